"""torch -> ONNX: export, check, clean up, and the ONNX Runtime fusions of ORT targets.

The TorchScript exporter (``dynamo=False``) is the default: on timm ViTs with :class:`EdgeAttention` (fused
``scaled_dot_product_attention``, prefix K/V, memory branch) it gives a standard-op graph with one
``LayerNormalization`` per norm at opset 17, takes ~0.3 s on a tiny ViT where the dynamo exporter takes
5-8 s, and after onnxslim it has fewer nodes (201 vs 239 on the digits baseline). ``exporter: dynamo`` in a
profile selects torch's newer exporter.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.export.artifacts import ort_session
from edgevit.export.checks import opset_of
from edgevit.export.profiles import BatchSpec

log = logging.getLogger("edgevit")

INPUT, OUTPUT = "input", "logits"

QDQ_FP16_OPSET = 19  # QuantizeLinear/DequantizeLinear take fp16 scales from opset 19


def export_onnx(
        model: nn.Module,
        path: Path,
        sample: torch.Tensor,
        batch: BatchSpec,
        opset: int = 17,
        exporter: str = "torchscript",
) -> onnx.ModelProto:
    """Export ``model`` (eval mode, fp32) to ``path`` with input ``input`` and output ``logits``, checked.

    Args:
        model: the bundle's graph.
        path: where to write the ONNX file.
        sample: one input batch (``B x C x H x W``) to trace with.
        batch: a static batch (``min == max``: the batch dimension is fixed) or a dynamic range.
        opset: ONNX opset; 17+ keeps LayerNormalization as one op.
        exporter: ``torchscript`` or ``dynamo``.
    """
    model = model.eval().float()
    sample = sample[:1] if batch.dynamic else sample[:1].expand(batch.opt, *sample.shape[1:]).contiguous()
    kwargs = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": opset}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                shapes = {"x": {0: torch.export.Dim("batch", min=batch.min, max=max(batch.max, 2))}} \
                    if batch.dynamic else None
                torch.onnx.export(model, (sample,), str(path), dynamo=True, dynamic_shapes=shapes,
                                  external_data=False, **kwargs)
            else:
                axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}} if batch.dynamic else None
                torch.onnx.export(model, (sample,), str(path), dynamo=False, dynamic_axes=axes, **kwargs)
        except Exception as err:  # exporter failures are many types; report the first line only
            raise EdgeVitError(f"torch.onnx.export ({exporter}) failed: {str(err).splitlines()[0][:200]}") from None
    graph = onnx.load(str(path))
    check(graph)
    return graph


def check(graph: onnx.ModelProto) -> None:
    """``onnx.checker`` with full shape inference; a failure is an :class:`EdgeVitError`."""
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as err:
        raise EdgeVitError(f"the exported ONNX graph is invalid: {str(err).splitlines()[0]}") from None


def simplify(src: Path, dst: Path) -> dict[str, int]:
    """Constant folding and graph slimming with onnxslim; writes ``dst`` and returns node counts."""
    import onnxslim

    graph = onnx.load(str(src))
    before = len(graph.graph.node)
    with contextlib.redirect_stdout(io.StringIO()):
        slim = onnxslim.slim(graph)
    check(slim)
    onnx.save(slim, str(dst))
    return {"nodes_before": before, "nodes_after": len(slim.graph.node)}


def op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    """``{domain::op or op: count}`` of a graph's nodes."""
    return dict(Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                        for n in graph.graph.node))


def session_fusions(path: Path) -> dict[str, int]:
    """The fused ops ONNX Runtime builds from ``path`` when a session loads it (level: all).

    Serialises the session's optimised graph to a temporary file and counts its ``com.microsoft`` ops:
    the proof that an ORT target gets the transformer fusions (SkipLayerNormalization, BiasGelu, ...)
    without shipping a graph that only ORT can read.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, optimization="all", optimized_model=optimized)
        graph = onnx.load(str(optimized))
    return {op: n for op, n in sorted(op_counts(graph).items()) if op.startswith("com.microsoft::")}


def transformer_fusions(src: Path, dst: Path, num_heads: int, hidden: int) -> dict[str, int]:
    """Offline fusions with ``onnxruntime.transformers.optimizer`` (model type ``vit``); returns the counts
    of fused operators. Measured on the digits baseline it does not fuse timm's attention and runs slower
    than the session's own fusions, so profiles default to ``ort_fusions: session``."""
    from onnxruntime.transformers import optimizer

    with contextlib.redirect_stdout(io.StringIO()):
        model = optimizer.optimize_model(str(src), model_type="vit", num_heads=num_heads, hidden_size=hidden,
                                         opt_level=0)
    model.save_model_to_file(str(dst))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def to_fp16(src: Path, dst: Path, keep_fp32: list[str]) -> None:
    """A strongly typed fp16 copy of ``src`` for TensorRT, which takes precision from the graph: every float
    tensor fp16 except the graph's inputs and outputs (one Cast at each end, so runners keep fp32 bindings) and
    the ``keep_fp32`` op types. Q/DQ graphs move to opset 19 first, where Q/DQ scales may be fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = onnx.load(str(src))
    if any(n.op_type == "QuantizeLinear" for n in graph.graph.node) and opset_of(graph) < QDQ_FP16_OPSET:
        graph = onnx.version_converter.convert_version(graph, QDQ_FP16_OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(graph, keep_io_types=True, op_block_list=keep_fp32)
    _topological_sort(half.graph)  # the converter appends its input casts after their consumers
    check(half)
    onnx.save(half, str(dst))


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progress = [n for n in pending if all(i in ready for i in n.input)]
        if not progress:
            raise EdgeVitError("the fp16 graph has a cycle or an undefined input")
        for node in progress:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if all(n is not p for p in progress)]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)
