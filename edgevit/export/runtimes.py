"""What each runtime adds to an export, one class per runtime in :data:`RUNTIMES` (a profile's ``runtime``).

:func:`edgevit.export.pipeline.export_bundle` runs the steps every export shares (ONNX export, onnxslim,
parity, INT8 quantization and its accuracy gate) and calls the profile's runtime at four points:

- :meth:`Runtime.fp32_graph`: check or rewrite ``model.onnx`` before parity (TensorRT: standard ops only;
  ONNX Runtime: its fused ``com.microsoft`` kernels);
- :meth:`Runtime.check_int8`: check ``model.int8.onnx`` fits the runtime;
- :meth:`Runtime.device_graph`: what ONNX Runtime runs on the CPU to measure a low-precision graph's accuracy as
  the runtime computes it (TensorRT: the fake-quant proxy);
- :meth:`Runtime.low_precision`: a low-precision graph other than INT8 (TensorRT FP16), with its accuracy;
- :meth:`Runtime.finish`: what the runtime records once the deploy graph exists (fusions ORT builds, the
  TensorRT build script and precision report).

A new runtime is one subclass decorated with ``@register`` plus its name in ``Profile.runtime``; a target
written beside the graph (Triton, DeepStream) is an emitter module instead (``pipeline.EMITTERS``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import onnx
from torch import nn

from edgevit import cpu
from edgevit.errors import EdgeVitError
from edgevit.export import checks, fakequant, ort_graph, precision
from edgevit.export import onnx as onnx_export
from edgevit.export.artifacts import FP16_ONNX, FP32_ONNX, INT8_ONNX, SCRIPT
from edgevit.export.profiles import Profile
from edgevit.export.tensorrt import build_plan
from edgevit.export.trtexec import build_script
from edgevit.vit.bundle import BundleMeta

log = logging.getLogger("edgevit")


class Runtime:
    """The runtime-specific steps of an export; each returns what export.json records under ``graph``."""

    name: ClassVar[str]
    arithmetic: ClassVar[str]  # how the export measures a low-precision graph's accuracy (export.json)

    def fp32_graph(self, out: Path, graph: onnx.ModelProto, model: nn.Module, profile: Profile) -> dict[str, Any]:
        """Check or rewrite ``out/model.onnx`` (``graph`` is it as loaded) before the parity check."""
        return {}

    def check_int8(self, graph: onnx.ModelProto, profile: Profile) -> dict[str, Any]:
        """Raise :class:`EdgeVitError` if the quantized ``graph`` does not fit this runtime."""
        return {}

    def device_graph(self, path: Path) -> Path | bytes:
        """What ONNX Runtime runs on the CPU to compute the graph ``path`` as this runtime does."""
        return path

    def low_precision(self, out: Path, meta: BundleMeta, profile: Profile) -> dict[str, Any] | None:
        """Write a non-INT8 low-precision graph the profile asks for and return its accuracy (None: none)."""
        return None

    def finish(self, out: Path, model: nn.Module, profile: Profile, deploy: str, dims: list[int]) -> dict[str, Any]:
        """Runtime files and records once ``deploy`` (the graph the runtime loads) is final."""
        return {}


RUNTIMES: dict[str, Runtime] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    """Register a :class:`Runtime` subclass under its ``name``."""
    RUNTIMES[cls.name] = cls()
    return cls


@register
class OnnxRuntime(Runtime):
    """ONNX Runtime on a CPU: the graph may use ORT's ``com.microsoft`` kernels (``ort_fusions``)."""

    name = "onnxruntime"
    arithmetic = "ONNX Runtime's CPU kernels on the exporting machine"

    def check_int8(self, graph: onnx.ModelProto, profile: Profile) -> dict[str, Any]:
        """Record the CPU the graph is verified on and what its weights need from the CPU that runs it."""
        here = cpu.cpu_info()
        needs = cpu.EXACT_U8S8 if profile.int8.weight_type == "int8" else None
        if cpu.lacks(needs, here):
            log.warning("%s: int8 weights need %s; %s, so the accuracy gate measures this CPU's saturating "
                        "arithmetic (int7 weights are exact everywhere)", INT8_ONNX, needs, cpu.lacks(needs, here))
        return {"cpu": {"verified_on": here.record(), "weights": profile.int8.weight_type, "needs": needs}}

    def fp32_graph(self, out: Path, graph: onnx.ModelProto, model: nn.Module, profile: Profile) -> dict[str, Any]:
        path = out / FP32_ONNX
        if profile.ort_fusions == "transformers":
            heads = next(b.attn.num_heads for b in model.blocks if hasattr(b, "attn"))
            fused = onnx_export.transformer_fusions(path, out / "fused.onnx", heads, model.embed_dim)
            os.replace(out / "fused.onnx", path)
            return {"transformer_fusions": fused}
        if profile.ort_fusions == "session":  # fused kernels ORT does not build itself
            return {"ort_rewrites": ort_graph.rewrite(path, path)}
        return {}

    def finish(self, out: Path, model: nn.Module, profile: Profile, deploy: str, dims: list[int]) -> dict[str, Any]:
        if profile.ort_fusions != "session":
            return {}
        return {"ort_session_fusions": onnx_export.session_fusions(out / deploy)}


