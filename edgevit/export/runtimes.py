"""Runtimes (a profile's ``runtime``): one class each, owning everything that differs between them.

A :class:`Runtime` says what it can do (its precisions and quantizers, whether it builds an engine on the device,
its Triton platform, whether DeepStream runs it, its CPU/GPU placement) and does the runtime-specific steps of an
export, which :func:`edgevit.export.pipeline.export_bundle` calls in this order:

- :meth:`Runtime.fp32_graph`: rewrite ``model.onnx`` before parity (ONNX Runtime: its fused ``com.microsoft``
  kernels; a ``standard_ops_only`` runtime gets it checked for contrib-domain ops instead);
- :meth:`Runtime.quantize`: write the INT8/FP8 graph with the runtime's quantizer and check it fits;
- :meth:`Runtime.low_precision`: a low-precision graph that is not quantized (TensorRT FP16);
- :meth:`Runtime.device_graph`: what ONNX Runtime runs on the CPU to measure a low-precision graph's accuracy
  as the runtime computes it (TensorRT: the fake-quant proxy);
- :meth:`Runtime.finish`: what the runtime records once the deploy graph exists.

Everything else (profile validation, the Triton and DeepStream emitters, ``edgevit build``, ``doctor``, the
profiling backends) asks the profile's runtime (:func:`runtime_of`) and never compares names. A new runtime is
one subclass decorated with ``@register``. Heavy imports (torch, ONNX) happen inside the methods, so validating a
profile stays light.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgevit import cpu
from edgevit.errors import EdgeVitError
from edgevit.export import targets
from edgevit.export.artifacts import FP16_ONNX, FP32_ONNX, SCRIPT

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from edgevit.export.profiles import Profile
    from edgevit.vit.bundle import BundleMeta

log = logging.getLogger("edgevit")


class Runtime:
    """What a runtime can do, and the runtime-specific steps of an export."""

    name: ClassVar[str]
    arithmetic: ClassVar[str]  # how the export measures a low-precision graph's accuracy (export.json)
    precisions: ClassVar[tuple[str, ...]]
    quantizers: ClassVar[tuple[str, ...]]  # ``int8.quantizer`` / ``fp8.quantizer`` values it takes
    builds_engine: ClassVar[bool] = False  # the device builds an engine from the graph (edgevit build, device kit)
    standard_ops_only: ClassVar[bool] = False  # its parser takes no contrib-domain ops
    deepstream: ClassVar[bool] = False  # DeepStream's nvinfer runs it
    triton_platform: ClassVar[str]
    triton_file: ClassVar[str]
    min_opset: ClassVar[int] = 13

    def refusal(self, profile: Profile) -> str | None:
        """Why ``profile`` does not fit this runtime (checked when the profile is validated), or None."""
        if profile.precision not in self.precisions:
            return f"{profile.precision} is not an {self.name} precision (it takes {', '.join(self.precisions)})"
        if profile.quantized and profile.quant.quantizer not in self.quantizers:
            return (f"{profile.precision}.quantizer {profile.quant.quantizer} is not for {self.name} "
                    f"(it takes {', '.join(self.quantizers)})")
        if profile.opset < self.min_opset:
            return f"{self.name} profiles need opset >= {self.min_opset}"
        return None

    def fp32_graph(self, out: Path, model: nn.Module, profile: Profile) -> dict[str, Any]:
        """Check or rewrite ``out/model.onnx`` before the parity check."""
        return {}

    def quantize(self, out: Path, deploy: str, images: np.ndarray | None, profile: Profile) -> dict[str, Any]:
        """Write the quantized graph ``out/deploy`` from ``out/model.onnx``; returns what export.json records."""
        raise NotImplementedError(f"{self.name} has no quantizer")

    def device_graph(self, path: Path) -> Path | bytes:
        """What ONNX Runtime runs on the CPU to compute the graph ``path`` as this runtime does."""
        return path

    def low_precision(self, out: Path, meta: BundleMeta, profile: Profile) -> dict[str, Any] | None:
        """Write a low-precision graph that is not quantized and return its accuracy (None: none)."""
        return None

    def finish(self, out: Path, model: nn.Module, profile: Profile, deploy: str, dims: list[int]) -> dict[str, Any]:
        """Runtime files and records once ``deploy`` (the graph the runtime loads) is final."""
        return {}


RUNTIMES: dict[str, Runtime] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    """Register a :class:`Runtime` subclass under its ``name``."""
    RUNTIMES[cls.name] = cls()
    return cls


def runtime_of(profile: Profile) -> Runtime:
    """The runtime a (validated) profile names."""
    return RUNTIMES[profile.runtime]


def _quantized_graph(out: Path, deploy: str) -> Any:
    import onnx

    from edgevit.export import onnx as onnx_export

    graph = onnx.load(str(out / deploy))
    onnx_export.check(graph)
    return graph


@register
class OnnxRuntime(Runtime):
    """ONNX Runtime on a CPU: the graph may use ORT's ``com.microsoft`` kernels (``ort_fusions``); INT8 runs on its
    integer kernels."""

    name = "onnxruntime"
    arithmetic = "ONNX Runtime's CPU kernels on the exporting machine"
    precisions = ("fp32", "int8")
    quantizers = ("dynamic", "static")
    triton_platform, triton_file = "onnxruntime_onnx", "model.onnx"

    def refusal(self, profile: Profile) -> str | None:
        if profile.precision == "fp16":  # the message users of earlier versions know
            return "fp16 is a tensorrt precision; onnxruntime profiles are fp32 or int8"
        return super().refusal(profile)

    def fp32_graph(self, out: Path, model: nn.Module, profile: Profile) -> dict[str, Any]:
        from edgevit.export import onnx as onnx_export
        from edgevit.export import ort_graph
        from edgevit.vit import attention, attention_blocks

        path = out / FP32_ONNX
        if profile.ort_fusions == "transformers":
            heads = attention(model, attention_blocks(model)[0]).num_heads
            fused = onnx_export.transformer_fusions(path, out / "fused.onnx", heads, model.embed_dim)
            os.replace(out / "fused.onnx", path)
            return {"transformer_fusions": fused}
        if profile.ort_fusions == "session":  # fused kernels ORT does not build itself
            return {"ort_rewrites": ort_graph.rewrite(path, path)}
        return {}

    def quantize(self, out: Path, deploy: str, images: np.ndarray | None, profile: Profile) -> dict[str, Any]:
        """Dynamic or static (uint8 activations) quantization, and the CPU the graph is verified on."""
        from edgevit.export import quantize

        opts = profile.quant
        if opts.quantizer == "dynamic":
            info = quantize.quantize_dynamic(out / FP32_ONNX, out / deploy, opts)
        else:
            info = quantize.quantize_static(out / FP32_ONNX, out / deploy, images, opts, profile.calibration.method,
                                            False, _calibration_batch(profile))
        _quantized_graph(out, deploy)
        return {**info, "cpu": self._cpu_record(profile)}

    @staticmethod
    def _cpu_record(profile: Profile) -> dict[str, Any]:
        """The CPU the graph is verified on and what its weights need from the CPU that runs it."""
        here = cpu.cpu_info()
        needs = cpu.EXACT_U8S8 if profile.int8.weight_type == "int8" else None
        if reason := cpu.lacks(needs, here):
            log.warning("int8 weights need %s; %s, so the accuracy gate measures this CPU's saturating arithmetic "
                        "(int7 weights are exact everywhere)", needs, reason)
        return {"verified_on": here.record(), "weights": profile.int8.weight_type, "needs": needs}

    def finish(self, out: Path, model: nn.Module, profile: Profile, deploy: str, dims: list[int]) -> dict[str, Any]:
        from edgevit.export import onnx as onnx_export

        if profile.ort_fusions != "session":
            return {}
        return {"ort_session_fusions": onnx_export.session_fusions(out / deploy)}


@register
class TensorRT(Runtime):
    """TensorRT on Jetson or a desktop GPU: standard ops only, precision in the graph (strongly typed), an engine
    built on the device."""

    name = "tensorrt"
    arithmetic = "fake quantization in FP32 (edgevit.export.fakequant): the graph's Q/DQ and FP16 roundings"
    precisions = ("fp32", "fp16", "int8", "fp8")
    quantizers = ("modelopt", "static")
    builds_engine = standard_ops_only = deepstream = True
    triton_platform, triton_file = "tensorrt_plan", "model.plan"
    min_opset = 17  # LayerNormalization as one op

    def refusal(self, profile: Profile) -> str | None:
        if profile.quant.weight_type != "int8":
            return (f"{profile.precision}.weight_type {profile.quant.weight_type} is for ONNX Runtime's CPU kernels; "
                    "tensorrt takes int8")
        return super().refusal(profile) or targets.refusal(profile)

    def quantize(self, out: Path, deploy: str, images: np.ndarray | None, profile: Profile) -> dict[str, Any]:
        """ModelOpt's ONNX PTQ (edgevit's own Q/DQ placer where it is not installed), FP16 outside the Q/DQ; the Q/DQ
        may feed MatMul/Gemm only."""
        from edgevit.export import checks, quantize

        opts = profile.quant
        src, dst, fp32_ops = out / FP32_ONNX, out / deploy, profile.tensorrt.fp32_ops
        method, mode = profile.calibration.method, profile.precision
        if opts.quantizer == "modelopt" and quantize.modelopt_available():
            info = quantize.quantize_modelopt(src, dst, images, opts, method, fp32_ops, mode)
        else:
            if opts.quantizer == "modelopt":
                log.info("nvidia-modelopt is not installed (pip install 'edgevit[quant]'); using ORT static Q/DQ "
                         "restricted to %s", "/".join(opts.ops))
            info = quantize.quantize_static(src, dst, images, opts, method, True, _calibration_batch(profile),
                                            fp32_ops, mode)
            info |= {"fallback_from": "modelopt"} if opts.quantizer == "modelopt" else {}
        graph = _quantized_graph(out, deploy)
        checks.check_standard_ops(graph, deploy)
        return {**info, "qdq": checks.check_qdq_placement(graph, opts.ops, deploy)}

    def device_graph(self, path: Path) -> bytes:
        import onnx

        from edgevit.export import fakequant

        return fakequant.fake_quant(onnx.load(str(path))).SerializeToString()

    def low_precision(self, out: Path, meta: BundleMeta, profile: Profile) -> dict[str, Any] | None:
        import onnx

        from edgevit.export import checks
        from edgevit.export import onnx as onnx_export

        if profile.precision != "fp16":
            return None
        onnx_export.to_fp16(out / FP32_ONNX, out / FP16_ONNX, profile.tensorrt.fp32_ops)
        checks.check_standard_ops(onnx.load(str(out / FP16_ONNX)), FP16_ONNX)
        return checks.low_precision_accuracy(out, meta, profile, FP16_ONNX, self, None)

    def finish(self, out: Path, model: nn.Module, profile: Profile, deploy: str, dims: list[int]) -> dict[str, Any]:
        from edgevit.export import onnx as onnx_export
        from edgevit.export.tensorrt import build_plan, supported_majors
        from edgevit.export.trtexec import build_script

        plans = {major: build_plan(profile, deploy, version) for major, version in supported_majors(profile).items()}
        (out / SCRIPT).write_text(build_script(profile, plans, onnx_export.INPUT, dims))
        (out / SCRIPT).chmod(0o755)
        return {"precision": self._precision(out, model, profile, deploy)}

    @staticmethod
    def _precision(out: Path, model: nn.Module, profile: Profile, deploy: str) -> dict[str, Any]:
        """The precision report of the strongly typed graph TensorRT builds (fp16 on TensorRT 10 builds
        model.onnx with --fp16 instead, from the same weights); a graph that breaks the profile's precision, or
        whose LayerNorms are no longer one op each (decomposed LayerNorm overflows in FP16), fails the export."""
        import onnx

        from edgevit.export import checks, precision

        typed = FP16_ONNX if profile.precision == "fp16" else deploy
        graph = onnx.load(str(out / typed))
        checks.check_layernorm(graph, model, typed)
        report = precision.precision_report(graph, targets.compute_capability(profile))
        problem = precision.check_precision(report, profile.precision, profile.tensorrt.fp32_ops)
        if problem:
            raise EdgeVitError(
                f"{typed} for {profile.name} is not {profile.precision} where TensorRT needs it: {problem}"
            )
        return {"onnx": typed, **report}


def _calibration_batch(profile: Profile) -> int:
    """Images per calibration run: the graph's batch when it is static, else at least 8."""
    batch = profile.batch_spec
    return max(batch.opt, 8) if batch.dynamic else batch.max

