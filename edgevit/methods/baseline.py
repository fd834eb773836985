"""The baseline: a timm ViT trained (or fine-tuned from a local checkpoint) on a data source."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from edgevit.data import DIGITS, classifier_classes, data_ref, default_input, load_split
from edgevit.data.transforms import (
    Augment,
    default_preprocessing,
    pretrained_config,
    pretrained_preprocessing,
    with_overrides,
)
from edgevit.errors import EdgeVitError
from edgevit.train import TrainConfig, fit, is_main_process
from edgevit.train.run import check_run_dir, finish_run, method_train_config
from edgevit.vit import BundleMeta, create_vit
from edgevit.vit.bundle import BaseArch, Preprocessing, read_weights

log = logging.getLogger("edgevit")

# A ViT small enough to train on 2 CPU cores in minutes, sized for 32 px digits.
DIGITS_ARCH = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}


def load_init_weights(path: str | Path, model: VisionTransformer) -> list[str]:
    """Load a local checkpoint (safetensors, or a torch state dict read with ``weights_only=True``) into
    ``model``, remapping timm/DeiT/JAX-style names and resizing position embeddings. A classifier head of
    another size is left at its fresh initialisation. Returns the keys left uninitialised."""
    path = Path(path)
    if not path.is_file():
        raise EdgeVitError(f"--init {path} does not exist")
    if path.suffix == ".safetensors":
        state = read_weights(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise EdgeVitError(f"--init {path} is not a loadable torch state dict: {str(err)[:120]}") from None
    for key in ("model", "state_dict", "model_ema"):  # common training-checkpoint wrappers
        state = state.get(key, state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgeVitError(f"--init {path} does not hold a state dict of tensors")
    state = checkpoint_filter_fn({k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()},
                                 model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not state:
        raise EdgeVitError(f"--init {path} shares no weights with {type(model).__name__}")
    missing = model.load_state_dict(state, strict=False).missing_keys
    return missing


def baseline_preprocessing(data: str, model_name: str, img_size: int | None, weights: str | None,
                           overrides: dict[str, Any] | None = None) -> Preprocessing:
    """The input of a baseline: the pretrained model's own preprocessing when the weights are timm's
    (``weights`` ``pretrained``, or an ``--init`` file taken to hold ``model_name``'s pretrained weights) and
    the data is RGB; otherwise the neutral from-scratch default. ``overrides`` (mean, std, interpolation,
    crop_pct) replace recorded fields."""
    default = default_input(data)
    size = img_size or (None if weights else default.size)
    if weights and default.channels == 3:
        pre = pretrained_preprocessing(pretrained_config(model_name), default.channels, size)
    else:
        pre = default_preprocessing(size or default.size, default.channels)
    return with_overrides(pre, **(overrides or {}))


def train_baseline(
        data: str,
        out: str | Path,
        model_name: str = "vit_tiny_patch16_224",
        img_size: int | None = None,
        arch: dict[str, Any] | None = None,
        classes: list[str] | None = None,
        init: str | None = None,
        cfg: TrainConfig | None = None,
        resume: bool = False,
        pretrained: bool = False,
        preprocessing: dict[str, Any] | None = None,
        augment: Augment | None = None,
) -> Path:
    """Train a ViT on ``data`` and write a bundle with val/test top-1 to ``out``.

    Args:
        data: ``digits`` or an image folder.
        out: the run directory (bundle + training checkpoint).
        model_name: a timm ViT architecture (with a pretrained tag or as ``hf-hub:`` id for ``pretrained``).
        img_size: input side; default 32 for digits, the pretrained input size with pretrained weights, 224
            otherwise.
        arch: architecture overrides (patch_size, embed_dim, depth, num_heads, ...); default: a small
            ViT for digits, the named architecture as is otherwise.
        classes: a subset of the source's classes to train on (default all).
        init: a local checkpoint to start from (``model_name``'s pretrained preprocessing is recorded).
        cfg: optimisation settings.
        resume: continue a killed run in ``out``.
        pretrained: start from timm's pretrained weights of ``model_name`` (needs the network once).
        preprocessing: overrides of the recorded preprocessing (mean, std, interpolation, crop_pct).
        augment: image-folder training augmentation (timm's pipeline; default RandomResizedCrop, no flips).
    """
    if pretrained and init:
        raise EdgeVitError("pass either --pretrained or --init, not both")
    cfg = cfg or method_train_config("baseline", data)
    out = check_run_dir(out, resume)
    classes = classifier_classes(data, classes)
    arch = dict(DIGITS_ARCH if data == DIGITS and arch is None and not (pretrained or init) else arch or {})
    resuming = resume and (out / "checkpoint.pt").exists()
    torch.manual_seed(cfg.seed)
    if pretrained:
        channels = default_input(data).channels
        kwargs = {"in_chans": channels, "num_classes": len(classes), **arch,
                  **({"img_size": img_size} if img_size else {})}
        model = create_vit(model_name, pretrained=not resuming, **kwargs)
        pre = with_overrides(pretrained_preprocessing(model.pretrained_cfg, channels, img_size),
                             **(preprocessing or {}))
        model_name = model.pretrained_cfg.get("architecture") or model_name  # a bundle rebuilds offline
    else:
        pre = baseline_preprocessing(data, model_name, img_size, init, preprocessing)
        kwargs = {"in_chans": pre.channels, "num_classes": len(classes), **arch}
        model = create_vit(model_name, img_size=pre.size, **kwargs)
        if init and not resuming:
            missing = load_init_weights(init, model)
            log.info("--init %s: kept fresh (not in the file or of another shape): %s", init,
                     ", ".join(missing) or "nothing")
    kwargs["img_size"] = pre.size

    ref = data_ref(data, classes)
    meta = BundleMeta(base=BaseArch(name=model_name, kwargs=kwargs), preprocessing=pre, classes=classes,
                      data=ref)
    augment = augment or Augment()
    train_set = load_split(data, "train", pre, ref.classes, augment=augment)
    val_set = load_split(data, "val", pre, ref.classes)
    result = fit(model, train_set, cfg, out, val_set=val_set, resume=resume, description="baseline")
    if is_main_process():
        weights = "timm-pretrained" if pretrained else str(init) if init else None
        folder_augment = None if data == DIGITS else asdict(augment)  # digits are augmented by cfg.augment
        finish_run(out, model, meta, "baseline", None, cfg, result, init=weights, augment=folder_augment)
    return out
