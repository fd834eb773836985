"""What every ``edgevit train <method>`` shares: the run directory, metrics and provenance."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgevit import __version__
from edgevit.data import data_ref, load_ref, source_classes
from edgevit.errors import EdgeVitError
from edgevit.train.config import TrainConfig
from edgevit.train.loop import CHECKPOINT, TrainResult, confusion_matrix, is_main_process
from edgevit.vit.bundle import META, BundleMeta, save_bundle


def check_run_dir(out: str | Path, resume: bool, checkpoint: str = CHECKPOINT) -> Path:
    """Check ``out`` can take a new run (absent or empty) or be resumed (holds ``checkpoint`` or a finished
    bundle). Creates nothing: writers create the directory with their first file, so a run refused by any
    later check leaves nothing behind, and a finished run is never overwritten."""
    out = Path(out)
    if not is_main_process():  # rank 0 checks; the others only read its checkpoint
        return out
    if out.exists() and not out.is_dir():
        raise EdgeVitError(f"{out} exists and is not a directory")
    if resume:
        if not (out / checkpoint).exists() and not (out / META).exists():
            raise EdgeVitError(f"nothing to resume in {out} (no {checkpoint})")
    elif out.exists() and any(out.iterdir()):
        raise EdgeVitError(f"{out} is not empty; pass --resume to continue it or choose another -o")
    return out


def split_metrics(model: nn.Module, meta: BundleMeta, splits: tuple[str, ...] = ("val", "test")) -> dict:
    """Top-1 of ``model`` on the bundle's data splits, with how it was measured; for the last split also the
    per-class top-1 and the confusion matrix (rows: true class, columns: predicted, in ``meta.classes`` order),
    since on imbalanced line data the rare defect classes are what the overall top-1 hides."""
    metrics: dict[str, Any] = {"how": "top-1 through torch fp32, eval mode, on the bundle's data splits"}
    for split in splits:
        matrix = confusion_matrix(model, load_ref(meta.data, split, meta.preprocessing), len(meta.classes))
        metrics[f"{split}_top1"] = round(matrix.diag().sum().item() / max(1, matrix.sum().item()), 5)
    metrics[f"{splits[-1]}_per_class_top1"] = per_class_top1(matrix, meta.classes)
    metrics[f"{splits[-1]}_confusion"] = matrix.tolist()
    return metrics


def per_class_top1(matrix: torch.Tensor, classes: list[str]) -> dict[str, float | None]:
    """Recall of each class from a confusion matrix (``None`` for a class absent from the split)."""
    totals = matrix.sum(1).tolist()
    return {c: round(matrix[i, i].item() / totals[i], 5) if totals[i] else None for i, c in enumerate(classes)}


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


def finish_run(out: Path, model: nn.Module, meta: BundleMeta, method: str, cfg: Any, train_cfg: TrainConfig,
               result: TrainResult | None = None, metrics: dict[str, Any] | None = None,
               top1: dict[str, Any] | None = None, **extra: Any) -> Path:
    """The last step of every ``train_<method>``: top-1 on the bundle's splits, the training record, the
    provenance, and the bundle itself (``model`` must already be the plain graph ``meta`` describes). Under
    torchrun only rank 0 measures and writes; every rank returns ``out``.

    Args:
        out: the bundle directory.
        model: the plain graph.
        meta: its metadata (base, surgery, preprocessing, classes, data); metrics and provenance are set here.
        method: the method's name.
        cfg: the method's config dataclass.
        train_cfg: the optimisation settings (recorded with ``cfg``'s as one ``config``, as the command line
            takes them).
        result: what the (last) :func:`~edgevit.train.fit` returned, or None: its epochs, steps and seconds, and
            the augmentation it ran, are recorded.
        metrics: the method's own measurements, recorded after the split top-1s.
        top1: the split top-1s when the method has measured them already (default: measure ``model``).
        **extra: the method's provenance fields (teacher, backbone, removed blocks, ...).
    """
    if not is_main_process():
        return out
    trained = {}
    if result is not None:
        trained = {"epochs": result.epochs, "steps": result.steps, "train_seconds": round(result.seconds, 1)}
    meta.metrics = {**(top1 or split_metrics(model, meta)), **trained, **(metrics or {})}
    if meta.metrics.get("references"):
        meta.metrics["against_references"] = against(meta.metrics["test_top1"], meta.metrics["references"])
    augment = result.augment if result is not None else None
    meta.provenance = provenance(method, {**asdict(cfg), **asdict(train_cfg)}, train_cfg.seed, augment=augment,
                                 **extra)
    return save_bundle(out, model, meta)


def source_reference(name: str, source: BundleMeta, meta: BundleMeta) -> dict[str, dict[str, Any]]:
    """The source bundle as the reference ``name`` (``graph: source``: it runs the source's graph), when it was
    measured on the same task as ``meta``; else none."""
    if source.data != meta.data or source.classes != meta.classes or "test_top1" not in source.metrics:
        return {}
    return {name: {"val_top1": source.metrics.get("val_top1"), "test_top1": source.metrics["test_top1"],
                   "graph": "source"}}


def against(test_top1: float, references: dict[str, dict[str, Any]]) -> dict[str, str]:
    """One sentence per reference: where the method's test top-1 stands, e.g. "below its linear probe by 9.5
    points"."""
    said = {}
    for name, ref in references.items():
        gap = round(100 * (test_top1 - ref["test_top1"]), 1)
        what = f"{name} ({ref['bound']} bound)" if ref.get("bound") else name
        said[name] = (f"level with its {what}" if gap == 0 else
                      f"{'above' if gap > 0 else 'below'} its {what} by {abs(gap):.1f} points")
    return said


def unseen_classes(meta: BundleMeta, data: str, classes: list[str] | None, purpose: str) -> list[str]:
    """Classes of ``data`` a method may adapt the backbone of ``meta`` to: ``classes`` if given, else those the
    backbone was not trained on (same source). Classes the backbone saw are refused, since continual learning
    and prompt tuning must be measured on labels the backbone never had; another source is a different label
    space and is taken whole.

    Args:
        meta: the backbone bundle's metadata (``data.classes`` unset means it saw every class).
        data: the data source of the new task(s).
        classes: the requested classes, or ``None`` for all unseen ones.
        purpose: what the classes are for, for the error messages (e.g. ``"continual tasks"``).
    """
    same_source = data_ref(data).source == meta.data.source
    seen = set(meta.data.classes or source_classes(meta.data.source)) if same_source else set()
    if classes is None:
        classes = [c for c in source_classes(data) if c not in seen]
        if not classes:
            raise EdgeVitError(f"the backbone was trained on every class of {data}; {purpose} need classes it "
                               "never saw (train it on a subset: edgevit train baseline --classes 0,1,2,3,4)")
    overlap = sorted(set(classes) & seen)
    if overlap:
        raise EdgeVitError(f"classes {overlap} were in the backbone's training data; {purpose} need classes "
                           "the backbone never saw")
    return list(classes)
