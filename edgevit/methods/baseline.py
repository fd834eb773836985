"""The baseline: a timm ViT trained (or fine-tuned from a local checkpoint) on a data source."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from edgevit.data import DIGITS, classifier_classes, data_ref, default_input, load_split
from edgevit.data.transforms import default_preprocessing, pretrained_config, pretrained_preprocessing, with_overrides
from edgevit.errors import EdgeVitError
from edgevit.methods.registry import MethodConfig, Source, register
from edgevit.settings import setting
from edgevit.train import TrainConfig, fit
from edgevit.train.loop import CHECKPOINT
from edgevit.train.run import check_run_dir, finish_run
from edgevit.vit import BundleMeta, create_vit
from edgevit.vit.bundle import BaseArch, Preprocessing, read_weights

log = logging.getLogger("edgevit")

# A ViT small enough to train on 2 CPU cores in minutes, sized for 32 px digits.
DIGITS_ARCH = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}


@dataclass
class Architecture(MethodConfig):
    """Overrides of a timm ViT architecture (a baseline's, or an attention-transfer student's)."""

    img_size: int | None = setting(None, "Input side (default: 32 for digits, 224 or the weights' for folders; a "
                                         "student: its teacher's, for the same patch grid).")
    patch_size: int | None = setting(None, "Override the architecture's patch size.")
    embed_dim: int | None = setting(None, "Override the width.")
    depth: int | None = setting(None, "Override the number of blocks.")
    heads: int | None = setting(None, "Override the number of heads.")

    def arch(self) -> dict[str, int]:
        """The overrides given, as timm constructor arguments."""
        sizes = {"patch_size": self.patch_size, "embed_dim": self.embed_dim, "depth": self.depth,
                 "num_heads": self.heads}
        return {k: v for k, v in sizes.items() if v is not None}


@dataclass
class BaselineConfig(Architecture):
    """Train a ViT on DATA: from scratch, from timm's pretrained weights (--pretrained) or a local
    checkpoint (--init).

    \b
    Example:
      edgevit train baseline --data digits -o runs/base
      edgevit train baseline --data line3/ --model deit_tiny_patch16_224 --init deit_tiny.safetensors -o runs/line3
    """

    classes: list[str] | None = setting(None, "Comma-separated subset of the data's classes (default: all).")
    pretrained: bool = setting(False, "Start from timm's pretrained weights of --model (a tagged name or hf-hub: id; "
                                      "needs the network once, then timm's cache).")
    init: str | None = setting(None, "Local checkpoint of --model to start from (.safetensors, or a torch state "
                                     "dict); the bundle records --model's pretrained preprocessing.")
    mean: list[float] | None = setting(None, "Override the recorded normalisation mean (one value or one per "
                                             "channel).")
    std: list[float] | None = setting(None, "Override the recorded std.")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = setting(
        None, "Override the recorded resize interpolation.")
    crop_pct: float | None = setting(None, "Override the recorded centre-crop fraction (1: no crop).")

    def check(self) -> None:
        if self.pretrained and self.init:
            raise EdgeVitError("pass either --pretrained or --init, not both")

    def preprocessing(self) -> dict[str, Any]:
        """The overrides of the recorded preprocessing."""
        return {"mean": self.mean, "std": self.std, "interpolation": self.interpolation, "crop_pct": self.crop_pct}


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


def base_model(model_name: str, data: str, cfg: BaselineConfig, classes: list[str],
               resuming: bool) -> tuple[VisionTransformer, BundleMeta]:
    """The model a baseline starts from and its metadata: ``model_name`` with the architecture overrides (a
    small ViT for digits trained from scratch), from timm's pretrained weights, a local checkpoint (not when
    resuming: the checkpoint has the weights) or random ones."""
    arch = cfg.arch() or (DIGITS_ARCH if data == DIGITS and not (cfg.pretrained or cfg.init) else {})
    kwargs = {"num_classes": len(classes), **arch}
    if cfg.pretrained:
        channels = default_input(data).channels
        model = create_vit(model_name, pretrained=not resuming, in_chans=channels, **kwargs,
                           **({"img_size": cfg.img_size} if cfg.img_size else {}))
        pre = with_overrides(pretrained_preprocessing(model.pretrained_cfg, channels, cfg.img_size),
                             **cfg.preprocessing())
        model_name = model.pretrained_cfg.get("architecture") or model_name  # a bundle rebuilds offline
    else:
        pre = baseline_preprocessing(data, model_name, cfg.img_size, cfg.init, cfg.preprocessing())
        model = create_vit(model_name, img_size=pre.size, in_chans=pre.channels, **kwargs)
        if cfg.init and not resuming:
            missing = load_init_weights(cfg.init, model)
            log.info("--init %s: kept fresh (not in the file or of another shape): %s", cfg.init,
                     ", ".join(missing) or "nothing")
    kwargs.update(in_chans=pre.channels, img_size=pre.size)
    meta = BundleMeta(base=BaseArch(name=model_name, kwargs=kwargs), preprocessing=pre, classes=classes,
                      data=data_ref(data, classes))
    return model, meta


@register("baseline", BaselineConfig,
          source=Source("--model", "timm ViT architecture.", default="vit_tiny_patch16_224"))
def train_baseline(source: str, data: str, out: Path, cfg: BaselineConfig, train_cfg: TrainConfig,
                   resume: bool) -> Path:
    """Train the timm ViT ``source`` on ``data`` and write a bundle with val/test top-1 to ``out``.

    Args:
        source: a timm ViT architecture (with a pretrained tag or as ``hf-hub:`` id for ``cfg.pretrained``).
        data: ``digits`` or an image folder.
        out: the run directory (bundle + training checkpoint).
        cfg: the architecture, classes, initial weights and recorded preprocessing.
        train_cfg: optimisation settings.
        resume: continue a killed run in ``out``.
    """
    out = check_run_dir(out, resume)
    classes = classifier_classes(data, cfg.classes)
    torch.manual_seed(train_cfg.seed)
    model, meta = base_model(source, data, cfg, classes, resume and (out / CHECKPOINT).exists())
    pre, chosen = meta.preprocessing, meta.data.classes
    train_set = load_split(data, "train", pre, chosen, augment=train_cfg.augment)
    result = fit(model, train_set, train_cfg, out, val_set=load_split(data, "val", pre, chosen), resume=resume,
                 description="baseline")
    weights = "timm-pretrained" if cfg.pretrained else cfg.init
    return finish_run(out, model, meta, "baseline", cfg, train_cfg, result, init=weights)
