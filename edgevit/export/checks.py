"""Checks every export must pass: graph fits its target, ONNX agrees with torch on real images."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from edgevit.data import balanced_indices, split_arrays
from edgevit.errors import EdgeVitError
from edgevit.export import gate, preprocess
from edgevit.export.artifacts import FP32_ONNX, ort_session
from edgevit.export.profiles import Calibration, Parity, Profile
from edgevit.vit.bundle import BundleMeta

if TYPE_CHECKING:
    from edgevit.export.runtimes import Runtime

log = logging.getLogger("edgevit")

STANDARD_DOMAINS = ("", "ai.onnx")
# What a LayerNormalization looks like once an exporter decomposes it; none of it may appear next to a
# missing LayerNormalization node.
DECOMPOSED_NORM_OPS = ("ReduceMean", "Pow")


def check_standard_ops(graph: onnx.ModelProto, where: str) -> None:
    """TensorRT targets: every node is a standard ONNX op (no ``com.microsoft`` or other contrib domain)."""
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.graph.node if n.domain not in STANDARD_DOMAINS})
    if foreign:
        raise EdgeVitError(f"{where} has non-standard ops TensorRT cannot parse: {', '.join(foreign)}")


def opset_of(graph: onnx.ModelProto) -> int:
    return next(o.version for o in graph.opset_import if o.domain in STANDARD_DOMAINS)


def check_layernorm(graph: onnx.ModelProto, model: nn.Module, where: str) -> int:
    """Each ``nn.LayerNorm`` of ``model`` is one ``LayerNormalization`` node (needs opset 17+). Returns the
    count."""
    expected = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    ops = [n.op_type for n in graph.graph.node]
    found = ops.count("LayerNormalization")
    if opset_of(graph) < 17 or found != expected or any(op in ops for op in DECOMPOSED_NORM_OPS):
        raise EdgeVitError(f"{where}: expected {expected} LayerNormalization nodes at opset >= 17, found {found} "
                           f"at opset {opset_of(graph)} (LayerNorm was decomposed)")
    return found


def check_qdq_placement(graph: onnx.ModelProto, quantized_ops: Iterable[str], where: str) -> dict[str, int]:
    """Explicit-quantization graphs for TensorRT: every DequantizeLinear feeds only ``quantized_ops``
    (MatMul/Gemm), so LayerNorm, Softmax and residual adds run in high precision. Returns Q/DQ counts."""
    allowed = set(quantized_ops)
    consumers: dict[str, list[str]] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    if not dq:
        raise EdgeVitError(f"{where} has no DequantizeLinear nodes: it is not an explicit-quantization graph")
    wrong = sorted({op for n in dq for op in consumers.get(n.output[0], []) if op not in allowed})
    if wrong:
        raise EdgeVitError(f"{where}: Q/DQ feeds {', '.join(wrong)}, which must stay in high precision")
    q = sum(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    return {"QuantizeLinear": q, "DequantizeLinear": len(dq)}


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs diff, mean cosine similarity of the logit rows and top-1 agreement of two logit arrays."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-12)
    return {"max_abs_diff": float(np.abs(ref - cand).max()), "cosine": float(cosine.min()),
            "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1)))}


def run_onnx(graph: Path | bytes, images: np.ndarray, batch: int, threads: int = 1) -> np.ndarray:
    """Logits of an ONNX graph (a path, or a serialized model) on ``images`` in ONNX Runtime (CPU), ``batch``
    images per run."""
    session = ort_session(graph, threads)
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch
    outs = []
    for i in range(0, len(images), step):
        chunk = images[i:i + step]
        pad = step - len(chunk) if isinstance(fixed, int) and fixed > 0 else 0
        if pad:  # a static-batch graph: pad the last chunk, drop the padding's logits
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(session.run(None, {name: chunk})[0][:len(chunk) - pad])
    return np.concatenate(outs).astype(np.float32)


def run_torch(model: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(torch.from_numpy(images[i:i + batch])) for i in range(0, len(images), batch)]
                         ).float().numpy()


def parity(model: nn.Module, path: Path, images: np.ndarray, tol: Parity, batch: int) -> dict[str, Any]:
    """torch vs ONNX Runtime on ``images``: the numbers, the tolerances and whether they pass."""
    ref, cand = run_torch(model, images), run_onnx(path, images, batch)
    result = compare(ref, cand)
    # what is left of each difference once rtol * |logit| is allowed for; this must stay within max_abs_diff
    result["max_diff_beyond_rtol"] = float((np.abs(ref - cand) - tol.rtol * np.abs(ref)).max())
    passed = (result["max_diff_beyond_rtol"] <= tol.max_abs_diff and result["cosine"] >= tol.min_cosine
              and result["top1_agreement"] >= tol.min_top1_agreement)
    tolerances = {"max_abs_diff": tol.max_abs_diff, "rtol": tol.rtol, "min_cosine": tol.min_cosine,
                  "min_top1_agreement": tol.min_top1_agreement}
    return {"images": len(images), "split": tol.split, **result, "tolerances": tolerances, "passed": passed}


def parity_error(result: dict[str, Any]) -> str:
    t = result["tolerances"]
    return (f"parity check failed on {result['images']} {result['split']} images: max abs diff "
            f"{result['max_abs_diff']:.3g} (tolerance {t['max_abs_diff']:.3g} + {t['rtol']:.3g} x |logit|), "
            f"cosine {result['cosine']:.6f} "
            f"(min {t['min_cosine']}), top-1 agreement {result['top1_agreement']:.4f} "
            f"(min {t['min_top1_agreement']})")


def onnx_top1(graph: Path | bytes, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    """Top-1 of an ONNX graph in ONNX Runtime on preprocessed images."""
    return float(np.mean(run_onnx(graph, images, batch).argmax(1) == labels))


def low_precision_accuracy(out: Path, meta: BundleMeta, profile: Profile, graph: str, runtime: Runtime,
                           calibration: Calibration | None) -> dict[str, Any]:
    """Val and test top-1 of the low-precision ``graph`` in ``out`` next to the FP32 graph's, and the paired gate.

    The graph is run as ``runtime`` computes it (:meth:`Runtime.device_graph`: for TensorRT, the fake-quant proxy
    of :mod:`edgevit.export.fakequant`). The gate (:mod:`edgevit.export.gate`) compares both graphs image by
    image on the val split; when that is too small to resolve the profile's ``max_top1_drop`` it adds train images
    ``calibration`` never drew (:func:`edgevit.export.quantize.held_out_train`), never test images. A drop beyond
    the tolerance with the gate's confidence fails the export; test top-1 is recorded, never used to decide.
    """
    label = profile.precision
    max_drop = profile.quant.max_top1_drop if profile.quantized else profile.tensorrt.max_top1_drop
    eval_batch = 64 if profile.batch_spec.dynamic else profile.batch_spec.max
    graph_pre = preprocess.recorded(meta.preprocessing, profile.input)
    device_graph = runtime.device_graph(out / graph)

    def right(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = preprocess.graph_pixels(images, graph_pre)
        return tuple(run_onnx(g, images, eval_batch).argmax(1) == labels for g in (out / FP32_ONNX, device_graph))

    result: dict[str, Any] = {"graph": graph, "arithmetic": runtime.arithmetic}
    splits = {split: right(*split_arrays(meta, split)) for split in ("val", "test")}
    for split, (fp32, low) in splits.items():
        result |= {f"fp32_{split}_top1": float(fp32.mean()), f"{label}_{split}_top1": float(low.mean()),
                   f"{split}_images": len(fp32)}
    result["delta"] = result[f"{label}_val_top1"] - result["fp32_val_top1"]
    fp32, low = splits["val"]
    sources = {"val": len(fp32)}
    flip_rate = float(np.mean(fp32 != low))
    if not gate.resolves(len(fp32), max_drop, flip_rate):
        from edgevit.export.quantize import held_out_train  # quantize imports this module (via export.onnx)

        held = held_out_train(meta, calibration)
        extra = min(gate.images_needed(max_drop, flip_rate) - len(fp32), len(held))
        log.info("%d val images cannot resolve a %.1f-point drop (%.1f%% of them flip); the gate adds %d train "
                 "images never used for calibration", len(fp32), 100 * max_drop, 100 * flip_rate, extra)
        more = right(*_images(held, balanced_indices(held, extra)))
        fp32, low = np.concatenate([fp32, more[0]]), np.concatenate([low, more[1]])
        sources["train_held_out"] = extra
    result["gate"] = {**gate.paired_gate(fp32, low, max_drop), "sources": sources}
    if result["gate"]["detectable_drop"] > gate.RESOLUTION * max_drop:
        log.warning("the %s gate rests on %d images, %.1f%% of which flip: it detects drops of %.1f%% or more",
                    label.upper(), len(fp32), 100 * np.mean(fp32 != low), 100 * result["gate"]["detectable_drop"])
    if not result["gate"]["passed"]:
        hint = "; try more calibration samples or another calibration method" if profile.quantized else ""
        raise EdgeVitError(f"{label.upper()} {graph} loses accuracy beyond the profile's {max_drop:.3g}: "
                           f"{gate.describe(result['gate'])}{hint}")
    return result


def _images(dataset, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return (torch.stack([dataset[i][0] for i in rows]).numpy().astype(np.float32),
            np.array([dataset.targets[i] for i in rows]))
