"""Seeded, class-balanced sampling: calibration sets and low-data subsets."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset, Subset

from edgevit.errors import EdgeVitError


def _by_class(dataset: Dataset, seed: int) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(dataset.targets):
        groups.setdefault(int(y), []).append(i)
    rng = random.Random(seed)
    for idx in groups.values():
        rng.shuffle(idx)
    return [groups[y] for y in sorted(groups)]


def class_counts(dataset: Dataset) -> dict[str, int] | None:
    """Images per class of ``dataset`` (``None`` when it does not expose ``targets`` and ``classes``)."""
    targets, classes = getattr(dataset, "targets", None), getattr(dataset, "classes", None)
    if targets is None or classes is None:
        return None
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.long), minlength=len(classes)).tolist()
    return dict(zip(classes, counts, strict=False))


def class_balanced_weights(dataset: Dataset) -> torch.Tensor:
    """One sampling weight per image, the inverse of its class's count: every class is drawn equally often."""
    targets = torch.as_tensor(list(dataset.targets), dtype=torch.long)
    return 1.0 / torch.bincount(targets).double()[targets]


def balanced_indices(dataset: Dataset, n: int, seed: int = 0) -> list[int]:
    """``n`` indices drawn round-robin over classes (each class's order seeded-shuffled)."""
    if n > len(dataset):
        raise EdgeVitError(f"asked for {n} images but the split holds only {len(dataset)}")
    groups = _by_class(dataset, seed)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for idx in groups:
            if depth < len(idx) and len(chosen) < n:
                chosen.append(idx[depth])
        depth += 1
    return chosen


def calibration_batch(dataset: Dataset, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` class-balanced images stacked into one ``n x C x H x W`` tensor."""
    return torch.stack([dataset[i][0] for i in balanced_indices(dataset, n, seed)])


def fraction_subset(dataset: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """A class-stratified ``fraction`` of ``dataset`` (at least one image per class; all of it: ``dataset``)."""
    if not 0 < fraction <= 1:
        raise EdgeVitError(f"data fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return dataset
    rows = [i for idx in _by_class(dataset, seed) for i in idx[:max(1, round(fraction * len(idx)))]]
    subset = Subset(dataset, sorted(rows))
    subset.targets = [dataset.targets[i] for i in subset.indices]
    subset.classes = dataset.classes
    return subset
