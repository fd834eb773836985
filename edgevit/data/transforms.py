"""Image -> tensor, as recorded in a bundle's preprocessing, through timm's transform factory.

Eval (and export, profiling, prediction): timm's eval transform. ``crop_mode`` ``squash`` resizes both sides to
``size / crop_pct`` (aspect ratio not kept; at ``crop_pct`` 1 nothing is cut off); ``center`` resizes the
shorter side to ``floor(size / crop_pct)`` and cuts the centre ``size x size`` out, as timm evaluates its
pretrained models. Training (:class:`~edgevit.train.Augment`, the same for every method): timm's
RandomResizedCrop pipeline for image files, flips only where the user allows them; :func:`random_shift` for
the embedded digits. Each draws from the global generators, which the training loop seeds per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from edgevit.errors import EdgeVitError
from edgevit.train.config import Augment
from edgevit.vit.bundle import Preprocessing

Transform = Callable[[Image.Image], torch.Tensor]


def default_preprocessing(size: int, channels: int) -> Preprocessing:
    """Mean/std of 0.5: a neutral choice for models trained from scratch on the user's own images."""
    return Preprocessing(size=size, channels=channels, mean=[0.5] * channels, std=[0.5] * channels)


def pretrained_config(model_name: str) -> dict:
    """timm's registered pretrained config of ``model_name`` (default tag when it has none), offline."""
    from timm.models import get_pretrained_cfg

    found = get_pretrained_cfg(model_name, allow_unregistered=False)
    if found is None:
        raise EdgeVitError(f"timm has no pretrained config for {model_name!r} (see timm.list_pretrained())")
    return found.to_dict()


def pretrained_preprocessing(pretrained_cfg: dict, channels: int, size: int | None = None) -> Preprocessing:
    """The preprocessing a timm pretrained model was trained with (``timm.data.resolve_data_config``: mean,
    std, interpolation, crop_pct, crop_mode), at ``size`` (default: the pretrained input size).

    Args:
        pretrained_cfg: a timm pretrained config (:func:`pretrained_config`, or a created model's
            ``pretrained_cfg``).
        channels: input channels; for 1 the per-channel statistics are averaged.
        size: input side; default the pretrained input size.
    """
    from timm.data import resolve_data_config

    data = resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    mean, std = list(data["mean"]), list(data["std"])
    if channels == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return Preprocessing(size=size or data["input_size"][-1], channels=channels, mean=mean, std=std,
                         interpolation=data["interpolation"], crop_pct=data["crop_pct"],
                         crop_mode=data.get("crop_mode") or "center")


def with_overrides(pre: Preprocessing, **overrides) -> Preprocessing:
    """``pre`` with the given fields replaced (``None`` values are ignored); a one-value mean/std is repeated
    per channel."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in ("mean", "std"):
        if key in given:
            values = list(given[key])
            if len(values) == 1:
                values *= pre.channels
            if len(values) != pre.channels:
                raise EdgeVitError(f"--{key} needs 1 or {pre.channels} values, got {len(values)}")
            given[key] = values
    if "crop_pct" in given and not 0 < given["crop_pct"] <= 1:
        raise EdgeVitError(f"--crop-pct must be in (0, 1], got {given['crop_pct']}")
    return pre.model_copy(update=given)


def _converted(mode: str, tf: Transform, image: Image.Image) -> torch.Tensor:
    return tf(image.convert(mode))


def _with_mode(pre: Preprocessing, tf: Transform) -> Transform:
    """``tf`` after a conversion to the model's channels; a partial (not a lambda) so workers can pickle it."""
    return partial(_converted, "L" if pre.channels == 1 else "RGB", tf)


def eval_transform(pre: Preprocessing) -> Transform:
    """PIL image (any mode, any size) -> normalised ``C x size x size`` tensor, as the bundle records."""
    from timm.data import create_transform

    tf = create_transform(pre.size, is_training=False, interpolation=pre.interpolation, mean=pre.mean,
                          std=pre.std, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)
    return _with_mode(pre, tf)


# TrivialAugment (Mueller & Hutter 2021) in timm's RandAugment: one op per image, always applied, magnitude drawn
# uniformly from 0..10 (mstd above 100 means uniform). The ops and their ranges are timm's RandAugment ones.
TRIVIAL_AUGMENT = "rand-n1-m10-mstd101-p1.0"


def train_transform(pre: Preprocessing, augment: Augment) -> Transform:
    """timm's training transform for ``pre`` (no colour jitter: a defect's colour can be its signature;
    ``augment.auto_augment`` may still add RandAugment's colour ops when the user asks for them)."""
    from timm.data import create_transform

    auto = TRIVIAL_AUGMENT if augment.auto_augment == "trivial" else augment.auto_augment
    try:
        tf = create_transform(pre.size, is_training=True, scale=augment.scale, hflip=augment.hflip,
                              vflip=augment.vflip, color_jitter=None, auto_augment=auto,
                              interpolation=pre.interpolation, mean=pre.mean, std=pre.std)
    except (AssertionError, ValueError, KeyError):  # timm asserts on an unknown policy or config section
        raise EdgeVitError(f"--auto-augment {augment.auto_augment!r} is not a timm auto-augment config (e.g. "
                           "rand-m9-mstd0.5, trivial, augmix-m5, original)") from None
    return _with_mode(pre, tf)


def folder_augmentation(augment: Augment) -> dict[str, Any]:
    """What :func:`train_transform` runs, as a bundle's provenance records it."""
    return {"transform": "timm RandomResizedCrop", **asdict(augment)}


# The digits' augmentation: a random translation of up to 1/16 of the side each way and a scale in 0.9-1.1 (a
# flip or a crop can turn one digit into another).
SHIFT = {"transform": "random shift", "translate": 1 / 16, "scale": (0.9, 1.1)}


@cache
def _pixel_grid(height: int, width: int) -> torch.Tensor:
    """``1 x H x W x 2`` sampling coordinates of every pixel centre (grid_sample's, in [-1, 1])."""
    return F.affine_grid(torch.eye(2, 3)[None], [1, 1, height, width], align_corners=False)


def random_shift(image: torch.Tensor) -> torch.Tensor:
    """One ``C x H x W`` image shifted and scaled at random (:data:`SHIFT`; the border pixels fill in)."""
    scale, shift = torch.rand(1), torch.rand(2)
    lo, hi = SHIFT["scale"]
    offset = (shift - 0.5) * 4 * SHIFT["translate"]  # grid coordinates span 2 per side
    grid = _pixel_grid(*image.shape[-2:]) * (lo + (hi - lo) * scale) + offset
    return F.grid_sample(image[None], grid.to(image.dtype), padding_mode="border", align_corners=False)[0]


def normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Normalise a ``C x H x W`` (or batched) tensor with values in [0, 1]."""
    mean = torch.tensor(pre.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def image_to_tensor(image: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """One PIL image through the bundle's eval transform."""
    return eval_transform(pre)(image)
