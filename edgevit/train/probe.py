"""Linear probes: a classifier fitted on frozen features.

A probe is the cheapest honest reference for a method that adapts a frozen backbone (prompts, continual
adapters): if the method does not beat a logistic regression on the backbone's own pooled features, it does not
pay. It is also the head a tuner should start from: trained jointly from a random head, prompts or adapters
first learn around a head that is still near chance (on the digits backbones a head alone needs ~100 epochs of
AdamW to reach what the probe's closed-form fit gives). Starting the head at the probe is LP-FT (Kumar et al.,
*Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution*, ICLR 2022).

The fit is scikit-learn's multinomial logistic regression (L-BFGS) on the features of the un-augmented training
split, its inverse regularisation ``C`` chosen on the val split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Encoder = Callable[[torch.Tensor], torch.Tensor]  # images -> features (B x d)
C_GRID = (0.1, 1.0, 10.0, 100.0)


@dataclass
class Probe:
    """A fitted linear classifier and how well it does.

    Args:
        weight: ``classes x d``.
        bias: ``classes``.
        c: the regularisation chosen on val.
        val_top1: its val top-1 (what chose ``c``).
        test_top1: its test top-1 (None: no test split given).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    c: float
    val_top1: float
    test_top1: float | None = None

    def record(self) -> dict[str, float | None]:
        return {"val_top1": round(self.val_top1, 5), "test_top1": None if self.test_top1 is None else
                round(self.test_top1, 5), "c": self.c}


@torch.no_grad()
def features(encode: Encoder, dataset: Dataset, batch_size: int = 256,
             device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``encode``'s features of every image of ``dataset`` (moved to ``device`` when given: the encoder's) and their
    labels (labels as the dataset numbers them)."""
    xs, ys = [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        xs.append(encode(images if device is None else images.to(device)).float().cpu())
        ys.append(labels)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def linear_probe(encode: Encoder, train_set: Dataset, val_set: Dataset, test_set: Dataset | None = None,
                 classes: int | None = None) -> Probe:
    """Fit a logistic regression on ``encode``'s features of ``train_set`` (C from :data:`C_GRID` by val top-1).

    Args:
        encode: images -> features, evaluated without gradients (the caller sets eval mode).
        train_set: un-augmented training images.
        val_set: chooses C.
        test_set: measured only.
        classes: rows of the returned weight (default: the labels seen in training); labels must be 0..classes-1.
    """
    x, y = features(encode, train_set)
    xv, yv = features(encode, val_set)
    fits = [logistic(x, y, c, classes) for c in C_GRID]
    scores = [top1(weight, bias, xv, yv) for weight, bias in fits]
    best = int(np.argmax(scores))
    weight, bias = fits[best]
    test = None if test_set is None else top1(weight, bias, *features(encode, test_set))
    return Probe(weight, bias, C_GRID[best], scores[best], test)


def logistic(x: np.ndarray, y: np.ndarray, c: float, classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression of ``y`` on ``x`` as a linear head (``classes x d`` weight, bias); rows of
    classes absent from ``y`` never win."""
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(C=c, max_iter=3000).fit(x, y)
    coef, offset = fitted.coef_, fitted.intercept_  # (1, d) and (1,) for two classes, else (K, d) and (K,)
    if len(fitted.classes_) == 2:  # scikit-learn fits one logit for two classes: softmax([0, z]) = sigmoid(z)
        coef, offset = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], offset])
    rows = classes or int(y.max()) + 1
    weight, bias = torch.zeros(rows, x.shape[1]), torch.full((rows,), -1e4)
    weight[fitted.classes_] = torch.from_numpy(coef).float()
    bias[fitted.classes_] = torch.from_numpy(offset).float()
    return weight, bias


def top1(weight: torch.Tensor, bias: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
    return float(((torch.from_numpy(x) @ weight.T + bias).argmax(1).numpy() == y).mean())
