"""What TensorRT will run each compute node in, read from the ONNX graph alone.

A strongly typed TensorRT network takes every tensor's type from the graph, so the precision of a MatMul, Gemm
or Conv is decided before the device sees it: INT8 when its activation and weight inputs are both outputs of
``DequantizeLinear`` (TensorRT fuses the Q/DQ pair into an INT8 kernel), else the element type ONNX type
inference gives its first input (FP16 or FP32). FLOPs come from the inferred shapes (an unknown batch counts
as 1), so the shares say where the time will go.
"""

from __future__ import annotations

from math import prod
from typing import Any

import onnx

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16"}


def _types_and_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, list[int]]]:
    """``name -> (elem_type, dims)`` of every typed tensor (unknown dims as 1)."""
    typed = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        typed[info.name] = (tensor.elem_type, [d.dim_value or 1 for d in tensor.shape.dim])
    for init in graph.initializer:
        typed[init.name] = (init.data_type, list(init.dims))
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            typed[node.output[0]] = (t.data_type, list(t.dims))
    return typed


def _flops(node: onnx.NodeProto, typed: dict[str, tuple[int, list[int]]]) -> int:
    """Multiply-adds x 2 of one MatMul/Gemm/Conv from its inferred shapes (0 when they are unknown)."""
    a = typed.get(node.input[0], (0, []))[1]
    b = typed.get(node.input[1], (0, []))[1]
    out = typed.get(node.output[0], (0, []))[1]
    if not a or not b or not out:
        return 0
    if node.op_type == "Conv":  # out: N x Cout x ...; weight: Cout x Cin/groups x k...
        return 2 * prod(out) * prod(b[1:])
    if node.op_type == "Gemm":
        trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
        return 2 * prod(out) * (a[0] if trans_a else a[-1])
    return 2 * prod(out) * a[-1]


def _is_int8(node: onnx.NodeProto, dequantized: set[str]) -> bool:
    """Both operands are ``DequantizeLinear`` outputs (a Gemm/Conv bias does not decide the kernel)."""
    return node.op_type in COMPUTE_OPS and all(i in dequantized for i in node.input[:2])


def _dequantized(graph: onnx.GraphProto) -> set[str]:
    return {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}


def int8_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The MatMul/Gemm/Conv nodes TensorRT runs in INT8."""
    dequantized = _dequantized(graph)
    return [n for n in graph.node if _is_int8(n, dequantized)]


def precision_report(model: onnx.ModelProto) -> dict[str, Any]:
    """Per MatMul/Gemm/Conv the precision TensorRT will run it in, and the share of FLOPs by precision.

    Returns a dict with ``nodes`` (name, op, precision, flops), ``flops_share`` (precision -> fraction),
    ``counts`` (precision -> nodes) and ``line``, the one-line summary the export prints.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    typed = _types_and_shapes(graph)
    dequantized = _dequantized(graph)
    nodes = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        dtype = typed.get(node.input[0], (0, []))[0]
        precision = "INT8" if _is_int8(node, dequantized) else NAMES.get(dtype, "unknown")
        nodes.append({"name": node.name, "op": node.op_type, "precision": precision,
                      "flops": _flops(node, typed)})
    total = sum(n["flops"] for n in nodes) or 1
    shares: dict[str, float] = {}
    counts: dict[str, int] = {}
    for n in nodes:
        shares[n["precision"]] = shares.get(n["precision"], 0.0) + n["flops"] / total
        counts[n["precision"]] = counts.get(n["precision"], 0) + 1
    order = ("INT8", "FP16", "FP32")
    line = ", ".join(f"{p} {round(100 * shares.get(p, 0.0))}%" for p in order) + " of MatMul/Gemm/Conv FLOPs ("
    line += ", ".join(f"{counts.get(p, 0)} {p}" for p in order) + " nodes)"
    return {"how": "ONNX type inference; INT8 where both operands come from DequantizeLinear",
            "flops_share": {p: round(s, 4) for p, s in shares.items()}, "counts": counts, "line": line,
            "nodes": nodes}
