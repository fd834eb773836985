"""Export profiles: schema, typo messages, lookup, and the trtexec lines they produce (no export needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgevit.cli import main
from edgevit.errors import EdgeVitError
from edgevit.export.profiles import list_profiles, load_profile, parse_profile
from edgevit.export.tensorrt import build_plan, supported_majors
from edgevit.export.trtexec import build_script, trtexec_args

SHIPPED = {"cpu-ort-fp32", "cpu-ort-int8", "jetson-orin-nano-fp16", "jetson-orin-nano-int8",
           "jetson-agx-orin-int8-dla", "desktop-gpu-fp16", "desktop-gpu-int8", "jetson-thor-fp16", "jetson-thor-int8",
           "jetson-thor-fp8", "desktop-gpu-fp8"}
REPO_PROFILES = Path(__file__).resolve().parents[1] / "export_profiles"


def raw(name: str) -> dict:
    return yaml.safe_load((REPO_PROFILES / f"{name}.yaml").read_text())


def test_shipped_profiles_validate_and_are_named_like_their_files():
    found = {p.name: path for p, path in list_profiles()}
    assert set(found) >= SHIPPED
    for name in SHIPPED:
        assert Path(found[name]).stem == name
        profile = load_profile(name)
        assert profile.opset >= 17
        assert (profile.runtime == "onnxruntime") == (profile.target == "cpu")


@pytest.mark.parametrize(("edit", "key", "suggestion"), [
    (lambda r: r.update(batc=1), "batc", "batch"),
    (lambda r: r["tensorrt"].update(workspace=512), "tensorrt.workspace", "workspace_mb"),
    (lambda r: r["calibration"].update(sampels=10), "calibration.sampels", "samples"),
    (lambda r: r.update(batch={"min": 1, "opt": 1, "maxx": 4}), "batch.maxx", "max"),
    (lambda r: r.update(precison=r.pop("precision")), "precison", "precision"),  # a required key
])
def test_misspelt_key_names_the_key_and_the_closest_valid_one(edit, key, suggestion):
    data = raw("jetson-orin-nano-int8")
    edit(data)
    with pytest.raises(EdgeVitError) as err:
        parse_profile(data, "p.yaml")
    assert f"unknown key {key!r}" in str(err.value)
    assert f"did you mean {suggestion!r}" in str(err.value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("precision", "fp8", "precision"),
    ("opset", 13, "opset >= 17"),
    ("batch", {"min": 4, "opt": 2, "max": 8}, "min <= opt <= max"),
])
def test_invalid_values_are_one_line(field, value, message):
    data = raw("jetson-orin-nano-int8")
    data[field] = value
    with pytest.raises(EdgeVitError, match=message) as err:
        parse_profile(data, "p.yaml")
    assert "\n" not in str(err.value)


def test_inconsistent_profiles_are_refused():
    data = raw("cpu-ort-fp32")
    data["precision"] = "fp16"
    with pytest.raises(EdgeVitError, match="fp16 is a tensorrt precision"):
        parse_profile(data)
    data = raw("desktop-gpu-int8")
    data["tensorrt"]["dla_core"] = 0
    with pytest.raises(EdgeVitError, match="dla_core is only available on Jetson"):
        parse_profile(data)


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("jetson-thor-int8", lambda r: r["tensorrt"].update(dla_core=0),
     "dla_core is only available on Jetson Orin NX and AGX Orin (jetson-thor: Jetson AGX Thor / T5000"),
    ("jetson-orin-nano-int8", lambda r: r.update(precision="fp8"),
     "precision fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell, Jetson Thor); "
     "jetson-orin-nano is 8.7"),
    ("desktop-gpu-fp8", lambda r: r["tensorrt"].update(compute_capability="8.6"), "desktop-gpu is 8.6"),
    ("desktop-gpu-fp8", lambda r: r["tensorrt"].pop("compute_capability"),
     "set tensorrt.compute_capability to the GPU's"),
    ("jetson-thor-fp8", lambda r: r["tensorrt"].update(compute_capability="8.7"), "is not jetson-thor's GPU (11.0)"),
    ("jetson-thor-fp8", lambda r: r.update(runtime="onnxruntime"), "fp8 is not an onnxruntime precision"),
    ("jetson-thor-fp8", lambda r: r.update(target="jetson-tor"), "unknown target 'jetson-tor'; did you mean "
                                                                 "'jetson-thor'?"),
])
def test_a_profile_asking_its_target_for_what_it_lacks_is_refused(name, edit, message):
    data = raw(name)
    edit(data)
    with pytest.raises(EdgeVitError, match=re.escape(message)) as err:
        parse_profile(data, "p.yaml")
    assert "\n" not in str(err.value)


def test_thor_and_fp8_profiles_state_their_device_software():
    for name in ("jetson-thor-fp16", "jetson-thor-int8", "jetson-thor-fp8"):
        profile = load_profile(name)
        trt = profile.tensorrt
        assert (profile.target, trt.jetpack_min, trt.cuda_min, trt.version_min, trt.version_max) == (
            "jetson-thor", "7.0", "13.0", "10.13", "12")
        assert trt.strongly_typed and trt.dla_core is None
    assert load_profile("desktop-gpu-fp8").tensorrt.compute_capability == "8.9"
    assert load_profile("jetson-thor-fp8").quant.quantizer == "modelopt"


def test_profiles_are_found_by_path_env_and_name(tmp_path, monkeypatch):
    mine = raw("cpu-ort-fp32") | {"name": "line-3-cpu", "description": "my line"}
    (tmp_path / "line-3-cpu.yaml").write_text(yaml.safe_dump(mine))
    assert load_profile(str(tmp_path / "line-3-cpu.yaml")).description == "my line"
    with pytest.raises(EdgeVitError, match="no export profile named 'line-3-cpu'"):
        load_profile("line-3-cpu")
    monkeypatch.setenv("EDGEVIT_PROFILES", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # ./export_profiles absent: the package's folder still supplies the rest
    assert load_profile("line-3-cpu").name == "line-3-cpu"
    assert {"line-3-cpu"} | SHIPPED <= {p.name for p, _ in list_profiles()}
    with pytest.raises(EdgeVitError, match="did you mean 'jetson-orin-nano-int8'"):
        load_profile("jetson-orin-nano-int9")


def test_cli_profiles_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(main, ["profiles", "list"])
    assert listed.exit_code == 0
    assert all(name in listed.output for name in SHIPPED)
    shown = runner.invoke(main, ["profiles", "show", "jetson-agx-orin-int8-dla"])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.output)["tensorrt"]["dla_core"] == 0
    missing = runner.invoke(main, ["profiles", "show", "nope"])
    assert missing.exit_code == 2 and missing.output.count("\n") == 1


def test_build_plan_follows_tensorrt_10_and_11():
    fp16, int8, dla = (load_profile(n) for n in ("desktop-gpu-fp16", "jetson-orin-nano-int8",
                                                  "jetson-agx-orin-int8-dla"))
    assert build_plan(fp16, "model.onnx", "10.3.0") == {
        "trt_major": 10, "onnx": "model.onnx", "strongly_typed": False, "precision_flags": ["fp16"]}
    assert build_plan(fp16, "model.onnx", "11.0.1") == {
        "trt_major": 11, "onnx": "model.fp16.onnx", "strongly_typed": True, "precision_flags": []}
    for version in ("10.3.0", "11.0"):
        plan = build_plan(int8, "model.int8.onnx", version)
        assert plan["strongly_typed"] and plan["precision_flags"] == [] and plan["onnx"] == "model.int8.onnx"
    assert build_plan(dla, "model.int8.onnx", "10.3")["precision_flags"] == ["int8", "fp16"]
    # Jetson Thor builds strongly typed on TensorRT 10 too: fp16 from model.fp16.onnx, no precision flags
    for name, deploy in (("jetson-thor-fp16", "model.onnx"), ("jetson-thor-int8", "model.int8.onnx"),
                         ("jetson-thor-fp8", "model.fp8.onnx")):
        thor = load_profile(name)
        assert supported_majors(thor) == {10: "10.13", 11: "11.0"}
        for version in supported_majors(thor).values():
            plan = build_plan(thor, deploy, version)
            assert plan["strongly_typed"] and plan["precision_flags"] == []
            assert plan["onnx"] == ("model.fp16.onnx" if name.endswith("fp16") else deploy)
    assert supported_majors(fp16) == {10: "10.0", 11: "11.0"}


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "") for a in args[1:])


def test_trtexec_line_matches_profile():
    profile = load_profile("jetson-orin-nano-int8")
    flags = _flags(trtexec_args(profile, build_plan(profile, "model.int8.onnx", "10.3"), "input", [1, 16, 16]))
    assert flags["onnx"] == "model.int8.onnx" and flags["saveEngine"] == "engine.plan"
    assert "stronglyTyped" in flags and "fp16" not in flags and "int8" not in flags
    assert flags["memPoolSize"] == f"workspace:{profile.tensorrt.workspace_mb}M"
    assert flags["builderOptimizationLevel"] == str(profile.tensorrt.builder_optimization_level)
    assert flags["timingCacheFile"] == profile.tensorrt.timing_cache
    assert "minShapes" not in flags  # static batch 1: the graph fixes the shape

    dla = load_profile("jetson-agx-orin-int8-dla")
    flags = _flags(trtexec_args(dla, build_plan(dla, "model.int8.onnx", "10.3"), "input", [3, 224, 224]))
    assert flags["useDLACore"] == "0" and "allowGPUFallback" in flags and "int8" in flags

    gpu = load_profile("desktop-gpu-fp16")
    plans = {m: build_plan(gpu, "model.onnx", f"{m}.0") for m in (10, 11)}
    script = build_script(gpu, plans, "input", [3, 224, 224])
    lines = [shlex.split(line.replace('"$TRTEXEC"', "trtexec").replace('"$@"', ""))
             for line in script.splitlines() if line.strip().startswith('"$TRTEXEC"')]
    assert len(lines) == 2
    ten, eleven = (_flags(line) for line in lines)
    assert "fp16" in ten and ten["onnx"] == "model.onnx"
    assert "stronglyTyped" in eleven and "fp16" not in eleven and eleven["onnx"] == "model.fp16.onnx"
    assert ten["minShapes"] == "input:1x3x224x224" and ten["optShapes"] == "input:8x3x224x224"
    assert ten["maxShapes"] == "input:32x3x224x224"
