"""INT8 and FP8: calibration sets and the quantizers that turn an fp32 ONNX graph into a quantized one.

Calibration sets are manifests ``calibration/<name>.yaml`` (see calibration/README.md) naming ``digits`` or
an image folder, a sample count and a seed; ``bundle`` means the bundle's own train split. Images are drawn
class-balanced (sub-folders count as classes) with :func:`edgevit.data.balanced_indices`.

Quantizers:

- ``static``: ONNX Runtime static quantization in QDQ format on MatMul/Gemm with per-channel weights and
  calibrated activation scales. For TensorRT, activations are symmetric int8 (TensorRT requires zero
  points of 0), Q/DQ pairs sit on MatMul/Gemm inputs only (LayerNorm, Softmax and residual adds are never
  quantized) and the calibrated graph is then made FP16 outside its Q/DQ (opset 19, fp16 scales), the same
  kind of graph ModelOpt writes; for ONNX Runtime, activations are uint8 (the fast u8s8 kernels on x86).
- ``dynamic``: ONNX Runtime dynamic quantization (int8 weights, activation ranges per batch). ORT only.
- ``modelopt``: nvidia-modelopt's ONNX PTQ in INT8 or FP8 mode (TensorRT placement rules, FP16 outside Q/DQ);
  when modelopt is not installed the ``static`` TensorRT path runs instead and export.json says so.

FP8 (E4M3, TensorRT on compute capability 8.9+) is the same Q/DQ placement with FLOAT8E4M3FN instead of int8:
symmetric, per-tensor scales. TensorRT graphs are mixed precision in the graph itself: a strongly typed build
runs the Q/DQ regions in INT8 or FP8, every other tensor in FP16 (except ``tensorrt.fp32_ops``), with FP32 graph
input and output.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.data import Dataset, Subset

from edgevit.data import DIGITS, balanced_indices, load_ref, load_split
from edgevit.data.datasets import IMAGE_SUFFIXES, ImageFiles
from edgevit.errors import EdgeVitError
from edgevit.export import onnx as onnx_export
from edgevit.export.precision import quantized_nodes
from edgevit.export.profiles import Calibration, QuantOptions, find_yaml, read_yaml
from edgevit.vit.bundle import BundleMeta

log = logging.getLogger("edgevit")

CALIBRATION_DIR = "calibration"
CALIBRATION_ENV = "EDGEVIT_CALIBRATION"
BUNDLE_SET = "bundle"
DEFAULT_SAMPLES = 256


class CalibrationManifest(BaseModel):
    """``calibration/<name>.yaml``: where calibration images come from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    source: str  # "digits" or an image folder (relative paths are relative to the manifest)
    split: str = "train"  # for digits: which split to draw from
    samples: int = Field(DEFAULT_SAMPLES, ge=1)
    seed: int = 0


def load_manifest(name: str) -> CalibrationManifest:
    path = find_yaml(name, CALIBRATION_DIR, CALIBRATION_ENV, "calibration set")
    raw = read_yaml(path)
    try:
        manifest = CalibrationManifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise EdgeVitError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if manifest.source != DIGITS and not Path(manifest.source).is_absolute():
        manifest.source = str((path.parent / manifest.source).resolve())
    return manifest


