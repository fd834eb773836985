"""Shared helpers of the on-device scripts: only python3, numpy, tensorrt, cuda-python and an image decoder
(Pillow, else OpenCV; JetPack has one).

Nothing here imports edgevit: the export directory (export.json, build_engine.sh, ONNX graphs) carries
everything the device needs.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np


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
        # Thor (AGX Thor, T5000, T4000): Blackwell, 11.0 under CUDA 13; Orin: Ampere 8.7
        capability = next((cc for key, cc in (("Thor", "11.0"), ("T4000", "11.0"), ("T5000", "11.0"), ("Orin", "8.7"),
                                              ("Xavier", "7.2")) if key in name), "unknown")
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


def _resized_size(width: int, height: int, pre: dict) -> tuple[int, int]:
    """(width, height) before the centre crop, as timm's eval transform computes it."""
    scale = math.floor(pre["size"] / pre.get("crop_pct", 1.0))
    if pre.get("crop_mode", "squash") == "squash":
        return scale, scale
    if width <= height:  # torchvision's Resize(int): the shorter side to ``scale``, the longer floored
        return scale, int(scale * height / width)
    return int(scale * width / height), scale


def _crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def load_image(path: Path, pre: dict) -> np.ndarray:
    """``size x size x channels`` float32 in [0, 1]: grayscale/RGB, resize, centre crop as edgevit (timm) does.

    Pillow gives edgevit's exact pixels; the OpenCV fallback resizes with its own kernels (close, not equal).
    """
    size, channels = pre["size"], pre["channels"]
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
            image = image.resize(_resized_size(*image.size, pre), resample[pre.get("interpolation", "bilinear")])
            array = np.asarray(image.crop(_crop_box(*image.size, size)), dtype=np.float32)
    except ImportError:
        import cv2

        array = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
        if array is None:
            raise ValueError(f"cannot read {path}") from None
        if channels == 3:
            array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
        interpolation = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
        height, width = array.shape[:2]
        new_w, new_h = _resized_size(width, height, pre)
        array = cv2.resize(array, (new_w, new_h), interpolation=interpolation[pre.get("interpolation", "bilinear")])
        left, top, right, bottom = _crop_box(new_w, new_h, size)
        array = array[top:bottom, left:right].astype(np.float32)
    return array.reshape(size, size, channels) / 255.0


RANGE = {"unit": 1.0, "byte": 255.0}


def graph_input(x: np.ndarray, pre: dict) -> np.ndarray:
    """``size x size x C`` in [0, 1] -> what the export's graph takes (export.json ``input.preprocessing``): the
    normalised float32 tensor, or, with ``normalize: in_graph``, the raw pixels in the graph's range and dtype;
    ``C x size x size`` unless the graph's layout is NHWC. Exports from before these keys mean the defaults."""
    if pre.get("normalize", "outside") == "in_graph":
        x = x * RANGE[pre.get("range", "unit")]
        if pre.get("pixels", "float") == "uint8":  # x holds 8-bit pixels / 255: rint gives them back exactly
            x = np.rint(x).astype(np.uint8)
    else:
        x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x if pre.get("layout", "NCHW") == "NHWC" else x.transpose(2, 0, 1)
