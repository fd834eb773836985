"""Building timm ViTs with edgevit's attention, and reaching into their blocks."""

from __future__ import annotations

import math
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


def num_blocks(model: VisionTransformer) -> int:
    """How many blocks ``model`` has (skip-pruned ones included)."""
    return len(model.blocks)


def block_index(model: VisionTransformer, block: int) -> int:
    """``block`` as a non-negative index (negative counts from the end); IndexError when out of range."""
    return range(num_blocks(model))[block]


def input_size(model: VisionTransformer) -> tuple[int, int]:
    """The image side(s) ``model`` was built for."""
    return tuple(model.patch_embed.img_size)


def num_tokens(model: VisionTransformer) -> int:
    """Tokens the blocks attend over at the built input size: patches plus prefix (class, register) tokens."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def patch_area(model: VisionTransformer) -> int:
    """Input values one patch embedding reads: ``in_chans * patch_h * patch_w``."""
    proj = model.patch_embed.proj
    return proj.in_channels * math.prod(proj.kernel_size)


def pooled_tokens(model: VisionTransformer) -> slice:
    """The token positions the classifier head reads: the class token under ``global_pool='token'``, the patch
    tokens under average/max pooling, every token under attention pooling or pooling that includes the prefix."""
    if model.global_pool == "token":
        return slice(0, 1)
    if model.global_pool in ("avg", "max", "avgmax") and not getattr(model, "pool_include_prefix", False):
        return slice(model.num_prefix_tokens, None)
    return slice(None)


def pooled_features(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """What the classifier head reads (``B x d``): the pooled, normalised tokens."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


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


@contextmanager
def capture_attention_branches(model: VisionTransformer, blocks: Iterable[int]) -> Iterator[dict]:
    """Record, per forward pass inside the context, each of ``blocks``' input ``x`` and its attention branch
    ``ls1(attn(norm1(x)))``, what the block adds to ``x`` (fp32 ``B x N x d`` each).

    Yields ``{block: (x, branch)}``, overwritten by every forward pass.
    """
    captured: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    handles = []
    for b in blocks:
        block = model.blocks[b]
        handles.append(block.register_forward_pre_hook(
            lambda module, args, b=b: captured.__setitem__(b, (args[0].float(), None))))
        # ls1 ends the attention branch (an Identity without LayerScale, whose hooks fire all the same).
        handles.append(block.ls1.register_forward_hook(
            lambda module, args, out, b=b: captured.__setitem__(b, (captured[b][0], out.float()))))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def query_key_product(model: VisionTransformer, block: int) -> torch.Tensor:
    """``W_q W_k^T`` (``d x d``) of ``block``'s attention with right-multiplied projections (``q = x W_q``), so
    its attention logits are ``X (W_q W_k^T) X^T`` up to the scale (and the q/k norms, if any)."""
    qkv = attention(model, block).qkv
    weight = qkv.weight.detach().float()
    return weight[:qkv.in_features].T @ weight[qkv.in_features:2 * qkv.in_features]
