"""Bad input as a new user makes it: one line, exit code 2, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgevit.cli import main
from edgevit.export.pipeline import OWNER


def refused(args: list[str], cwd: Path, *expected: str) -> str:
    """Run the CLI in ``cwd``; assert exit 2 with one line naming ``expected``, and return it."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        os.chdir(old)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in lines[0], lines[0]
    assert ".tmp" not in lines[0], lines[0]
    return lines[0]


def edited_bundle(src: Path, dst: Path, **kwargs) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint.pt"))
    meta = json.loads((dst / "bundle.json").read_text())
    meta["base"]["kwargs"].update(kwargs)
    (dst / "bundle.json").write_text(json.dumps(meta))
    return dst


def test_bundle_whose_architecture_cannot_be_built(digits_bundle, tmp_path):
    bundle = edited_bundle(digits_bundle, tmp_path / "odd", num_heads=5)  # 48 is not divisible by 5
    refused(["export", "odd", "--profile", "cpu-ort-fp32", "-o", "out"], tmp_path, "odd/bundle.json",
            "cannot be built")
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundle.name]


def test_bundle_whose_weights_do_not_fit_names_the_first_misfit_and_a_count(digits_bundle, tmp_path):
    edited_bundle(digits_bundle, tmp_path / "narrow", embed_dim=24)
    line = refused(["export", "narrow", "--profile", "cpu-ort-fp32", "-o", "out"], tmp_path, "narrow",
                   "does not fit the recorded graph", "tensor(s) of another shape")
    assert "cls_token is (1, 1, 48) there but (1, 1, 24) in the graph" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["narrow"]


def write_folder(root: Path, classes: tuple[str, ...]) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize(("args", "expected"), [
    (["--data", "empty"], "no class sub-folders"),
    (["--data", "flat"], "no class sub-folders"),
    (["--data", "missing"], "missing"),
    (["--data", "digits", "--classes", "0,x"], "['x']"),
    (["--data", "digits", "--classes", "3"], "a classifier needs at least two"),
    (["--data", "one"], "a classifier needs at least two"),
    (["--data", "digits", "--init", "bad.safetensors"], "bad.safetensors"),
    (["--data", "digits", "--init", "nothing.pt"], "nothing.pt"),
])
def test_failed_train_baseline_leaves_no_run_directory(tmp_path, args, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    write_folder(tmp_path / "one", ("good",))
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(["train", "baseline", *args, "-o", "run", "--epochs", "1"], tmp_path, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_failed_train_skip_with_bad_blocks_leaves_no_run_directory(digits_bundle, tmp_path):
    refused(["train", "skip", "--model", str(digits_bundle), "--data", "digits", "--blocks", "9", "-o", "run"],
            tmp_path, "9")
    assert not (tmp_path / "run").exists()


def test_export_removes_temporary_directories_of_killed_exports_only(digits_bundle, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale, live, foreign = (tmp_path / f".{n}.x1y2.tmp" for n in ("killed", "running", "other"))
    for tmp, owner in ((stale, f"{host} {dead.pid}"), (live, f"{host} {os.getpid()}"), (foreign, None)):
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(b"partial")
        if owner:
            (tmp / OWNER).write_text(owner)
    result = CliRunner().invoke(main, ["export", str(digits_bundle), "--profile", "cpu-ort-fp32",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists() and foreign.exists()
    assert OWNER not in os.listdir(tmp_path / "out")
    assert OWNER not in json.loads((tmp_path / "out" / "export.json").read_text())["hashes"]


@pytest.mark.slow
def test_an_export_killed_with_sigkill_is_cleaned_up_by_the_next(digits_bundle, tmp_path):
    killed = subprocess.Popen([sys.executable, "-m", "edgevit", "export", str(digits_bundle), "--profile",
                               "cpu-ort-fp32", "-o", str(tmp_path / "first")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".first.*.tmp/bundle")) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert list(tmp_path.glob(".first.*.tmp")) and not (tmp_path / "first").exists()
    result = CliRunner().invoke(main, ["export", str(digits_bundle), "--profile", "cpu-ort-fp32",
                                       "-o", str(tmp_path / "second")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second"]
