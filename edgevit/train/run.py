"""What every ``edgevit train <method>`` shares: the run directory, metrics and provenance."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgevit import __version__
from edgevit.data import load_ref
from edgevit.errors import EdgeVitError
from edgevit.train.loop import CHECKPOINT, evaluate, is_main_process
from edgevit.vit.bundle import META, BundleMeta


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    """Create ``out`` for a new run, or check it can be resumed. Never overwrites a finished run."""
    out = Path(out)
    if not is_main_process():  # rank 0 checks and creates; the others only read its checkpoint
        return out
    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"{out} exists and is not a directory")
    if resume:
        if not (out / CHECKPOINT).exists() and not (out / META).exists():
            raise EdgeVitError(f"nothing to resume in {out} (no {CHECKPOINT})")
    elif out.exists() and any(out.iterdir()):
        raise EdgeVitError(f"{out} is not empty; pass --resume to continue it or choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    return out


def split_metrics(model: nn.Module, meta: BundleMeta, splits: tuple[str, ...] = ("val", "test")) -> dict:
    """Top-1 of ``model`` on the bundle's data splits, with how it was measured."""
    metrics: dict[str, Any] = {"how": "top-1 through torch fp32, eval mode, on the bundle's data splits"}
    for split in splits:
        metrics[f"{split}_top1"] = round(evaluate(model, load_ref(meta.data, split, meta.preprocessing)), 5)
    return metrics


def provenance(method: str, config: dict[str, Any], seed: int, **extra: Any) -> dict[str, Any]:
    import timm

    return {
        "method": method,
        "config": config,
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"edgevit": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        **extra,
    }