@register
class TensorRT(Runtime):
    """TensorRT on Jetson or a desktop GPU: standard ops only, precision in the graph (strongly typed)."""

    name = "tensorrt"
    arithmetic = "fake quantization in FP32 (edgevit.export.fakequant): the graph's Q/DQ and FP16 roundings"

    def fp32_graph(self, out: Path, graph: onnx.ModelProto, model: nn.Module, profile: Profile) -> dict[str, Any]:
        checks.check_standard_ops(graph, FP32_ONNX)
        return {}

    def check_int8(self, graph: onnx.ModelProto, profile: Profile) -> dict[str, Any]:
        checks.check_standard_ops(graph, INT8_ONNX)
        return {"qdq": checks.check_qdq_placement(graph, profile.int8.ops, INT8_ONNX)}

    def low_precision(self, out: Path, meta: BundleMeta, profile: Profile) -> dict[str, Any] | None:
        if profile.precision != "fp16":
            return None
        onnx_export.to_fp16(out / FP32_ONNX, out / FP16_ONNX, profile.tensorrt.fp32_ops)
        checks.check_standard_ops(onnx.load(str(out / FP16_ONNX)), FP16_ONNX)
        return checks.low_precision_accuracy(out, meta, profile, FP16_ONNX, self, None)

    def device_graph(self, path: Path) -> bytes:
        return fakequant.fake_quant(onnx.load(str(path))).SerializeToString()

    def finish(self, out: Path, model: nn.Module, profile: Profile, deploy: str, dims: list[int]) -> dict[str, Any]:
        plans = {major: build_plan(profile, deploy, f"{major}.0") for major in (10, 11)}
        (out / SCRIPT).write_text(build_script(profile, plans, onnx_export.INPUT, dims))
        (out / SCRIPT).chmod(0o755)
        return {"precision": self._precision(out, model, profile, deploy)}

    @staticmethod
    def _precision(out: Path, model: nn.Module, profile: Profile, deploy: str) -> dict[str, Any]:
        """The precision report of the strongly typed graph TensorRT builds (fp16 on TensorRT 10 builds
        model.onnx with --fp16 instead, from the same weights); a graph that breaks the profile's precision, or
        whose LayerNorms are no longer one op each (decomposed LayerNorm overflows in FP16), fails the export."""
        typed = FP16_ONNX if profile.precision == "fp16" else deploy
        graph = onnx.load(str(out / typed))
        checks.check_layernorm(graph, model, typed)
        report = precision.precision_report(graph)
        problem = precision.check_precision(report, profile.precision, profile.tensorrt.fp32_ops)
        if problem:
            raise EdgeVitError(
                f"{typed} for {profile.name} is not {profile.precision} where TensorRT needs it: {problem}"
            )
        return {"onnx": typed, **report}
