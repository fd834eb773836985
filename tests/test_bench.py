"""edgevit profile / profile-device: backends, timing, accuracy through the backend, FLOPs, device parsers.

Export directories are built by hand here (``make_export_dir``) following the export contract, so these
tests do not depend on ``edgevit export``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgevit.bench.accuracy import backend_top1
from edgevit.bench.backends import onnx_precision, open_artifact, open_backend
from edgevit.bench.device import parse_tegrastats, parse_trtexec_times, profile_device
from edgevit.bench.flops import count_flops, count_params
from edgevit.bench.latency import TimingConfig, rotation_inputs, summarize, time_loop, time_onnx, time_torch
from edgevit.bench.profile import ProfileConfig, default_label, profile_artifacts
from edgevit.bench.schema import read_rows
from edgevit.cli import main
from edgevit.data import split_arrays
from edgevit.errors import EdgeVitError
from edgevit.vit import load_bundle
from edgevit.vit.bundle import META, WEIGHTS

FAST = TimingConfig(warmup=1, iterations=5)


def make_export_dir(bundle: Path, out: Path, method: str | None = None, settings: dict | None = None,
                    dynamic: bool = True, profile: str = "cpu-fp32") -> Path:
    """OUT/ with bundle/ (copy), model.onnx (torch.onnx.export, fp32) and export.json (contract keys)."""
    model, meta = load_bundle(bundle)
    out.mkdir(parents=True)
    (out / "bundle").mkdir()
    for name in (META, WEIGHTS):
        shutil.copy2(Path(bundle) / name, out / "bundle" / name)
    pre = meta.preprocessing
    torch.onnx.export(model, (torch.zeros(1, pre.channels, pre.size, pre.size),), str(out / "model.onnx"),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None)
    batch = "batch" if dynamic else 1
    export = {
        "schema_version": 1,
        "profile": {"name": profile, "target": "cpu", "runtime": "onnxruntime", "precision": "fp32",
                    "batch": [1, 8] if dynamic else [1]},
        "deploy_onnx": "model.onnx",
        "input": {"name": "input", "shape": [batch, pre.channels, pre.size, pre.size], "dtype": "float32"},
        "output": {"name": "logits", "shape": [batch, len(meta.classes)]},
        "parity": {"images": 0, "max_abs_diff": 0.0, "cosine": 1.0, "top1_agreement": 1.0, "tolerances": {},
                   "passed": True},
        "hashes": {"model.onnx": hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()},
        "versions": {"torch": torch.__version__},
        "method": method or meta.provenance.get("method", "baseline"),
        "settings": settings if settings is not None else meta.provenance.get("config", {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "export.json").write_text(json.dumps(export, indent=2))
    return out


@pytest.fixture(scope="module")
def export_dir(digits_bundle, tmp_path_factory):
    return make_export_dir(digits_bundle, tmp_path_factory.mktemp("exports") / "base" / "cpu-fp32")


def test_summarize_percentiles_and_mean():
    lat = summarize([float(i) for i in range(1, 101)])  # 1..100 ms
    assert lat.iterations == 100
    assert lat.p50 == pytest.approx(50.5)
    assert lat.p90 == pytest.approx(90.1)
    assert lat.p99 == pytest.approx(99.01)
    assert lat.mean == pytest.approx(50.5)


def test_time_loop_counts_and_budget():
    calls = []
    lat = time_loop(calls.append, TimingConfig(warmup=3, iterations=7))
    assert lat.iterations == 7 and len(calls) == 10
    assert calls == list(range(3)) + list(range(7))  # rotation index restarts after warm-up
    # A time budget still runs at least MIN_ITERATIONS and stops soon after the budget.
    t0 = time.perf_counter()
    lat = time_loop(lambda i: time.sleep(0.002), TimingConfig(warmup=0, seconds=0.1))
    assert 20 <= lat.iterations <= 60
    assert time.perf_counter() - t0 < 1.0
    assert lat.p50 >= 2.0


def test_interleaved_p50_times_every_graph(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgevit.bench.latency import interleaved_p50_ms

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    paths = {}
    for op in ("Relu", "Sigmoid"):
        graph = helper.make_graph([helper.make_node(op, ["input"], ["y"])], op, [x], [y])
        paths[op] = tmp_path / f"{op}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths[op])
    p50 = interleaved_p50_ms(paths, np.ones((1, 64), np.float32), threads=1, rounds=2, iters=5)
    assert set(p50) == {"Relu", "Sigmoid"} and all(0 < ms < 100 for ms in p50.values())


def test_rotation_inputs_are_fixed_and_distinct():
    a, b = rotation_inputs((2, 1, 8, 8)), rotation_inputs((2, 1, 8, 8))
    assert len(a) == 4 and all(x.dtype == np.float32 and x.shape == (2, 1, 8, 8) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[1])


def test_time_onnx_and_time_torch_side_by_side(export_dir):
    model = load_bundle(export_dir / "bundle")[0]
    inputs = rotation_inputs((2, 1, 16, 16))
    threads = torch.get_num_threads()
    ort_lat = time_onnx(export_dir / "model.onnx", inputs, threads=1, cfg=FAST,
                        config={"session.intra_op.allow_spinning": "0"})
    torch_lat = time_torch(model, inputs, threads=1, cfg=FAST)
    assert ort_lat.iterations == torch_lat.iterations == 5
    assert 0 < ort_lat.p50 < 1e3 and 0 < torch_lat.p50 < 1e3
    assert torch.get_num_threads() == threads  # time_torch restores the thread count


def test_flops_match_the_analytic_count(digits_bundle):
    model, meta = load_bundle(digits_bundle)
    d, n, patches, classes = 48, 17, 16, 10  # TINY_ARCH at 16 px, patch 4: 16 patches + class token
    patch_embed = 2 * patches * (1 * 4 * 4) * d
    per_block = 2 * n * 12 * d * d + 4 * n * n * d  # qkv+proj+mlp linears, then QK^T and AV
    expected = patch_embed + 4 * per_block + 2 * d * classes
    assert count_flops(model, (1, 1, 16, 16)) == expected
    assert count_params(model) == sum(p.numel() for p in model.state_dict().values() if p.dtype.is_floating_point)


def test_profile_rows_ort_and_torch(export_dir, digits_bundle):
    meta = load_bundle(digits_bundle)[1]
    rows = []
    for backend in ("ort", "torch"):
        rows += profile_artifacts([export_dir], ProfileConfig(backend, (1, 4), threads=1, timing=FAST,
                                                             device="cpu"), show_progress=False)
    assert [(r.backend, r.batch) for r in rows] == [("ort", 1), ("ort", 4), ("torch", 1), ("torch", 4)]
    for r in rows:
        lat = r.latency_ms
        assert lat.iterations == 5 and 0 < lat.p50 <= lat.p90 <= lat.p99
        assert r.throughput_ips == pytest.approx(r.batch * 1e3 / lat.mean, rel=1e-3)
        assert r.precision == "fp32" and r.threads == 1 and r.top1_split == "test"
        assert r.method == "baseline" and r.settings["epochs"] == 12
        assert r.label == "base"  # the export dir is named after its profile: the run's name is used
        assert r.params == count_params(load_bundle(digits_bundle)[0])
        assert r.gflops == pytest.approx(4_007_616 / 1e9, abs=1e-4)
        assert r.artifact_mb > 0 and r.peak_memory_mb is not None
        assert r.machine["cpu"] and r.machine["threads"] == 1 and r.machine["device"] == r.machine["cpu"]
        # Accuracy through the backend equals torch's test top-1 recorded at training (ORT: within 1 image).
        assert r.top1 == pytest.approx(meta.metrics["test_top1"], abs=1 / 360 + 1e-6)
    torch_rows = [r for r in rows if r.backend == "torch"]
    assert all(r.top1 == pytest.approx(meta.metrics["test_top1"], abs=1e-5) for r in torch_rows)
    assert rows[0].artifact_mb == pytest.approx((export_dir / "model.onnx").stat().st_size / 1e6, abs=1e-3)


def test_top1_pads_the_last_batch(export_dir):
    artifact = open_artifact(export_dir)
    images, labels = split_arrays(artifact.meta, "test")
    backend = open_backend(artifact, "ort", threads=1)
    assert len(images) % 7 != 0
    assert backend_top1(backend, images, labels, 7) == pytest.approx(backend_top1(backend, images, labels, 1))


def test_onnx_precision_reads_the_graph(export_dir, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert onnx_precision(export_dir / "model.onnx") == "fp32"
    quantize_dynamic(str(export_dir / "model.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    assert onnx_precision(tmp_path / "q.onnx") == "int8"


def test_fixed_batch_graph_refuses_other_batches(digits_bundle, tmp_path):
    out = make_export_dir(digits_bundle, tmp_path / "static", dynamic=False)
    with pytest.raises(EdgeVitError, match="fixed batch of 1"):
        profile_artifacts([out], ProfileConfig("ort", (4,), threads=1, timing=FAST), show_progress=False)


def test_default_label_uses_the_run_name_for_profile_dirs(export_dir, digits_bundle, tmp_path):
    assert default_label(open_artifact(export_dir)) == "base"
    assert default_label(open_artifact(digits_bundle)) == Path(digits_bundle).name
    renamed = tmp_path / "skip-third"
    shutil.copytree(export_dir, renamed)
    assert default_label(open_artifact(renamed)) == "skip-third"


def test_engine_for_another_gpu_is_refused(export_dir, tmp_path, monkeypatch):
    """No GPU here: TensorRT and the GPU are stood in for; the refusal path is edgevit's own."""
    import edgevit.export.tensorrt as export_trt

    fake_trt = SimpleNamespace(__version__="10.3.0")
    monkeypatch.setattr(export_trt, "import_tensorrt", lambda: fake_trt)  # the one import the trt backend uses
    monkeypatch.setattr(export_trt, "gpu_info", lambda: {"gpu_name": "NVIDIA H100", "compute_capability": "9.0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = shutil.copytree(export_dir, tmp_path / "orin-fp16")
    (out / "engine.plan").write_bytes(b"plan")
    (out / "engine.json").write_text(json.dumps({"trt_version": "10.3.0", "gpu_name": "Orin",
                                                 "compute_capability": "8.7", "onnx": "model.onnx"}))
    result = CliRunner().invoke(main, ["profile", str(out), "--backend", "trt", "-o", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "built for Orin (compute capability 8.7)" in lines[0] and "H100" in lines[0]


def test_cli_profile_appends_rows(export_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    args = ["profile", str(export_dir), "--backend", "ort", "--batch", "1,2", "--threads", "1", "--warmup", "1",
            "--iterations", "4", "--no-accuracy", "-o", str(results), "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert [r["batch"] for r in json.loads(first.stdout)["rows"]] == [1, 2]
    assert CliRunner().invoke(main, args).exit_code == 0
    rows = read_rows(results)
    assert len(rows) == 4 and all(r.top1 is None and r.latency_ms.iterations == 4 for r in rows)


@pytest.mark.parametrize("case", ["missing", "backend", "bundle-ort", "no-engine", "not-installed"])
def test_cli_bad_input_is_one_line_exit_2(case, export_dir, digits_bundle, tmp_path):
    target, backend = {"missing": (tmp_path / "nope", "ort"), "backend": (export_dir, "onnx"),
                       "bundle-ort": (digits_bundle, "ort"), "no-engine": (export_dir, "trt"),
                       "not-installed": (tmp_path / "with-engine", "trt")}[case]
    if case == "not-installed":
        pytest.importorskip("edgevit")  # keeps the parametrisation uniform
        try:
            import tensorrt  # noqa: F401

            pytest.skip("TensorRT is installed here")
        except ImportError:
            shutil.copytree(export_dir, target)
            (target / "engine.plan").write_bytes(b"not an engine")
    result = CliRunner().invoke(main, ["profile", str(target), "--backend", backend, "-o", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    expected = {"missing": "does not exist", "backend": "unknown backend", "bundle-ort": "not an export directory",
                "no-engine": "no engine.plan", "not-installed": "TensorRT"}[case]
    assert expected in lines[0]
    assert not (tmp_path / "r.jsonl").exists()


# --- device rows ------------------------------------------------------------------------------------------------

def _trtexec_times(path: Path, latencies: list[float], gap: float = 0.0) -> Path:
    entries, t = [], 0.0
    for ms in latencies:
        entries.append({"startEnqMs": t, "endEnqMs": t + 0.05, "startH2dMs": t, "endH2dMs": t + 0.1,
                        "startComputeMs": t + 0.1, "endComputeMs": t + ms - 0.1, "startD2hMs": t + ms - 0.1,
                        "endD2hMs": t + ms, "h2dMs": 0.1, "computeMs": ms - 0.2, "d2hMs": 0.1, "latencyMs": ms,
                        "endToEndMs": ms})
        t += ms + gap
    path.write_text(json.dumps(entries, indent=1))
    return path


ORIN = ("11-23-2026 06:15:54 RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,8%@1510] "
        "EMC_FREQ 0% GR3D_FREQ 99% cpu@48.5C gpu@50.1C VDD_IN {vin}mW/5000mW VDD_CPU_GPU_CV 1500mW/1500mW "
        "VDD_SOC 1400mW/1400mW")
NANO = ("RAM 1800/3964MB (lfb 4x4MB) CPU [20%@1479,off,off,off] GR3D_FREQ 76%@921 PLL@30C CPU@33C "
        "POM_5V_IN {vin}/3000 POM_5V_GPU 1000/1000 POM_5V_CPU 500/500")


def test_trtexec_times_percentiles_and_throughput(tmp_path):
    lat = [1.0 + 0.01 * i for i in range(100)]  # 1.00 .. 1.99 ms, back to back
    times = parse_trtexec_times(_trtexec_times(tmp_path / "t.json", lat))
    assert times.latency.iterations == 100
    assert times.latency.p50 == pytest.approx(np.percentile(lat, 50))
    assert times.latency.p99 == pytest.approx(np.percentile(lat, 99))
    assert times.batches_per_s == pytest.approx(100 / (sum(lat) / 1e3), rel=1e-6)
    compute = parse_trtexec_times(tmp_path / "t.json", metric="computeMs")
    assert compute.latency.p50 == pytest.approx(np.percentile(lat, 50) - 0.2)


@pytest.mark.parametrize("template,rail", [(ORIN, "VDD_IN"), (NANO, "POM_5V_IN")])
def test_tegrastats_average_board_power(tmp_path, template, rail):
    log = tmp_path / "power.log"
    log.write_text("\n".join(template.format(vin=v) for v in (4000, 5000, 6000)) + "\n")
    assert parse_tegrastats(log) == pytest.approx(5.0)
    other, watts = ("VDD_CPU_GPU_CV", 1.5) if rail == "VDD_IN" else ("POM_5V_GPU", 1.0)
    assert parse_tegrastats(log, rail=other) == pytest.approx(watts)
    (tmp_path / "empty.log").write_text("nothing here\n")
    with pytest.raises(EdgeVitError, match="no power rail"):
        parse_tegrastats(tmp_path / "empty.log")


def test_profile_device_row_energy_and_cli(export_dir, tmp_path):
    times = _trtexec_times(tmp_path / "times.json", [2.0] * 50)  # 2 ms per batch of 4 -> 2000 img/s
    log = tmp_path / "power.log"
    log.write_text("\n".join(ORIN.format(vin=v) for v in (7000, 9000)))
    row = profile_device(times, export_dir, log, batch=4, machine="Jetson Orin Nano")
    assert row.backend == "trtexec" and row.method == "baseline" and row.label == "base"
    assert row.throughput_ips == pytest.approx(2000, rel=1e-6) and row.power_w == pytest.approx(8.0)
    assert row.energy_mj_per_image == pytest.approx(8.0 / 2000 * 1e3)  # 4 mJ per image
    assert row.gflops == pytest.approx(4_007_616 / 1e9, abs=1e-4) and row.machine["device"] == "Jetson Orin Nano"

    results = tmp_path / "results.jsonl"
    ok = CliRunner().invoke(main, ["profile-device", "--trtexec-times", str(times), "--tegrastats", str(log),
                                   "--artifact", str(export_dir), "--batch", "4", "-o", str(results)])
    assert ok.exit_code == 0, ok.output
    assert read_rows(results)[0].energy_mj_per_image == pytest.approx(4.0)
    bad = CliRunner().invoke(main, ["profile-device", "--trtexec-times", str(tmp_path / "none.json"),
                                    "-o", str(results)])
    assert bad.exit_code == 2 and "does not exist" in bad.stderr


@pytest.mark.gpu
def test_trt_backend_on_a_gpu(export_dir):
    pytest.importorskip("tensorrt", reason="needs TensorRT")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not (export_dir / "engine.plan").exists():
        pytest.skip("needs an engine built by `edgevit build` (export stage)")
    rows = profile_artifacts([export_dir], ProfileConfig("trt", (1,), threads=1, timing=FAST), show_progress=False)
    assert rows[0].top1 is not None and rows[0].latency_ms.p50 > 0
