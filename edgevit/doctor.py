"""``edgevit doctor``: what this machine has, and which shipped profiles can export and build here.

Every probe is read-only and tolerant: a missing package, a missing GPU or a non-Jetson machine is a finding,
never an error.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgevit.cpu import cpu_info

# (import name, distribution names to read the version from: the first one installed wins)
COMPONENTS = {
    "edgevit": ("edgevit",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnxslim": ("onnxslim",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "cuda": ("cuda-python", "cuda-bindings"),
    "modelopt": ("nvidia-modelopt",),
    "tritonclient": ("tritonclient",),
}
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_MODEL = Path("/proc/device-tree/model")
# L4T release -> JetPack (NVIDIA's JetPack archive); the longest matching prefix wins. JetPack 7 (Jetson Thor,
# T4000 from 7.1, Orin again from 7.2): Jetson Linux 38.2 (7.0), 38.4 (7.1), 39.2 (7.2), 39.2.1 (7.2.1).
JETPACK = {"39.2.1": "7.2.1", "39.2": "7.2", "38.4": "7.1", "38.2": "7.0", "36.4.4": "6.2.1", "36.4.3": "6.2",
           "36.4": "6.1", "36.3": "6.0", "36.2": "6.0 DP", "35.6": "5.1.4", "35.5": "5.1.3", "35.4": "5.1.2",
           "35.3": "5.1.1", "35.2": "5.1", "35.1": "5.0.2"}


def _version(distributions: tuple[str, ...]) -> str | None:
    for dist in distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def components() -> dict[str, dict[str, Any]]:
    """Each component: installed or not, its version; torch's CUDA device, onnxruntime's providers."""
    found: dict[str, dict[str, Any]] = {}
    for module, dists in COMPONENTS.items():
        installed = importlib.util.find_spec(module) is not None
        found[module] = {"installed": installed, "version": _version(dists) if installed else None}
    if found["tensorrt"]["installed"] and found["tensorrt"]["version"] is None:  # JetPack's apt package
        found["tensorrt"]["version"] = getattr(__import__("tensorrt"), "__version__", None)
    if found["torch"]["installed"]:
        import torch

        cuda = torch.cuda.is_available()
        found["torch"]["cuda"] = cuda
        if cuda:
            found["torch"]["device"] = torch.cuda.get_device_name(0)
            found["torch"]["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    if found["onnxruntime"]["installed"]:
        import onnxruntime

        found["onnxruntime"]["providers"] = onnxruntime.get_available_providers()
    return found


def jetson() -> dict[str, Any] | None:
    """L4T release, JetPack, board model and power mode on a Jetson; None elsewhere."""
    if not TEGRA_RELEASE.is_file():
        return None
    text = TEGRA_RELEASE.read_text(errors="replace")
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    l4t = f"{match[1]}.{match[2]}" if match else None
    prefixes = [p for p in JETPACK if l4t and (l4t == p or l4t.startswith(p + "."))]
    info: dict[str, Any] = {"l4t": l4t, "jetpack": JETPACK[max(prefixes, key=len)] if prefixes else None,
                            "model": DEVICE_MODEL.read_text(errors="replace").strip("\x00\n ")
                            if DEVICE_MODEL.is_file() else None, "power_mode": None}
    if shutil.which("nvpmodel"):
        done = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
        mode = re.search(r"NV Power Mode:\s*(.+)", done.stdout)
        info["power_mode"] = mode[1].strip() if mode else None
    return info


def _can_export(profile, found: dict) -> tuple[bool, str]:
    if not found["onnx"]["installed"] or not found["onnxruntime"]["installed"]:
        return False, "needs onnx and onnxruntime (parity is checked on the CPU)"
    if profile.quantized and profile.quant.quantizer == "modelopt" and not found["modelopt"]["installed"]:
        return True, "nvidia-modelopt not installed: edgevit's own Q/DQ placer runs (pip install 'edgevit[quant]')"
    return True, ""


def _can_build(profile, found: dict, device: dict | None) -> tuple[bool | None, str]:
    """Whether this machine can build the profile's TensorRT engine (None: ONNX Runtime builds no engine)."""
    from edgevit.errors import EdgeVitError
    from edgevit.export.runtimes import runtime_of
    from edgevit.export.targets import TARGETS
    from edgevit.export.tensorrt import check_gpu, check_version, gpu_info

    if not runtime_of(profile).builds_engine:
        return None, f"no engine: {profile.runtime} loads the exported graph"
    if not found["tensorrt"]["installed"]:
        return False, "tensorrt is not installed (pip install 'edgevit[trt]'; JetPack ships it)"
    on_jetson = TARGETS[profile.target].jetson
    if on_jetson and device is None:
        return False, f"{profile.target} engines are built on the Jetson itself (no {TEGRA_RELEASE} here)"
    if not on_jetson and device is not None:
        return False, f"{profile.target} engines are built on a desktop GPU, not on this Jetson"
    jetpack_min = profile.tensorrt.jetpack_min
    if on_jetson and jetpack_min and _older((device or {}).get("jetpack"), jetpack_min):
        return False, f"{profile.name} needs JetPack {jetpack_min}+; this Jetson has {device['jetpack']}"
    try:
        check_gpu(profile, gpu_info())
        check_version(profile, found["tensorrt"]["version"] or "0")
    except EdgeVitError as err:
        return False, str(err)
    return True, ""


