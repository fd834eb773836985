"""edgevit export on tiny digits bundles: parity, INT8, TensorRT-ready graphs, and clean failures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner

from edgevit.cli import main
from edgevit.data import split_arrays
from edgevit.errors import EdgeVitError
from edgevit.export import export_bundle, load_profile
from edgevit.export.checks import check_standard_ops, onnx_top1, run_onnx
from edgevit.export.fakequant import fake_quant
from edgevit.export.quantize import modelopt_available
from edgevit.vit import read_meta, save_bundle
from edgevit.vit.bundle import build_model

REPO = Path(__file__).resolve().parents[1]


def profile_file(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of a shipped profile with ``changes`` merged one level deep, written to ``tmp_path``."""
    data = yaml.safe_load((REPO / "export_profiles" / f"{name}.yaml").read_text())
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    path = tmp_path / f"{name}-test.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def fp32_export(cpu_fp32_export):
    return cpu_fp32_export


def test_cpu_fp32_export_passes_parity_on_real_images(fp32_export, digits_bundle):
    out, export = fp32_export
    parity = export["parity"]
    assert parity["passed"] and parity["images"] >= 64
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0 and parity["cosine"] > 0.99999
    assert export["deploy_onnx"] == "model.onnx" and export["schema_version"] == 1
    assert export["profile"]["name"] == "cpu-ort-fp32" and export["method"] == "baseline"
    assert export["input"]["shape"] == [-1, 1, 16, 16] and export["output"]["shape"] == [-1, 10]
    assert json.loads((out / "export.json").read_text()) == export
    for name, digest in export["hashes"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert (out / "bundle" / "bundle.json").read_text() == (Path(digits_bundle) / "bundle.json").read_text()
    # ORT fuses the standard graph when the session loads it (the ORT target's transformer fusions)
    assert any("SkipLayerNormalization" in op or "BiasGelu" in op or "Gelu" in op
               for op in export["graph"]["ort_session_fusions"])


def test_cpu_fp32_graph_has_ort_attention_one_layernorm_op_per_norm_and_dynamic_batch(fp32_export):
    out, export = fp32_export
    graph = onnx.load(str(out / "model.onnx"))
    # ORT targets get ORT's fused attention kernel (edgevit.export.ort_graph); every other op is standard
    assert export["graph"]["ort_rewrites"] == {"attention": 4}
    assert {f"{n.domain}::{n.op_type}" for n in graph.graph.node if n.domain} == {"com.microsoft::Attention"}
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("LayerNormalization") == export["graph"]["layer_norms"] == 2 * 4 + 1
    assert "ReduceMean" not in ops and export["graph"]["opset"] >= 17
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16), dtype=np.float32)
    assert run_onnx(out / "model.onnx", x, batch=3).shape == (3, 10)


