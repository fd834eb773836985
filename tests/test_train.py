"""The shared loop: resume after a kill replays the same run, torchrun DDP, --init, CLI errors."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edgevit.cli import main
from edgevit.vit import read_meta

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "24", "--depth", "2", "--heads", "2",
        "--batch-size", "32", "--lr", "3e-3"]


def _edgevit(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgevit", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    args = ["train", "baseline", "--data", "digits", *TINY, "--epochs", "4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the uninterrupted run here, on one thread as the subprocesses: the same kernels
    try:
        done = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "full")])
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, done.output

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_edgevit(*args, "-o", str(killed)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in epoch 2: three epochs (0.6 s on the fastest CPU seen) before the end
    proc.wait()
    assert not (killed / "bundle.json").exists(), "run finished before it could be killed"

    resumed = subprocess.run(_edgevit(*args, "-o", str(killed), "--resume"), env=_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    full, again = read_meta(tmp_path / "full").metrics, read_meta(killed).metrics
    assert again["steps"] == full["steps"] == 4 * (1259 // 32)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgevit", "train", "baseline", "--data", "digits", *TINY, "--epochs", "2", "-o", str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_meta(out).metrics["steps"] == 2 * (1259 // 32)  # global batch 32 = 2 ranks x 16
    history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    assert history[1]["loss"] < history[0]["loss"]


def test_image_folder_trains(image_folder, tmp_path):
    result = CliRunner().invoke(main, ["train", "baseline", "--data", str(image_folder), *TINY, "--epochs", "2",
                                       "--batch-size", "4", "-o", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    meta = read_meta(tmp_path / "run")
    assert meta.classes == ["bolt", "nut", "washer"] and meta.preprocessing.channels == 3
    assert 0 <= meta.metrics["test_top1"] <= 1


def test_init_from_a_prefixed_torch_checkpoint(tmp_path, digits_bundle):
    weights = load_file(Path(digits_bundle) / "model.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "ckpt.pth")
    from edgevit.methods.baseline import load_init_weights
    from edgevit.vit import create_vit, load_bundle

    _, meta = load_bundle(digits_bundle)
    target = create_vit(meta.base.name, **{**meta.base.kwargs, "num_classes": 5})
    missing = load_init_weights(tmp_path / "ckpt.pth", target)
    assert set(missing) == {"head.weight", "head.bias"}  # head of another size stays fresh
    assert torch.equal(target.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])

    save_file({"junk": torch.zeros(1)}, tmp_path / "junk.safetensors")
    from edgevit.errors import EdgeVitError

    with pytest.raises(EdgeVitError, match="shares no weights"):
        load_init_weights(tmp_path / "junk.safetensors", target)
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(EdgeVitError, match="not a loadable torch state dict"):
        load_init_weights(tmp_path / "bad.pth", target)


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere"], "neither 'digits' nor an image folder"),
    (["--data", "digits", "--model", "vit_nope"], "unknown timm model"),
    (["--data", "digits", "--resume"], "nothing to resume"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "baseline", *args, "-o", str(tmp_path / "r"), *TINY])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_refuses_to_overwrite_a_finished_run(digits_bundle):
    result = CliRunner().invoke(main, ["train", "baseline", "--data", "digits", "-o", str(digits_bundle)])
    assert result.exit_code == 2 and "not empty" in result.output
