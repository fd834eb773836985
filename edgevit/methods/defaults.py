"""Each method's optimisation defaults: the one source for the Python API and the CLI.

Plain values (no torch import), so ``edgevit --help`` stays instant while the CLI shows exactly the defaults
``train_<method>()`` uses when it is given no ``train_cfg``.
"""

from __future__ import annotations

# Baseline, transfer and any method not in METHOD_TRAIN; the entries there replace some of these.
TRAIN: dict[str, int | float] = {"epochs": 40, "lr": 1e-3, "batch_size": 64}
METHOD_TRAIN: dict[str, dict[str, int | float]] = {
    "skip": {"epochs": 5, "lr": 2e-4, "warmup_epochs": 0.5},  # healing
    "memory": {"epochs": 15, "lr": 5e-4, "warmup_epochs": 1.0},
    "continual": {"epochs": 10, "lr": 3e-3, "warmup_epochs": 1.0},  # per task
    "prompts": {"epochs": 20, "lr": 1e-2},
}


def train_defaults(method: str) -> dict[str, int | float]:
    """``method``'s optimisation defaults: :data:`TRAIN` updated by its :data:`METHOD_TRAIN` entry, if any."""
    return {**TRAIN, **METHOD_TRAIN.get(method, {})}


def augment_for(data: str) -> str:
    """Digits are orientation-sensitive (no flips); image folders get horizontal flips too."""
    return "shift" if data == "digits" else "shift-flip"
