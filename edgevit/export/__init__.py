"""The export stage: a bundle -> ONNX (+ INT8 Q/DQ) -> TensorRT engines, per export profile.

``edgevit.export.pipeline.export_bundle`` writes an export directory; ``edgevit.export.tensorrt`` builds and
checks engines on the target; ``profiles`` validates the YAML profiles that drive both.
"""

from edgevit.export.artifacts import EXPORT_JSON
from edgevit.export.profiles import Profile, list_profiles, load_profile

__all__ = ["EXPORT_JSON", "Profile", "export_bundle", "list_profiles", "load_profile"]


def __getattr__(name: str):
    # Imported on first use: profiles and artifact names need no torch / ONNX (`edgevit profiles list` is instant).
    if name == "export_bundle":
        from edgevit.export.pipeline import export_bundle

        return export_bundle
    raise AttributeError(f"module 'edgevit.export' has no attribute {name!r}")
