"""Image -> tensor, as recorded in a bundle's preprocessing."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from edgevit.vit.bundle import Preprocessing

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def default_preprocessing(size: int, channels: int) -> Preprocessing:
    """Mean/std of 0.5: a neutral choice for models trained from scratch on the user's own images."""
    return Preprocessing(size=size, channels=channels, mean=[0.5] * channels, std=[0.5] * channels)


def normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Normalise a ``C x H x W`` (or batched) tensor with values in [0, 1]."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def image_to_tensor(image: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """Any PIL image (grayscale, RGB, RGBA, palette; any size) -> normalised ``C x size x size`` tensor."""
    image = image.convert("L" if pre.channels == 1 else "RGB")
    image = image.resize((pre.size, pre.size), _RESAMPLE[pre.interpolation])
    array = np.asarray(image, dtype=np.float32) / 255.0
    x = torch.from_numpy(array.copy())
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    return normalize(x, pre)
