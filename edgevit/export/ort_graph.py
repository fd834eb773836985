"""ONNX Runtime-only rewrites of an exported ViT graph into ORT's fused ``com.microsoft`` kernels.

ONNX Runtime's own session fusions leave most of a timm ViT block as separate nodes on the CPU: its
attention fusion does not match timm's ``qkv -> Reshape -> Transpose -> Split`` form, and only one residual
``Add`` + ``LayerNormalization`` of the 25 becomes a ``SkipLayerNormalization``. These rewrites build those
kernels directly from the standard graph:

- ``attention``: ``qkv`` MatMul + bias, the head split, the scaled ``q k^T``, Softmax, ``@ v`` and the head
  merge become one ``com.microsoft::Attention`` (packed QKV weight and bias, ``num_heads``, ``scale``).
- ``skip_layernorm``: ``LayerNormalization(residual + (x @ W + b))`` becomes one
  ``com.microsoft::SkipLayerNormalization`` that also adds the Linear's bias and outputs the residual sum.
- ``multihead_attention`` (alternative to ``attention``): the qkv MatMul stays, its bias and the rest go into
  ``com.microsoft::MultiHeadAttention``.

Measured with ``benchmarks/peers.py`` and ``benchmarks/int8_cpu.py`` (vit_tiny at 224, batch 1, 2 threads,
ORT 1.32, interleaved; shared machine): ``attention`` 0.92-0.97x of the standard graph's latency,
``multihead_attention`` the same in fp32 and slower once quantized, ``skip_layernorm`` 1.07-1.10x (slower:
ORT's CPU SkipLayerNormalization loses to LayerNormalization + Add), so only ``attention`` is on by default.
Tried and not kept, because they did not pay at idle: Linear biases inside ``Gemm`` (Reshape + Gemm + Reshape,
the MLP kept 2-D across its GELU: 1.00x), ORT's ``BiasGelu`` fusion disabled (1.02x), an INT8 attention
core from standard ops (``MatMulInteger``; 1.7x the fp32 core's time, ``benchmarks/attention_core.py``).

A pattern that does not match exactly (prefix K/V, memory branches, skipped sub-layers) is left as it is, so
every rewrite computes what the original computed. Only ONNX Runtime targets get these graphs: TensorRT's
ONNX parser reads standard ops only (:func:`edgevit.export.checks.check_standard_ops`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    """Look-ups over a graph (producers, consumers, constants) and node replacement; :meth:`finish` writes the
    nodes back in topological order and drops initializers nothing reads any more."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.dead: set[int] = set()
        self.added: list[onnx.NodeProto] = []
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def node(self, name: str, op: str) -> onnx.NodeProto | None:
        """The producer of ``name`` if it is an ``op`` node that is still alive."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op and id(node) not in self.dead else None

    def sole(self, name: str, op: str) -> onnx.NodeProto | None:
        """The only consumer of ``name`` if it is an ``op`` node and ``name`` is not a graph output."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op or name in self.outputs or id(readers[0]) in self.dead:
            return None
        return readers[0]

    def private(self, nodes: list[onnx.NodeProto], keep: str) -> bool:
        """Whether every output of ``nodes`` except ``keep`` is read only inside ``nodes`` (safe to remove)."""
        ids = {id(n) for n in nodes}
        return all(
            o == keep or (o not in self.outputs and all(id(c) in ids for c in self.consumers.get(o, [])))
            for n in nodes
            for o in n.output
        )

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        found = next((a for a in node.attribute if a.name == name), None)
        return helper.get_attribute_value(found) if found is not None else default

    def add_int64(self, name: str, value: list[int]) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def add_init(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def replace(self, old: list[onnx.NodeProto], new: onnx.NodeProto) -> None:
        """Remove ``old`` and put ``new`` where the last of them was (keeps the order topological)."""
        self.dead.update(id(n) for n in old)
        self.added.append(new)
        self.producer.update({o: new for o in new.output})
        for name in new.input:
            self.consumers.setdefault(name, []).append(new)

    def finish(self) -> None:
        """Write the surviving and new nodes back in topological order and drop unused initializers."""
        nodes = [n for n in self.graph.node if id(n) not in self.dead] + self.added
        ready = {i.name for i in self.graph.input} | set(self.inits) | {""}
        ordered: list[onnx.NodeProto] = []
        while nodes:
            progress = [n for n in nodes if all(i in ready for i in n.input)]
            if not progress:
                raise ValueError("rewritten graph has a cycle or an undefined input")
            ordered += progress
            ready.update(o for n in progress for o in n.output)
            done = {id(n) for n in progress}
            nodes = [n for n in nodes if id(n) not in done]
        used = {i for n in ordered for i in n.input} | self.outputs
        copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
        del self.graph.node[:]
        self.graph.node.extend(copies)
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        if all(o.domain != MS_DOMAIN for o in self.model.opset_import) and any(n.domain == MS_DOMAIN for n in ordered):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _scalar(g: _Graph, mul: onnx.NodeProto | None, name: str) -> tuple[str, float]:
    """``(x, s)`` when ``name`` is ``Mul(x, s)`` with a scalar constant ``s``, else ``(name, 1.0)``."""
    if mul is not None:
        for a, b in ((0, 1), (1, 0)):
            value = g.const(mul.input[b])
            if value is not None and value.size == 1:
                return mul.input[a], float(value.reshape(()))
    return name, 1.0


def _linear(g: _Graph, name: str) -> tuple[onnx.NodeProto, np.ndarray | None, list[onnx.NodeProto]] | None:
    """``(matmul, bias, nodes)`` when ``name`` is ``x @ W (+ b)`` with constant 2-D ``W`` and 1-D ``b``."""
    add = g.node(name, "Add")
    bias, nodes = None, []
    if add is not None:
        for a, b in ((0, 1), (1, 0)):
            value = g.const(add.input[b])
            if value is not None and value.ndim == 1 and g.node(add.input[a], "MatMul") is not None:
                bias, name, nodes = value, add.input[a], [add]
                break
    matmul = g.node(name, "MatMul")
    if matmul is None or g.const(matmul.input[1]) is None or g.const(matmul.input[1]).ndim != 2:
        return None
    return matmul, bias, [matmul, *nodes]


@dataclass
class _Attention:
    """One matched timm attention: ``x`` -> qkv Linear (``weight``, ``bias``) -> heads -> ``output``."""

    x: str
    weight: str
    bias: np.ndarray
    heads: int
    scale: float
    output: str
    nodes: list[onnx.NodeProto]


def _match_attention(g: _Graph, softmax: onnx.NodeProto) -> _Attention | None:
    """The timm attention around ``softmax`` (see the module docstring), or None when any part differs."""
    if g.attr(softmax, "axis", -1) != -1:
        return None
    scores, out = g.node(softmax.input[0], "MatMul"), g.sole(softmax.output[0], "MatMul")
    if scores is None or out is None or out.input[0] != softmax.output[0]:
        return None
    q, q_scale = _scalar(g, g.node(scores.input[0], "Mul"), scores.input[0])
    k_t, k_scale = _scalar(g, g.node(scores.input[1], "Mul"), scores.input[1])
    k_transpose = g.node(k_t, "Transpose")
    if k_transpose is None or g.attr(k_transpose, "perm") != [0, 1, 3, 2]:
        return None
    squeezes = [g.node(name, "Squeeze") for name in (q, k_transpose.input[0], out.input[1])]
    if any(s is None for s in squeezes) or len({s.input[0] for s in squeezes}) != 3:
        return None
    split = g.node(squeezes[0].input[0], "Split")
    if split is None or list(split.output) != [s.input[0] for s in squeezes] or g.attr(split, "axis", 0) != 0:
        return None
    heads_first = g.node(split.input[0], "Transpose")
    if heads_first is None or g.attr(heads_first, "perm") != [2, 0, 3, 1, 4]:
        return None
    unpack = g.node(heads_first.input[0], "Reshape")
    shape = g.const(unpack.input[1]) if unpack is not None else None
    if shape is None or len(shape) != 5 or shape[2] != 3:
        return None
    heads, head_size = int(shape[3]), int(shape[4])
    linear = _linear(g, unpack.input[0])
    merge = g.sole(out.output[0], "Transpose")
    flat = g.sole(merge.output[0], "Reshape") if merge is not None and g.attr(merge, "perm") == [0, 2, 1, 3] else None
    if linear is None or flat is None:
        return None
    matmul, bias, linear_nodes = linear
    width = g.const(matmul.input[1]).shape[1]
    if width != 3 * heads * head_size:
        return None
    nodes = [*linear_nodes, unpack, heads_first, split, *squeezes, k_transpose, scores, softmax, out, merge, flat]
    nodes += [m for m in (g.node(scores.input[0], "Mul"), g.node(scores.input[1], "Mul")) if m is not None]
    if not g.private(nodes, flat.output[0]):
        return None
    bias = np.zeros(width, np.float32) if bias is None else bias
    return _Attention(matmul.input[0], matmul.input[1], bias, heads, q_scale * k_scale, flat.output[0], nodes)


def fuse_attention(g: _Graph) -> int:
    """timm's attention -> one ``com.microsoft::Attention`` (qkv projection inside). Returns the count."""
    count = 0
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        if (found := _match_attention(g, softmax)) is None:
            continue
        prefix = f"{found.output}/attention"
        attention = helper.make_node(
            "Attention",
            [found.x, found.weight, g.add_init(f"{prefix}/bias", found.bias)],
            [found.output],
            name=prefix,
            domain=MS_DOMAIN,
            num_heads=found.heads,
            scale=found.scale,
        )
        g.replace(found.nodes, attention)
        count += 1
    return count


def fuse_multihead_attention(g: _Graph) -> int:
    """timm's attention -> qkv ``MatMul`` + ``Split`` + ``com.microsoft::MultiHeadAttention`` (qkv bias
    inside). Returns the count."""
    count = 0
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        if (found := _match_attention(g, softmax)) is None:
            continue
        prefix = f"{found.output}/mha"
        width = len(found.bias) // 3
        qkv = [f"{prefix}/{t}" for t in "qkv"]
        g.replace(found.nodes, helper.make_node("MatMul", [found.x, found.weight], [f"{prefix}/qkv_out"]))
        split = helper.make_node(
            "Split", [f"{prefix}/qkv_out", g.add_int64(f"{prefix}/sizes", [width] * 3)], qkv, axis=-1
        )
        g.replace([], split)
        mha = helper.make_node(
            "MultiHeadAttention",
            [*qkv, g.add_init(f"{prefix}/bias", found.bias)],
            [found.output],
            name=prefix,
            domain=MS_DOMAIN,
            num_heads=found.heads,
            scale=found.scale,
        )
        g.replace([], mha)
        count += 1
    return count


def fuse_skip_layernorm(g: _Graph) -> int:
    """``LayerNormalization(r + (x @ W + b))`` -> ``MatMul`` + ``com.microsoft::SkipLayerNormalization``
    (bias folded in, the sum kept as its fourth output for the next residual). Returns the count."""
    count = 0
    for norm in [n for n in g.graph.node if n.op_type == "LayerNormalization"]:
        if g.attr(norm, "axis", -1) != -1 or len(norm.input) < 3 or len(norm.output) > 1:
            continue
        add = g.node(norm.input[0], "Add")
        if add is None or any(g.const(i) is not None for i in add.input):
            continue
        for branch in (1, 0):
            bias_add = g.node(add.input[branch], "Add")
            linear = _linear(g, add.input[branch]) if bias_add is not None else None
            if linear is not None and linear[1] is not None and g.private([bias_add], bias_add.output[0]):
                break
        else:
            continue
        matmul, bias, _ = linear
        consumers = [c for c in g.consumers.get(add.output[0], []) if c is not norm]
        total = add.output[0] if consumers or add.output[0] in g.outputs else ""
        prefix = f"{norm.name or norm.output[0]}/skip"
        fused = helper.make_node(
            "SkipLayerNormalization",
            [matmul.output[0], add.input[1 - branch], norm.input[1], norm.input[2], g.add_init(f"{prefix}/bias", bias)],
            [norm.output[0], "", "", total] if total else [norm.output[0]],
            name=prefix,
            domain=MS_DOMAIN,
            epsilon=g.attr(norm, "epsilon", 1e-5),
        )
        g.replace([bias_add, add, norm], fused)
        count += 1
    return count


REWRITES: dict[str, Callable[[_Graph], int]] = {
    "attention": fuse_attention,
    "multihead_attention": fuse_multihead_attention,
    "skip_layernorm": fuse_skip_layernorm,
}
DEFAULT_REWRITES = ("attention",)


def rewrite(src: Path, dst: Path, rewrites: tuple[str, ...] = DEFAULT_REWRITES) -> dict[str, int]:
    """Apply ``rewrites`` (names in :data:`REWRITES`, in order) to ``src`` and write ``dst``; returns how many
    times each matched.

    Args:
        src: an fp32 ONNX graph exported by edgevit (standard ops).
        dst: where to write the rewritten graph (may be ``src``).
        rewrites: which rewrites to apply.
    """
    model = onnx.load(str(src))
    counts = {}
    for name in rewrites:
        g = _Graph(model)
        counts[name] = REWRITES[name](g)
        g.finish()
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return counts
