"""Pretrained starts: the weights' own preprocessing is recorded and applied identically by training-eval,
export parity and the Jetson runner; --pretrained offline says what to do; --init takes timm-format files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import write_photos
from safetensors.torch import save_file

from edgevit.cli import main
from edgevit.vit import read_meta

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# deit_tiny's blocks at 32 px (2x2 patches of 16: position embeddings resized from 14x14), 1 epoch: seconds.
FAST = ["--img-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("line") / "line3", {"good": 6, "scratch": 6, "dent": 6}, quality=90)


@pytest.fixture(scope="module")
def deit_weights(tmp_path_factory) -> Path:
    """A timm-format deit_tiny_patch16_224 state dict with its 1000-class head, as users download it."""
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def deit_run(photos, deit_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "deit"
    result = CliRunner().invoke(main, ["train", "baseline", "--data", str(photos), "--model", "deit_tiny_patch16_224",
                                       "--init", str(deit_weights), *FAST, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_init_with_a_timm_checkpoint_records_its_preprocessing(deit_run, photos, tmp_path, caplog):
    pre = read_meta(deit_run).preprocessing
    assert pre.mean == pytest.approx(IMAGENET_MEAN) and pre.std == pytest.approx(IMAGENET_STD)
    assert (pre.interpolation, pre.crop_pct, pre.crop_mode, pre.size) == ("bicubic", 0.9, "center", 32)

    # the same weights as a pytorch_model.bin: the replaced keys (the 1000-class head) are logged
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="edgevit"):
        result = CliRunner().invoke(main, ["train", "baseline", "--data", str(photos), "--model",
                                           "deit_tiny_patch16_224", "--init", str(tmp_path / "pytorch_model.bin"),
                                           *FAST, "--mean", "0.5", "--std", "0.5", "--crop-pct", "1",
                                           "-o", str(tmp_path / "bin")])
    assert result.exit_code == 0, result.output
    assert "kept fresh (not in the file or of another shape): head.weight, head.bias" in caplog.text
    pre = read_meta(tmp_path / "bin").preprocessing
    assert (pre.mean, pre.std, pre.crop_pct, pre.interpolation) == ([0.5] * 3, [0.5] * 3, 1.0, "bicubic")


def test_one_image_same_tensor_through_training_eval_export_parity_and_jetson(deit_run, tmp_path):
    from edgevit.data import load_ref, split_arrays
    from edgevit.export.pipeline import export_bundle

    meta = read_meta(deit_run)
    val = load_ref(meta.data, "val", meta.preprocessing)
    path = val.files[0]
    training_eval = val[0][0].numpy()
    parity_images, _ = split_arrays(meta, "val")  # what the export's parity check runs on
    export = export_bundle(deit_run, "cpu-ort-fp32", tmp_path / "export")
    sys.path.insert(0, str(REPO / "jetson"))
    try:
        from run_folder import preprocess
    finally:
        sys.path.remove(str(REPO / "jetson"))
    on_device = preprocess(path, json.loads(json.dumps(export["input"]["preprocessing"])))

    assert training_eval.shape == (3, 32, 32)
    np.testing.assert_allclose(parity_images[0], training_eval, atol=1e-6, rtol=0)
    np.testing.assert_allclose(on_device, training_eval, atol=1e-6, rtol=0)
    # and it is the crop, not a squash: the squashed image differs
    squash = preprocess(path, {**export["input"]["preprocessing"], "crop_mode": "squash", "crop_pct": 1.0})
    assert np.abs(squash - training_eval).max() > 1e-3


@pytest.mark.slow
def test_pretrained_offline_is_one_line_with_the_init_alternative(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    done = subprocess.run([sys.executable, "-m", "edgevit", "train", "baseline", "--data", "digits", "--pretrained",
                           "--model", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "-o", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "cannot fetch pretrained weights for vit_tiny_patch16_224.augreg_in21k_ft_in1k" in lines[0]
    assert "--init model.safetensors" in lines[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