def _older(version: str | None, minimum: str) -> bool:
    """``version`` (e.g. "6.2") is below ``minimum``; an unknown version is not (the build itself will tell)."""
    numbers = re.findall(r"\d+", version or "")
    return bool(numbers) and tuple(map(int, numbers)) < tuple(map(int, minimum.split(".")))


def diagnose() -> dict[str, Any]:
    """Everything ``edgevit doctor`` reports, as a JSON-ready dict."""
    from edgevit.export.profiles import list_profiles

    found = components()
    device = jetson()
    rows = []
    for profile, path in list_profiles():
        export_ok, export_note = _can_export(profile, found)
        build_ok, build_note = _can_build(profile, found, device)
        rows.append({"name": profile.name, "target": profile.target, "runtime": profile.runtime,
                     "precision": profile.precision, "path": str(path), "export": export_ok,
                     "export_note": export_note, "build": build_ok, "build_note": build_note})
    here = cpu_info()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpu": {**here.record(), "int8": here.int8_line()}, "components": found, "jetson": device,
            "profiles": rows}


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`diagnose`."""
    lines = [f"python {report['python']} on {report['platform']}"]
    c = report["cpu"]
    lines.append(f"cpu: {c['model']} ({', '.join(c['features']) or 'no AVX2/AVX-512/VNNI/AMX'})")
    lines.append(f"  int8: {c['int8']}")
    for name, c in report["components"].items():
        extra = ""
        if name == "torch" and c["installed"]:
            extra = f" (CUDA: {c['device']}, sm {c['compute_capability']})" if c["cuda"] else " (no CUDA device)"
        if name == "onnxruntime" and c["installed"]:
            extra = f" (providers: {', '.join(c['providers'])})"
        lines.append(f"  {name:13s} {(c['version'] or 'installed') if c['installed'] else 'not installed'}{extra}")
    j = report["jetson"]
    lines.append(f"jetson: {j['model']}, L4T {j['l4t']}, JetPack {j['jetpack']}, power mode {j['power_mode']}"
                 if j else "jetson: not a Jetson")
    lines.append("profiles (export here / build engine here):")
    for p in report["profiles"]:
        build = {True: "yes", False: "no", None: "n/a"}[p["build"]]
        notes = "; ".join(n for n in (p["export_note"], p["build_note"]) if n)
        lines.append(f"  {p['name']:26s} export {'yes' if p['export'] else 'no':3s}  build {build:3s}  {notes}")
    return "\n".join(lines)
