"""Prompt tokens in a ViT: the prompted forward of training, and the two graph edits that keep trained prompts
(``prefix_kv``: merged deep prompts as constant keys/values; ``prompt_tokens``: shallow prompts as tokens).

Deep prompts (VPT-deep) replace the previous block's prompt outputs before each prompted block, so they only
ever act as extra keys/values; shallow prompts are inserted once, after the prefix tokens and before
``norm_pre``, and carried through every block. Either way the prompt outputs are dropped before the final
norm, so the head pools only the class/register and patch tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgevit.vit.attention import split_qkv
from edgevit.vit.model import attention, embed_tokens, num_blocks
from edgevit.vit.surgery import register


def insert_prompts(x: torch.Tensor, prompts: torch.Tensor, num_prefix: int, replace: int = 0) -> torch.Tensor:
    """``prompts`` (``m x d``, or ``1 x m x d``) inserted after the first ``num_prefix`` tokens of ``x``, in place of
    the ``replace`` tokens there (the previous block's prompts)."""
    prompts = prompts.expand(x.shape[0], -1, -1).to(x.dtype)
    return torch.cat([x[:, :num_prefix], prompts, x[:, num_prefix + replace:]], dim=1)


def drop_prompts(x: torch.Tensor, num_prefix: int, count: int) -> torch.Tensor:
    """``x`` without the ``count`` prompt tokens that follow its first ``num_prefix`` tokens."""
    return torch.cat([x[:, :num_prefix], x[:, num_prefix + count:]], dim=1)


def prompted_forward(model: VisionTransformer, images: torch.Tensor, prompts: torch.Tensor,
                     blocks: Sequence[int] | None, pre_logits: bool = False) -> torch.Tensor:
    """``model``'s logits (``pre_logits``: the pooled features its head reads) for ``images`` read with prompt
    tokens (``prompts``: ``layers x m x d``).

    Args:
        model: a plain ViT (no prompt ops).
        images: the batch.
        prompts: one prompt set per prompted block (deep) or one set (shallow).
        blocks: deep: the prompted blocks, ``prompts[i]`` before ``blocks[i]``; None: shallow.
        pre_logits: return the head's input instead of its output.
    """
    n, m = model.num_prefix_tokens, prompts.shape[1]
    x = embed_tokens(model, images)
    carried = 0 if blocks is not None else m
    if blocks is None:
        x = insert_prompts(x, prompts[0], n)
    x = model.norm_pre(x)
    layer_of = {b: i for i, b in enumerate(blocks or [])}
    for i, block in enumerate(model.blocks):
        if i in layer_of:
            x, carried = insert_prompts(x, prompts[layer_of[i]], n, carried), m
        x = block(x)
    return model.forward_head(model.norm(drop_prompts(x, n, carried)), pre_logits=pre_logits)


@register("prefix_kv")
def prefix_kv(model: VisionTransformer, tokens: int, blocks: Sequence[int] | None = None) -> None:
    """Give each listed block (default: all) ``tokens`` constant prefix keys/values (merged deep prompts)."""
    for b in range(num_blocks(model)) if blocks is None else blocks:
        attn = attention(model, b)
        zeros = torch.zeros(attn.num_heads, tokens, attn.head_dim)
        attn.set_prefix(zeros, zeros)


@torch.no_grad()
def set_prefix_prompts(model: VisionTransformer, block: int, prompts: torch.Tensor) -> None:
    """Merge the deep prompts ``prompts`` (``m x d``) of ``block`` (which has a ``prefix_kv`` op) into its constant
    keys and values: ``k_norm(LN1(P) W_k + b_k)`` and ``LN1(P) W_v + b_v``, exactly what the block computes for
    them; their queries and MLP outputs were never read."""
    attn = attention(model, block)
    _, k, v = split_qkv(attn, attn.qkv(model.blocks[block].norm1(prompts[None])))
    attn.set_prefix(attn.k_norm(k)[0], v[0])


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
        return self.inner(insert_prompts(x, self.prompts, self.num_prefix_tokens))


@register("prompt_tokens")
def prompt_tokens(model: VisionTransformer, tokens: int) -> None:
    """Carry ``tokens`` shallow prompt tokens through every block (pooling ignores them)."""
    model.norm_pre = PromptTokens(tokens, model.embed_dim, model.num_prefix_tokens, model.norm_pre)
    # Pooling skips the first num_prefix_tokens tokens; counting the prompts there keeps them out of it.
    model.num_prefix_tokens += tokens


@torch.no_grad()
def set_prompt_tokens(model: VisionTransformer, prompts: torch.Tensor) -> None:
    """Keep the shallow prompts ``prompts`` (``m x d``) in the model's ``prompt_tokens`` op."""
    model.norm_pre.prompts.copy_(prompts[None])
