"""Data sources: digits splits, image folders with messy files, calibration sampling."""

import logging

import numpy as np
import pytest
import torch

from edgevit.data import (
    balanced_indices,
    calibration_batch,
    default_preprocessing,
    fraction_subset,
    load_split,
)
from edgevit.errors import EdgeVitError

PRE = default_preprocessing(16, 1)


def test_digits_splits_are_disjoint_stratified_and_stable():
    splits = {s: load_split("digits", s, PRE) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=10)
    assert set(splits["test"].targets) == set(range(10))
    again = load_split("digits", "test", PRE)
    assert torch.equal(again.images, splits["test"].images)
    train_rows = {tuple(x.flatten().tolist()) for x in splits["train"].images[:200]}
    assert not train_rows & {tuple(x.flatten().tolist()) for x in splits["test"].images}
    x, y = splits["train"][0]
    assert x.shape == (1, 16, 16) and x.min() >= -1.01 and x.max() <= 1.01


def test_digits_read_from_scikit_learns_file_equal_load_digits():
    from sklearn.datasets import load_digits

    from edgevit.data.datasets import _digits_arrays

    images, labels = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def test_class_subset_relabels_in_the_given_order():
    subset = load_split("digits", "val", PRE, classes=["7", "3"])
    assert subset.classes == ["7", "3"] and set(subset.targets) == {0, 1}
    with pytest.raises(EdgeVitError, match="not in the dataset"):
        load_split("digits", "val", PRE, classes=["x"])


def test_image_folder_mixed_modes_sizes_and_junk(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="edgevit"):
        train = load_split(str(image_folder), "train", default_preprocessing(24, 3))
    assert "skipped 2 non-image or unreadable file(s)" in caplog.text
    assert train.classes == ["bolt", "nut", "washer"]
    shapes = {train[i][0].shape for i in range(len(train))}
    assert shapes == {torch.Size([3, 24, 24])}
    gray = load_split(str(image_folder), "test", default_preprocessing(24, 1))
    assert gray[0][0].shape == (1, 24, 24)


def test_image_folder_with_split_directories(tmp_path):
    from conftest import write_image_folder

    for split in ("train", "val"):
        write_image_folder(tmp_path / split, per_class=3, corrupt=False)
    assert len(load_split(str(tmp_path), "val", PRE)) == 9
    assert len(load_split(str(tmp_path), "test", PRE)) == 9  # falls back to val/


def test_empty_class_and_missing_folder_are_clear_errors(image_folder, tmp_path):
    (image_folder / "empty").mkdir()
    with pytest.raises(EdgeVitError, match="class 'empty' has no readable images"):
        load_split(str(image_folder), "train", PRE)
    with pytest.raises(EdgeVitError, match="neither 'digits' nor an image folder"):
        load_split(str(tmp_path / "nope"), "train", PRE)
    (tmp_path / "flat").mkdir()
    with pytest.raises(EdgeVitError, match="no class sub-folders"):
        load_split(str(tmp_path / "flat"), "train", PRE)


def test_calibration_is_class_balanced_and_seeded():
    train = load_split("digits", "train", PRE)
    idx = balanced_indices(train, 50, seed=3)
    counts = torch.bincount(torch.tensor([train.targets[i] for i in idx]), minlength=10)
    assert counts.tolist() == [5] * 10
    assert idx == balanced_indices(train, 50, seed=3) and idx != balanced_indices(train, 50, seed=4)
    assert calibration_batch(train, 20).shape == (20, 1, 16, 16)
    with pytest.raises(EdgeVitError, match="only"):
        balanced_indices(train, 10_000)


def test_fraction_subset_keeps_every_class():
    train = load_split("digits", "train", PRE)
    small = fraction_subset(train, 0.03)
    assert set(small.targets) == set(range(10)) and len(small) < 0.05 * len(train)
