"""TensorRT engines: compatibility checks everywhere; real builds where tensorrt and a GPU exist."""

from __future__ import annotations

import json
import re

import pytest

from edgevit.errors import EdgeVitError
from edgevit.export.profiles import list_profiles, load_profile
from edgevit.export.runtimes import runtime_of
from edgevit.export.tensorrt import ENGINE_JSON, check_engine_compatible, check_version, sha256, supported_majors

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
@pytest.mark.parametrize("profile", ["desktop-gpu-int8", "desktop-gpu-fp16", "desktop-gpu-fp8"])
def test_build_engine_on_gpu(gpu, digits_bundle, tmp_path, profile):
    """Desktop profiles: a Jetson profile's engine is refused on any other GPU (edgevit.export.tensorrt.check_gpu),
    and desktop-gpu-fp8 needs compute capability 8.9+."""
    import torch

    from edgevit.export import export_bundle
    from edgevit.export.tensorrt import build_engine, load_engine

    if profile.endswith("fp8") and torch.cuda.get_device_capability(0) < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    export_bundle(digits_bundle, profile, tmp_path / "out")
    info = build_engine(tmp_path / "out")
    assert (tmp_path / "out" / "engine.plan").is_file() and (tmp_path / "out" / "engine_inspector.json").is_file()
    assert info["trt_version"] == gpu.__version__ and info["compute_capability"]
    assert info["strongly_typed"] == (not profile.endswith("fp16") or int(gpu.__version__.split(".")[0]) >= 11)
    assert load_engine(tmp_path / "out").num_io_tensors == 2
    stale = json.loads((tmp_path / "out" / ENGINE_JSON).read_text()) | {"trt_version": "9.9.9"}
    (tmp_path / "out" / ENGINE_JSON).write_text(json.dumps(stale))
    with pytest.raises(EdgeVitError, match="built with TensorRT 9.9.9"):
        load_engine(tmp_path / "out")


class _Recorder:
    """A stand-in for the parts of the tensorrt module ``build_engine`` uses; records what it is asked."""

    def __init__(self, version: str, dla_cores: int = 0, input_shape: tuple = (-1, 1, 16, 16)) -> None:
        from types import SimpleNamespace as NS

        self.__version__ = version
        self.calls: dict = {"flags": [], "shapes": None, "network_flags": None, "device": None, "dla": None}
        calls = self.calls
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})
        self.NetworkDefinitionCreationFlag = NS(STRONGLY_TYPED=5)
        self.MemoryPoolType = NS(WORKSPACE="workspace")
        self.ProfilingVerbosity = NS(DETAILED="detailed")
        self.BuilderFlag = NS(FP16="FP16", INT8="INT8", GPU_FALLBACK="GPU_FALLBACK")
        self.DeviceType = NS(DLA="DLA")
        self.LayerInformationFormat = NS(JSON="json")

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls["workspace"] = size

            def set_flag(self, flag):
                calls["flags"].append(flag)

            def add_optimization_profile(self, profile):
                calls["shapes"] = profile.shapes

            def create_timing_cache(self, data):
                return data

            def set_timing_cache(self, cache, ignore_mismatch):
                calls["cache_in"] = cache

            def get_timing_cache(self):
                return NS(serialize=lambda: b"cache")

            def __setattr__(self, name, value):
                calls[name] = value

        class Profile:
            def set_shape(self, name, *shapes):
                self.shapes = shapes

        class Network:
            def get_input(self, i):
                return NS(name="input", shape=input_shape)

        class Builder:
            num_DLA_cores = dla_cores

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"engine-bytes"

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls["onnx"] = path.rsplit("/", 1)[-1]
                return True

        engine = NS(create_engine_inspector=lambda: NS(get_engine_information=lambda fmt: '{"Layers": []}'))
        self.Builder, self.OnnxParser = Builder, Parser
        self.Runtime = lambda logger: NS(deserialize_cuda_engine=lambda data: engine)


@pytest.fixture(scope="module")
def fp16_export(digits_bundle, tmp_path_factory):
    from edgevit.export import export_bundle

    out = tmp_path_factory.mktemp("trt") / "out"
    export_bundle(digits_bundle, "desktop-gpu-fp16", out)
    return out


