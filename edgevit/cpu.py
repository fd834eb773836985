"""This CPU's integer dot products: what ONNX Runtime's INT8 kernels compute on it.

ONNX Runtime multiplies uint8 activations by int8 weights (u8s8). On x86 CPUs with AVX2 or AVX-512 but no VNNI,
its kernels use ``vpmaddubsw``, which adds each pair of u8 x s8 products in int16 *with saturation* before the
int32 sum (``vpmaddwd``): two products of 255 x 127 overflow and are clipped to 32767. With VNNI (AVX512-VNNI,
AVX-VNNI), AMX, or on ARM the products are summed exactly in int32. The same INT8 graph therefore computes
different logits on different CPUs: OpenVINO's documentation calls this the saturation issue, and Hugging Face
Optimum ships separate ``avx2`` and ``avx512_vnni`` quantization configs for it.

Weights within +-64 (7-bit, ONNX Runtime's ``reduce_range``) keep every pair within int16
(2 x 255 x 64 = 32640 < 32767), so a 7-bit graph computes exactly the same integers on every CPU.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags /proc/cpuinfo spells these features with, in the order they are shown.
FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
            "amx_int8": "AMX-INT8", "asimddp": "ARM dot product", "i8mm": "ARM i8mm"}
EXACT_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")
X86 = ("x86_64", "amd64", "i386", "i686")
# the largest |weight| whose u8 x s8 pairs stay within int16: 2 x 255 x 64 = 32640 <= 32767
SATURATION_FREE_WEIGHT = 64
EXACT_U8S8 = "VNNI, AMX or ARM (u8 x s8 products summed exactly)"


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's architecture, model name and feature flags (as /proc/cpuinfo spells them)."""

    arch: str
    model: str
    flags: frozenset[str]

    @property
    def features(self) -> list[str]:
        """The INT8-relevant features this CPU has, by their usual names."""
        return [name for flag, name in FEATURES.items() if flag in self.flags]

    @property
    def x86(self) -> bool:
        return self.arch.lower() in X86

    @property
    def saturating_u8s8(self) -> bool:
        """ONNX Runtime's u8s8 kernels sum product pairs in int16 with saturation here (x86 AVX2 without VNNI)."""
        return self.x86 and "avx2" in self.flags and not any(f in self.flags for f in EXACT_DOT)

    @property
    def u8s8(self) -> str:
        return "saturating" if self.saturating_u8s8 else "exact"

    def int8_line(self) -> str:
        """One line on what INT8 graphs compute here."""
        if self.saturating_u8s8:
            return ("u8 x s8 pairs are summed in int16 with saturation (AVX2 without VNNI): 8-bit INT8 weights lose "
                    "accuracy here; 7-bit weights (the cpu-ort-int8 profile) are exact")
        return "u8 x s8 products are summed exactly in int32: INT8 graphs compute what they compute on any CPU"

    def record(self) -> dict[str, object]:
        """What export.json records of the CPU an export was verified on."""
        return {"arch": self.arch, "model": self.model, "features": self.features, "u8s8": self.u8s8}


def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return platform.processor(), frozenset()
    model, flags = "", set()
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model or platform.processor(), frozenset(flags)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    model, flags = _proc_cpuinfo()
    return CpuInfo(platform.machine(), model, flags)


def lacks(needs: str | None, cpu: CpuInfo | None = None) -> str | None:
    """Why this CPU lacks what an INT8 graph ``needs`` (export.json ``int8.cpu.needs``), or None."""
    cpu = cpu or cpu_info()
    if needs == EXACT_U8S8 and cpu.saturating_u8s8:
        return f"this CPU ({', '.join(cpu.features) or cpu.arch}) has no {EXACT_U8S8.split(' (')[0]}"
    return None
