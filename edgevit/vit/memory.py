"""Memory tables: the deployable form of a memorizing ViT (MoViT), and the ``memory_table`` surgery op.

What is whose:

* [paper: MoViT, Shen et al., MLMI 2023, arXiv 2303.15553; only its abstract was readable] an external
  memory caches attention snapshots (keys/values) during training, is updated by an *attention temporal
  moving average* (ATMA), and is distilled by *prototypical attention learning* (PAL) into a small
  representative set for fast inference.
* [paper: Memorizing Transformers, Wu et al., ICLR 2022] each query attends to its top-k memory keys
  (a non-differentiable key/value cache) with ordinary softmax attention, and the result is blended with
  local attention by a learned per-head scalar gate ``O = g*O_mem + (1-g)*O_local``, ``g = sigmoid(b_g)``.
* [ours] everything concrete below: one block's memory, per-head tables ``keys``/``values`` (``H x P x
  d_h``) read with the block's own (unscaled) queries and its softmax scale; a per-slot additive score
  ``bias`` (``H x P``) that carries ``log(count)`` of the memory slots a prototype summarises (so a
  prototype standing in for ``m`` identical slots gets their softmax mass) and ``-inf`` for unused slots;
  top-k read as TopK + GatherElements; and an explicit *closed* gate state ``gate_logit = -inf`` for which
  ``sigmoid`` is exactly 0 and the block is exactly the plain block (``0*O_mem + 1*O_local == O_local``).

In a bundle the table is constants (keys, values, bias, gate logits) in a plain graph; the full training
memory and its bookkeeping (labels, counts, ATMA) live in ``edgevit.methods.memory`` and the run's
checkpoint, never here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgevit.vit.attention import split_qkv
from edgevit.vit.model import attention, pooled_tokens
from edgevit.vit.surgery import register


class MemoryTable(nn.Module):
    """A constant per-head key/value table attended by every query of one block, gated against local attention.

    Called by :class:`~edgevit.vit.attention.EdgeAttention` as ``memory(q, out)`` with the per-head queries
    (before scaling) and the local attention output, both ``B x H x N x d_h``.

    Args:
        num_heads: heads of the block.
        slots: table rows ``P`` per head.
        head_dim: ``d_h``.
        topk: attend to the ``k`` best-scoring rows per query; ``None`` (or ``k >= P``) is dense attention.
    """

    def __init__(self, num_heads: int, slots: int, head_dim: int, topk: int | None = None) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"a memory table needs at least one slot, got {slots}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be positive, got {topk}")
        self.topk = topk if topk is not None and topk < slots else None
        self.scale = head_dim ** -0.5
        self.keys = nn.Parameter(torch.zeros(num_heads, slots, head_dim))
        self.values = nn.Parameter(torch.zeros(num_heads, slots, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, slots))
        # Closed until trained: a freshly built table leaves the block exactly as it was.
        self.gate_logit = nn.Parameter(torch.full((num_heads,), float("-inf")))

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    def gate(self) -> torch.Tensor:
        """The per-head blend weight ``g`` in [0, 1], shaped ``1 x H x 1 x 1``."""
        return self.gate_logit.sigmoid().view(1, -1, 1, 1)

    def close_gate(self) -> None:
        """Set ``g = 0`` exactly in every head: the block becomes the plain block."""
        with torch.no_grad():
            self.gate_logit.fill_(float("-inf"))

    def read(self, q: torch.Tensor) -> torch.Tensor:
        """Memory attention ``softmax(q K^T * scale + bias) V`` (over the top-k rows when ``topk`` is set)."""
        keys, values = self.keys.to(q.dtype), self.values.to(q.dtype)
        scores = (q * self.scale) @ keys.transpose(-2, -1) + self.bias.to(q.dtype).unsqueeze(1)
        if self.topk is None:
            return scores.softmax(dim=-1) @ values
        B, H, N, _ = q.shape
        d = values.shape[-1]
        top, index = scores.topk(self.topk, dim=-1)
        # GatherElements over the slot axis: the rows each query picked, B x H x (N*k) x d_h.
        picked = torch.gather(values.unsqueeze(0).expand(B, -1, -1, -1), 2,
                              index.reshape(B, H, N * self.topk, 1).expand(-1, -1, -1, d))
        weights = top.softmax(dim=-1).unsqueeze(-2)  # B x H x N x 1 x k
        return (weights @ picked.reshape(B, H, N, self.topk, d)).squeeze(-2)

    def forward(self, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        g = self.gate().to(out.dtype)
        return g * self.read(q) + (1 - g) * out

    def table_bytes(self) -> int:
        """Bytes of the table's rows (keys, values, bias) at fp32; the gate adds ``4*H`` bytes to any table."""
        return (self.keys.numel() + self.values.numel() + self.bias.numel()) * 4

    def extra_repr(self) -> str:
        heads, slots, d = self.keys.shape
        return f"heads={heads}, slots={slots}, head_dim={d}, topk={self.topk}"


def memory_of(model: VisionTransformer, block: int) -> MemoryTable:
    """The memory table installed in ``block``; an error if there is none."""
    table = attention(model, block).memory
    if not isinstance(table, MemoryTable):
        raise ValueError(f"block {block} has no memory table")
    return table


@register("memory_table")
def memory_table(model: VisionTransformer, block: int, slots: int, topk: int | None = None) -> None:
    """Give ``block`` a constant memory table of ``slots`` rows per head (zeros, gate closed until loaded)."""
    attn = attention(model, block)
    if attn.memory is not None:
        raise ValueError(f"block {block} already has a memory branch")
    attn.memory = MemoryTable(attn.num_heads, slots, attn.head_dim, topk)


def set_memory(model: VisionTransformer, block: int, table: MemoryTable) -> None:
    """Make ``block`` read ``table`` (in place of its own, if it has one)."""
    attention(model, block).memory = table


@contextmanager
def capture_pooled_kv(model: VisionTransformer, block: int) -> Iterator[dict[str, torch.Tensor]]:
    """Record, per forward pass inside the context, each image's key and value in ``block`` for the tokens the
    head pools (:func:`~edgevit.vit.model.pooled_tokens`, averaged: the class token, or the mean patch token),
    ``B x H x d_h`` each and detached; keys after the block's key norm, as its attention reads them.

    Yields ``{"keys": ..., "values": ...}``, overwritten by every forward pass.
    """
    attn = attention(model, block)
    pooled = pooled_tokens(model)
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        _, k, v = split_qkv(attn, output.detach())
        captured["keys"] = attn.k_norm(k)[:, :, pooled].mean(2)
        captured["values"] = v[:, :, pooled].mean(2)

    handle = attn.qkv.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
