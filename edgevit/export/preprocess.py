"""Preprocessing inside the graph: a profile's ``input`` section (``normalize: in_graph``).

The model wants ``(x / R - mean[c]) / std[c]`` for raw pixels ``x`` in [0, R] (R = 255 for ``range: byte``, 1 for
``unit``). Its first op is the patch embedding, a Conv ``y = W * z + b`` with stride = kernel and no padding, so
every output sees only real pixels and the normalisation folds into it exactly:
``W'[d, c] = W[d, c] / (std[c] R)`` and ``b'[d] = b[d] - sum_{c,i,j} W[d, c, i, j] mean[c] / std[c]``. The graph
gains no op for the normalisation; uint8 input adds one Cast to float, NHWC one Transpose (also with
``normalize: outside``, where only the layout changes). The parity check then feeds the adapted graph raw pixels
and torch the same pixels normalised (:class:`NormalizedInput`).

Every consumer reads what the graph takes from export.json (``input.preprocessing``: the bundle's preprocessing
plus ``pixels``, ``range``, ``layout``, ``normalize``): edgevit's own through :func:`graph_pixels`, the device
kit (no edgevit there) through its ``common.graph_input``. An export written before this section existed has
none of the keys and means the defaults (normalised float NCHW).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgevit.errors import EdgeVitError
from edgevit.export.profiles import InputSpec
from edgevit.vit.bundle import Preprocessing

RANGE = {"unit": 1.0, "byte": 255.0}
DTYPE = {"float": "float32", "uint8": "uint8"}
ONNX_DTYPE = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8}
NCHW_FROM_NHWC = [0, 3, 1, 2]


def recorded(preprocessing: Preprocessing, spec: InputSpec) -> dict[str, Any]:
    """export.json's ``input.preprocessing``: the bundle's preprocessing and what the graph takes."""
    return {**preprocessing.model_dump(mode="json"), **spec.model_dump(mode="json")}


def spec_of(preprocessing: Mapping[str, Any]) -> InputSpec:
    """The :class:`InputSpec` recorded in export.json's ``input.preprocessing`` (defaults where absent)."""
    return InputSpec(**{k: preprocessing[k] for k in InputSpec.model_fields if k in preprocessing})


def input_dims(channels: int, size: int, spec: InputSpec) -> list[int]:
    """The graph's input shape without the batch dimension."""
    return [size, size, channels] if spec.layout == "NHWC" else [channels, size, size]


def input_dtype(spec: InputSpec) -> str:
    return DTYPE[spec.pixels]


