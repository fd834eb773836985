"""Shared fixtures: tiny models and bundles built once per test session, on CPU, offline."""

from __future__ import annotations

import os

import pytest
import torch

from edgevit.train import TrainConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A ViT small enough that a few epochs on digits take seconds.
TINY_ARCH = {"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3}
TINY_TRAIN = TrainConfig(epochs=12, batch_size=64, lr=3e-3, warmup_epochs=1, augment="none", label_smoothing=0.0)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory):
    """A tiny baseline trained 12 epochs on digits (16 px, ~85% test top-1, ~10 s); returns its directory."""
    from edgevit.methods.baseline import train_baseline

    out = tmp_path_factory.mktemp("bundles") / "base"
    return train_baseline("digits", out, img_size=16, arch=TINY_ARCH, cfg=TINY_TRAIN)


@pytest.fixture(scope="session")
def digits_bundle_04(tmp_path_factory):
    """Like ``digits_bundle`` but trained only on classes 0-4: an upstream backbone for tasks on 5-9."""
    from edgevit.methods.baseline import train_baseline

    out = tmp_path_factory.mktemp("bundles") / "base04"
    return train_baseline("digits", out, img_size=16, arch=TINY_ARCH, classes=list("01234"), cfg=TINY_TRAIN)
