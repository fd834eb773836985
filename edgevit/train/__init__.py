"""The shared training loop and run-directory helpers.

``TrainConfig`` is torch-free (the CLI reads its defaults for ``--help``); the loop is imported on first use.
"""

from edgevit.train.config import Augment, TrainConfig

__all__ = ["Augment", "TrainConfig", "TrainResult", "evaluate", "fit", "is_main_process"]


def __getattr__(name: str):
    if name in ("TrainResult", "evaluate", "fit", "is_main_process"):
        from edgevit.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'edgevit.train' has no attribute {name!r}")
