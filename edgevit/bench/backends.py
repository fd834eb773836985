"""What ``edgevit profile`` measures: export directories, and the runtimes that execute them.

An artifact is an export directory (``export.json`` + ``bundle/`` + ONNX graphs + optionally
``engine.plan``; see the export contract) or a plain bundle directory (torch backend only). A backend wraps
one runtime behind the same four calls, so timing and accuracy code is shared:

- ``torch``: the bundle's graph in PyTorch (fp32; CUDA when available, else CPU);
- ``ort``: ``export.json``'s ``deploy_onnx`` in ONNX Runtime on CPU (a TensorRT export's graph as its runtime
  computes it: the fake-quant proxy, :meth:`edgevit.export.runtimes.Runtime.device_graph`);
- ``trt``: ``engine.plan`` in TensorRT (imported lazily; an engine built for another GPU, TensorRT or graph is
  refused by :func:`edgevit.export.tensorrt.check_engine_compatible`).

Backends live in the registry :data:`BACKENDS` (as graph edits live in :data:`edgevit.vit.SURGERY`): a new
runtime is one :class:`Backend` subclass decorated with ``@register("name")``; ``edgevit profile --backend``,
``edgevit predict --backend`` and :func:`open_backend` take every registered name.

Export directories are read through :mod:`edgevit.export.artifacts`, the module ``edgevit export`` writes them
with.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgevit import cpu
from edgevit.bench.latency import CudaEventTimer, Timer, WallTimer
from edgevit.errors import EdgeVitError
from edgevit.export.artifacts import (
    BUNDLE_DIR,
    ENGINE,
    ENGINE_JSON,
    EXPORT_JSON,
    FP32_ONNX,
    is_export_dir,
    ort_session,
    read_export,
)
from edgevit.vit.bundle import META, WEIGHTS, BundleMeta, read_meta

log = logging.getLogger("edgevit")


@dataclass(frozen=True)
class Artifact:
    """An export directory (or a bare bundle) ready to be measured."""

    path: Path
    bundle_dir: Path
    meta: BundleMeta
    export: dict[str, Any] | None

    @property
    def method(self) -> str:
        if self.export and self.export.get("method"):
            return str(self.export["method"])
        return str(self.meta.provenance.get("method", "unknown"))

    @property
    def settings(self) -> dict[str, Any]:
        if self.export and isinstance(self.export.get("settings"), dict):
            return self.export["settings"]
        return dict(self.meta.provenance.get("config", {}))

    @property
    def deploy_onnx(self) -> Path:
        if self.export is None:
            raise EdgeVitError(f"{self.path} is a bundle, not an export directory; run `edgevit export` first "
                               "or profile it with --backend torch")
        path = self.path / str(self.export.get("deploy_onnx", FP32_ONNX))
        if not path.is_file():
            raise EdgeVitError(f"{path} is missing (export.json names it as deploy_onnx)")
        return path

    def graph_input(self, x: np.ndarray) -> np.ndarray:
        """A normalised float NCHW batch (every backend's input) as the export's graph takes it: raw pixels for
        a graph that normalises itself (profile ``input: {normalize: in_graph}``), else unchanged."""
        from edgevit.export.preprocess import graph_pixels

        recorded = (self.export or {}).get("input", {}).get("preprocessing")
        return x if recorded is None else graph_pixels(x, recorded)  # none recorded: the default graph

    @property
    def profile_precision(self) -> str:
        return str((self.export or {}).get("profile", {}).get("precision", "fp32"))


def open_artifact(path: str | Path) -> Artifact:
    """Read an export directory or a bundle; every problem is one clear :class:`EdgeVitError`."""
    path = Path(path)
    if not path.exists():
        raise EdgeVitError(f"artifact {path} does not exist")
    if is_export_dir(path):
        export = read_export(path)
        return Artifact(path, path / BUNDLE_DIR, read_meta(path / BUNDLE_DIR), export)
    if (path / META).is_file():
        return Artifact(path, path, read_meta(path), None)
    raise EdgeVitError(f"{path} is neither an export directory ({EXPORT_JSON}) nor a bundle ({META})")


class Backend(ABC):
    """One runtime executing one artifact. ``to_native`` runs outside the timed region; ``infer`` is one
    synchronous inference (its result is ready when the timer reads the clock).

    A subclass is constructed as ``cls(artifact, threads, device)`` after :meth:`check` passed, with ``device``
    from :meth:`resolve_device`."""

    name: ClassVar[str]  # set by @register
    precision: str
    measured_files: list[Path]
    timer: type[Timer] = WallTimer
    # Device memory the runtime allocates outside torch's allocator (TensorRT activations), in MB.
    private_memory_mb: float = 0.0

    @classmethod  # noqa: B027 (a backend with nothing to check keeps this)
    def check(cls, artifact: Artifact) -> None:
        """Raise :class:`EdgeVitError` if this backend cannot run ``artifact`` here (not installed, file
        missing, engine for another machine); called before any time is spent measuring."""

    @staticmethod
    def resolve_device(requested: str | None) -> str:
        """The device this backend runs on, given ``--device`` (``None``: not given)."""
        return "cpu"

    @abstractmethod
    def to_native(self, x: np.ndarray) -> Any:
        """Move one input batch to the runtime's device and dtype."""

    @abstractmethod
    def infer(self, native: Any) -> Any:
        """Run one inference on a native batch; returns the runtime's output."""

    @abstractmethod
    def logits(self, output: Any) -> np.ndarray:
        """The output of :meth:`infer` as a float32 numpy array."""

    def check_batch(self, batch: int) -> None:  # noqa: B027 (most runtimes take any batch)
        """Raise if this artifact cannot run ``batch`` images at once."""


BACKENDS: dict[str, type[Backend]] = {}


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Register a :class:`Backend` subclass as the profiling backend ``name``."""

    def wrap(cls: type[Backend]) -> type[Backend]:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} registered twice")
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return wrap


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@register("torch")
class TorchBackend(Backend):
    """The bundle's graph in PyTorch fp32 (CUDA when ``device`` says so)."""

    precision = "fp32"

    def __init__(self, artifact: Artifact, threads: int, device: str) -> None:
        import torch

        from edgevit.vit import load_bundle

        torch.set_num_threads(threads)
        self.device = device
        self.model = load_bundle(artifact.bundle_dir)[0].to(device)
        self.measured_files = [artifact.bundle_dir / WEIGHTS]
        self.timer = CudaEventTimer if device.startswith("cuda") else WallTimer

    @staticmethod
    def resolve_device(requested: str | None) -> str:
        return requested or default_device()

    def to_native(self, x: np.ndarray):
        import torch

        return torch.from_numpy(x).to(self.device)

    def infer(self, native):
        import torch

        with torch.inference_mode():
            return self.model(native)

    def logits(self, output) -> np.ndarray:
        return output.float().cpu().numpy()


@register("ort")
class OrtBackend(Backend):
    """``deploy_onnx`` in ONNX Runtime on CPU with ``threads`` intra-op threads; warns in one line when this CPU
    lacks what the graph's INT8 recipe relies on (export.json ``int8.cpu.needs``)."""

    def __init__(self, artifact: Artifact, threads: int, device: str) -> None:
        from edgevit.export.runtimes import RUNTIMES

        path = artifact.deploy_onnx
        export = artifact.export or {}
        if reason := cpu.lacks(export.get("int8", {}).get("cpu", {}).get("needs")):
            log.warning("%s relies on %s; %s, so its INT8 sums saturate and top-1 may fall below export.json's "
                        "(re-export with int8.weight_type: int7)", path, export["int8"]["cpu"]["needs"], reason)
        runtime = RUNTIMES.get(export.get("profile", {}).get("runtime"))
        self.session = ort_session(runtime.device_graph(path) if runtime else path, threads)
        self.input = self.session.get_inputs()[0]
        self.precision = onnx_precision(path)
        self.measured_files = [path]
        self.graph_input = artifact.graph_input

    @classmethod
    def check(cls, artifact: Artifact) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise EdgeVitError("the ort backend needs onnxruntime, which is not installed") from None
        artifact.deploy_onnx  # noqa: B018 (raises when missing)

    def check_batch(self, batch: int) -> None:
        fixed = self.input.shape[0]
        if isinstance(fixed, int) and fixed > 0 and fixed != batch:
            raise EdgeVitError(f"{self.measured_files[0]} has a fixed batch of {fixed}; use --batch {fixed} "
                               "or export with a dynamic batch")

    def to_native(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {self.input.name: self.graph_input(x)}

    def infer(self, native):
        return self.session.run(None, native)

    def logits(self, output) -> np.ndarray:
        return np.asarray(output[0], dtype=np.float32)


def onnx_precision(path: Path) -> str:
    """``int8`` for a Q/DQ graph, ``fp16`` for a half-precision graph, else ``fp32``: read from the graph,
    not from a file name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} & ops or {"QLinearMatMul", "MatMulInteger"} & ops:
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


@register("trt")
class TrtBackend(Backend):
    """``engine.plan`` in TensorRT 10+ (tensor-address API), I/O buffers in torch CUDA memory."""

    timer = CudaEventTimer

    def __init__(self, artifact: Artifact, threads: int, device: str) -> None:
        from edgevit.export import tensorrt as export_trt

        trt = export_trt.import_tensorrt()
        self.engine = export_trt.load_engine(artifact.path)  # refuses an engine for another GPU / TensorRT / graph
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.input_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.input))
        self.output_dtype = _torch_dtype(self.engine.get_tensor_dtype(self.output))
        self.precision = artifact.profile_precision
        self.measured_files = [artifact.path / ENGINE]
        self.graph_input = artifact.graph_input
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        self.private_memory_mb = size / 2**20
        self._outputs: dict[int, Any] = {}

    @classmethod
    def check(cls, artifact: Artifact) -> None:
        import torch

        from edgevit.export import tensorrt as export_trt

        if not (artifact.path / ENGINE).is_file():
            raise EdgeVitError(f"{artifact.path} has no {ENGINE}; run `edgevit build {artifact.path}` on the target")
        export_trt.import_tensorrt()
        if not torch.cuda.is_available():
            raise EdgeVitError("the trt backend needs a CUDA GPU; none is visible")
        export_trt.check_engine_compatible(artifact.path / ENGINE_JSON)

    @staticmethod
    def resolve_device(requested: str | None) -> str:
        return "cuda"

    def check_batch(self, batch: int) -> None:
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        if not lo[0] <= batch <= hi[0]:
            raise EdgeVitError(f"the engine's optimisation profile allows batch {lo[0]}..{hi[0]}, not {batch}")

    def to_native(self, x: np.ndarray):
        import torch

        return torch.from_numpy(self.graph_input(x)).to("cuda", self.input_dtype).contiguous()

    def infer(self, native):
        import torch

        batch = native.shape[0]
        self.context.set_input_shape(self.input, tuple(native.shape))
        if batch not in self._outputs:
            shape = tuple(self.context.get_tensor_shape(self.output))
            self._outputs[batch] = torch.empty(shape, dtype=self.output_dtype, device="cuda")
        out = self._outputs[batch]
        self.context.set_tensor_address(self.input, native.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out

    def logits(self, output) -> np.ndarray:
        return output.float().cpu().numpy()


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
            trt.int32: torch.int32, trt.bfloat16: torch.bfloat16, trt.uint8: torch.uint8}[trt_dtype]


def backend_class(name: str) -> type[Backend]:
    """The registered backend ``name``; an unknown name is one clear error listing the registered ones."""
    if name not in BACKENDS:
        raise EdgeVitError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name]


def open_backend(artifact: Artifact, name: str, threads: int, device: str | None = None) -> Backend:
    """The backend ``name`` on ``artifact``.

    Args:
        artifact: what to run.
        name: a registered backend (:data:`BACKENDS`: ``torch``, ``ort``, ``trt``).
        threads: CPU threads (torch intra-op threads / ORT intra-op threads).
        device: the torch backend's device (default: CUDA when available).
    """
    cls = backend_class(name)
    cls.check(artifact)
    return cls(artifact, threads, cls.resolve_device(device))
