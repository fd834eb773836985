"""Drop-in replacement for timm's ``Attention`` with the hooks edgevit's methods need.

``EdgeAttention`` subclasses ``timm.layers.Attention``, so parameter names and constructor arguments are
identical and any timm ViT checkpoint loads unchanged. Pass it with
``timm.create_model(name, attn_layer=EdgeAttention)``. On top of timm's behaviour it can:

* return the attention logits ``(q k^T) * scale`` in fp32 (``capture_logits = True``; stored in
  ``self.logits``), computed only when asked because they cost ``B*H*N^2*4`` bytes;
* take injected attention probabilities (``self.injected_probs``) in place of its own (attention copy);
* attend to constant prefix keys/values (``prefix_k``/``prefix_v``, shape ``H x M x d_h``): merged deep
  prompts, which add keys but not queries;
* blend in a memory branch (``self.memory``: a module called as ``memory(q, out) -> out`` with the
  per-head queries and the local attention output, both ``B x H x N x d_h``).

With none of these set it runs timm's fused ``scaled_dot_product_attention`` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn


def split_qkv(attn: Attention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (``B x H x N x d_h`` each, before q/k norms) from ``attn.qkv``'s output
    (``B x N x 3d``): timm's fused layout, ``[q | k | v]`` with heads contiguous inside each."""
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


class EdgeAttention(Attention):
    """timm ``Attention`` with logit capture, probability injection, prefix K/V and a memory branch."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.capture_logits = False
        self.logits: torch.Tensor | None = None
        self.injected_probs: torch.Tensor | None = None
        self.register_parameter("prefix_k", None)
        self.register_parameter("prefix_v", None)
        self.memory: nn.Module | None = None

    def set_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Install constant prefix keys/values of shape ``(num_heads, M, head_dim)``."""
        expected = (self.num_heads, keys.shape[1], self.head_dim)
        if keys.shape != expected or values.shape != expected:
            raise ValueError(f"prefix keys/values must have shape {expected}, got {tuple(keys.shape)}")
        self.prefix_k = nn.Parameter(keys.detach().clone(), requires_grad=False)
        self.prefix_v = nn.Parameter(values.detach().clone(), requires_grad=False)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = split_qkv(self, self.qkv(x))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.prefix_k is not None:
            k = torch.cat([self.prefix_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([self.prefix_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)

        out = self._attend(q, k, v, attn_mask, is_causal)
        if self.memory is not None:
            out = self.memory(q, out)

        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        if gate is not None:
            out = out * gate
        out = self.norm(out)
        out = self.proj(out)
        return self.proj_drop(out)

    def _attend(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: torch.Tensor | None,
            is_causal: bool,
    ) -> torch.Tensor:
        if self.injected_probs is not None:
            return self.attn_drop(self.injected_probs.to(v.dtype)) @ v
        if self.capture_logits:
            with torch.autocast(q.device.type, enabled=False):  # the logits are a loss target: keep fp32
                logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)
            if attn_mask is not None:
                logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(
                    ~attn_mask, float("-inf"))
            self.logits = logits
            return self.attn_drop(logits.softmax(dim=-1).to(v.dtype)) @ v
        return F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
        )
