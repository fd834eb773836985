"""Where edgevit's shipped files live: export profiles, calibration manifests and the device kit.

The repository's top-level ``export_profiles/``, ``calibration/`` and ``jetson/`` folders are the editable
sources; a built wheel carries them inside the package (``edgevit/export_profiles/``, ...; see the package-dir
mapping in pyproject.toml). Every look-up of a shipped file goes through :func:`shipped_dir`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHIPPED = ("export_profiles", "calibration", "jetson")


def shipped_dir(folder: str) -> Path:
    """The directory holding the shipped ``folder`` (one of :data:`SHIPPED`): inside the installed package, or
    at the repository root for a source checkout (an editable install maps no data folders into the package)."""
    if folder not in SHIPPED:
        raise ValueError(f"unknown shipped folder {folder!r}; one of {SHIPPED}")
    packaged = files("edgevit") / folder
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / folder
