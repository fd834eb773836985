"""The shared training loop and run-directory helpers."""

from edgevit.train.loop import TrainConfig, TrainResult, evaluate, fit, is_main_process

__all__ = ["TrainConfig", "TrainResult", "evaluate", "fit", "is_main_process"]
