"""DeepStream: ``deepstream/config_infer.txt`` + ``labels.txt`` for ``nvinfer`` as a classifier (TensorRT exports).

nvinfer converts each frame (or detector crop) to ``network-input`` size and computes
``y = net-scale-factor * (x - offsets[c])`` on pixels ``x`` in [0, 255]. The model wants
``(x / 255 - mean[c]) / std[c]``, so ``offsets[c] = 255 * mean[c]`` is exact, and ``net-scale-factor =
1 / (255 * std)`` is exact only when every channel has the same std.

With ``input: {normalize: in_graph}`` in the profile the graph normalises itself (mean/std folded into its patch
embedding, ``edgevit.export.preprocess``) and nvinfer only brings the pixels to the graph's range: ``offsets`` 0
and ``net-scale-factor`` 1 (``range: byte``) or 1/255 (``range: unit``), exact for any std. nvinfer hands the
engine float planar (NCHW) data, so graphs taking uint8 or NHWC input get no DeepStream config (export.json
records why under ``targets.deepstream.skipped``); they are for Triton and edgevit's own runners.

With the normalisation outside the graph and a per-channel std (ImageNet's 0.229/0.224/0.225) edgevit writes the
nearest scalar and says so, rather
than refusing DeepStream for the profile: refusing would take DeepStream away from nearly every pretrained
RGB ViT, while the nearest scalar (1 / (255 * midrange std), which minimises the largest per-channel relative
error) scales each channel by at most a percent or so. The cost is measured, not guessed: the export runs the
fp32 graph on its parity images preprocessed both ways and records the top-1 agreement and the largest logit
difference in export.json and in a warning at the top of the config.

nvinfer's default classifier parser takes the output layer's values as they are, and the graph's output is
logits, so ``classifier-threshold`` is compared with the winning logit: the default 0 attaches the argmax label
whenever its logit is positive (nvinfer refuses negative thresholds). The profile's ``deepstream`` section picks
primary (whole frames, the default) or secondary (a detector's objects, ``operate-on-gie-id``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import EdgeVitError
from edgevit.export.artifacts import ENGINE
from edgevit.export.checks import run_onnx
from edgevit.export.preprocess import RANGE, spec_of
from edgevit.export.profiles import Profile

log = logging.getLogger("edgevit")

NAME = "deepstream"
FOLDER = "deepstream"
CONFIG, LABELS = "config_infer.txt", "labels.txt"
PROCESS_MODE = {"primary": 1, "secondary": 2}
# nvinfer has no FP8 network-mode: it matters only when nvinfer builds an engine itself, and FP8 engines come
# from edgevit's strongly typed build (the config says so)
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2, "fp8": 2}
COLOR_FORMAT = {3: 0, 1: 2}  # nvinfer: 0 RGB, 1 BGR, 2 GRAY; timm models take RGB
SCALING_FILTER = {"nearest": 0, "bilinear": 1, "bicubic": 2}  # NvBufSurfTransform_Inter (2: GPU cubic)
PIXEL_RANGE = 255.0


def scale_and_offsets(pre: dict[str, Any]) -> tuple[float, list[float], bool]:
    """nvinfer's ``net-scale-factor`` and ``offsets`` for the input of a graph with export.json preprocessing
    ``pre`` (raw pixels in the graph's range, or ``(x / 255 - mean) / std``), and whether they are exact."""
    spec, mean, std = spec_of(pre), pre["mean"], pre["std"]
    if spec.raw:
        return RANGE[spec.range] / PIXEL_RANGE, [0.0] * len(mean), True
    offsets = [PIXEL_RANGE * m for m in mean]
    exact = max(std) - min(std) <= 1e-12 * max(std)
    scale = 1.0 / (PIXEL_RANGE * (min(std) + max(std)) / 2)
    return scale, offsets, exact


def approximation_cost(
    onnx_path: Path, images: np.ndarray, std: list[float], scale: float, batch: int
) -> dict[str, float]:
    """Top-1 agreement and max logit difference of the graph on ``images`` (normalised exactly) against the same
    images as nvinfer would normalise them with the scalar ``scale``."""
    ratio = np.array([scale * PIXEL_RANGE * s for s in std], dtype=np.float32).reshape(1, -1, 1, 1)
    exact = run_onnx(onnx_path, images, batch)
    approx = run_onnx(onnx_path, images * ratio, batch)
    return {
        "top1_agreement": float((exact.argmax(1) == approx.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(exact - approx).max()),
        "images": len(images),
        "max_channel_scale_error": float(np.abs(ratio - 1).max()),
    }


def config_infer(export: dict[str, Any], profile: Profile, warning: str | None = None) -> str:
    """``config_infer.txt`` (the ``[property]`` group of an nvinfer classifier) for export.json ``export``.

    Paths are relative to the config file, as nvinfer resolves them.
    """
    pre, ds = export["input"]["preprocessing"], profile.deepstream
    dims = export["input"]["shape"][1:]  # C, H, W
    scale, offsets, _ = scale_and_offsets(pre)
    lines = [
        f"# nvinfer classifier for {export['method']} / profile {profile.name}, written by `edgevit export`.",
        "# model-engine-file is built on the device: `edgevit build ..` or ../build_engine.sh; nvinfer builds",
        "# one from onnx-file itself only when it is missing (without edgevit's builder settings).",
    ]
    if profile.precision == "fp8":
        lines += ["# FP8: build model-engine-file with edgevit build or ../build_engine.sh (strongly typed); nvinfer's",
                  "# own build has no FP8 network-mode and would run FP16."]
    if warning:
        lines += [f"# WARNING: {warning}"]
    props = {
        "gpu-id": 0,
        "onnx-file": f"../{export['deploy_onnx']}",
        "model-engine-file": f"../{ENGINE}",
        "labelfile-path": LABELS,
        "batch-size": profile.batch_spec.max,
        "network-mode": NETWORK_MODE[profile.precision],
        "network-type": 1,
        "process-mode": PROCESS_MODE[ds.mode],
        "gie-unique-id": ds.gie_unique_id,
        "net-scale-factor": repr(scale),
        "offsets": ";".join(repr(o) for o in offsets),
        "model-color-format": COLOR_FORMAT[dims[0]],
        "infer-dims": ";".join(str(d) for d in dims),
        "output-blob-names": export["output"]["name"],
        "classifier-threshold": ds.classifier_threshold,
        "maintain-aspect-ratio": 0,  # edgevit resizes to a square without keeping the aspect ratio too
        "scaling-filter": SCALING_FILTER.get(pre.get("interpolation", "bilinear"), 1),
    }
    if ds.mode == "secondary":
        props["operate-on-gie-id"] = ds.operate_on_gie_id
        if ds.operate_on_class_ids:
            props["operate-on-class-ids"] = ";".join(map(str, ds.operate_on_class_ids))
    if profile.tensorrt.dla_core is not None:
        props.update({"enable-dla": 1, "use-dla-core": profile.tensorrt.dla_core})
    lines += ["[property]", *(f"{k}={v}" for k, v in props.items())]
    return "\n".join(lines) + "\n"


def labels_txt(classes: list[str]) -> str:
    """nvinfer's classifier label file: one line per output layer, that layer's labels separated by ``;``."""
    bad = [c for c in classes if ";" in c or "\n" in c]
    if bad:
        raise EdgeVitError(f"class names cannot hold ';' or a newline in a DeepStream label file: {bad}")
    return ";".join(classes) + "\n"


def emit(out: Path, export: dict[str, Any], profile: Profile, images: np.ndarray) -> dict[str, Any] | None:
    """Write ``deepstream/`` for a TensorRT export into ``out``; returns what export.json records (None: not one)."""
    from edgevit.export.runtimes import runtime_of

    if not runtime_of(profile).deepstream:
        return None
    pre = export["input"]["preprocessing"]
    spec = spec_of(pre)
    if spec.pixels != "float" or spec.layout != "NCHW":
        reason = (
            f"nvinfer feeds the engine float NCHW tensors; this graph takes {spec.pixels} {spec.layout} "
            "(use input: {pixels: float, range: byte, layout: NCHW, normalize: in_graph} for DeepStream)"
        )
        log.warning("no DeepStream config: %s", reason)
        return {"skipped": reason}
    scale, offsets, exact = scale_and_offsets(pre)
    info: dict[str, Any] = {
        "config": f"{FOLDER}/{CONFIG}",
        "labels": f"{FOLDER}/{LABELS}",
        "exact": exact,
        "net_scale_factor": scale,
        "offsets": offsets,
    }
    warning = None
    if not exact:
        batch = profile.batch_spec
        cost = approximation_cost(
            out / "model.onnx", images, pre["std"], scale, batch.opt if batch.dynamic else batch.max
        )
        warning = (
            f"per-channel std {pre['std']} is not expressible in nvinfer (one net-scale-factor); "
            f"net-scale-factor is the nearest scalar (std {(min(pre['std']) + max(pre['std'])) / 2:.6g}): "
            f"top-1 agreement {cost['top1_agreement']:.4f}, max logit diff {cost['max_abs_logit_diff']:.3g} "
            f"on {cost['images']} parity images; input: {{normalize: in_graph}} in the profile makes it exact"
        )
        info.update(approximation=cost, warning=warning)
        log.warning("DeepStream config: %s", warning)
    folder = out / FOLDER
    folder.mkdir()
    (folder / CONFIG).write_text(config_infer(export, profile, warning))
    (folder / LABELS).write_text(labels_txt(export["output"]["classes"]))
    return info