def graph_pixels(images: np.ndarray, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """Normalised float NCHW ``images`` (what the bundle's transform gives) as the graph of an export with
    ``preprocessing`` (export.json's ``input.preprocessing``) takes them: unchanged for ``normalize: outside``;
    otherwise the raw pixels back (clipped to the range, rounded for uint8), in the graph's layout."""
    spec = spec_of(preprocessing)
    if spec.layout == "NHWC":
        images = images.transpose(0, 2, 3, 1)
    if not spec.raw:
        return np.ascontiguousarray(images, dtype=np.float32)
    shape = (1, 1, 1, -1) if spec.layout == "NHWC" else (1, -1, 1, 1)
    mean = np.asarray(preprocessing["mean"], dtype=np.float64).reshape(shape)
    std = np.asarray(preprocessing["std"], dtype=np.float64).reshape(shape)
    raw = np.clip(images * std + mean, 0.0, 1.0) * RANGE[spec.range]
    if spec.pixels == "uint8":
        return np.ascontiguousarray(np.rint(raw), dtype=np.uint8)
    return np.ascontiguousarray(raw, dtype=np.float32)


class NormalizedInput(nn.Module):
    """``model`` behind the input the adapted graph takes (:func:`adapt_input`): normalises in torch (the
    reference of the parity check) and runs ``model``."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], spec: InputSpec) -> None:
        super().__init__()
        self.model, self.layout, self.raw, self.scale = model, spec.layout, spec.raw, RANGE[spec.range]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        return self.model((x / self.scale - self.mean) / self.std if self.raw else x)


def _patch_embedding(graph: onnx.GraphProto, input_name: str, where: str) -> onnx.NodeProto:
    """The Conv the graph input feeds (its only consumer), checked to be one the fold is exact for."""
    consumers = [n for n in graph.node if input_name in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "Conv":
        found = ", ".join(n.op_type for n in consumers) or "nothing"
        raise EdgeVitError(
            f"{where}: normalize: in_graph needs the input to feed only the patch-embedding Conv; it feeds {found}"
        )
    conv = consumers[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if (
        any(attrs.get("pads", [0]))
        or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
        or attrs.get("group", 1) != 1
    ):
        raise EdgeVitError(
            f"{where}: the patch-embedding Conv pads or groups its input; mean/std cannot be folded into it exactly"
        )
    return conv


def adapt_input(path: Path, input_name: str, mean: list[float], std: list[float], spec: InputSpec) -> dict[str, Any]:
    """Rewrite the ONNX graph at ``path`` (normalised float NCHW input ``input_name``) to take what ``spec`` says:
    with ``normalize: in_graph`` mean/std fold into the patch-embedding Conv (see the module docstring), uint8
    adds a Cast, NHWC a Transpose. Returns what export.json records under ``graph.input``."""
    model = onnx.load(str(path))
    graph = model.graph
    conv = _patch_embedding(graph, input_name, path.name)
    if spec.raw:
        _fold(graph, conv, mean, std, RANGE[spec.range], path.name)
    added = _input_ops(spec)
    _replace_input(graph, conv, input_name, spec, added)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return {
        "folded_into": (conv.name or conv.output[0]) if spec.raw else None,
        "added_ops": added,
        **spec.model_dump(mode="json"),
    }


def _fold(
    graph: onnx.GraphProto, conv: onnx.NodeProto, mean: list[float], std: list[float], scale: float, where: str
) -> None:
    """Fold ``(x / scale - mean) / std`` into ``conv``'s weight and bias initializers, in place."""
    inits = {i.name: i for i in graph.initializer}
    if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] not in inits):
        raise EdgeVitError(f"{where}: the patch-embedding Conv's weights are not constants")
    weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    if weight.shape[1] != len(mean):
        raise EdgeVitError(
            f"{where}: the patch embedding takes {weight.shape[1]} channels, the preprocessing has {len(mean)}"
        )
    bias = (
        numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
        if len(conv.input) > 2
        else np.zeros(weight.shape[0])
    )
    mean64, std64 = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    folded_w = weight / (std64 * scale).reshape(1, -1, 1, 1)
    folded_b = bias - np.einsum("dcij,c->d", weight, mean64 / std64)
    inits[conv.input[1]].CopyFrom(numpy_helper.from_array(folded_w.astype(np.float32), conv.input[1]))
    bias_name = conv.input[2] if len(conv.input) > 2 else f"{conv.name or 'patch_embed'}.folded_bias"
    if len(conv.input) > 2:
        inits[bias_name].CopyFrom(numpy_helper.from_array(folded_b.astype(np.float32), bias_name))
    else:
        graph.initializer.append(numpy_helper.from_array(folded_b.astype(np.float32), bias_name))
        conv.input.append(bias_name)


def _replace_input(
    graph: onnx.GraphProto, conv: onnx.NodeProto, input_name: str, spec: InputSpec, added: list[str]
) -> None:
    """A new graph input ``input_name`` of ``spec``'s dtype and layout, through the ``added`` ops into ``conv``."""
    old = next(i for i in graph.input if i.name == input_name)
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]  # batch, C, H, W
    if spec.layout == "NHWC":
        dims = [dims[0], dims[2], dims[3], dims[1]]
    feed, nodes = input_name, []
    for op in added:  # input -> [Transpose] -> [Cast] -> Conv: transpose while the tensor is still 1 byte/pixel
        out = f"{input_name}_{op.lower()}"
        attrs = {"perm": NCHW_FROM_NHWC} if op == "Transpose" else {"to": TensorProto.FLOAT}
        nodes.append(helper.make_node(op, [feed], [out], name=f"edgevit_input_{op.lower()}", **attrs))
        feed = out
    for i, name in enumerate(conv.input):
        if name == input_name:
            conv.input[i] = feed
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info(input_name, ONNX_DTYPE[input_dtype(spec)], dims))


def _input_ops(spec: InputSpec) -> list[str]:
    """The ops the raw input needs before the patch embedding (the normalisation itself needs none)."""
    return (["Transpose"] if spec.layout == "NHWC" else []) + (["Cast"] if spec.pixels == "uint8" else [])
