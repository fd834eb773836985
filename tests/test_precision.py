"""The precision report: what TensorRT will run each MatMul/Gemm/Conv in, read from the graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgevit.export.precision import check_precision, precision_report


def _graph(dtype: int, quantize_first: bool, fp8: bool = False) -> onnx.ModelProto:
    """x (1x4x8) -> MatMul(W1 8x16) -> MatMul(W2 16x2): the first optionally behind Q/DQ (int8, or FP8 E4M3) on
    both operands."""
    np_type = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    zero = (helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0]) if fp8
            else numpy_helper.from_array(np.array(0, np.int8), "z"))
    inits = [numpy_helper.from_array(np.ones((8, 16), np_type), "w1"),
             numpy_helper.from_array(np.ones((16, 2), np_type), "w2"),
             numpy_helper.from_array(np.array(0.1, np_type), "s"), zero]
    nodes = []
    a, b = "x", "w1"
    if quantize_first:
        for name in ("x", "w1"):
            nodes += [helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"]),
                      helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"])]
        a, b = "x_dq", "w1_dq"
    nodes += [helper.make_node("MatMul", [a, b], ["h"], name="first"),
              helper.make_node("MatMul", ["h", "w2"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", dtype, [1, 4, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_int8_only_where_both_operands_are_dequantized_and_flops_from_shapes():
    report = precision_report(_graph(TensorProto.FLOAT, quantize_first=True))
    by_name = {n["name"]: n for n in report["nodes"]}
    assert (by_name["first"]["precision"], by_name["second"]["precision"]) == ("INT8", "FP32")
    assert (by_name["first"]["flops"], by_name["second"]["flops"]) == (2 * 4 * 8 * 16, 2 * 4 * 16 * 2)
    total = 2 * 4 * 8 * 16 + 2 * 4 * 16 * 2
    assert report["flops_share"] == {"INT8": round(1024 / total, 4), "FP32": round(256 / total, 4)}
    assert report["line"] == "INT8 80%, FP16 0%, FP32 20% of MatMul/Gemm/Conv FLOPs (1 INT8, 0 FP16, 1 FP32 nodes)"


def test_fp8_qdq_reports_fp8_and_an_fp8_profile_refuses_int8():
    report = precision_report(_graph(TensorProto.FLOAT16, quantize_first=True, fp8=True))
    assert report["counts"] == {"FP8": 1, "FP16": 1}
    assert report["line"].startswith("FP8 80%, INT8 0%, FP16 20%, FP32 0% of MatMul/Gemm/Conv FLOPs (1 FP8, 0 INT8")
    assert check_precision(report, "fp8", []) is None
    assert check_precision(report, "int8", []) == "1 MatMul/Gemm/Conv quantized to FP8, not INT8"
    int8 = precision_report(_graph(TensorProto.FLOAT16, quantize_first=True))
    assert check_precision(int8, "fp8", []) == "1 MatMul/Gemm/Conv quantized to INT8, not FP8"


def test_fp16_graph_reports_fp16():
    report = precision_report(_graph(TensorProto.FLOAT16, quantize_first=False))
    assert report["counts"] == {"FP16": 2} and report["flops_share"] == {"FP16": 1.0}


def test_precision_gate_refuses_fp32_compute_beyond_the_profiles_fp32_ops():
    fp32 = precision_report(_graph(TensorProto.FLOAT, quantize_first=True))
    assert check_precision(fp32, "int8", []) == "1 MatMul/Gemm/Conv left in FP32 (first: second)"
    assert check_precision(fp32, "int8", ["MatMul"]) is None and check_precision(fp32, "fp32", []) is None
    assert check_precision(precision_report(_graph(TensorProto.FLOAT16, quantize_first=False)), "fp16", []) is None


def test_attention_blocks_say_why_fused_attention_cannot_take_them(tmp_path):
    """A head size of 20 is no FP16 fused-attention size (multiples of 8 in 16..256); an FP32 graph has no fused
    attention at all. Each block reports its shape and the reason."""
    import timm
    import torch

    from edgevit.export import onnx as onnx_export
    from edgevit.export.profiles import BatchSpec

    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=40, depth=2,
                              num_heads=2, num_classes=3, in_chans=1).eval()
    onnx_export.export_onnx(model, tmp_path / "fp32.onnx", torch.zeros(1, 1, 16, 16), BatchSpec(min=1, opt=1, max=1))
    onnx_export.to_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx", [])
    fp32 = precision_report(onnx.load(str(tmp_path / "fp32.onnx")))["attention"]
    fp16 = precision_report(onnx.load(str(tmp_path / "fp16.onnx")))
    assert [(b["fused"], b["reason"]) for b in fp32] == [(None, "matmuls run FP32/FP32")] * 2
    assert [(b["head_size"], b["seq_len"], b["fused"]) for b in fp16["attention"]] == [(20, 17, None)] * 2
    assert fp16["attention"][0]["reason"] == "head size 20 not a multiple of 8 in 16..256"
    assert fp16["line"].endswith("fused attention 0/2 blocks (head size 20 not a multiple of 8 in 16..256)")
