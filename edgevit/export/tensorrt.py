"""TensorRT engines: built on the target with the Python API, refused anywhere else.

``tensorrt`` is imported lazily (only :func:`build_engine` and :func:`load_engine` need it), so everything
else in edgevit runs on machines without it. TensorRT 10 and 11 are both handled (:func:`build_plan`), each major
only where the profile's version range lists it (:func:`supported_majors`):

- Q/DQ (INT8, FP8) graphs build as *strongly typed* networks: precision comes from the graph;
- fp16 sets the FP16 builder flag on TensorRT 10; TensorRT 11 removed precision flags, so it builds the
  strongly typed fp16 graph ``model.fp16.onnx`` that fp16 exports also write, as profiles with
  ``tensorrt.strongly_typed`` (Jetson Thor) do on TensorRT 10 too;
- DLA on TensorRT 10 builds weakly typed with INT8 + FP16 flags (the DLA has no fp32) and GPU fallback.

``engine.json`` records the TensorRT version, GPU name, compute capability and the ONNX hash; an engine
is only valid for the TensorRT version and GPU architecture it was built with, so
:func:`check_engine_compatible` refuses any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgevit.errors import EdgeVitError
from edgevit.export.artifacts import ENGINE, ENGINE_JSON, EXPORT_JSON, FP16_ONNX, SCRIPT, read_export
from edgevit.export.profiles import Profile, parse_profile
from edgevit.export.triton import place_engine

log = logging.getLogger("edgevit")

INSPECTOR_JSON = "engine_inspector.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _major(version: str) -> int:
    return int(str(version).split(".")[0])


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(version).split(".") if p.isdigit())


def build_plan(profile: Profile, deploy_onnx: str, trt_version: str) -> dict[str, Any]:
    """How to build ``profile`` with TensorRT ``trt_version``: which ONNX, strongly typed or not, which flags.

    Args:
        profile: the validated export profile.
        deploy_onnx: export.json's ``deploy_onnx`` (``model.onnx`` or ``model.int8.onnx``).
        trt_version: e.g. ``10.3.0`` or ``11.0``.
    """
    major = _major(trt_version)
    weak = major < 11 and not profile.tensorrt.strongly_typed  # TensorRT 10 may still take precision flags
    dla = profile.tensorrt.dla_core is not None
    plan: dict[str, Any] = {"trt_major": major, "onnx": deploy_onnx, "strongly_typed": False, "precision_flags": []}
    if profile.quantized:
        if dla and weak:
            plan["precision_flags"] = ["int8", "fp16"]
        else:
            plan["strongly_typed"] = True
    elif profile.precision == "fp16":
        if weak:
            plan["precision_flags"] = ["fp16"]
        else:
            plan.update(onnx=FP16_ONNX, strongly_typed=True)
    return plan


def supported_majors(profile: Profile) -> dict[int, str]:
    """The TensorRT majors (10, 11) the profile's version range lists, each with the lowest version it allows."""
    lo, hi = profile.tensorrt.version_min, profile.tensorrt.version_max
    majors = {}
    for major in (10, 11):
        version = max(_version_tuple(lo), (major, 0))
        if version[0] == major and (hi is None or version < _version_tuple(hi)):
            majors[major] = ".".join(map(str, version))
    return majors


def check_version(profile: Profile, trt_version: str) -> None:
    """The profile's TensorRT version range (``version_min`` inclusive, ``version_max`` exclusive)."""
    have = _version_tuple(trt_version)
    lo, hi = profile.tensorrt.version_min, profile.tensorrt.version_max
    if have < _version_tuple(lo) or (hi is not None and have >= _version_tuple(hi)):
        raise EdgeVitError(f"profile {profile.name} needs TensorRT >= {lo}" + (f" and < {hi}" if hi else "")
                           + f"; this machine has {trt_version}")


