"""The device-graph proxy: a TensorRT graph rewritten as FP32 fake quantization computes the ONNX specification's
arithmetic, and nothing ONNX Runtime could compute differently on another CPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgevit.export.checks import run_onnx
from edgevit.export.fakequant import fake_quant

F16 = np.float16


def _spec_graph(x_scale, w, w_scales, bias, y_scale, fp8_scale) -> onnx.ModelProto:
    """FP32 input -> FP16 -> x 0.3 -> int8 Q/DQ -> Gemm with per-channel int8 weights -> uint8 Q/DQ (zero point
    128) -> FP8 Q/DQ -> FP32 output: every rewritten op, in a strongly typed FP16 graph."""
    init = [numpy_helper.from_array(a, n) for a, n in [
        (np.array(0.3, F16), "c"), (np.array(x_scale, F16), "xs"), (np.array(0, np.int8), "xz"),
        (w.astype(F16), "w"), (w_scales.astype(F16), "ws"), (np.zeros(len(w_scales), np.int8), "wz"),
        (bias.astype(F16), "b"), (np.array(y_scale, F16), "ys"), (np.array(128, np.uint8), "yz"),
        (np.array(fp8_scale, F16), "fs")]]
    init.append(helper.make_tensor("fz", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["h", "c"], ["hc"]),
        helper.make_node("QuantizeLinear", ["hc", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["a"]),
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Gemm", ["a", "wd", "b"], ["y"], transB=1),
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["z"]),
        helper.make_node("QuantizeLinear", ["z", "fs", "fz"], ["zq"], saturate=1),
        helper.make_node("DequantizeLinear", ["zq", "fs", "fz"], ["f"]),
        helper.make_node("Cast", ["f"], ["out"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "spec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _spec_reference(x, x_scale, w, w_scales, bias, y_scale, fp8_scale) -> np.ndarray:
    """The same arithmetic written out in numpy from the ONNX specification: each op computed in FP32 and rounded
    to its output type (FP16); Q = saturate(round_half_even(x / scale) + zero point); DQ = (q - zero point) x scale;
    FP8 Q = saturating round-to-nearest cast to E4M3."""
    f32 = np.float32
    h = F16(F16(x).astype(f32) * F16(0.3).astype(f32))
    a = F16(np.clip(np.rint(h.astype(f32) / f32(F16(x_scale))), -128, 127) * f32(F16(x_scale)))
    ws = F16(w_scales).astype(f32)[:, None]
    wd = F16(np.clip(np.rint(F16(w).astype(f32) / ws), -128, 127) * ws)
    y = F16(a.astype(f32) @ wd.astype(f32).T + F16(bias).astype(f32))
    ys = f32(F16(y_scale))
    z = F16((np.clip(np.rint(y.astype(f32) / ys) + 128, 0, 255) - 128) * ys)
    fs = f32(F16(fp8_scale))
    q8 = np.clip(z.astype(f32) / fs, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(f32)
    return F16(q8 * fs).astype(f32)


def test_proxy_computes_the_onnx_specifications_fake_quant_to_fp32_rounding():
    rng = np.random.default_rng(0)
    # Power-of-two scales keep every product and sum of the Gemm exact in FP32 whatever the summation order, so
    # the reference must agree to the last bit on any CPU; the non-power-of-two Mul and the per-channel scales of
    # different sizes exercise FP16 rounding, ties and saturation (|x| up to 40 overflows int8 at scale 2^-3).
    x = (rng.standard_normal((4, 16)) * 40).astype(np.float32)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    w_scales = 2.0 ** rng.integers(-8, -5, 8)
    bias = rng.standard_normal(8)
    args = (0.125, w, w_scales, bias, 1.0, 0.5)
    proxy = fake_quant(_spec_graph(*args))
    onnx.checker.check_model(proxy)
    got = run_onnx(proxy.SerializeToString(), x, batch=4)
    want = _spec_reference(x, *args)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert np.unique(want).size > 16 and np.any(want % 2 != 0)  # FP8 rounds (3 mantissa bits) values up to 256
    ops = {n.op_type for n in proxy.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "MatMulInteger", "QLinearMatMul"}


def test_proxy_of_a_real_int8_graph_has_no_integer_or_fp16_kernel_to_choose(orin_int8_export):
    """What ONNX Runtime runs for the accuracy gate: every tensor FP32 (FP16 values travel as FP32 after one
    rounding pair), no Q/DQ left to fuse into integer kernels, so graph optimisation cannot change the result."""
    out, _ = orin_int8_export
    graph = onnx.load(str(out / "model.int8.onnx"))
    proxy = fake_quant(graph)
    inferred = onnx.shape_inference.infer_shapes(proxy)
    types = {v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    casts_to_fp16 = [n for n in proxy.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert types <= {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64}
    # every FP16 tensor is a Cast's output that only a Cast back to FP32 reads
    readers = {i: n for n in proxy.graph.node for i in n.input}
    assert casts_to_fp16 and all(readers[n.output[0]].op_type == "Cast" for n in casts_to_fp16)
    assert not {n.op_type for n in proxy.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    images = np.random.default_rng(0).standard_normal((5, 1, 16, 16), dtype=np.float32)
    from edgevit.export.artifacts import ort_session

    model = proxy.SerializeToString()
    outs = [np.concatenate([ort_session(model, 1, level).run(None, {"input": x[None]})[0] for x in images])
            for level in ("disable", "all")]
    assert np.array_equal(outs[0], outs[1])
    assert np.abs(outs[0] - run_onnx(out / "model.onnx", images, 5)).max() < 0.5  # close to FP32, not equal
