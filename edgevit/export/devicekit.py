"""The device kit: ``device/`` inside every TensorRT export directory, so the device needs no edgevit install.

It holds the on-device scripts of the package's ``jetson/`` folder (:func:`edgevit.resources.shipped_dir`, so a
wheel install has them too): ``build_engine.py`` (runs the export's ``build_engine.sh``, the profile's trtexec
line, and records ``engine.json``), ``benchmark.sh`` (trtexec latency + tegrastats power), ``run_folder.py`` and
its helper ``common.py`` (top-1 of the engine on a folder of class sub-folders), and a short ``README.md``. They
need only what JetPack ships: python3, numpy, tensorrt, trtexec, and cuda-python for the runner.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.export.profiles import Profile
from edgevit.resources import shipped_dir

NAME = "device_kit"
FOLDER = "device"
# shipped jetson/ file -> name in the kit
FILES = {
    "build_engine.py": "build_engine.py",
    "benchmark.sh": "benchmark.sh",
    "run_folder.py": "run_folder.py",
    "common.py": "common.py",
    "KIT.md": "README.md",
}
EXECUTABLE = ("build_engine.py", "benchmark.sh", "run_folder.py")


def emit(out: Path, export: dict[str, Any], profile: Profile, images: np.ndarray) -> dict[str, Any] | None:
    """Copy the kit into ``out/device/`` where the device builds an engine; returns what export.json records."""
    from edgevit.export.runtimes import runtime_of

    del export, images  # the scripts read export.json on the device
    if not runtime_of(profile).builds_engine:
        return None
    source = shipped_dir("jetson")
    folder = out / FOLDER
    folder.mkdir()
    for name, kit_name in FILES.items():
        shutil.copyfile(source / name, folder / kit_name)
        (folder / kit_name).chmod(0o755 if kit_name in EXECUTABLE else 0o644)  # a wheel may not keep the bits
    return {"folder": FOLDER, "files": sorted(FILES.values())}
