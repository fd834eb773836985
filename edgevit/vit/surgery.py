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
from edgevit.vit.model import attention

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


@register("prefix_kv")
def prefix_kv(model: VisionTransformer, tokens: int, blocks: Sequence[int] | None = None) -> None:
    """Give each listed block (default: all) ``tokens`` constant prefix keys/values (merged deep prompts)."""
    for b in range(len(model.blocks)) if blocks is None else blocks:
        attn = attention(model, b)
        zeros = torch.zeros(attn.num_heads, tokens, attn.head_dim)
        attn.set_prefix(zeros, zeros)


class PromptTokens(nn.Module):
    """Inserts ``M`` learned tokens after the prefix (class/register) tokens: shallow prompts.

    Wraps the model's ``norm_pre`` so it runs after the position embedding, as in VPT-shallow.
    """

    def __init__(self, tokens: int, dim: int, num_prefix_tokens: int, inner: nn.Module) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(1, tokens, dim))
        self.num_prefix_tokens = num_prefix_tokens
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_prefix_tokens
        prompts = self.prompts.expand(x.shape[0], -1, -1).to(x.dtype)
        return self.inner(torch.cat([x[:, :n], prompts, x[:, n:]], dim=1))


@register("prompt_tokens")
def prompt_tokens(model: VisionTransformer, tokens: int) -> None:
    """Carry ``tokens`` shallow prompt tokens through every block (pooling ignores them)."""
    model.norm_pre = PromptTokens(tokens, model.embed_dim, model.num_prefix_tokens, model.norm_pre)
    # Pooling skips the first num_prefix_tokens tokens; counting the prompts there keeps them out of it.
    model.num_prefix_tokens += tokens
