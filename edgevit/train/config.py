"""The training settings every method shares: one default set, torch-free (the CLI reads them for ``--help``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from edgevit.errors import EdgeVitError
from edgevit.settings import setting


@dataclass(frozen=True)
class Augment:
    """Training augmentation, the same for every method. Image folders: timm's RandomResizedCrop pipeline (no
    colour jitter: a defect's colour can be its signature); the embedded digits: a random shift (translation up
    to 1/16 of the side, scale 0.9-1.1), since flipping or cropping a digit can change its class.
    """

    scale: tuple[float, float] = setting((0.5, 1.0), "RandomResizedCrop area range for image folders (min,max).")
    hflip: float = setting(0.0, "Augment image folders with horizontal flips (off: parts may be "
                                "orientation-sensitive).", flag_value=0.5)
    vflip: float = setting(0.0, "Augment image folders with vertical flips.", flag_value=0.5)
    auto_augment: str | None = setting(None, "Image folders: timm auto-augment, e.g. rand-m9-mstd0.5 (RandAugment), "
                                             "trivial (TrivialAugment), augmix-m5, original (AutoAugment).")

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise EdgeVitError(f"--scale must satisfy 0 < min <= max <= 1, got {lo},{hi}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every method (AdamW, linear warm-up then cosine decay). A method's own
    defaults (its config's ``training``) replace some of these; see :func:`edgevit.methods.registry.train_config`.
    """

    epochs: int = setting(40, "Passes over the training split.")
    batch_size: int = setting(64, "Global batch size (split across torchrun processes).")
    lr: float = setting(1e-3, "Peak learning rate.")
    weight_decay: float = setting(0.05, "AdamW weight decay (not on norms, biases, tokens, position embeddings).")
    warmup_epochs: float = setting(2.0, "Linear learning-rate warm-up, in epochs.")
    label_smoothing: float = setting(0.1, "Cross-entropy label smoothing.")
    amp: bool = setting(True, "Mixed precision when training on CUDA.", flag="--amp/--no-amp")
    grad_clip: float = setting(1.0, "Max gradient norm (0: no clipping).")
    seed: int = setting(0, "Seed for init, data order, augmentation.")
    workers: int = setting(2, "DataLoader processes decoding and augmenting image files.")
    balance: bool = setting(False, "Class-weighted sampling: rare classes (defects) are drawn as often as common "
                                   "ones.")
    mixup: float = setting(0.0, "Mixup alpha (timm Mixup, soft-target cross-entropy; 0: off), e.g. 0.8.")
    cutmix: float = setting(0.0, "CutMix alpha (0: off), e.g. 1.0; with --mixup, each batch picks one.")
    augment: Augment | None = setting(Augment(), "Training augmentation (None: the images as evaluated).")

    def __post_init__(self) -> None:
        # Refused when built, so no run writes anything with settings that cannot train.
        for name in ("epochs", "workers", "warmup_epochs", "weight_decay", "label_smoothing", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise EdgeVitError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise EdgeVitError(f"--batch-size and --lr must be positive, got {self.batch_size} and {self.lr}")
        if self.mixup < 0 or self.cutmix < 0:
            raise EdgeVitError(f"--mixup and --cutmix take alphas >= 0, got {self.mixup} and {self.cutmix}")
        per_rank = max(1, self.batch_size // int(os.environ.get("WORLD_SIZE", 1)))
        if self.mixes and per_rank % 2:
            raise EdgeVitError(f"mixup/cutmix pair each batch with its reverse: the batch per process must be even, "
                               f"got {per_rank}")

    @property
    def mixes(self) -> bool:
        return bool(self.mixup or self.cutmix)

    def check_loss(self, own_loss: str | None) -> None:
        """Refuse mixup/cutmix for a loss other than the plain cross-entropy (``own_loss``: its name): the mixed
        soft targets need that loss."""
        if self.mixes and own_loss:
            raise EdgeVitError(f"mixup/cutmix need the plain cross-entropy loss; {own_loss} trains with its own")
