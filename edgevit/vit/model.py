"""Building timm ViTs with edgevit's attention, and reaching into their blocks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from edgevit.errors import EdgeVitError
from edgevit.vit.attention import EdgeAttention


def create_vit(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """``timm.create_model(name, **kwargs)`` with :class:`EdgeAttention` in every block.

    Args:
        name: a timm ViT architecture, e.g. ``vit_tiny_patch16_224``, with a pretrained tag
            (``vit_small_patch16_224.augreg_in21k_ft_in1k``) or an ``hf-hub:`` id when ``pretrained``.
        pretrained: load timm's pretrained weights (downloaded through the Hugging Face hub and cached; timm
            replaces a head of another size and resizes position embeddings); default random weights.
        **kwargs: overrides of the architecture (img_size, patch_size, embed_dim, depth, num_heads,
            in_chans, num_classes, global_pool, ...).
    """
    if not (name.startswith("hf-hub:") and pretrained) and not timm.is_model(name):
        raise EdgeVitError(f"unknown timm model {name!r} (see timm.list_models('vit_*'))")
    try:
        model = timm.create_model(name, pretrained=pretrained, attn_layer=EdgeAttention, **kwargs)
    except TypeError as err:
        raise EdgeVitError(f"{name} is not a ViT edgevit can adapt: {err}") from None
    except OSError as err:  # huggingface_hub's offline / not-found errors and urllib's are all OSErrors
        raise EdgeVitError(f"cannot fetch pretrained weights for {name} ({type(err).__name__}; offline?): "
                           f"download its model.safetensors on a connected machine and pass --model "
                           f"{name.removeprefix('hf-hub:')} --init model.safetensors") from None
    if not isinstance(model, VisionTransformer):
        raise EdgeVitError(f"{name} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def attention(model: VisionTransformer, block: int) -> EdgeAttention:
    """The attention module of ``block``; an error if that block's attention was removed."""
    attn = getattr(model.blocks[block], "attn", None)
    if not isinstance(attn, EdgeAttention):
        raise ValueError(f"block {block} has no EdgeAttention (skipped or not built by create_vit)")
    return attn


@contextmanager
def capture_attention_logits(model: VisionTransformer, blocks: Iterable[int]) -> Iterator[dict]:
    """Record the fp32 attention logits of ``blocks`` during forward passes inside the context.

    Yields a dict ``{block: B x H x N x N tensor}`` that each forward pass overwrites. Other blocks keep
    the fused path; nothing is kept once the context exits.
    """
    layers = {b: attention(model, b) for b in blocks}
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for block, layer in layers.items():
        def hook(module, args, output, block=block):
            captured[block] = module.logits
            module.logits = None

        layer.capture_logits = True
        handles.append(layer.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for layer, handle in zip(layers.values(), handles, strict=True):
            layer.capture_logits = False
            layer.logits = None
            handle.remove()
        captured.clear()


def attention_blocks(model: VisionTransformer) -> list[int]:
    """Indices of the blocks that still have an attention sub-layer (skip-pruned ones have none)."""
    return [i for i, b in enumerate(model.blocks) if isinstance(getattr(b, "attn", None), EdgeAttention)]


def embed_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The token sequence the first block's pre-norm reads: patch embedding, prefix tokens and position
    embedding (resampled by timm for the image size), patch dropout."""
    return model.patch_drop(model._pos_embed(model.patch_embed(images)))


@torch.no_grad()
def block_inputs(model: VisionTransformer, images: torch.Tensor, blocks: Iterable[int]) -> dict[int, torch.Tensor]:
    """The inputs (``n x N x d``, fp32) of ``blocks`` when ``model`` reads ``images``."""
    captured: dict[int, torch.Tensor] = {}
    handles = [model.blocks[b].register_forward_pre_hook(
        lambda module, args, b=b: captured.__setitem__(b, args[0].detach().float())) for b in blocks]
    try:
        model.eval().forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@contextmanager
def injected_attention(model: VisionTransformer, probs: dict[int, torch.Tensor]) -> Iterator[None]:
    """Make the listed blocks of ``model`` attend with the given probabilities inside the context."""
    layers = {b: attention(model, b) for b in probs}
    for block, layer in layers.items():
        layer.injected_probs = probs[block]
    try:
        yield
    finally:
        for layer in layers.values():
            layer.injected_probs = None
