"""The export directory: its file names, ``export.json`` (schema, reading, writing) and ONNX Runtime sessions.

``edgevit export`` writes an export directory through this module and ``edgevit profile`` / ``predict`` /
``build`` read it through this module, so the contract has one owner::

    OUT/
      export.json         what was exported, how, and the checks it passed (schema SCHEMA_VERSION)
      bundle/             the bundle it came from (model.safetensors + bundle.json)
      model.onnx          the FP32 graph (checked against torch)
      model.int8.onnx     INT8 profiles: the quantized graph (export.json's deploy_onnx)
      model.fp8.onnx      TensorRT FP8 profiles: the FP8 Q/DQ graph (export.json's deploy_onnx)
      model.fp16.onnx     TensorRT fp16 profiles: the strongly typed fp16 graph
      build_engine.sh     TensorRT profiles: the trtexec command equivalent to ``edgevit build``
      engine.plan         written on the target by ``edgevit build`` (+ engine.json: what it was built for)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgevit.errors import EdgeVitError

SCHEMA_VERSION = 1
EXPORT_JSON = "export.json"
BUNDLE_DIR = "bundle"
FP32_ONNX = "model.onnx"
INT8_ONNX = "model.int8.onnx"
FP16_ONNX = "model.fp16.onnx"
FP8_ONNX = "model.fp8.onnx"
QUANTIZED_ONNX = {"int8": INT8_ONNX, "fp8": FP8_ONNX}  # a quantized precision's deploy graph
SCRIPT = "build_engine.sh"
ENGINE = "engine.plan"
ENGINE_JSON = "engine.json"


def is_export_dir(path: Path) -> bool:
    return (path / EXPORT_JSON).is_file()


def read_export(out_dir: str | Path) -> dict[str, Any]:
    """``export.json`` of the export directory ``out_dir``, checked to be one this version of edgevit reads.

    Raises :class:`EdgeVitError` naming the user's path when the file is missing, is not JSON, or has another
    schema version.
    """
    from edgevit.vit.bundle import read_versioned_json

    out_dir = Path(out_dir)
    if not is_export_dir(out_dir):
        raise EdgeVitError(f"{out_dir} is not an export directory (no {EXPORT_JSON}); run `edgevit export` first")
    return read_versioned_json(out_dir / EXPORT_JSON, SCHEMA_VERSION)


def write_export(out_dir: Path, export: dict[str, Any]) -> None:
    """Write ``export.json`` into ``out_dir`` atomically (``export`` carries its ``schema_version``)."""
    from edgevit.vit.bundle import atomic_write_json

    atomic_write_json(out_dir / EXPORT_JSON, export)


def ort_session(path: str | Path | bytes, threads: int = 1, optimization: str = "all",
                config: dict[str, str] | None = None, optimized_model: str | Path | None = None):
    """An ONNX Runtime CPU session pinned to ``threads`` intra-op threads, sequential execution.

    Args:
        path: the ONNX file (or a serialized model).
        threads: intra-op threads (the only parallelism; inter-op is 1 so the count is what it says).
        optimization: graph optimisation level: ``disable``, ``basic``, ``extended`` or ``all``.
        config: session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``.
        optimized_model: where ORT writes the graph it optimised (to read which fusions it built).
    """
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = 3
    if optimized_model is not None:
        opts.optimized_model_filepath = str(optimized_model)
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
