"""Where edgevit's shipped files live: export profiles, calibration manifests and the device kit.

The repository's top-level ``export_profiles/``, ``calibration/`` and ``jetson/`` folders are the editable
sources. Every look-up of a shipped file goes through :func:`shipped_dir`, so where they sit in an installed
package is decided here only.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = ("export_profiles", "calibration", "jetson")


def shipped_dir(folder: str) -> Path:
    """The directory holding the shipped ``folder`` (one of :data:`SHIPPED`)."""
    if folder not in SHIPPED:
        raise ValueError(f"unknown shipped folder {folder!r}; one of {SHIPPED}")
    return Path(__file__).resolve().parents[1] / folder
