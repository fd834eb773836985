"""edgevit: attention-centred ViT compression and deployment for edge GPUs."""

__version__ = "0.1.0"
