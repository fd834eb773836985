"""The paired accuracy gate: a correct export never fails on a few flipped images, a broken one always fails, and
the images it rests on are never test images nor calibration images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgevit.errors import EdgeVitError
from edgevit.export import checks, gate, load_profile
from edgevit.export.profiles import Calibration
from edgevit.export.quantize import calibration_images, held_out_train
from edgevit.export.runtimes import RUNTIMES
from edgevit.vit import read_meta


def flips(n: int, lost: int, gained: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of FP32 and a low-precision graph that disagree on ``lost + gained`` images."""
    fp32, low = np.ones(n, bool), np.ones(n, bool)
    low[:lost] = False
    fp32[lost:lost + gained] = False
    return fp32, low


def test_two_flipped_images_of_179_pass_and_a_real_drop_fails():
    # The demo's DATA merged export lost 2 of 179 val images (1.1 points over a 1-point tolerance) and failed.
    passed = gate.paired_gate(*flips(179, 2, 0), max_drop=0.01)
    assert passed["passed"] and passed["lost"] == 2 and passed["drop"] == pytest.approx(2 / 179)
    low, high = passed["interval"]
    assert low < 0.01 < high  # consistent with the tolerance: no evidence of a larger drop
    failed = gate.paired_gate(*flips(179, 12, 1), max_drop=0.01)
    assert not failed["passed"] and failed["interval"][0] > 0.01
    # the decision is the interval's: a lower bound above the tolerance fails, whatever the point estimate
    for lost, gained in [(0, 0), (3, 0), (5, 2), (8, 0), (20, 5)]:
        result = gate.paired_gate(*flips(300, lost, gained), max_drop=0.01)
        assert result["passed"] == (result["interval"][0] <= 0.01)


def test_interval_covers_the_true_drop_at_its_stated_confidence():
    """Each bound is one-sided at 95%: over simulated exports with a known drop, each misses about 5% of the time
    (Tango's score interval; a Wald interval misses far more often at these small counts)."""
    rng = np.random.default_rng(0)
    for p_lost, p_gained, n in [(0.01, 0.0, 179), (0.03, 0.01, 300)]:
        misses = np.zeros(2)
        for _ in range(400):
            u = rng.random(n)
            lost, gained = int(np.sum(u < p_lost)), int(np.sum((u >= p_lost) & (u < p_lost + p_gained)))
            low, high = gate.drop_interval(lost, gained, n)
            misses += [low > p_lost - p_gained, high < p_lost - p_gained]
        assert np.all(misses / 400 <= 0.09), misses


def test_images_needed_to_resolve_a_tolerance():
    assert not gate.resolves(179, 0.01) and gate.detectable_drop(179, 0.01) > 0.02
    n = gate.images_needed(0.01)
    assert gate.resolves(n, 0.01) and not gate.resolves(n - 1, 0.01)
    assert gate.images_needed(0.005) > n
    # flips either way widen the interval: a set where 5% of the images flip needs more to see the same drop
    assert gate.images_needed(0.01, flip_rate=0.05) > n and gate.detectable_drop(n, 0.01, flip_rate=0.05) > 0.02


def test_held_out_train_images_exclude_the_calibration_draw(digits_bundle):
    meta = read_meta(digits_bundle)
    cal = Calibration(set="bundle", samples=64, seed=3)
    held = held_out_train(meta, cal)
    train_size = len(held_out_train(meta, None))
    assert len(held) == train_size - 64
    images, _ = calibration_images(cal, meta)
    train = held.dataset
    calibrated = {i for i in range(len(train)) if any(np.array_equal(train[i][0].numpy(), c) for c in images[:8])}
    assert calibrated and not calibrated & set(held.indices)


def test_export_records_the_gate_on_val_and_held_out_train_images(orin_int8_export):
    _, export = orin_int8_export
    q = export["int8"]
    g = q["gate"]
    assert g["passed"] and g["sources"]["val"] == q["val_images"] == 179
    # 179 val images cannot resolve a 1-point drop: the gate adds train images calibration never drew, up to
    # the number that does at the val split's share of flips (test images are never used)
    assert g["images"] == 179 + g["sources"]["train_held_out"] >= gate.images_needed(0.01)
    assert g["interval"][0] <= g["drop"] <= g["interval"][1] and g["confidence"] == 0.95
    assert "fake quantization" in q["arithmetic"]


def test_a_broken_quantization_fails_the_gate_on_the_digits_baseline(orin_int8_export, digits_bundle):
    """Every Q/DQ pair of the INT8 graph put on a 3-bit grid (its scales x 32, weights and activations) must fail.
    The tiny baseline shrugs off milder damage: 4-bit weights alone cost it 1 image of 300, 4-bit weights and
    activations 2-4 points (a lower bound of 1.7-2.3%, measured on models trained with 1 and 2 threads); 3 bits
    cost 11-21 points, far beyond what any CPU's training differences can move."""
    out, _ = orin_int8_export
    graph = onnx.load(str(out / "model.int8.onnx"))
    scales = {n.input[1] for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for init in graph.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 32, init.name))
    onnx.save(graph, str(out / "broken.int8.onnx"))
    profile = load_profile("jetson-orin-nano-int8")
    with pytest.raises(EdgeVitError, match=r"loses accuracy beyond the profile's 0.01: drop .*\(\d+ lost"):
        checks.low_precision_accuracy(Path(out), read_meta(digits_bundle), profile, "broken.int8.onnx",
                                      RUNTIMES["tensorrt"], profile.calibration)
