"""Shared helpers of the on-device scripts: only python3, numpy, tensorrt and cuda-python (JetPack).

Nothing here imports edgevit: the export directory (export.json, build_engine.sh, ONNX graphs) carries
everything the device needs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def cudart():
    """cuda-python's runtime module (new and old import paths)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise SystemExit("cuda-python is required: pip3 install cuda-python (match your CUDA version)") from None
    return runtime


def check(result):
    """Unwrap a cuda-python call's ``(err, value...)`` tuple, exiting on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise SystemExit(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def gpu_info() -> dict[str, str]:
    """GPU name and compute capability (cuda-python; the device tree on a Jetson without it)."""
    try:
        prop = check(cudart().cudaGetDeviceProperties(0))
        name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
        return {"gpu_name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}
    except SystemExit:
        model = Path("/proc/device-tree/model")
        name = model.read_text().rstrip("\x00") if model.is_file() else "unknown"
        capability = "8.7" if "Orin" in name else "7.2" if "Xavier" in name else "unknown"
        return {"gpu_name": name, "compute_capability": capability}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_export(export_dir: Path) -> dict:
    path = export_dir / "export.json"
    if not path.is_file():
        raise SystemExit(f"{export_dir} is not an export directory (no export.json)")
    return json.loads(path.read_text())


def check_engine(export_dir: Path) -> dict:
    """Refuse an engine built with another TensorRT or for another GPU architecture (as edgevit does)."""
    import tensorrt as trt

    path = export_dir / "engine.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: build the engine here with build_engine.py first")
    built = json.loads(path.read_text())
    here = gpu_info()
    if built.get("trt_version") != trt.__version__:
        raise SystemExit(f"engine built with TensorRT {built.get('trt_version')}, this device has {trt.__version__}: "
                         "rebuild it here")
    if built.get("compute_capability") != here["compute_capability"]:
        raise SystemExit(f"engine built for {built.get('gpu_name')} ({built.get('compute_capability')}), this is "
                         f"{here['gpu_name']} ({here['compute_capability']}): rebuild it here")
    return built
