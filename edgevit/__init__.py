"""edgevit: attention-centred ViT compression and deployment for edge GPUs."""

__version__ = "0.1.0"
__all__ = ["Predictor"]


def __getattr__(name: str):
    # Imported on first use: `import edgevit` stays light (no torch / ONNX Runtime until needed).
    if name == "Predictor":
        from edgevit.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'edgevit' has no attribute {name!r}")
