"""Imbalanced folders: per-class counts before training, class-balanced sampling that a resumed run replays,
per-class top-1 and the confusion matrix in the bundle and in ``edgevit report``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cli, write_photos

from edgevit.bench.report import build_report
from edgevit.bench.schema import ResultRow
from edgevit.cli import main
from edgevit.train.loop import _batches
from edgevit.vit import read_meta

TINY = tiny_cli(img_size=32, embed_dim=24)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    """16 'good' parts, 4 of each defect (32 px RGB JPEGs)."""
    return write_photos(tmp_path_factory.mktemp("imb") / "line", {"dent": 4, "good": 16, "scratch": 4},
                        size=(32, 40), noise=20)


def test_balanced_batches_draw_every_class_equally_and_replay():
    targets = torch.tensor([0] * 90 + [1] * 5 + [2] * 5)
    weights = 1.0 / torch.bincount(targets).double()[targets]
    drawn = [i for seed_epoch in range(20) for b in _batches(100, 10, 0, 1, 0, seed_epoch, weights) for i in b]
    share = Counter(targets[drawn].tolist())
    assert all(abs(share[c] / len(drawn) - 1 / 3) < 0.05 for c in range(3)), share
    assert _batches(100, 10, 0, 1, 0, 3, weights) == _batches(100, 10, 0, 1, 0, 3, weights)  # resume replays
    ranks = [_batches(100, 10, r, 2, 0, 3, weights) for r in range(2)]
    assert all(len(b) == 5 for rank in ranks for b in rank)  # DDP: each rank its half of every batch


def test_counts_balance_per_class_metrics_and_report(imbalanced, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "baseline", "--data", str(imbalanced), *TINY, "--balance",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "baseline: 15 training images (class-balanced sampling); per class: dent 2, good 11, scratch 2" \
        in result.output
    metrics = read_meta(out).metrics
    matrix = np.array(metrics["test_confusion"])
    assert matrix.shape == (3, 3) and matrix.sum(1).tolist() == [1, 3, 1]
    assert metrics["test_top1"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-5)
    per_class = metrics["test_per_class_top1"]
    assert list(per_class) == ["dent", "good", "scratch"]
    assert per_class["good"] == pytest.approx(matrix[1, 1] / 3, abs=1e-5)

    results = tmp_path / "results.jsonl"
    row = ResultRow(artifact=str(out), method="baseline", label="base", backend="torch", precision="fp32",
                    batch=1, top1=metrics["test_top1"], machine={"cpu": "test"})
    results.write_text(row.model_dump_json() + "\n")
    report = build_report(results, tmp_path / "report")
    assert report["per_class"]["base"]["confusion"] == matrix.tolist()
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Per-class test top-1 and confusion matrix" in text
    assert "| good | " + " | ".join(str(n) for n in matrix[1]) in text
    json.loads((tmp_path / "report" / "report.json").read_text())
