"""Deployment targets: what each device can run, so a profile that asks for more is refused before any work.

A profile's ``target`` names one of :data:`TARGETS`. Facts come from NVIDIA's documentation:

- Jetson Orin (Ampere GPU, compute capability 8.7): no FP8 tensor cores; DLA on Orin NX and AGX Orin only.
  JetPack 6.x (TensorRT 10.3) and JetPack 7.2+ (Jetson Linux 39.2, CUDA 13.2, TensorRT 10.16; TensorRT 11.4.1
  through the SBSA build on JetPack 7.2.2+ for AGX Orin).
- Jetson Thor (AGX Thor / T5000, and the smaller T4000; Blackwell GPU, compute capability 11.0 under CUDA 13):
  FP8 and FP4 tensor cores, **no DLA**. JetPack 7.0 (Jetson Linux 38.2, CUDA 13.0, TensorRT 10.13), 7.1
  (38.4, adds T4000), 7.2 (39.2, CUDA 13.2, TensorRT 10.16); TensorRT 11.4.1 (SBSA build) on JetPack 7.2.2+
  ("Migrating TensorRT from 10.x to 11.x on Jetson/JetPack": Thor has no DLA).
- Desktop GPUs: FP8 from Ada (8.9: RTX 40, L4, L40S), Hopper (9.0) and Blackwell (10.x, 12.0); FP4 from
  Blackwell (10.0). Which one is a profile's business: ``tensorrt.compute_capability``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgevit.export.profiles import Profile

FP8_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell (TensorRT's FP8 GEMMs; Working with Quantized Types)
DLA_TARGETS = "Jetson Orin NX and AGX Orin"


@dataclass(frozen=True)
class Target:
    """A device family engines are built for.

    Args:
        name: the profile's ``target``.
        device: what it is, in words.
        compute_capability: its GPU's (None: any GPU a profile names, or no GPU).
        dla: has deep-learning accelerators.
        jetpack: the JetPack releases that support it (Jetson only).
        gpu: runs engines on an NVIDIA GPU (False: ONNX Runtime on a CPU).
    """

    name: str
    device: str
    compute_capability: str | None = None
    dla: bool = False
    jetpack: str | None = None
    gpu: bool = True

    @property
    def jetson(self) -> bool:
        return self.jetpack is not None


TARGETS = {t.name: t for t in (
    Target("jetson-orin-nano", "Jetson Orin Nano (Ampere GPU)", "8.7", jetpack="6.0+"),
    Target("jetson-orin-nx", "Jetson Orin NX (Ampere GPU, DLA)", "8.7", dla=True, jetpack="6.0+"),
    Target("jetson-agx-orin", "Jetson AGX Orin (Ampere GPU, DLA)", "8.7", dla=True, jetpack="6.0+"),
    Target("jetson-thor", "Jetson AGX Thor / T5000 (Blackwell GPU, no DLA)", "11.0", jetpack="7.0+"),
    Target("jetson-t4000", "Jetson T4000 (Blackwell GPU, no DLA)", "11.0", jetpack="7.1+"),
    Target("desktop-gpu", "a desktop or server NVIDIA GPU"),
    Target("cpu", "a CPU (ONNX Runtime)", gpu=False),
)}


def capability(value: str) -> tuple[int, ...]:
    return tuple(int(p) for p in value.split("."))


def compute_capability(profile: Profile) -> str | None:
    """The GPU a profile is for: its own ``tensorrt.compute_capability``, else its target's (None: any)."""
    return profile.tensorrt.compute_capability or TARGETS[profile.target].compute_capability


def refusal(profile: Profile) -> str | None:
    """Why ``profile`` asks its target for something the target does not have, or None."""
    target = TARGETS[profile.target]
    trt = profile.tensorrt
    if trt.dla_core is not None and not target.dla:
        return f"dla_core is only available on {DLA_TARGETS} ({target.name}: {target.device})"
    if target.compute_capability and trt.compute_capability not in (None, target.compute_capability):
        return (f"tensorrt.compute_capability {trt.compute_capability} is not {target.name}'s GPU "
                f"({target.compute_capability}); leave it out")
    have = compute_capability(profile)
    if profile.precision == "fp8" and (have is None or capability(have) < FP8_CAPABILITY):
        gpu = f"{target.name} is {have}" if have else "set tensorrt.compute_capability to the GPU's"
        return (f"precision fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell, "
                f"Jetson Thor); {gpu}")
    return None
