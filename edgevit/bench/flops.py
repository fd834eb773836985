"""Parameters and FLOPs of a bundle's graph, counted by running it, so surgery ops are counted as built."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from edgevit.vit.bundle import BundleMeta


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-add, matmuls and convolutions; norms and activations not counted) of one
    forward pass on a zero batch of ``input_shape``.

    Attention runs on SDPA's math path while counting: the fused CPU kernel is opaque to the counter, whose
    count would silently drop the attention matmuls.
    """
    model = model.eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(input_shape))
    return int(counter.get_total_flops())


def gflops_per_image(model: nn.Module, meta: BundleMeta) -> float:
    """GFLOPs for one image at the bundle's input size."""
    pre = meta.preprocessing
    return count_flops(model, (1, pre.channels, pre.size, pre.size)) / 1e9