@pytest.mark.parametrize(("version", "onnx_name", "strongly_typed", "flags"), [
    ("10.3.0", "model.onnx", False, ["FP16"]),
    ("11.0.0", "model.fp16.onnx", True, []),
])
def test_build_engine_flow_on_tensorrt_10_and_11(fp16_export, monkeypatch, version, onnx_name, strongly_typed,
                                                 flags):
    """The builder's decisions, checked against a recording stand-in for tensorrt (no GPU needed)."""
    import sys

    from edgevit.export import tensorrt as trt_export

    out = fp16_export
    fake = _Recorder(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_export, "gpu_info", lambda: {"gpu_name": "Fake GPU", "compute_capability": "8.9"})
    info = trt_export.build_engine(out)
    calls = fake.calls
    assert calls["onnx"] == onnx_name and calls["flags"] == flags
    assert calls["network_flags"] == (1 << 5 if strongly_typed else 0)
    assert calls["shapes"] == ((1, 1, 16, 16), (8, 1, 16, 16), (32, 1, 16, 16))
    assert calls["workspace"] == 4096 << 20 and calls["builder_optimization_level"] == 4
    assert (out / "engine.plan").read_bytes() == b"engine-bytes" and (out / "timing.cache").read_bytes() == b"cache"
    assert info["triton_model_file"].endswith("/1/model.plan")  # the Triton repository gets the same plan
    assert (out / info["triton_model_file"]).read_bytes() == b"engine-bytes"
    saved = json.loads((out / ENGINE_JSON).read_text())
    assert saved == info and saved["trt_version"] == version and saved["onnx_sha256"] == sha256(out / onnx_name)
    assert json.loads((out / "engine_inspector.json").read_text()) == {"Layers": []}
    here = {"trt_version": version, "gpu_name": "Fake GPU", "compute_capability": "8.9"}
    assert check_engine_compatible(out / ENGINE_JSON, here)["onnx"] == onnx_name


def test_engine_plan_is_the_serialized_engine_only(fp16_export, monkeypatch):
    """No header, no footer: engine.plan is byte for byte what the builder serialized, which is what trtexec
    --loadEngine, DeepStream's model-engine-file and Triton's model.plan deserialize directly."""
    import hashlib
    import os
    import sys
    from types import SimpleNamespace as NS

    from edgevit.export import tensorrt as trt_export

    serialized = bytearray(os.urandom(4096))  # IHostMemory exposes the buffer protocol; bytes() copies it
    deserialized: list[bytes] = []

    def deserialize(data: bytes):
        deserialized.append(bytes(data))
        return NS(create_engine_inspector=lambda: NS(get_engine_information=lambda fmt: "{}"))

    fake = _Recorder("10.3.0")
    fake.Builder.build_serialized_network = lambda self, network, config: serialized
    fake.Runtime = lambda logger: NS(deserialize_cuda_engine=deserialize)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_export, "gpu_info", lambda: {"gpu_name": "Fake GPU", "compute_capability": "8.9"})
    info = trt_export.build_engine(fp16_export)
    plan = (fp16_export / "engine.plan").read_bytes()
    assert plan == bytes(serialized) and deserialized == [plan]
    assert info["engine_sha256"] == hashlib.sha256(bytes(serialized)).hexdigest()
    assert (fp16_export / info["triton_model_file"]).read_bytes() == plan
    assert "--saveEngine=engine.plan" in (fp16_export / "build_engine.sh").read_text()  # trtexec writes raw plans


