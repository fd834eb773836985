"""The device graph's arithmetic on any CPU: a TensorRT graph rewritten as FP32 fake quantization.

A strongly typed TensorRT graph says its own precision: FP16 tensors, FP32 bindings and Q/DQ pairs around the
INT8 (or FP8) matrix products. Run as it is by ONNX Runtime, its accuracy would depend on the CPU: ORT fuses
``DequantizeLinear -> MatMul`` into its own integer kernels (which saturate on x86 without VNNI) and picks FP16
kernels by instruction set. :func:`fake_quant` rewrites the graph so ORT can only compute it one way, the ONNX
specification's, in FP32:

- ``QuantizeLinear`` becomes ``Div -> Round (half to even) -> Add zero point -> Clip`` to the integer range,
  or for FP8 ``Div -> Cast(FLOAT8E4M3FN, saturate) -> Cast(FLOAT)``; ``DequantizeLinear`` becomes
  ``(q - zero point) * scale``. Quantized values travel as FP32 holding the integers, so no integer kernel runs.
- Every FP16 tensor is computed in FP32 and rounded to FP16 where the graph produces it (a
  ``Cast(FLOAT16) -> Cast(FLOAT)`` pair): the values the device's tensors hold, with FP32 accumulation inside each
  node, as TensorRT's FP16 kernels accumulate.

What it cannot reproduce is what the device decides: kernel choice, fusion order and accumulation order. Its
numbers differ from TensorRT's by rounding, not by the CPU it runs on.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgevit.errors import EdgeVitError

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP8 = (TensorProto.FLOAT8E4M3FN,)
# integer range of each quantized type (QuantizeLinear's saturation)
INT_RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT4: (-8, 7),
              TensorProto.UINT4: (0, 15)}


def _as_float(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of an initializer or constant as FP32 (exact for FP16 and the integer types)."""
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


class _Rewriter:
    """One pass over the graph in order, writing each node's FP32 replacement (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        inferred = onnx.shape_inference.infer_shapes(model)
        graph = inferred.graph
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]}
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.ranks[init.name] = len(init.dims)
        self.model = model
        # quantized values, zero points and integer biases (int32 into DequantizeLinear) travel as FP32
        self.integers = {name for n in graph.node if n.op_type == "DequantizeLinear" for name in n.input[::2] if name}
        self.integers |= {n.input[2] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, name: str) -> str:
        self.count += 1
        return f"{name}__fq{self.count}"

    def constant(self, name: str, value, dtype=np.float32) -> str:
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), self.fresh(name))
        self.initializers.append(tensor)
        return tensor.name

    def add(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.fresh(inputs[0])
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def round_to_fp16(self, value: str, output: str) -> None:
        self.add("Cast", [self.add("Cast", [value], to=FLOAT16)], output, to=FLOAT)

    def per_axis(self, scale: str, node: onnx.NodeProto) -> str:
        """A per-axis scale or zero point reshaped to broadcast against the node's input along ``axis``."""
        rank = self.ranks.get(node.input[0])
        if self.ranks.get(scale, 0) != 1 or rank is None:
            return scale
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % rank
        shape = [1] * rank
        shape[axis] = -1
        return self.add("Reshape", [scale, self.constant("shape", shape, np.int64)])

    def zero_point(self, node: onnx.NodeProto) -> str | None:
        return self.per_axis(node.input[2], node) if len(node.input) > 2 and node.input[2] else None

    def quantize(self, node: onnx.NodeProto) -> None:
        if any(a.name == "block_size" and a.i for a in node.attribute):
            raise EdgeVitError(f"{node.name}: blocked quantization has no fake-quant proxy yet")
        qtype = self.types.get(node.input[2], TensorProto.UINT8) if len(node.input) > 2 else TensorProto.UINT8
        scaled = self.add("Div", [node.input[0], self.per_axis(node.input[1], node)])
        if qtype in FP8:  # saturate to the format's range, round to nearest even (the spec's FP8 cast)
            fp8 = self.add("Cast", [scaled], to=qtype, saturate=1)
            self.add("Cast", [fp8], node.output[0], to=FLOAT)
            return
        low, high = INT_RANGES[qtype]
        rounded = self.add("Round", [scaled])
        zero = self.zero_point(node)
        shifted = self.add("Add", [rounded, zero]) if zero else rounded
        self.add("Clip", [shifted, self.constant("low", low), self.constant("high", high)], node.output[0])

    def dequantize(self, node: onnx.NodeProto) -> None:
        zero = self.zero_point(node)
        centred = self.add("Sub", [node.input[0], zero]) if zero else node.input[0]
        out = node.output[0]
        product = out if self.types.get(out) != FLOAT16 else self.fresh(out)
        self.add("Mul", [centred, self.per_axis(node.input[1], node)], product)
        if product != out:
            self.round_to_fp16(product, out)

    def cast(self, node: onnx.NodeProto) -> None:
        to = next(a.i for a in node.attribute if a.name == "to")
        if to == FLOAT16:
            self.round_to_fp16(node.input[0], node.output[0])
        elif to == FLOAT and self.types.get(node.input[0]) in (FLOAT, FLOAT16):  # FP16 values travel as FP32
            self.add("Identity", [node.input[0]], node.output[0])
        else:
            self.nodes.append(node)

    def other(self, node: onnx.NodeProto) -> None:
        """Any other node runs in FP32; its FP16 outputs are rounded to FP16 where the graph makes them."""
        node = onnx.NodeProto.FromString(node.SerializeToString())
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and (attr.t.data_type == FLOAT16 or node.output[0] in self.integers):
                    attr.t.CopyFrom(_as_float(attr.t))
            self.nodes.append(node)
            return
        rounded = [(i, out) for i, out in enumerate(node.output) if self.types.get(out) == FLOAT16]
        for i, out in rounded:
            node.output[i] = self.fresh(out)
        self.nodes.append(node)
        for i, out in rounded:
            self.round_to_fp16(node.output[i], out)

    def run(self) -> onnx.ModelProto:
        graph = self.model.graph
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise EdgeVitError(f"{node.op_type} ({node.domain}) has no fake-quant proxy: TensorRT graphs keep "
                                   "standard ops")
            {"QuantizeLinear": self.quantize, "DequantizeLinear": self.dequantize, "Cast": self.cast}.get(
                node.op_type, self.other)(node)
        initializers = [_as_float(t) if t.data_type == FLOAT16 or t.name in self.integers else t
                        for t in graph.initializer]
        out = helper.make_graph(self.nodes, graph.name, [_fp32(v) for v in graph.input],
                                [_fp32(v) for v in graph.output], [*initializers, *self.initializers])
        return helper.make_model(out, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)


def _fp32(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto.FromString(value.SerializeToString())
    if copy.type.tensor_type.elem_type == FLOAT16:
        copy.type.tensor_type.elem_type = FLOAT
    return copy


def fake_quant(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a strongly typed TensorRT graph: FP16, Q/DQ INT8 or FP8) as FP32 fake quantization; see the
    module docstring. The result takes and returns the same tensors."""
    return _Rewriter(model).run()