def check_gpu(profile: Profile, gpu: dict[str, str]) -> None:
    """The GPU is the one the profile is for: a Jetson target's own, or at least a desktop profile's minimum."""
    from edgevit.export.targets import TARGETS, capability, compute_capability

    target = TARGETS[profile.target]
    want = compute_capability(profile)
    have = gpu["compute_capability"]
    if want is None:
        return
    if (have != want) if target.jetson else (capability(have) < capability(want)):
        relation = "" if target.jetson else " or newer"
        raise EdgeVitError(f"profile {profile.name} is for {target.device} (compute capability {want}{relation}); "
                           f"this GPU is {gpu['gpu_name']} ({have})")


def import_tensorrt():
    """The ``tensorrt`` module, imported only when an engine is built or run; missing, one clear error."""
    try:
        import tensorrt
    except ImportError:
        raise EdgeVitError("TensorRT is not installed here (pip install 'edgevit[trt]' on a machine with an "
                           "NVIDIA GPU; JetPack ships it)") from None
    return tensorrt


def gpu_info() -> dict[str, str]:
    """Name and compute capability of CUDA device 0 (through torch, else cuda-python)."""
    try:
        import torch

        if torch.cuda.is_available():
            return {"gpu_name": torch.cuda.get_device_name(0),
                    "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise EdgeVitError("no CUDA device visible (neither torch.cuda nor cuda-python found one)") from None
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise EdgeVitError(f"no CUDA device visible (cudaGetDeviceProperties: {err})")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu_name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}


