"""Top-1 through a backend: the same runtime and precision that was timed, on the bundle's test split."""

from __future__ import annotations

import numpy as np

from edgevit.bench.backends import Backend


def backend_top1(backend: Backend, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    """Top-1 (0..1) of ``backend`` on ``images`` in batches of exactly ``batch``; the last batch is padded
    with copies of its final image (engines may accept only the profiled batch) and the padding dropped."""
    correct = 0
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        logits = backend.logits(backend.infer(backend.to_native(np.ascontiguousarray(chunk))))
        correct += int((logits[:n].argmax(-1) == labels[start:start + n]).sum())
    return correct / max(1, len(images))