def _folder_images(root: Path, meta: BundleMeta) -> ImageFiles:
    """Every image under ``root`` (recursively); its parent folder is its class for balanced sampling."""
    if not root.is_dir():
        raise EdgeVitError(f"calibration folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    groups = sorted({p.parent for p in files})
    targets = [groups.index(p.parent) for p in files]
    return ImageFiles(files, targets, [str(g) for g in groups], meta.preprocessing)


def _calibration_source(cal: Calibration, meta: BundleMeta) -> tuple[Dataset, int, int, str, bool]:
    """Where the calibration set draws from: the dataset, sample count, seed, a description, and whether the
    dataset is the bundle's own train split."""
    if cal.set == BUNDLE_SET:
        dataset = load_ref(meta.data, "train", meta.preprocessing)
        return dataset, cal.samples or DEFAULT_SAMPLES, cal.seed or 0, f"{meta.data.source} (train split)", True
    manifest = load_manifest(cal.set)
    if manifest.source == DIGITS:
        if meta.data.source != DIGITS:
            raise EdgeVitError(f"calibration set {cal.set!r} is digits but the bundle was trained on "
                               f"{meta.data.source}; calibrate on images of the deployment data")
        dataset = load_split(DIGITS, manifest.split, meta.preprocessing, meta.data.classes)
    else:
        dataset = _folder_images(Path(manifest.source), meta)
    seed = manifest.seed if cal.seed is None else cal.seed
    own_train = manifest.source == DIGITS and manifest.split == "train"
    return dataset, cal.samples or manifest.samples, seed, manifest.source, own_train


def calibration_images(cal: Calibration, meta: BundleMeta) -> tuple[np.ndarray, dict[str, Any]]:
    """The calibration batch (``N x C x H x W`` float32, preprocessed like the bundle) and its description.

    Raises an :class:`EdgeVitError` when the set holds fewer images than asked for.
    """
    dataset, samples, seed, source, _ = _calibration_source(cal, meta)
    if len(dataset) < samples:
        raise EdgeVitError(f"calibration set {cal.set!r} has {len(dataset)} images but {samples} are needed; "
                           "add images or lower calibration.samples")
    rows = balanced_indices(dataset, samples, seed)
    images = torch.stack([dataset[i][0] for i in rows]).numpy().astype(np.float32)
    return images, {"set": cal.set, "source": source, "samples": samples, "seed": seed, "method": cal.method}


def held_out_train(meta: BundleMeta, cal: Calibration | None) -> Subset:
    """The bundle's train split less every image calibration ``cal`` draws (None: no calibration ran): images
    a low-precision graph was never fitted to, for the accuracy gate when the val split is too small."""
    train = load_ref(meta.data, "train", meta.preprocessing)
    used: set[int] = set()
    if cal is not None:
        dataset, samples, seed, _, own_train = _calibration_source(cal, meta)
        rows = balanced_indices(dataset, samples, seed)
        if own_train:
            used = set(rows)
        elif isinstance(dataset, ImageFiles) and isinstance(train, ImageFiles):
            files = {dataset.files[i].resolve() for i in rows}
            used = {i for i, f in enumerate(train.files) if f.resolve() in files}
    held = Subset(train, [i for i in range(len(train)) if i not in used])
    held.targets = [train.targets[i] for i in held.indices]
    return held


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizers' progress prints and bars and their root-logger chatter (one line per tensor);
    their failures still surface as exceptions."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over a fixed batch of images."""

    def __init__(self, name: str, images: np.ndarray, batch: int) -> None:
        self.batches = [{name: images[i:i + batch]} for i in range(0, len(images), batch)
                        if len(images[i:i + batch]) == batch]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def weight_nodes(graph: onnx.ModelProto, ops: list[str], attention_matmuls: bool) -> list[str]:
    """Names of the nodes of type ``ops`` to quantize: those with a constant 2-D weight (the linear layers),
    plus activation x activation MatMuls (attention) when ``attention_matmuls``. Batched constant operands
    (per-head memory tables, H x d x P) stay in fp32: ORT's int8 MatMul kernels take per-channel parameters of
    2-D weights only."""
    constants = {i.name for i in graph.graph.initializer if len(i.dims) == 2}
    constants |= {o for n in graph.graph.node if n.op_type == "Constant" and len(n.attribute[0].t.dims) == 2
                  for o in n.output}
    return [n.name for n in graph.graph.node
            if n.op_type in ops and (attention_matmuls or any(i in constants for i in n.input[1:]))]


def _exclusive_input_nodes(graph: onnx.ModelProto, nodes: list[str], ops: list[str]) -> list[str]:
    """The ``nodes`` whose activation input is read only by MatMul/Gemm nodes. ORT puts one Q/DQ pair on a
    tensor for all its readers, so quantizing a MatMul whose input also feeds a LayerNorm, an Add or a
    Reshape (adapter and router branches of the DATA exact form) would run those in int8 on TensorRT."""
    readers: dict[str, set[str]] = {}
    for node in graph.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    by_name = {n.name: n for n in graph.graph.node}
    return [name for name in nodes if readers.get(by_name[name].input[0], set()) <= set(ops)]


@contextlib.contextmanager
def _named_copy(src: Path, dst: Path) -> Iterator[tuple[Path, onnx.ModelProto]]:
    """``src`` with every node named (the quantizers select nodes by name), saved next to ``dst`` for the
    duration; yields its path and graph."""
    graph = onnx.load(str(src))
    for i, node in enumerate(graph.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    named = dst.with_suffix(".named.onnx")
    onnx.save(graph, str(named))
    try:
        yield named, graph
    finally:
        named.unlink(missing_ok=True)


def _ort_calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
            "distribution": CalibrationMethod.Distribution}[method]  # ORT's only one for float8


def _ort_weights(opts: QuantOptions) -> dict[str, Any]:
    """ONNX Runtime's quantizer arguments for the profile's ``weight_type`` (int7: int8 with ``reduce_range``)."""
    from onnxruntime.quantization import QuantType

    return {"weight_type": QuantType.QUInt8 if opts.weight_type == "uint8" else QuantType.QInt8,
            "reduce_range": opts.weight_type == "int7"}


def quantize_static(src: Path, dst: Path, images: np.ndarray, opts: QuantOptions, method: str,
                    for_tensorrt: bool, batch: int, fp32_ops: list[str] = (), mode: str = "int8") -> dict[str, Any]:
    """ONNX Runtime static QDQ quantization of ``src``'s MatMul/Gemm nodes into ``dst``; for TensorRT the
    result is FP16 outside the Q/DQ except ``fp32_ops``. ``mode`` ``fp8`` quantizes to FLOAT8E4M3FN
    (per-tensor, TensorRT only)."""
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_static

    # Symmetric int8 activations for TensorRT (zero point 0); uint8 activations for ORT's u8s8 CPU kernels.
    fp8 = mode == "fp8"
    activation = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8 if for_tensorrt else QuantType.QUInt8
    weights = {"weight_type": QuantType.QFLOAT8E4M3FN} if fp8 else _ort_weights(opts)
    extra = {"ActivationSymmetric": for_tensorrt, "WeightSymmetric": True}
    if for_tensorrt:  # Q/DQ on MatMul/Gemm inputs only: TensorRT fuses them; outputs stay high precision
        extra["OpTypesToExcludeOutputQuantization"] = list(opts.ops)
    with _named_copy(src, dst) as (named, graph):
        nodes = weight_nodes(graph, opts.ops, opts.quantize_attention_matmuls)
        if for_tensorrt:
            nodes = _exclusive_input_nodes(graph, nodes, opts.ops)
        try:
            with _quiet():
                ort_static(str(named), str(dst), _Reader(graph.graph.input[0].name, images, batch),
                           quant_format=QuantFormat.QDQ, op_types_to_quantize=opts.ops, nodes_to_quantize=nodes,
                           per_channel=opts.per_channel and not fp8, activation_type=activation,
                           calibrate_method=_ort_calibration_method("distribution" if fp8 else method),
                           extra_options=extra, **weights)
        finally:
            for leftover in dst.parent.glob("augmented_model*.onnx"):
                leftover.unlink()
    if for_tensorrt:
        onnx_export.to_fp16(dst, dst, list(fp32_ops))
    activations = "fp8-e4m3" if fp8 else "int8-symmetric" if for_tensorrt else "uint8"
    return {"method": "onnxruntime-static-qdq", "quantized_nodes": len(nodes), "activations": activations,
            "weights": "fp8-e4m3" if fp8 else opts.weight_type, "per_channel": opts.per_channel and not fp8}


def quantize_dynamic(src: Path, dst: Path, opts: QuantOptions) -> dict[str, Any]:
    """ONNX Runtime dynamic quantization: int8 weights of MatMul/Gemm, activation ranges at run time."""
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    with _named_copy(src, dst) as (named, graph), _quiet():
        nodes = weight_nodes(graph, opts.ops, opts.quantize_attention_matmuls)
        gemms = [n.name for n in graph.graph.node if n.op_type == "Gemm" and n.name in nodes]
        # ORT's integer ops have no Gemm: it splits each into MatMul (named "<gemm>_MatMul") + Add first
        ort_dynamic(str(named), str(dst), op_types_to_quantize=[*opts.ops, "MatMul"],
                    nodes_to_quantize=nodes + [f"{name}_MatMul" for name in gemms],
                    per_channel=opts.per_channel, **_ort_weights(opts))
    integer = ("MatMulInteger", "QAttention", "DynamicQuantizeMatMul")
    quantized = sum(n.op_type in integer for n in onnx.load(str(dst), load_external_data=False).graph.node)
    return {"method": "onnxruntime-dynamic", "quantized_nodes": quantized, "weights": opts.weight_type,
            "per_channel": opts.per_channel}


def modelopt_available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _ort_restored() -> Iterator[None]:
    """Undo ModelOpt's in-place patches of ONNX Runtime's calibrators and quantizers
    (``modelopt.onnx.quantization.ort_patching``) once it is done, so ORT's own static quantization still works in
    this process (after a ModelOpt export it fails on tensors ModelOpt's calibrator skipped)."""
    import inspect

    from onnxruntime.quantization import base_quantizer, calibrate, qdq_quantizer, quantize

    owners = [owner for module in (calibrate, base_quantizer, qdq_quantizer, quantize)
              for owner in (module, *(c for _, c in inspect.getmembers(module, inspect.isclass)))]
    saved = [(owner, dict(vars(owner))) for owner in owners]
    try:
        yield
    finally:
        for owner, attrs in saved:
            for name, value in attrs.items():
                if vars(owner).get(name) is not value:
                    setattr(owner, name, value)


def quantize_modelopt(src: Path, dst: Path, images: np.ndarray, opts: QuantOptions, method: str,
                      fp32_ops: list[str] = (), mode: str = "int8") -> dict[str, Any]:
    """nvidia-modelopt ONNX PTQ in ``mode`` ``int8`` or ``fp8`` (TensorRT's Q/DQ placement rules, its MHA pattern
    when the profile quantizes attention), LayerNorm/Softmax/Add excluded, FP16 outside Q/DQ except ``fp32_ops``;
    calibration on the CPU."""
    from modelopt.onnx.quantization import quantize

    with _named_copy(src, dst) as (named, graph), _quiet(), _ort_restored():
        # As for the ORT placer: only nodes whose activation input is read by MatMul/Gemm alone, so no Q/DQ pair
        # lands on a tensor a LayerNorm, Add or Reshape also reads (the DATA exact form's adapter branches).
        nodes = _exclusive_input_nodes(graph, weight_nodes(graph, opts.ops, opts.quantize_attention_matmuls),
                                       opts.ops)
        quantize(str(named), quantize_mode=mode, calibration_data=images,
                 calibration_method="max" if method == "minmax" or mode == "fp8" else "entropy",
                 op_types_to_quantize=opts.ops, nodes_to_quantize=nodes,
                 op_types_to_exclude=opts.high_precision_ops, op_types_to_exclude_fp16=list(fp32_ops) or None,
                 disable_mha_qdq=not opts.quantize_attention_matmuls, high_precision_dtype="fp16",
                 calibration_eps=["cpu"], log_level="WARNING", output_path=str(dst))
    quantized = quantized_nodes(onnx.load(str(dst), load_external_data=False).graph)
    return {"method": f"modelopt-{mode}", "quantized_nodes": len(quantized), "per_channel": mode == "int8"}
