"""The skip sweep study: rows before and after healing, built from train_skip, export_bundle and the profiler."""

from __future__ import annotations

import pytest

from edgevit.bench.latency import TimingConfig
from edgevit.bench.schema import read_rows
from edgevit.studies.skip_sweep import sweep_skip
from edgevit.train import TrainConfig
from edgevit.vit import load_bundle

HEAL = TrainConfig(epochs=1, batch_size=256, lr=1e-3, warmup_epochs=0.5, augment=None)



@pytest.mark.slow
def test_sweep_rows_before_and_after_healing(digits_bundle, tmp_path):
    timing = TimingConfig(warmup=1, iterations=3)
    results = sweep_skip(digits_bundle, "digits", tmp_path / "sweep", HEAL, ratios=(0, 0.5),
                         selects=("cosine", "last"), calib=32, threads=1, timing=timing)
    rows = read_rows(results)
    by_label = {r.label: r for r in rows}
    assert list(by_label) == ["baseline", "skip none 0 healed", "skip cosine 1/2", "skip cosine 1/2 healed",
                              "skip last 1/2", "skip last 1/2 healed"]
    base = by_label["baseline"]
    assert base.method == "baseline" and base.settings["blocks"] == []
    _, base_meta = load_bundle(digits_bundle)
    assert base.top1 == pytest.approx(base_meta.metrics["test_top1"], abs=2 / 360)  # ORT vs torch, ties at most
    for label in ("skip cosine 1/2", "skip last 1/2"):
        before, after = by_label[label], by_label[f"{label} healed"]
        assert before.method == after.method == "skip" and before.backend == "ort" and before.precision == "fp32"
        assert before.settings["blocks"] == after.settings["blocks"] and len(before.settings["blocks"]) == 2
        assert (before.settings["healed"], after.settings["healed"]) == (False, True)
        assert before.params == after.params < base.params and before.gflops < base.gflops
        assert before.latency_ms.iterations == 3 and before.batch == 1 and before.top1_split == "test"
        assert (tmp_path / "sweep" / f"{before.settings['select']}-2of4" / "bundle.json").exists()
    assert by_label["skip last 1/2"].settings["blocks"] == [1, 2]
    # A resumed sweep finds every configuration done and adds nothing.
    sweep_skip(digits_bundle, "digits", tmp_path / "sweep", HEAL, ratios=(0, 0.5), selects=("cosine", "last"),
               calib=32, threads=1, timing=timing, resume=True)
    assert len(read_rows(results)) == len(rows)
