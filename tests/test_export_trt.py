"""TensorRT engines: compatibility checks everywhere; real builds where tensorrt and a GPU exist."""

from __future__ import annotations

import json

import pytest

from edgevit.errors import EdgeVitError
from edgevit.export.profiles import load_profile
from edgevit.export.tensorrt import ENGINE_JSON, check_engine_compatible, check_version, sha256

HERE = {"trt_version": "10.3.0", "gpu_name": "Orin (nvgpu)", "compute_capability": "8.7"}


def write_engine_json(tmp_path, **changes):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    info = {**HERE, "onnx": "model.onnx", "onnx_sha256": sha256(tmp_path / "model.onnx"), **changes}
    (tmp_path / ENGINE_JSON).write_text(json.dumps(info))
    return tmp_path / ENGINE_JSON


def test_matching_engine_is_accepted(tmp_path):
    assert check_engine_compatible(write_engine_json(tmp_path), HERE)["gpu_name"] == HERE["gpu_name"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"compute_capability": "8.9", "gpu_name": "RTX 4090"}, "built for RTX 4090 (compute capability 8.9)"),
    ({"trt_version": "10.8.0"}, "built with TensorRT 10.8.0 but this machine has 10.3.0"),
    ({"onnx_sha256": "0" * 64}, "built from another model.onnx"),
])
def test_engine_for_another_gpu_trt_or_graph_is_refused(tmp_path, changes, message):
    with pytest.raises(EdgeVitError, match="rebuild it here") as err:
        check_engine_compatible(write_engine_json(tmp_path, **changes), HERE)
    assert message in str(err.value)


def test_missing_engine_json_and_version_range(tmp_path):
    with pytest.raises(EdgeVitError, match="edgevit build"):
        check_engine_compatible(tmp_path / ENGINE_JSON, HERE)
    profile = load_profile("jetson-orin-nano-int8")
    check_version(profile, "10.3.0")
    with pytest.raises(EdgeVitError, match="needs TensorRT >= 10.0"):
        check_version(profile, "8.6.2")


@pytest.fixture()
def gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    return trt


@pytest.mark.gpu
@pytest.mark.parametrize("profile", ["jetson-orin-nano-int8", "desktop-gpu-fp16"])
def test_build_engine_on_gpu(gpu, digits_bundle, tmp_path, profile):
    from edgevit.export import export_bundle
    from edgevit.export.tensorrt import build_engine, load_engine

    export_bundle(digits_bundle, profile, tmp_path / "out")
    info = build_engine(tmp_path / "out")
    assert (tmp_path / "out" / "engine.plan").is_file() and (tmp_path / "out" / "engine_inspector.json").is_file()
    assert info["trt_version"] == gpu.__version__ and info["compute_capability"]
    assert info["strongly_typed"] == (profile.endswith("int8") or int(gpu.__version__.split(".")[0]) >= 11)
    assert load_engine(tmp_path / "out").num_io_tensors == 2
    stale = json.loads((tmp_path / "out" / ENGINE_JSON).read_text()) | {"trt_version": "9.9.9"}
    (tmp_path / "out" / ENGINE_JSON).write_text(json.dumps(stale))
    with pytest.raises(EdgeVitError, match="built with TensorRT 9.9.9"):
        load_engine(tmp_path / "out")