def u8s8_without_vnni(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What x86 AVX2 without VNNI computes for uint8 activations (M x K) times int8 weights (K x N): vpmaddubsw adds
    adjacent products along K in int16 with saturation, vpmaddwd then sums those pairs in int32."""
    a, w = activations.astype(np.int64), weights.astype(np.int64)
    if a.shape[1] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2] + a[:, 1::2, None] * w[None, 1::2]
    return np.clip(pairs, -(2 ** 15), 2 ** 15 - 1).sum(1)


def int8_weights(path: Path) -> list[np.ndarray]:
    """The quantized weight matrices ONNX Runtime's u8s8 kernels read (MatMulInteger and QAttention)."""
    graph = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    return [inits[n.input[1]] for n in graph.graph.node if n.op_type in ("MatMulInteger", "QAttention")]


def test_cpu_int8_weights_compute_the_same_on_cpus_with_and_without_vnni(digits_bundle, tmp_path, fp32_export):
    """cpu-ort-int8 keeps its weights within +-64 (int7), so no u8 x s8 pair can saturate: emulating the AVX2
    arithmetic gives the exact integers for every possible activation, on whatever CPU this test runs. 8-bit
    weights do not: the same emulation loses the sums (the saturation that failed this test on AVX2 machines)."""
    export = export_bundle(digits_bundle, "cpu-ort-int8", tmp_path / "int8")
    q = export["int8"]
    assert export["deploy_onnx"] == "model.int8.onnx" and q["method"] == "onnxruntime-dynamic"
    assert q["weights"] == q["cpu"]["weights"] == "int7" and q["cpu"]["needs"] is None
    assert q["cpu"]["verified_on"]["u8s8"] in ("exact", "saturating")
    # every block's linear layer has int8 weights: qkv inside ORT's fused attention (QAttention), proj, fc1, fc2;
    # the classifier (the output layer, a Gemm) stays FP32 (the profile's ops leave Gemm out)
    graph = onnx.load(str(tmp_path / "int8" / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QAttention") == 4 and "Attention" not in ops and q["quantized_nodes"] == 4 * 4
    head = next(n for n in graph.node if n.name.startswith("/head/") and n.op_type == "MatMul")
    assert head.input[1] in {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    rng = np.random.default_rng(0)
    int7 = int8_weights(tmp_path / "int8" / "model.int8.onnx")
    assert len(int7) == q["quantized_nodes"] and max(int(np.abs(w).max()) for w in int7) <= 64
    for w in int7:
        for a in (np.full((2, w.shape[0]), 255), rng.integers(0, 256, (8, w.shape[0]))):
            assert np.array_equal(u8s8_without_vnni(a, w), a.astype(np.int64) @ w.astype(np.int64))
    full = profile_file(tmp_path, "cpu-ort-int8", int8={"weight_type": "int8", "max_top1_drop": 1.0})
    export_bundle(digits_bundle, full, tmp_path / "full")
    int8 = int8_weights(tmp_path / "full" / "model.int8.onnx")
    a = np.full((1, int8[0].shape[0]), 255)
    assert max(int(np.abs(w).max()) for w in int8) == 127
    assert not np.array_equal(u8s8_without_vnni(a, int8[0]), a.astype(np.int64) @ int8[0].astype(np.int64))
    # Accuracy is judged pairwise by the gate (edgevit.export.gate), not by a raw 1-point difference of two
    # top-1s on 179 images: the tiny bundle itself trains slightly differently on each CPU's float kernels, and a
    # 1-point bound there is a 2-image coin flip.
    assert q["gate"]["passed"] and q["gate"]["images"] >= q["val_images"]
    assert abs(q["delta"] - (q["int8_val_top1"] - q["fp32_val_top1"])) < 1e-12
    images, labels = split_arrays(read_meta(digits_bundle), "test")
    assert onnx_top1(fp32_export[0] / "model.onnx", images, labels, 64) > 0.5
    assert q["int8_test_top1"] == pytest.approx(onnx_top1(tmp_path / "int8" / "model.int8.onnx", images, labels, 64))


def test_jetson_int8_is_qdq_on_matmul_with_standard_ops_and_matching_trtexec(digits_bundle, tmp_path):
    path = profile_file(tmp_path, "jetson-orin-nano-int8", calibration={"set": "digits", "samples": 64,
                                                                       "method": "minmax"})
    export = export_bundle(digits_bundle, path, tmp_path / "orin")
    out = tmp_path / "orin"
    graph = onnx.load(str(out / "model.int8.onnx"))
    check_standard_ops(graph, "int8")
    consumers = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and set().union(*(consumers[n.output[0]] for n in dq)) <= {"MatMul", "Gemm"}
    assert {"LayerNormalization", "Softmax"} <= {n.op_type for n in graph.graph.node}
    q = export["int8"]
    assert q["samples"] == 64 and q["calibration"]["set"] == "digits" and q["delta"] >= -0.01
    # qkv, proj, fc1, fc2 per block + head; attention BMMs stay fp. ModelOpt (the profile's quantizer, installed by
    # the quant extra) keeps the graph's output layer, the head Gemm, in high precision; ORT's placer quantizes it.
    assert q["method"] == ("modelopt-int8" if modelopt_available() else "onnxruntime-static-qdq")
    assert q["quantized_nodes"] == 4 * 4 + (0 if modelopt_available() else 1)
    # The precision report reads the same graph: the quantized nodes run INT8 and everything else FP16 (the patch
    # embedding, the attention BMMs, LayerNorm, Softmax, GELU, the adds); input and output stay FP32 bindings.
    report = export["graph"]["precision"]
    assert report["onnx"] == "model.int8.onnx" and set(report["other"]) == {"FP16"}
    assert report["counts"] == {"INT8": q["quantized_nodes"], "FP16": 4 * 2 + 1 + (4 * 4 + 1 - q["quantized_nodes"])}
    assert [b["fused"] for b in report["attention"]] == ["FP16"] * 4  # head size 16, 17 tokens, attention in FP16
    assert report["line"].endswith("fused attention FP16 4/4")
    assert {i.type.tensor_type.elem_type for i in [*graph.graph.input, *graph.graph.output]} == {onnx.TensorProto.FLOAT}
    # The device graph's accuracy beside FP32's on val (gated) and test (recorded), computed as TensorRT's arithmetic:
    # the graph's fake-quant proxy, not ONNX Runtime's integer kernels (whose rounding differs between CPUs).
    assert q["graph"] == "model.int8.onnx" and q["val_images"] and q["test_images"]
    test_images, test_labels = split_arrays(read_meta(digits_bundle), "test")
    proxy = fake_quant(graph).SerializeToString()
    assert q["int8_test_top1"] == pytest.approx(onnx_top1(proxy, test_images, test_labels, 1))
    script = (out / "build_engine.sh").read_text()
    line = next(s for s in script.splitlines() if s.strip().startswith('"$TRTEXEC"'))
    t = load_profile(str(path)).tensorrt
    for flag in ("--onnx=model.int8.onnx", "--saveEngine=engine.plan", "--stronglyTyped",
                 f"--memPoolSize=workspace:{t.workspace_mb}M",
                 f"--builderOptimizationLevel={t.builder_optimization_level}",
                 f"--timingCacheFile={t.timing_cache}"):
        assert flag in line.split()
    assert "--fp16" not in line and "--int8" not in line and (out / "build_engine.sh").stat().st_mode & 0o100


def test_surgery_bundles_export_with_parity(tmp_path):
    """Prefix K/V (merged prompts), skipped attention, shallow prompt tokens and a top-k memory table all
    lower to standard ops."""
    from edgevit.data import data_ref, default_preprocessing
    from edgevit.vit import SURGERY, BundleMeta
    from edgevit.vit.bundle import BaseArch

    torch.manual_seed(0)
    surgery = [{"op": "skip_attention", "blocks": [1]}, {"op": "prefix_kv", "tokens": 3, "blocks": [0, 2]},
               {"op": "prompt_tokens", "tokens": 2}]
    if "memory_table" in SURGERY:
        surgery.append({"op": "memory_table", "block": 2, "slots": 8, "topk": 3})
    meta = BundleMeta(base=BaseArch(name="vit_tiny_patch16_224", kwargs={
        "img_size": 16, "in_chans": 1, "num_classes": 10, "patch_size": 4, "embed_dim": 48, "depth": 3,
        "num_heads": 3}), surgery=surgery, preprocessing=default_preprocessing(16, 1),
        classes=[str(i) for i in range(10)], data=data_ref("digits"), provenance={"method": "test"})
    model = build_model(meta)
    for block in (0, 2):
        attn = model.blocks[block].attn
        attn.set_prefix(torch.randn_like(attn.prefix_k), torch.randn_like(attn.prefix_v))
    model.norm_pre.prompts.data.normal_()
    for param in getattr(model.blocks[2].attn, "memory", torch.nn.Identity()).parameters():
        param.data.normal_()
    save_bundle(tmp_path / "bundle", model, meta)
    export = export_bundle(tmp_path / "bundle", "jetson-orin-nano-fp16", tmp_path / "out")
    assert export["parity"]["passed"] and export["parity"]["max_abs_diff"] <= 1e-4
    assert export["graph"]["layer_norms"] == 2 * 3 - 1 + 1  # block 1 lost norm1
    check_standard_ops(onnx.load(str(tmp_path / "out" / "model.fp16.onnx")), "fp16")
    check_standard_ops(onnx.load(str(tmp_path / "out" / "model.onnx")), "fp32")  # no ORT rewrites for TensorRT
    assert "ort_rewrites" not in export["graph"]
    # Every compute node of the strongly typed fp16 graph, surgery ops included, runs in FP16.
    report = export["graph"]["precision"]
    assert set(report["counts"]) == set(report["other"]) == {"FP16"} and export["fp16"]["delta"] >= -0.01
    # The INT8 graph keeps every LayerNorm one op (a decomposed LayerNorm overflows in FP16) and no FP32 compute.
    export = export_bundle(tmp_path / "bundle", profile_file(tmp_path, "jetson-orin-nano-int8", calibration={
        "set": "digits", "samples": 32, "method": "minmax"}, int8={"max_top1_drop": 1.0}), tmp_path / "int8")
    graph = onnx.load(str(tmp_path / "int8" / "model.int8.onnx"))
    assert not {"ReduceMean", "Pow", "Sqrt"} & {n.op_type for n in graph.graph.node}
    assert [n.op_type for n in graph.graph.node].count("LayerNormalization") == 2 * 3 - 1 + 1
    assert "FP32" not in export["graph"]["precision"]["counts"] and "FP32" not in export["graph"]["precision"]["other"]


def test_int8_attention_follows_tensorrts_fused_mha_rule(digits_bundle, tmp_path):
    """With quantize_attention_matmuls, Q, K, the softmax output and V are quantized and the second BMM's output
    reaches the output projection's Q/DQ: every block is INT8 fused-attention eligible (head size 16, 17 tokens)."""
    path = profile_file(tmp_path, "jetson-orin-nano-int8", calibration={"set": "digits", "samples": 32,
                                                                       "method": "minmax"},
                        int8={"quantize_attention_matmuls": True, "max_top1_drop": 1.0})
    report = export_bundle(digits_bundle, path, tmp_path / "out")["graph"]["precision"]
    assert [(b["fused"], b["head_size"], b["seq_len"]) for b in report["attention"]] == [("INT8", 16, 17)] * 4
    assert report["counts"]["INT8"] >= 4 * 4 + 4 * 2 and "fused attention INT8 4/4" in report["line"]


def test_int8_graph_left_in_fp32_fails_the_export(digits_bundle, tmp_path, monkeypatch):
    """The precision gate: an INT8 TensorRT graph whose compute outside Q/DQ stayed FP32 is refused."""
    from edgevit.export import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "to_fp16", lambda src, dst, keep: None)  # the placer's FP16 pass "forgotten"
    path = profile_file(tmp_path, "jetson-orin-nano-int8", calibration={"set": "digits", "samples": 32,
                                                                       "method": "minmax"},
                        int8={"quantizer": "static"})
    line = _cli_fails(["export", str(digits_bundle), "--profile", str(path), "-o", str(tmp_path / "o")],
                      tmp_path / "o", "model.int8.onnx for jetson-orin-nano-int8 is not int8")
    assert "MatMul/Gemm/Conv left in FP32" in line


@pytest.mark.skipif(not modelopt_available(), reason="needs nvidia-modelopt (the quant extra)")
def test_ort_static_quantization_still_works_after_modelopt(digits_bundle, tmp_path):
    """ModelOpt patches ONNX Runtime's calibrators in place; edgevit puts them back, so an ORT-placed export in
    the same process (the fallback, cpu-ort-int8, a sweep) still calibrates every tensor it needs."""
    from edgevit.export import onnx as onnx_export
    from edgevit.export.quantize import calibration_images, quantize_modelopt, quantize_static
    from edgevit.vit import load_bundle

    profile = load_profile("jetson-orin-nano-int8")
    model, meta = load_bundle(digits_bundle)
    images, _ = calibration_images(profile.calibration.model_copy(update={"samples": 16}), meta)
    src = tmp_path / "model.onnx"  # the standard-op graph TensorRT targets export
    onnx_export.export_onnx(model, src, torch.from_numpy(images[:1]), profile.batch_spec, profile.opset)
    quantize_modelopt(src, tmp_path / "modelopt.onnx", images, profile.int8, "minmax")
    info = quantize_static(src, tmp_path / "ort.onnx", images, profile.int8, "minmax", True, 1)
    assert info["quantized_nodes"] == 4 * 4 + 1


def _cli_fails(args: list[str], out: Path, match: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], result.output
    assert not out.exists() and leftovers(out.parent) == []
    return lines[0]


def test_typo_profile_exits_2_without_output(digits_bundle, tmp_path):
    path = profile_file(tmp_path, "cpu-ort-fp32", parity={"max_abs_dif": 1.0})
    (tmp_path / "o").mkdir()
    _cli_fails(["export", str(digits_bundle), "--profile", str(path), "-o", str(tmp_path / "o" / "x")],
               tmp_path / "o" / "x", "did you mean 'max_abs_diff'")


def test_missing_calibration_set_exits_2_without_output(digits_bundle, tmp_path):
    path = profile_file(tmp_path, "jetson-orin-nano-int8", calibration={"set": "line7"})
    (tmp_path / "o").mkdir()
    _cli_fails(["export", str(digits_bundle), "--profile", str(path), "-o", str(tmp_path / "o" / "x")],
               tmp_path / "o" / "x", "no calibration set named 'line7'")


def test_parity_allows_fp32_rounding_of_large_logits_but_not_more(monkeypatch):
    """|onnx - torch| <= max_abs_diff + rtol * |torch| element-wise: a logit of 200 may differ by its own fp32
    rounding (a DATA exact form's logits are of that size), a small logit may not."""
    from edgevit.export import checks
    from edgevit.export.profiles import Parity

    ref = np.array([[200.0, -150.0, 0.5]], np.float32)
    monkeypatch.setattr(checks, "run_torch", lambda model, images: ref)
    for delta, rtol, passed in (([1.5e-4, 0, 0], 1e-5, True), ([1.5e-4, 0, 0], 0.0, False),
                                ([0, 0, 1.5e-4], 1e-5, False), ([0, 2e-3, 0], 1e-5, False)):
        monkeypatch.setattr(checks, "run_onnx", lambda path, images, batch, d=delta: ref + np.float32(d))
        result = checks.parity(None, Path("m.onnx"), ref, Parity(rtol=rtol), 1)
        assert result["passed"] is passed, (delta, rtol, result)
        assert result["max_abs_diff"] == pytest.approx(max(delta), rel=0.05)  # 200 + 1.5e-4 in fp32


def test_failing_parity_exits_2_with_the_numbers_and_no_output(digits_bundle, tmp_path):
    path = profile_file(tmp_path, "cpu-ort-fp32", parity={"max_abs_diff": 1e-12, "rtol": 0})
    (tmp_path / "o").mkdir()
    line = _cli_fails(["export", str(digits_bundle), "--profile", str(path), "-o", str(tmp_path / "o" / "x")],
                      tmp_path / "o" / "x", "parity check failed on 64 val images: max abs diff")
    assert "tolerance 1e-12" in line


def test_too_few_calibration_images_is_a_clear_error(digits_bundle, tmp_path, monkeypatch):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "cal" / "images", per_class=3, corrupt=False)
    (tmp_path / "cal" / "few.yaml").write_text(yaml.safe_dump({"name": "few", "source": "images", "samples": 50}))
    monkeypatch.setenv("EDGEVIT_CALIBRATION", str(tmp_path / "cal"))
    path = profile_file(tmp_path, "jetson-orin-nano-int8", calibration={"set": "few", "samples": None})
    with pytest.raises(EdgeVitError, match="calibration set 'few' has 9 images but 50 are needed"):
        export_bundle(digits_bundle, path, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_existing_output_is_refused(fp32_export, digits_bundle):
    with pytest.raises(EdgeVitError, match="already exists"):
        export_bundle(digits_bundle, "cpu-ort-fp32", fp32_export[0])


def test_build_without_tensorrt_points_to_build_engine_sh(fp32_export):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed: this test covers machines without it")
    except ImportError:
        pass
    result = CliRunner().invoke(main, ["build", str(fp32_export[0])])
    assert result.exit_code == 2 and "build_engine.sh" in result.output
    assert "tensorrt is not importable" in result.output
