"""What TensorRT will run each compute node in, read from the ONNX graph alone.

A strongly typed TensorRT network takes every tensor's type from the graph, so the precision of a MatMul, Gemm
or Conv is decided before the device sees it: INT8 (or FP8) when its activation and weight inputs are both outputs
of ``DequantizeLinear`` from int8 (or FLOAT8E4M3FN) values (TensorRT fuses the Q/DQ pair into an INT8 or FP8
kernel), else the element type ONNX type inference gives its first input (FP16 or FP32). FLOPs come from the
inferred shapes (an unknown batch counts as 1), so the shares say where the time will go.

Every other floating-point compute node (LayerNorm, Softmax, GELU, the residual adds) runs in its output's type,
and each attention block (``MatMul -> Softmax -> MatMul``) is checked against TensorRT's fused multi-head attention
rules (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/transformers-fused-attention.html
and the INT8 MHA fusion notes of the TensorRT developer guide): INT8 fused attention needs Q/DQ on Q, K, the softmax
output and V (the second matmul's output is quantized where its consumer, the output projection, reads it through
Q/DQ), head size 16, 32 or 64 and sequences of at most 512 tokens; FP16 fused attention needs both matmuls and the
softmax in FP16 and a head size that is a multiple of 8 from 16 to 256. FP8 fused attention needs FP8 Q/DQ on Q,
K, the softmax output and V (ModelOpt's FP8 MHA pattern); on Ada (compute capability 8.9) head sizes up to 64 and
sequences up to 3072 tokens (TensorRT 10.6 release notes). The attention scale must reach Q or K before the first
matmul, so nothing may sit between that matmul and the softmax.
"""

from __future__ import annotations

from math import prod
from typing import Any

import onnx

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
# Nodes that move, reshape or convert data rather than compute on it (their precision is their neighbours').
DATA_OPS = {"QuantizeLinear", "DequantizeLinear", "Cast", "Constant", "ConstantOfShape", "Shape", "Gather", "Concat",
            "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Split", "Slice", "Expand", "Where", "Equal", "Identity",
            "Flatten", "Tile", "Range"}
PASS_THROUGH = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
INT8_MHA_HEAD_SIZES = (16, 32, 64)
INT8_MHA_MAX_SEQ = 512
ADA_FP8_MHA = ("8.9", 64, 3072)  # compute capability, largest head size, longest sequence
NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16"}
# what a DequantizeLinear's input type makes the compute it feeds
QUANTIZED_KINDS = {onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "INT8",
                   onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.INT4: "INT4"}


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


def _kind(node: onnx.NodeProto, dequantized: dict[str, str]) -> str | None:
    """INT8/FP8 when both operands come from DequantizeLinear of that type (a Gemm/Conv bias does not decide the
    kernel), else None."""
    kinds = {dequantized.get(i) for i in node.input[:2]}
    return kinds.pop() if node.op_type in COMPUTE_OPS and len(kinds) == 1 and None not in kinds else None


