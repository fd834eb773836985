"""Every method and the export on an RGB image folder, from a pretrained-style ``--init`` of vit_tiny_patch16_224
(a timm-format state dict with a 1000-class head, random values, written here: nothing is downloaded).

At 224 px: the baseline and its export. The five methods run from a 32 px, 4-block backbone with the same init
(vit_tiny's width, position embeddings resized) and export too: at 224 px they take minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import write_photos
from safetensors.torch import save_file

from edgevit.cli import main
from edgevit.data.transforms import pretrained_config, pretrained_preprocessing
from edgevit.vit import read_meta

MODEL = "vit_tiny_patch16_224"
FAST = ["--epochs", "1", "--batch-size", "4"]


def _photos(root: Path, classes: list[str], per_class: int = 5) -> str:
    """Non-square RGB JPEGs, a brightness and a dimmed channel per class."""
    return str(write_photos(root, dict.fromkeys(classes, per_class), size=(30, 40), base=50, step=45,
                            seed=len(classes), dim_channel=True))


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> dict[str, str]:
    """Two RGB folders (3 classes for the baseline, transfer, skip, memory; 4 other ones for continual and
    prompts, whose backbone must not have seen their labels) and a timm-format init file."""
    root = tmp_path_factory.mktemp("rgb")
    init = root / "vit_tiny.safetensors"
    torch.manual_seed(0)  # the same init values whichever tests ran before
    save_file(timm.create_model(MODEL, num_classes=1000).state_dict(), init)
    return {"parts": _photos(root / "parts", ["dent", "good", "scratch"]),
            "other": _photos(root / "other", ["chip", "crack", "ok", "stain"]), "init": str(init), "root": str(root)}


def _run(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def _export(run: Path) -> dict:
    out = run.parent / f"{run.name}-export"
    _run("export", str(run), "--profile", "cpu-ort-fp32", "-o", str(out))
    return json.loads((out / "export.json").read_text())


def test_baseline_at_224_from_an_init_file_exports_with_the_weights_preprocessing(line, tmp_path):
    run = tmp_path / "base"
    _run("train", "baseline", "--data", line["parts"], "--model", MODEL, "--init", line["init"], *FAST,
         "--workers", "0", "-o", str(run))
    meta = read_meta(run)
    assert meta.preprocessing == pretrained_preprocessing(pretrained_config(MODEL), 3)
    assert meta.preprocessing.size == 224 and meta.classes == ["dent", "good", "scratch"]
    report = _export(run)
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] < 1e-4


@pytest.fixture(scope="module")
def backbone(line) -> Path:
    run = Path(line["root"]) / "backbone"
    _run("train", "baseline", "--data", line["parts"], "--model", MODEL, "--init", line["init"], "--img-size", "32",
         "--depth", "4", *FAST, "--workers", "0", "-o", str(run))
    return run


METHODS = {
    "transfer": lambda b, line: ["--teacher", str(b), "--data", line["parts"], "--depth", "2", *FAST],
    "skip": lambda b, line: ["--model", str(b), "--data", line["parts"], "--heal-epochs", "1", "--batch-size", "4",
                             "--calib", "6"],
    "memory": lambda b, line: ["--model", str(b), "--data", line["parts"], "--prototypes", "4", *FAST],
    "continual": lambda b, line: ["--model", str(b), "--data", line["other"], "--tasks", "2", *FAST],
    "prompts": lambda b, line: ["--model", str(b), "--data", line["other"], "--whiten-images", "4", *FAST],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_exports_on_an_rgb_folder(method, backbone, line, tmp_path):
    run = tmp_path / method
    _run("train", method, *METHODS[method](backbone, line), "-o", str(run))
    meta = read_meta(run)
    assert meta.preprocessing == read_meta(backbone).preprocessing  # the weights' preprocessing carries through
    assert "test_top1" in meta.metrics
    assert _export(run)["parity"]["passed"]
