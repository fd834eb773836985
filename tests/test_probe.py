"""Linear probes: the reference every adapted backbone is measured against, and the head BPT starts from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from edgevit.train.probe import linear_probe, logistic


def clusters(classes: int, per_class: int, seed: int, spread: float = 0.3) -> TensorDataset:
    """Points around ``classes`` well separated centres in 8 dimensions; ``targets`` as the datasets have them."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:classes] * 3
    x = np.concatenate([c + spread * rng.standard_normal((per_class, 8)) for c in centres])
    y = np.repeat(np.arange(classes), per_class)
    data = TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    data.targets = y.tolist()
    return data


@pytest.mark.parametrize("classes", [2, 4])
def test_probe_separates_separable_classes_and_its_head_reproduces_its_score(classes):
    probe = linear_probe(lambda x: x, clusters(classes, 40, 0), clusters(classes, 20, 1), clusters(classes, 20, 2))
    assert probe.weight.shape == (classes, 8) and probe.bias.shape == (classes,)
    assert probe.val_top1 == 1.0 and probe.test_top1 == 1.0 and probe.c in (0.1, 1.0, 10.0, 100.0)
    test = clusters(classes, 20, 3)
    logits = test.tensors[0] @ probe.weight.T + probe.bias  # the head a tuner starts from predicts the same
    assert (logits.argmax(1) == test.tensors[1]).float().mean() == 1.0


def test_a_class_absent_from_training_never_wins():
    data = clusters(3, 30, 0)
    weight, bias = logistic(data.tensors[0].numpy(), data.tensors[1].numpy(), 1.0, classes=5)
    logits = data.tensors[0] @ weight.T + bias
    assert weight.shape == (5, 8) and set(logits.argmax(1).tolist()) <= {0, 1, 2}