def _dequantized(graph: onnx.GraphProto) -> dict[str, str]:
    """``DequantizeLinear`` output -> the kind of values it dequantizes (its input's type: an initializer's, or the
    zero point of the QuantizeLinear that made it; uint8 when that has none)."""
    types = {i.name: i.data_type for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
            types[node.output[0]] = types.get(zero, onnx.TensorProto.UINT8) if zero else onnx.TensorProto.UINT8
    return {n.output[0]: QUANTIZED_KINDS.get(types.get(n.input[0]), "INT8")
            for n in graph.node if n.op_type == "DequantizeLinear"}


def quantized_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The MatMul/Gemm/Conv nodes TensorRT runs in INT8 or FP8."""
    dequantized = _dequantized(graph)
    return [n for n in graph.node if _kind(n, dequantized)]


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _quantized_downstream(name: str, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """``name`` reaches a ``QuantizeLinear`` through data-movement ops only (TensorRT moves Q/DQ across them)."""
    for node in readers.get(name, []):
        if node.op_type == "QuantizeLinear" or (node.op_type in PASS_THROUGH
                                                  and _quantized_downstream(node.output[0], readers)):
            return True
    return False


def _fusion_blockers(kind: str, bmm2: onnx.NodeProto, head: int, seq: int, softmax_type: str,
                     dequantized: dict[str, str], readers: dict[str, list[onnx.NodeProto]],
                     compute_capability: str | None) -> list[str]:
    """Why TensorRT's ``kind`` (INT8, FP8 or FP16) fused attention cannot take a block; empty when it can."""
    if kind == "INT8":
        rules = [(all(i in dequantized for i in bmm2.input[:2]), "softmax output or V not quantized"),
                 (_quantized_downstream(bmm2.output[0], readers), "second matmul's output not quantized"),
                 (head in INT8_MHA_HEAD_SIZES, f"head size {head} not 16/32/64"),
                 (seq <= INT8_MHA_MAX_SEQ, f"sequence {seq} > {INT8_MHA_MAX_SEQ}")]
    elif kind == "FP8":
        ada = compute_capability == ADA_FP8_MHA[0]
        rules = [(all(i in dequantized for i in bmm2.input[:2]), "softmax output or V not quantized"),
                 (not ada or head <= ADA_FP8_MHA[1], f"head size {head} > {ADA_FP8_MHA[1]} on Ada"),
                 (not ada or seq <= ADA_FP8_MHA[2], f"sequence {seq} > {ADA_FP8_MHA[2]} on Ada")]
    else:
        rules = [(softmax_type == "FP16", f"softmax in {softmax_type}"),
                 (16 <= head <= 256 and head % 8 == 0, f"head size {head} not a multiple of 8 in 16..256")]
    return [reason for ok, reason in rules if not ok]


def attention_blocks(graph: onnx.GraphProto, typed: dict[str, tuple[int, list[int]]],
                     precisions: dict[str, str], compute_capability: str | None = None) -> list[dict[str, Any]]:
    """Each ``MatMul -> Softmax -> MatMul`` chain: its head size, sequence length, the precision of its matmuls
    and whether TensorRT's fused attention can take it (``fused``: ``INT8``, ``FP8``, ``FP16`` or None with
    ``reason``) on a GPU of ``compute_capability`` (None: any)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    dequantized = _dequantized(graph)
    blocks = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        bmm1 = producer.get(softmax.input[0])
        out = softmax.output[0]
        after = readers.get(out, [])
        if after and after[0].op_type == "QuantizeLinear":  # softmax -> Q -> DQ -> second matmul
            out = readers[after[0].output[0]][0].output[0]
        bmm2 = next((n for n in readers.get(out, []) if n.op_type == "MatMul"), None)
        if bmm1 is None or bmm2 is None:
            blocks.append({"softmax": softmax.name, "fused": None, "reason": "not a MatMul -> Softmax -> MatMul chain"})
            continue
        if bmm1.op_type != "MatMul":
            blocks.append({"softmax": softmax.name, "fused": None, "reason": f"{bmm1.op_type} between the first matmul "
                           "and the softmax (the scale must be applied to Q or K)"})
            continue
        q_shape = typed.get(bmm1.input[0], (0, []))[1]
        head, seq = (q_shape[-1], q_shape[-2]) if len(q_shape) >= 2 else (0, 0)
        pair = (precisions.get(bmm1.name), precisions.get(bmm2.name))
        softmax_type = NAMES.get(typed.get(softmax.output[0], (0, []))[0], "unknown")
        if pair[0] == pair[1] and pair[0] in ("INT8", "FP8", "FP16"):
            kind = pair[0]
            reasons = _fusion_blockers(kind, bmm2, head, seq, softmax_type, dequantized, readers, compute_capability)
        else:
            kind, reasons = None, [f"matmuls run {pair[0]}/{pair[1]}"]
        blocks.append({"name": bmm1.name.rsplit("/", 2)[0] or bmm1.name, "head_size": head, "seq_len": seq,
                       "matmuls": list(pair), "softmax": softmax_type, "fused": None if reasons else kind,
                       "reason": "; ".join(reasons) or None})
    return blocks


def precision_report(model: onnx.ModelProto, compute_capability: str | None = None) -> dict[str, Any]:
    """Per MatMul/Gemm/Conv the precision TensorRT will run it in, the share of FLOPs by precision, the precision
    of every other compute node and the fused-attention eligibility of every attention block on a GPU of
    ``compute_capability`` (None: any).

    Returns a dict with ``nodes`` (name, op, precision, flops), ``flops_share`` (precision -> fraction),
    ``counts`` (precision -> nodes), ``other`` (precision -> op type -> nodes, for the non-MatMul compute),
    ``attention`` (one entry per block, see :func:`attention_blocks`) and ``line``, the one-line summary the
    export prints.
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
        precision = _kind(node, dequantized) or NAMES.get(dtype, "unknown")
        nodes.append({"name": node.name, "op": node.op_type, "precision": precision,
                      "flops": _flops(node, typed)})
    total = sum(n["flops"] for n in nodes) or 1
    shares: dict[str, float] = {}
    counts: dict[str, int] = {}
    for n in nodes:
        shares[n["precision"]] = shares.get(n["precision"], 0.0) + n["flops"] / total
        counts[n["precision"]] = counts.get(n["precision"], 0) + 1
    order = ("FP8",) * ("FP8" in counts) + ("INT8", "FP16", "FP32")
    line = ", ".join(f"{p} {round(100 * shares.get(p, 0.0))}%" for p in order) + " of MatMul/Gemm/Conv FLOPs ("
    line += ", ".join(f"{counts.get(p, 0)} {p}" for p in order) + " nodes)"
    other: dict[str, dict[str, int]] = {}
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS and node.op_type not in DATA_OPS and node.output[0] in typed:
            p = NAMES.get(typed[node.output[0]][0])
            if p is not None:
                other.setdefault(p, {}).setdefault(node.op_type, 0)
                other[p][node.op_type] += 1
    if other:
        line += "; other compute " + ", ".join(f"{p} {sum(other[p].values())}" for p in order if p in other)
    attention = attention_blocks(graph, typed, {n["name"]: n["precision"] for n in nodes}, compute_capability)
    if attention:
        fused = [b["fused"] for b in attention]
        kinds = [k for k in ("INT8", "FP8", "FP16") if k in fused]
        line += "; fused attention " + (", ".join(f"{k} {fused.count(k)}/{len(fused)}" for k in kinds)
                                         or f"0/{len(fused)} blocks ({attention[0]['reason']})")
    return {"how": "ONNX type inference; INT8/FP8 where both operands come from DequantizeLinear of that type",
            "flops_share": {p: round(s, 4) for p, s in shares.items()}, "counts": counts, "other": other,
            "attention": attention, "line": line, "nodes": nodes}


def check_precision(report: dict[str, Any], precision: str, fp32_ops: list[str]) -> str | None:
    """Why a TensorRT graph breaks its profile's precision, or None: an INT8, FP8 or FP16 graph may leave no
    MatMul/Gemm/Conv and no other compute node in FP32 except the op types the profile keeps (``fp32_ops``)."""
    if precision not in ("int8", "fp8", "fp16"):
        return None
    other_kind = {"int8": "FP8", "fp8": "INT8"}.get(precision)
    if other_kind in report["counts"]:
        return f"{report['counts'][other_kind]} MatMul/Gemm/Conv quantized to {other_kind}, not {precision.upper()}"
    fp32 = [n["name"] for n in report["nodes"] if n["precision"] == "FP32" and n["op"] not in fp32_ops]
    if fp32:
        return f"{len(fp32)} MatMul/Gemm/Conv left in FP32 (first: {fp32[0]})"
    extra = {op: k for op, k in report["other"].get("FP32", {}).items() if op not in fp32_ops}
    if extra:
        return "FP32 compute the profile does not list in tensorrt.fp32_ops: " + \
            ", ".join(f"{k} {op}" for op, k in sorted(extra.items()))
    return None
