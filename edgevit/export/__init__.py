"""The export stage: a bundle -> ONNX (+ INT8 Q/DQ) -> TensorRT engines, per export profile.

``edgevit.export.pipeline.export_bundle`` writes an export directory; ``edgevit.export.tensorrt`` builds and
checks engines on the target; ``profiles`` validates the YAML profiles that drive both.
"""

from edgevit.export.artifacts import EXPORT_JSON
from edgevit.export.pipeline import export_bundle
from edgevit.export.profiles import Profile, list_profiles, load_profile

__all__ = ["EXPORT_JSON", "Profile", "export_bundle", "list_profiles", "load_profile"]
