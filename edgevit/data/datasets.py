"""Datasets: the embedded ``digits`` set and image folders, with fixed train/val/test splits.

A data source is the string ``digits`` or a path to a folder of class sub-folders, optionally split into
``train/``, ``val/`` and ``test/``. Without split folders, each class's files are split 70/10/20 by a
seeded shuffle, so every command sees the same split.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from edgevit.data.transforms import (
    SHIFT,
    Transform,
    default_preprocessing,
    eval_transform,
    folder_augmentation,
    normalize,
    random_shift,
    train_transform,
)
from edgevit.errors import EdgeVitError
from edgevit.train.config import Augment
from edgevit.vit.bundle import BundleMeta, DataRef, Preprocessing

log = logging.getLogger("edgevit")

DIGITS = "digits"
SPLITS = ("train", "val", "test")
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_SEED = 0


class TensorImages(Dataset):
    """Images already decoded into one ``N x C x H x W`` tensor (small sets such as digits).

    Args:
        images: the preprocessed images.
        targets: their labels.
        classes: label names.
        transform: applied to each image as it is read (training augmentation), or None.
        augmentation: what ``transform`` does, as provenance records it.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: list[str],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augmentation: dict | None = None) -> None:
        self.images = images
        self.targets = list(targets)
        self.classes = classes
        self.transform = transform
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.targets[i]


class ImageFiles(Dataset):
    """Image files, decoded on every access (in DataLoader workers when there are any): memory does not grow
    with the folder.

    Args:
        files: image paths.
        targets: their labels.
        classes: label names.
        pre: the model's preprocessing (the eval transform unless ``transform`` is given).
        transform: PIL image -> tensor, e.g. :func:`edgevit.data.transforms.train_transform`.
        augmentation: what ``transform`` does, as provenance records it.
    """

    def __init__(self, files: list[Path], targets: list[int], classes: list[str], pre: Preprocessing,
                 transform: Transform | None = None, augmentation: dict | None = None) -> None:
        self.files = files
        self.targets = targets
        self.classes = classes
        self.pre = pre
        self.augmentation = augmentation
        self.transform = transform or eval_transform(pre)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as image:
            return self.transform(image), self.targets[i]


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only ``(1797 x 8 x 8 images, labels)``, read once per process from the file
    scikit-learn ships, without importing scikit-learn (and SciPy): that import is a second of every start."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = bunch.images, bunch.target
    for array in (images, labels):
        array.setflags(write=False)
    return images, labels


def digits_images(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16), upscaled to ``size``, in [0, 1]."""
    pixels, labels = _digits_arrays()
    images = torch.from_numpy(pixels.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp_(0, 1), labels


def _split_indices(labels: Sequence[int], split: str) -> list[int]:
    """Per-class seeded shuffle cut 70/10/20: stratified and stable. Classes of 3+ images give at least
    one image to each of val and test."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    rng = random.Random(SPLIT_SEED)
    chosen = []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n = len(idx)
        n_val, n_test = (max(1, round(VAL_FRACTION * n)), max(1, round(TEST_FRACTION * n))) if n >= 3 else (0, 0)
        bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
        lo, hi = bounds[split]
        chosen += idx[lo:hi]
    return sorted(chosen)


def _select_classes(all_classes: list[str], classes: list[str] | None) -> list[str]:
    if classes is None:
        return all_classes
    unknown = [c for c in classes if c not in all_classes]
    if unknown:
        raise EdgeVitError(f"classes {unknown} are not in the dataset (it has {all_classes})")
    return list(classes)


def _load_digits(split: str, pre: Preprocessing, classes: list[str] | None, augment: Augment | None) -> TensorImages:
    images, labels = digits_images(pre.size)
    images = images.expand(-1, pre.channels, -1, -1)
    all_classes = [str(c) for c in range(10)]
    keep = _select_classes(all_classes, classes)
    index = {all_classes.index(c): i for i, c in enumerate(keep)}
    rows = [i for i in _split_indices(labels, split) if int(labels[i]) in index]
    targets = [index[int(labels[i])] for i in rows]
    if augment is None:
        return TensorImages(normalize(images[rows], pre), targets, keep)
    return TensorImages(normalize(images[rows], pre), targets, keep, random_shift, dict(SHIFT))


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, targets, skipped = [], [], []
    for label, name in enumerate(classes):
        class_dir = root / name
        found = 0
        for path in sorted(class_dir.rglob("*")) if class_dir.is_dir() else []:
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES and _is_image(path):
                files.append(path)
                targets.append(label)
                found += 1
            else:
                skipped.append(path)
        if found == 0:
            raise EdgeVitError(f"class {name!r} has no readable images under {root}")
    if skipped:
        log.warning("skipped %d non-image or unreadable file(s) under %s (first: %s)",
                    len(skipped), root, skipped[0])
    return files, targets


