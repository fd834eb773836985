"""The baseline: a timm ViT trained (or fine-tuned from a local checkpoint) on a data source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from edgevit.data import DIGITS, classifier_classes, data_ref, default_input, load_split
from edgevit.data.transforms import default_preprocessing
from edgevit.errors import EdgeVitError
from edgevit.train import TrainConfig, fit, is_main_process
from edgevit.train.run import check_run_dir, finish_run, method_train_config
from edgevit.vit import BundleMeta, create_vit
from edgevit.vit.bundle import BaseArch, read_weights

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
) -> Path:
    """Train a ViT on ``data`` and write a bundle with val/test top-1 to ``out``.

    Args:
        data: ``digits`` or an image folder.
        out: the run directory (bundle + training checkpoint).
        model_name: a timm ViT architecture.
        img_size: input side; default 32 for digits, 224 otherwise.
        arch: architecture overrides (patch_size, embed_dim, depth, num_heads, ...); default: a small
            ViT for digits, the named architecture as is otherwise.
        classes: a subset of the source's classes to train on (default all).
        init: a local checkpoint to start from.
        cfg: optimisation settings.
        resume: continue a killed run in ``out``.
    """
    cfg = cfg or method_train_config("baseline", data)
    out = check_run_dir(out, resume)
    default = default_input(data)
    pre = default_preprocessing(img_size or default.size, default.channels)
    classes = classifier_classes(data, classes)
    arch = dict(DIGITS_ARCH if data == DIGITS and arch is None else arch or {})
    kwargs = {"img_size": pre.size, "in_chans": pre.channels, "num_classes": len(classes), **arch}
    torch.manual_seed(cfg.seed)
    model = create_vit(model_name, **kwargs)
    if init and not (resume and (out / "checkpoint.pt").exists()):
        load_init_weights(init, model)

    ref = data_ref(data, classes)
    meta = BundleMeta(base=BaseArch(name=model_name, kwargs=kwargs), preprocessing=pre, classes=classes,
                      data=ref)
    train_set = load_split(data, "train", pre, ref.classes)
    val_set = load_split(data, "val", pre, ref.classes)
    result = fit(model, train_set, cfg, out, val_set=val_set, resume=resume, description="baseline")
    if is_main_process():
        finish_run(out, model, meta, "baseline", None, cfg, result, init=str(init) if init else None)
    return out
