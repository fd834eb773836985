"""The low-precision accuracy gate: FP32 and the low-precision graph compared image by image.

Both graphs classify the same images, so what matters are the images where they disagree: ``lost`` (FP32 right,
low precision wrong) and ``gained`` (the reverse). The top-1 drop is ``(lost - gained) / n``. Its confidence
interval is Tango's score interval for a difference of paired proportions (Tango 1998, *Statistics in Medicine*
17:891; the interval that goes with McNemar's test, good coverage down to zero discordant images). An export
fails only when the interval's lower bound exceeds the profile's tolerance: the drop is then larger than allowed
with the stated confidence, so a correct export never fails on one or two flipped images, and a broken one fails.

How small a drop a gate can see depends on its images and on how many of them flip either way: each flip widens
the interval. :func:`detectable_drop` is the smallest observed drop that fails at a given share of flips. A set
*resolves* a tolerance when that is at most twice the tolerance; :func:`images_needed` says how many images that
takes (300 for a 1-point tolerance when nothing else flips, about 1,400 when 5% of the images flip).
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # one-sided: each bound of the interval holds with this probability
RESOLUTION = 2.0  # a gate's images must resolve drops of RESOLUTION x its tolerance


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def _score(lost: int, gained: int, n: int, drop: float) -> float:
    """Tango's score statistic for the hypothesis that the true drop is ``drop``; decreasing in ``drop``."""
    b = -lost - gained + (2 * n - lost + gained) * drop
    c = -gained * drop * (1 - drop)
    gained_rate = (math.sqrt(max(b * b - 8 * n * c, 0.0)) - b) / (4 * n)  # restricted MLE of P(gained)
    variance = n * (2 * gained_rate + drop * (1 - drop))
    excess = lost - gained - n * drop
    return excess / math.sqrt(variance) if variance > 0 else math.copysign(math.inf, excess) if excess else 0.0


def _solve(lost: int, gained: int, n: int, target: float) -> float:
    """The drop at which the score equals ``target`` (bisection on [-1, 1]; the score decreases)."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _score(lost, gained, n, mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def drop_interval(lost: int, gained: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Lower and upper confidence bounds of the top-1 drop, each one-sided at ``confidence``."""
    z = _z(confidence)
    return _solve(lost, gained, n, z), _solve(lost, gained, n, -z)


def fails(lost: int, gained: int, n: int, max_drop: float, confidence: float = CONFIDENCE) -> bool:
    """The drop exceeds ``max_drop`` with ``confidence`` (the interval's lower bound is above it)."""
    return _score(lost, gained, n, max_drop) > _z(confidence)


def detectable_drop(n: int, max_drop: float, flip_rate: float = 0.0, confidence: float = CONFIDENCE) -> float:
    """The smallest observed drop that fails a gate on ``n`` images when a ``flip_rate`` share of them disagree
    (more flips widen the interval); 1.0 when none does."""
    flips = round(flip_rate * n)
    lo, hi = 0, n + 1
    while lo < hi:  # the fewest losses that fail; the other flips are gains
        mid = (lo + hi) // 2
        if mid <= n and fails(mid, max(flips - mid, 0), n, max_drop, confidence):
            hi = mid
        else:
            lo = mid + 1
    return (lo - max(flips - lo, 0)) / n if lo <= n else 1.0


def resolves(n: int, max_drop: float, flip_rate: float = 0.0, confidence: float = CONFIDENCE) -> bool:
    return detectable_drop(n, max_drop, flip_rate, confidence) <= RESOLUTION * max_drop


def images_needed(max_drop: float, flip_rate: float = 0.0, confidence: float = CONFIDENCE) -> int:
    """The fewest images that resolve ``max_drop`` at ``flip_rate`` (see the module docstring)."""
    return next(n for n in itertools.count(1) if resolves(n, max_drop, flip_rate, confidence))


def paired_gate(reference_right: np.ndarray, candidate_right: np.ndarray, max_drop: float,
                confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The gate's decision on per-image correctness of the FP32 (``reference_right``) and low-precision graphs.

    Returns ``images``, ``lost``, ``gained``, ``drop``, ``interval`` (each bound one-sided at ``confidence``),
    ``max_drop``, ``detectable_drop`` and ``passed``.
    """
    reference_right, candidate_right = np.asarray(reference_right, bool), np.asarray(candidate_right, bool)
    n = len(reference_right)
    lost = int(np.sum(reference_right & ~candidate_right))
    gained = int(np.sum(~reference_right & candidate_right))
    low, high = drop_interval(lost, gained, n, confidence)
    return {"images": n, "lost": lost, "gained": gained, "drop": (lost - gained) / n,
            "interval": [round(low, 5), round(high, 5)], "confidence": confidence, "max_drop": max_drop,
            "detectable_drop": round(detectable_drop(n, max_drop, (lost + gained) / n, confidence), 5),
            "passed": not fails(lost, gained, n, max_drop, confidence)}


def describe(gate: dict[str, Any]) -> str:
    """The gate in one line, e.g. ``drop 1.1% [-0.3%, 3.4%] on 179 images (2 lost, 0 gained)``."""
    low, high = gate["interval"]
    return (f"drop {100 * gate['drop']:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%] on {gate['images']} images "
            f"({gate['lost']} lost, {gate['gained']} gained; {round(100 * gate['confidence'])}% bounds)")