def build_engine(out_dir: str | Path) -> dict[str, Any]:
    """Build ``engine.plan`` (+ engine.json, engine_inspector.json, the timing cache) in an export directory, in
    Polygraphy's steps: plan -> parse -> configure -> serialize -> record.

    Raises :class:`EdgeVitError` when the profile builds no engine, when tensorrt is not importable (the caller
    points to ``build_engine.sh``), when this is not the profile's GPU, or when the build fails.
    """
    from edgevit.export.runtimes import runtime_of

    out_dir = Path(out_dir)
    export = read_export(out_dir)
    profile = parse_profile(export["profile"], str(out_dir / EXPORT_JSON))
    if not runtime_of(profile).builds_engine:
        raise EdgeVitError(f"profile {profile.name} targets {profile.runtime}; there is no engine to build")
    trt = import_tensorrt()
    check_version(profile, trt.__version__)
    plan = build_plan(profile, export["deploy_onnx"], trt.__version__)
    onnx_path = out_dir / plan["onnx"]
    if not onnx_path.is_file():
        raise EdgeVitError(f"{onnx_path} is missing; re-export with `edgevit export`")
    gpu = gpu_info()
    check_gpu(profile, gpu)
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network = parse_network(trt, logger, onnx_path, plan["strongly_typed"])
    cache_path = out_dir / profile.tensorrt.timing_cache if profile.tensorrt.timing_cache else None
    config = builder_config(trt, builder, network, profile, plan, cache_path)
    engine_bytes = serialize(builder, network, config, onnx_path)
    _atomic_write(out_dir / ENGINE, engine_bytes)
    if cache_path:
        _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    _atomic_write(out_dir / INSPECTOR_JSON, layers.encode())
    info = {"trt_version": trt.__version__, **gpu, "onnx": plan["onnx"], "onnx_sha256": sha256(onnx_path),
            "deploy_onnx": export["deploy_onnx"], "profile": profile.name, "precision": profile.precision,
            "strongly_typed": plan["strongly_typed"], "precision_flags": plan["precision_flags"],
            "batch": profile.batch_spec.model_dump(), "dla_core": profile.tensorrt.dla_core,
            "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
            "build_seconds": round(time.perf_counter() - started, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    triton_plan = place_engine(out_dir)
    if triton_plan is not None:
        info["triton_model_file"] = str(triton_plan.relative_to(out_dir))
    _atomic_write(out_dir / ENGINE_JSON, (json.dumps(info, indent=2) + "\n").encode())
    return info


def parse_network(trt, logger, onnx_path: Path, strongly_typed: bool):
    """A builder and the network TensorRT's ONNX parser makes of ``onnx_path`` (strongly typed or not)."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeVitError(f"TensorRT could not parse {onnx_path.name}: {errors[:300]}")
    return builder, network


def builder_config(trt, builder, network, profile: Profile, plan: dict[str, Any], cache_path: Path | None):
    """The builder config of ``profile``: workspace, optimisation level, the plan's precision flags (TensorRT 10
    only), the batch profile, DLA, and the timing cache at ``cache_path`` (reused when it exists)."""
    config = builder.create_builder_config()
    opts = profile.tensorrt
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.builder_optimization_level = opts.builder_optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in plan["precision_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    _add_batch_profile(builder, network, config, profile)
    if opts.dla_core is not None:
        if builder.num_DLA_cores <= opts.dla_core:
            raise EdgeVitError(f"profile {profile.name} asks for DLA core {opts.dla_core}; this device has "
                               f"{builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opts.dla_core
        if opts.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def serialize(builder, network, config, onnx_path: Path) -> bytes:
    """The serialized engine (exactly what trtexec --saveEngine writes)."""
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeVitError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    return bytes(serialized)


def _add_batch_profile(builder, network, config, profile: Profile) -> None:
    """One optimisation profile over the batch dimension when the graph's batch is dynamic."""
    tensor = network.get_input(0)
    dims = list(tensor.shape)
    if dims[0] != -1:
        return
    batch = profile.batch_spec
    shapes = [tuple([b, *dims[1:]]) for b in (batch.min, batch.opt, batch.max)]
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(opt_profile)


def _atomic_write(path: Path, data: bytes) -> None:
    from edgevit.vit.bundle import atomic_write_bytes

    atomic_write_bytes(path, data)


def engine_mismatch(built: dict[str, Any], here: dict[str, str]) -> str | None:
    """Why an engine described by ``built`` (engine.json) cannot run ``here`` (``trt_version``,
    ``gpu_name``, ``compute_capability``), or ``None``."""
    if str(built.get("compute_capability")) != str(here["compute_capability"]):
        return (f"was built for {built.get('gpu_name')} (compute capability {built.get('compute_capability')}) "
                f"but this GPU is {here['gpu_name']} ({here['compute_capability']})")
    if str(built.get("trt_version")) != str(here["trt_version"]):
        return f"was built with TensorRT {built.get('trt_version')} but this machine has {here['trt_version']}"
    return None


def check_engine_compatible(engine_json_path: str | Path, here: dict[str, str] | None = None) -> dict[str, Any]:
    """Refuse an engine built for another GPU architecture or TensorRT version, or from another ONNX file.

    Args:
        engine_json_path: the engine's ``engine.json``.
        here: this machine (``trt_version``, ``gpu_name``, ``compute_capability``); default: detected.

    Returns the engine.json contents. Raises :class:`EdgeVitError` with what differs and what to do.
    """
    path = Path(engine_json_path)
    if not path.is_file():
        raise EdgeVitError(f"{path} is missing; build the engine with `edgevit build {path.parent}` on this device")
    built = json.loads(path.read_text())
    if here is None:
        here = {"trt_version": import_tensorrt().__version__, **gpu_info()}
    problem = engine_mismatch(built, here)
    onnx_path = path.parent / str(built.get("onnx", ""))
    stale = built.get("onnx_sha256") and onnx_path.is_file() and sha256(onnx_path) != built["onnx_sha256"]
    if problem is None and stale:
        problem = f"was built from another {built['onnx']} than the one next to it"
    if problem:
        raise EdgeVitError(f"{path.parent / ENGINE} {problem}; rebuild it here with `edgevit build {path.parent}` "
                           f"or {path.parent / SCRIPT}")
    if built.get("gpu_name") != here["gpu_name"]:
        log.warning("engine built on %s, running on %s (same architecture)", built.get("gpu_name"), here["gpu_name"])
    return built


def load_engine(out_dir: str | Path):
    """The deserialized ``ICudaEngine`` of an export directory, after :func:`check_engine_compatible`."""
    out_dir = Path(out_dir)
    check_engine_compatible(out_dir / ENGINE_JSON)
    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine((out_dir / ENGINE).read_bytes())
    if engine is None:
        raise EdgeVitError(f"TensorRT could not deserialize {out_dir / ENGINE}")
    return engine
