"""The registry of graph edits a method may record in a bundle.

Each op is ``apply(model, **params)``: it changes the *structure* of a freshly built model in place (remove
a sub-layer, add a constant table, ...) so that a strict ``load_state_dict`` of the bundle's weights fits.
Ops never train and never read data; the same op list rebuilds the same graph anywhere, which is what
lets the export stage load any method's output without importing ``edgevit.methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from edgevit.errors import EdgeVitError

SurgeryOp = Callable[..., None]
SURGERY: dict[str, SurgeryOp] = {}


def register(name: str) -> Callable[[SurgeryOp], SurgeryOp]:
    """Register ``fn(model, **params)`` as the graph edit ``name``."""

    def wrap(fn: SurgeryOp) -> SurgeryOp:
        if name in SURGERY:
            raise ValueError(f"surgery op {name!r} registered twice")
        SURGERY[name] = fn
        return fn

    return wrap


def apply_surgery(model: VisionTransformer, ops: Sequence[dict]) -> VisionTransformer:
    """Apply the recorded ops, in order, to ``model`` (in place); returns the model."""
    for spec in ops:
        params = dict(spec)
        name = params.pop("op", None)
        if name not in SURGERY:
            raise EdgeVitError(f"unknown surgery op {name!r}; known ops: {', '.join(sorted(SURGERY))}")
        try:
            SURGERY[name](model, **params)
        except (TypeError, ValueError, IndexError) as err:
            raise EdgeVitError(f"surgery op {name!r} with {params} does not fit this model: {err}") from None
    return model


class MlpOnlyBlock(nn.Module):
    """A pre-norm ViT block whose attention sub-layer was removed: ``x + ls2(mlp(norm2(x)))``.

    Keeps the original block's MLP-side modules under their original names, so checkpoint keys
    (``blocks.i.norm2.*``, ``blocks.i.mlp.*``) are unchanged and the attention side leaves no trace.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.ls2 = block.ls2
        self.drop_path2 = block.drop_path2

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register("skip_attention")
def skip_attention(model: VisionTransformer, blocks: Sequence[int]) -> None:
    """Remove the attention sub-layer (norm1, qkv, proj, ls1) of each listed block.

    Only timm's pre-norm ``Block`` is accepted: other block types (post-norm ``ResPostBlock``, parallel
    blocks) compute something else, and rebuilding them as :class:`MlpOnlyBlock` would silently change
    the function of their MLP side.
    """
    for b in blocks:
        b = range(len(model.blocks))[b]  # IndexError when out of range; -1 and depth-1 are the same block
        block = model.blocks[b]
        if isinstance(block, MlpOnlyBlock):
            raise ValueError(f"block {b} has no attention left to skip")
        if not isinstance(block, Block):
            raise ValueError(f"block {b} is a {type(block).__name__}, not a pre-norm timm Block")
        model.blocks[b] = MlpOnlyBlock(block)
