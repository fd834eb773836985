"""The only code that knows ViT internals: attention, graph surgery, bundles."""

from edgevit.vit import adapters, memory, prompts  # noqa: F401  (importing them registers their surgery ops)
from edgevit.vit.attention import EdgeAttention, split_qkv
from edgevit.vit.bundle import BundleMeta, DataRef, Preprocessing, load_bundle, read_meta, save_bundle
from edgevit.vit.model import (
    attention,
    attention_blocks,
    block_inputs,
    capture_attention_logits,
    create_vit,
    embed_tokens,
    injected_attention,
)
from edgevit.vit.surgery import SURGERY, apply_surgery, register

__all__ = [
    "SURGERY",
    "BundleMeta",
    "DataRef",
    "EdgeAttention",
    "Preprocessing",
    "apply_surgery",
    "attention",
    "attention_blocks",
    "block_inputs",
    "capture_attention_logits",
    "create_vit",
    "embed_tokens",
    "injected_attention",
    "load_bundle",
    "read_meta",
    "register",
    "save_bundle",
    "split_qkv",
]
