"""Jetson Thor and FP8: profiles that export on the CPU like INT8 (Q/DQ placed, FP16 elsewhere, the fake-quant
proxy and the paired gate), refused where the target cannot run them."""

from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from edgevit import doctor
from edgevit.cli import main
from edgevit.export import export_bundle
from edgevit.export.precision import quantized_nodes


@pytest.fixture(scope="module")
def thor_fp8(digits_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("thor") / "fp8"
    return out, export_bundle(digits_bundle, "jetson-thor-fp8", out)


def test_fp8_graph_is_fp8_in_its_qdq_fp16_elsewhere_and_judged_by_the_proxy(thor_fp8):
    out, export = thor_fp8
    graph = onnx.load(str(out / "model.fp8.onnx"))
    assert export["deploy_onnx"] == "model.fp8.onnx" and export["fp8"]["method"] in ("modelopt-fp8",
                                                                                     "onnxruntime-static-qdq")
    zero_points = {i.name: i.data_type for i in graph.graph.initializer}
    dq_types = {zero_points.get(n.input[2]) for n in graph.graph.node
                if n.op_type == "DequantizeLinear" and len(n.input) > 2}
    assert dq_types == {onnx.TensorProto.FLOAT8E4M3FN}  # E4M3 everywhere, no int8 left
    # qkv, proj, fc1, fc2 of every block are FP8; nothing computes in FP32 between the FP32 bindings
    report = export["graph"]["precision"]
    assert report["counts"].get("FP32", 0) == 0 and report["counts"]["FP8"] == len(quantized_nodes(graph.graph)) >= 16
    assert report["line"].startswith("FP8 9") and set(report["other"]) == {"FP16"}
    assert [b["fused"] for b in report["attention"]] == ["FP16"] * 4  # attention stays FP16, as for INT8
    q = export["fp8"]
    assert "fake quantization" in q["arithmetic"] and q["gate"]["passed"]
    assert q["gate"]["images"] >= 300 and {"fp32_val_top1", "fp8_val_top1", "fp32_test_top1", "fp8_test_top1"} <= set(q)


def test_fp8_export_writes_triton_deepstream_and_a_strongly_typed_build_script(thor_fp8):
    out, export = thor_fp8
    config = text_format.Parse((out / "triton" / export["targets"]["triton"]["model"] / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.platform == "tensorrt_plan" and config.instance_group[0].kind == gpu
    infer = (out / "deepstream" / "config_infer.txt").read_text()
    assert "onnx-file=../model.fp8.onnx" in infer and "FP8: build model-engine-file with edgevit build" in infer
    script = (out / "build_engine.sh").read_text()
    lines = [line for line in script.splitlines() if line.strip().startswith('"$TRTEXEC"')]
    assert lines and all("--stronglyTyped" in line and "--fp16" not in line and "--int8" not in line for line in lines)
    assert (out / "device" / "build_engine.py").is_file()


@pytest.mark.parametrize(("profile", "edit", "message"), [
    ("jetson-thor-int8", {"tensorrt": {"dla_core": 0}}, "dla_core is only available on Jetson Orin NX and AGX Orin"),
    ("jetson-orin-nano-int8", {"precision": "fp8"}, "precision fp8 needs FP8 tensor cores"),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(profile, edit, message, digits_bundle, tmp_path):
    import yaml

    from edgevit.export.profiles import find_yaml

    data = yaml.safe_load(find_yaml(profile, "export_profiles", "EDGEVIT_PROFILES", "profile").read_text())
    for key, value in edit.items():
        data[key] = data[key] | value if isinstance(value, dict) else value
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["export", str(digits_bundle), "--profile", str(tmp_path / "p.yaml"),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_doctor_names_thor_and_its_jetpack(tmp_path, monkeypatch):
    release, model = tmp_path / "nv_tegra_release", tmp_path / "model"
    release.write_text("# R38 (release), REVISION: 2.1, GCID: 41322426, BOARD: generic, EABI: aarch64\n")
    model.write_text("NVIDIA Jetson AGX Thor Developer Kit\x00")
    monkeypatch.setattr(doctor, "TEGRA_RELEASE", release)
    monkeypatch.setattr(doctor, "DEVICE_MODEL", model)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = doctor.jetson()
    assert found["jetpack"] == "7.0" and found["model"] == "NVIDIA Jetson AGX Thor Developer Kit"
    for l4t, jetpack in (("R38 (release), REVISION: 4.0", "7.1"), ("R39 (release), REVISION: 2.1", "7.2.1")):
        release.write_text(f"# {l4t}, GCID: 1\n")
        assert doctor.jetson()["jetpack"] == jetpack
    # on that Thor with JetPack 7.2.1's TensorRT: Thor profiles build, Orin and desktop ones do not, and say why
    from edgevit.export import tensorrt

    found = doctor.components()
    found["tensorrt"] = {"installed": True, "version": "10.16.2"}
    monkeypatch.setattr(doctor, "components", lambda: found)
    monkeypatch.setattr(tensorrt, "gpu_info", lambda: {"gpu_name": "NVIDIA Thor", "compute_capability": "11.0"})
    rows = {r["name"]: r for r in doctor.diagnose()["profiles"]}
    assert all(rows[f"jetson-thor-{p}"]["build"] for p in ("fp16", "int8", "fp8"))
    orin = rows["jetson-orin-nano-int8"]["build_note"]
    assert "is for Jetson Orin Nano (Ampere GPU) (compute capability 8.7)" in orin
    assert "built on a desktop GPU, not on this Jetson" in rows["desktop-gpu-fp8"]["build_note"]
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 1\n")  # JetPack 6.2: too old for Thor profiles
    rows = {r["name"]: r for r in doctor.diagnose()["profiles"]}
    assert rows["jetson-thor-fp8"]["build_note"] == "jetson-thor-fp8 needs JetPack 7.0+; this Jetson has 6.2"


def test_fp8_gate_reads_the_fp8_tolerance(digits_bundle, tmp_path, monkeypatch):
    """A quantized graph is judged by its own section's max_top1_drop (fp8:), not the FP16 one (tensorrt:)."""
    import yaml

    from edgevit.export import gate
    from edgevit.export.profiles import find_yaml

    data = yaml.safe_load(find_yaml("jetson-thor-fp8", "export_profiles", "EDGEVIT_PROFILES", "profile").read_text())
    data["fp8"] = {**data.get("fp8", {}), "max_top1_drop": 0.5}
    data["tensorrt"] = {**data.get("tensorrt", {}), "max_top1_drop": 0.01}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    tolerances, paired_gate = [], gate.paired_gate
    monkeypatch.setattr(gate, "paired_gate", lambda a, b, tol: tolerances.append(tol) or paired_gate(a, b, tol))
    export_bundle(digits_bundle, tmp_path / "p.yaml", tmp_path / "out")
    assert tolerances == [0.5]
