"""Shared fixtures: tiny models and bundles built once per test session, on CPU, offline."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from edgevit.train import TrainConfig

# Two cores at most, shared by the pytest-xdist workers (scripts/test.sh runs one per core).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))


def pytest_collection_modifyitems(items):
    # Files with slow tests first: pytest-xdist's loadfile hands files out in this order (scripts/test.sh turns
    # off its reorder by test count), so each worker ends on short files rather than one waiting on a wheel build.
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def pytest_collection_finish(session):
    # Every test module is imported: move torch, timm, ONNX and the rest out of the collector's reach, so the
    # full collections (the profiler's before each memory measurement, Python's own) walk only new objects.
    gc.freeze()


# A ViT small enough that a few epochs on digits take seconds.
TINY_ARCH = {"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3}
TINY_TRAIN = TrainConfig(epochs=12, batch_size=64, lr=3e-3, warmup_epochs=1, augment=None, label_smoothing=0.0)


def tiny_baseline(data: str, out, classes: list[str] | None = None):
    """``train_baseline`` of the tiny ViT (``TINY_ARCH``, 16 px) with ``TINY_TRAIN``."""
    from edgevit.methods.baseline import BaselineConfig, train_baseline

    arch = BaselineConfig(img_size=16, patch_size=TINY_ARCH["patch_size"], embed_dim=TINY_ARCH["embed_dim"],
                          depth=TINY_ARCH["depth"], heads=TINY_ARCH["num_heads"], classes=classes)
    return train_baseline("vit_tiny_patch16_224", data, out, arch, TINY_TRAIN)


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory):
    """A tiny baseline trained 12 epochs on digits (16 px, ~85% test top-1, ~10 s); returns its directory."""
    return tiny_baseline("digits", tmp_path_factory.mktemp("bundles") / "base")


@pytest.fixture(scope="session")
def digits_bundle_04(tmp_path_factory):
    """Like ``digits_bundle`` but trained only on classes 0-4: an upstream backbone for tasks on 5-9."""
    return tiny_baseline("digits", tmp_path_factory.mktemp("bundles") / "base04", classes=list("01234"))


@pytest.fixture(scope="session")
def cpu_fp32_export(digits_bundle, tmp_path_factory):
    """``digits_bundle`` exported with the shipped ``cpu-ort-fp32`` profile: (directory, export.json). Read-only."""
    from edgevit.export import export_bundle

    out = tmp_path_factory.mktemp("exports") / "cpu-fp32"
    return out, export_bundle(digits_bundle, "cpu-ort-fp32", out)


@pytest.fixture(scope="session")
def orin_int8_export(digits_bundle, tmp_path_factory):
    """``digits_bundle`` exported with the shipped ``jetson-orin-nano-int8`` profile: (directory, export.json)."""
    from edgevit.export import export_bundle

    out = tmp_path_factory.mktemp("exports") / "orin-int8"
    return out, export_bundle(digits_bundle, "jetson-orin-nano-int8", out)


def tiny_cli(img_size: int, embed_dim: int) -> list[str]:
    """``edgevit train`` flags for a one-block, two-head ViT trained one epoch of batch 4 in this process."""
    return ["--img-size", str(img_size), "--patch-size", "8", "--embed-dim", str(embed_dim), "--depth", "1",
            "--heads", "2", "--epochs", "1", "--batch-size", "4", "--workers", "0"]


def write_photos(root, counts: dict[str, int], size=(48, 64), noise=25.0, base=60, step=60, seed=0,
                 dim_channel=False, quality=75):
    """RGB JPEG class folders standing in for line photos: ``counts`` maps class -> images. Class ``c`` has
    brightness ``base + step * c`` plus Gaussian noise, non-square (so a centre crop matters); ``dim_channel``
    also halves channel ``c % 3`` so colour tells the classes apart. Returns ``root``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(base + step * c + rng.normal(0, noise, (*size, 3)), 0, 255).astype(np.uint8)
            if dim_channel:
                pixels[..., c % 3] //= 2
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=quality)
    return root


def write_image_folder(root, classes=("bolt", "nut", "washer"), per_class=8, corrupt=True):
    """A small image folder: mixed RGB/grayscale/RGBA images of different sizes, plus junk files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            side = int(rng.integers(12, 40))
            base = np.full((side, side), 40 + 80 * c, dtype=np.uint8) + rng.integers(0, 30, (side, side),
                                                                                      dtype=np.uint8)
            mode = ("L", "RGB", "RGBA")[i % 3]
            image = Image.fromarray(base, "L").convert(mode)
            image.save(folder / f"{i}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        (root / classes[0] / "notes.txt").write_text("not an image")
    return root


@pytest.fixture()
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "parts")