def folder_classes(root: Path) -> list[str]:
    """Class names of an image folder (from ``train/`` when the folder is split)."""
    if not root.is_dir():
        raise EdgeVitError(f"data {str(root)!r} is neither 'digits' nor an image folder")
    top = root / "train" if (root / "train").is_dir() else root
    classes = [p.name for p in _class_dirs(top)]
    if not classes:
        raise EdgeVitError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    return classes


def _load_folder(root: Path, split: str, pre: Preprocessing, classes: list[str] | None,
                 augment: Augment | None) -> ImageFiles:
    keep = _select_classes(folder_classes(root), classes)
    if (root / "train").is_dir():
        split_dir = root / split
        if not split_dir.is_dir():
            fallback = "val" if split == "test" else "test"
            if split == "train" or not (root / fallback).is_dir():
                raise EdgeVitError(f"{root} has train/ but no {split}/ folder")
            log.warning("%s has no %s/ folder; using %s/", root, split, fallback)
            split_dir = root / fallback
        files, targets = _scan(split_dir, keep)
    else:
        all_files, all_targets = _scan(root, keep)
        rows = _split_indices(all_targets, split)
        files, targets = [all_files[i] for i in rows], [all_targets[i] for i in rows]
    if not files:
        raise EdgeVitError(f"the {split} split of {root} is empty")
    if augment is None:
        return ImageFiles(files, targets, keep, pre)
    return ImageFiles(files, targets, keep, pre, train_transform(pre, augment), folder_augmentation(augment))


def load_split(source: str, split: str, pre: Preprocessing, classes: list[str] | None = None,
               augment: Augment | None = None) -> Dataset:
    """One split (``train``, ``val`` or ``test``) of a data source, preprocessed as ``pre``.

    Args:
        source: ``digits`` or a path to an image folder.
        split: ``train``, ``val`` or ``test``.
        pre: the preprocessing of the model that will read the images.
        classes: a subset of the source's classes, in label order (default: all, sorted).
        augment: training augmentation (``TrainConfig.augment``): timm's training transform with these settings
            instead of the eval one for image folders, a random shift for digits; the images then arrive
            augmented, and the dataset's ``augmentation`` says how. None: the images as evaluated.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == DIGITS:
        return _load_digits(split, pre, classes, augment)
    root = Path(source)
    if not root.is_dir():
        raise EdgeVitError(f"data {source!r} is neither 'digits' nor an image folder")
    return _load_folder(root, split, pre, classes, augment)


def augmentation(dataset: Dataset) -> dict | None:
    """What augments ``dataset``'s images (None: nothing), looking through ``Subset``-like wrappers."""
    while not hasattr(dataset, "augmentation") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "augmentation", None)


def source_classes(source: str) -> list[str]:
    return [str(c) for c in range(10)] if source == DIGITS else folder_classes(Path(source))


def classifier_classes(source: str, classes: list[str] | None = None) -> list[str]:
    """The classes a classifier is trained on: ``classes`` (each checked against ``source``) or all of the
    source's; refused below two, where top-1 would be 100% by construction."""
    chosen = _select_classes(source_classes(source), classes)
    if len(chosen) < 2:
        raise EdgeVitError(f"{source} gives {len(chosen)} class(es) {chosen}; a classifier needs at least two")
    return chosen


def default_input(source: str) -> Preprocessing:
    """A sensible input for a source: 32 px grayscale for digits, 224 px RGB for folders."""
    return default_preprocessing(32, 1) if source == DIGITS else default_preprocessing(224, 3)


def fingerprint(source: str) -> str:
    """A short hash of the source's file list and sizes (digits: a fixed tag)."""
    if source == DIGITS:
        return "sklearn-digits"
    root = Path(source)
    h = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def data_ref(source: str, classes: list[str] | None = None) -> DataRef:
    """Where a bundle's data came from; ``classes`` only when a subset (all of them = the same task as None)."""
    if classes is not None and list(classes) == source_classes(source):
        classes = None
    source = source if source == DIGITS else str(Path(source).resolve())
    return DataRef(source=source, classes=classes, fingerprint=fingerprint(source))


def load_ref(ref: DataRef, split: str, pre: Preprocessing) -> Dataset:
    """The split a bundle's :class:`DataRef` points at."""
    return load_split(ref.source, split, pre, ref.classes)


def split_arrays(meta: BundleMeta, split: str, limit: int | None = None, seed: int = 0) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """A split of the bundle's data, preprocessed as the bundle says, as ``(images, labels)`` arrays (float32
    ``N x C x H x W``, int64); at most ``limit`` images (drawn with ``seed``, kept in split order). Decoded
    once, up front: the export's checks and ``edgevit profile``'s top-1 then neither decode nor time it."""
    dataset = load_ref(meta.data, split, meta.preprocessing)
    rows = list(range(len(dataset)))
    if limit is not None and limit < len(rows):
        rows = sorted(random.Random(seed).sample(rows, limit))
    images = torch.stack([dataset[i][0] for i in rows]).numpy().astype(np.float32)
    return images, np.array([dataset.targets[i] for i in rows])