@pytest.mark.parametrize(("name", "gpu", "message"), [
    ("jetson-thor-fp8", "8.7", "is for Jetson AGX Thor / T5000 (Blackwell GPU, no DLA) (compute capability 11.0); "
                               "this GPU is Fake GPU (8.7)"),
    ("desktop-gpu-fp8", "8.6", "(compute capability 8.9 or newer); this GPU is Fake GPU (8.6)"),
])
def test_an_engine_is_built_only_on_the_gpu_its_profile_is_for(name, gpu, message, tmp_path, monkeypatch):
    import sys

    from edgevit.export import tensorrt as trt_export

    profile = load_profile(name)
    (tmp_path / "model.fp8.onnx").write_bytes(b"graph")
    (tmp_path / "export.json").write_text(json.dumps({"schema_version": 1, "profile": profile.model_dump(mode="json"),
                                                      "deploy_onnx": "model.fp8.onnx"}))
    monkeypatch.setitem(sys.modules, "tensorrt", _Recorder("10.13.0"))
    monkeypatch.setattr(trt_export, "gpu_info", lambda: {"gpu_name": "Fake GPU", "compute_capability": gpu})
    with pytest.raises(EdgeVitError, match=re.escape(message)):
        trt_export.build_engine(tmp_path)
    assert not (tmp_path / "engine.plan").exists()


FAKE_TRTEXEC = """#!/usr/bin/env bash
printf '%s\\n' "$@" > trtexec.args
echo engine > engine.plan
"""


@pytest.mark.parametrize(("name", "version"), [(p.name, version) for p, _ in list_profiles()
                                               if runtime_of(p).builds_engine
                                               for version in supported_majors(p).values()])
def test_build_engine_sh_and_the_python_builder_agree(name, version, tmp_path, monkeypatch):
    """For every shipped TensorRT profile and every TensorRT major its version range lists, the trtexec line
    build_engine.sh runs (with a fake trtexec that records its arguments) asks for what the Python builder does: the
    same ONNX, strong typing, precision flags, batch shapes, workspace, optimisation level and DLA settings."""
    import subprocess
    import sys

    from edgevit.export import tensorrt as trt_export
    from edgevit.export.artifacts import QUANTIZED_ONNX, SCRIPT
    from edgevit.export.targets import TARGETS
    from edgevit.export.trtexec import build_script

    profile = load_profile(name)
    major = int(version.split(".")[0])
    deploy = QUANTIZED_ONNX.get(profile.precision, "model.onnx")
    for graph in ("model.onnx", deploy, trt_export.FP16_ONNX):
        (tmp_path / graph).write_bytes(b"graph")
    (tmp_path / "export.json").write_text(json.dumps({"schema_version": 1, "profile": profile.model_dump(mode="json"),
                                                      "deploy_onnx": deploy}))
    plans = {m: trt_export.build_plan(profile, deploy, v) for m, v in supported_majors(profile).items()}
    (tmp_path / SCRIPT).write_text(build_script(profile, plans, "input", [1, 16, 16]))
    (tmp_path / "trtexec").write_text(FAKE_TRTEXEC)
    (tmp_path / "trtexec").chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(tmp_path / "trtexec"), "TRT_MAJOR": str(major)}
    subprocess.run(["bash", str(tmp_path / SCRIPT)], env=env, check=True)
    args = (tmp_path / "trtexec.args").read_text().split()

    gpu = profile.tensorrt.compute_capability or TARGETS[profile.target].compute_capability or "8.7"
    batch = profile.batch_spec
    fake = _Recorder(version, dla_cores=1, input_shape=(-1 if batch.dynamic else batch.max, 1, 16, 16))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_export, "gpu_info", lambda: {"gpu_name": "Fake GPU", "compute_capability": gpu})
    trt_export.build_engine(tmp_path)
    calls = fake.calls

    def value(flag):
        return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{flag}=")), None)

    assert value("onnx") == calls["onnx"]
    assert ("--stronglyTyped" in args) == (calls["network_flags"] == 1 << 5)
    assert sorted(a[2:].upper() for a in args if a in ("--fp16", "--int8")) == \
        sorted(f for f in calls["flags"] if f != "GPU_FALLBACK")
    shapes = [value(f"{k}Shapes") for k in ("min", "opt", "max")]
    assert shapes == ([None] * 3 if calls["shapes"] is None else
                      ["input:" + "x".join(map(str, shape)) for shape in calls["shapes"]])
    assert value("memPoolSize") == f"workspace:{calls['workspace'] >> 20}M"
    assert int(value("builderOptimizationLevel")) == calls["builder_optimization_level"]
    assert value("useDLACore") == (str(calls["DLA_core"]) if "DLA_core" in calls else None)
    assert ("--allowGPUFallback" in args) == ("GPU_FALLBACK" in calls["flags"])
