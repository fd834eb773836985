"""Export profiles: one YAML per target x precision, validated before any work starts.

A profile says where a bundle is going (target, runtime, precision, batch) and how to get it there (opset,
calibration, TensorRT builder options, parity tolerances). Profiles are found by name in, in order,
``$EDGEVIT_PROFILES`` (``os.pathsep``-separated folders), ``./export_profiles`` and the ``export_profiles``
folder next to the installed package; a path to a YAML file works too. Unknown or misspelt keys are errors
that name the key and the closest valid one, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgevit.errors import EdgeVitError
from edgevit.export.artifacts import QUANTIZED_ONNX
from edgevit.export.targets import TARGETS
from edgevit.resources import shipped_dir

PROFILE_DIR = "export_profiles"
PROFILE_ENV = "EDGEVIT_PROFILES"
QUANTIZED = tuple(QUANTIZED_ONNX)  # precisions whose graph carries Q/DQ (a calibrated quantizer writes it)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchSpec(_Strict):
    """Static batch (``min == opt == max``) or a dynamic range with the size TensorRT tunes for (``opt``)."""

    min: int = Field(1, ge=1)
    opt: int = Field(1, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> BatchSpec:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch needs min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self

    @property
    def dynamic(self) -> bool:
        return self.min != self.max


class Calibration(_Strict):
    """Where INT8 ranges come from.

    ``set`` is ``bundle`` (class-balanced images of the bundle's own train split), the name of a manifest
    in ``calibration/`` or a path to one.
    """

    set: str = "bundle"
    samples: int | None = Field(None, ge=1, description="default: the manifest's sample count (256 for bundle)")
    method: Literal["entropy", "percentile", "minmax"] = "minmax"
    seed: int | None = None


class QuantOptions(_Strict):
    """How the quantized (INT8 or FP8) graph is made: the profile's ``int8`` or ``fp8`` section.

    ``quantizer``: ``static`` (Q/DQ with calibrated activation scales; what TensorRT needs), ``dynamic``
    (ONNX Runtime only: int8 weights, activation scales computed per batch at run time) or ``modelopt``
    (nvidia-modelopt's ONNX quantization, TensorRT targets; falls back to ``static`` when not installed).
    """

    quantizer: Literal["static", "dynamic", "modelopt"] = "static"
    ops: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm"])
    high_precision_ops: list[str] = Field(default_factory=lambda: ["LayerNormalization", "Softmax", "Add"])
    # q @ k^T and p @ v (activation x activation): INT8 fused attention on TensorRT where the block fits its rules
    quantize_attention_matmuls: bool = False
    per_channel: bool = True
    # ONNX Runtime's CPU kernels multiply uint8 activations by these weights. int8 weights are summed exactly only
    # with VNNI, AMX or on ARM (x86 AVX2 saturates pairs in int16, edgevit.cpu); int7 (weights within +-64, ORT's
    # reduce_range) is exact on every CPU; uint8 runs ORT's u8u8 kernels. TensorRT takes int8.
    weight_type: Literal["int8", "int7", "uint8"] = "int8"
    max_top1_drop: float = Field(0.01, ge=0, le=1, description="quantized vs FP32 top-1 drop that fails the export "
                                 "(decided by the paired gate, edgevit.export.gate)")


class TensorRTOptions(_Strict):
    """TensorRT builder settings (Python API and the equivalent trtexec line)."""

    workspace_mb: int = Field(1024, ge=16)
    builder_optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: str | None = "timing.cache"
    dla_core: int | None = Field(None, ge=0)
    gpu_fallback: bool = True
    version_min: str = "10.0"
    version_max: str | None = None  # exclusive upper bound, e.g. "12"
    # The GPU the engine is for: fixed by Jetson targets, the minimum a desktop profile needs (fp8: 8.9+).
    compute_capability: str | None = Field(None, pattern=r"^\d+\.\d+$")
    # What the device's software must be (Jetson: JetPack; CUDA), checked by doctor and recorded in export.json.
    jetpack_min: str | None = None
    cuda_min: str | None = None
    # Build strongly typed on every TensorRT major (fp16 from model.fp16.onnx, no precision flags); TensorRT 11
    # always does, and Jetson Thor profiles do on TensorRT 10 too.
    strongly_typed: bool = False
    # Op types the strongly typed graph keeps in FP32 outside the INT8 regions (everything else is FP16); an
    # fp16/int8 export with FP32 compute beyond these fails.
    fp32_ops: list[str] = Field(default_factory=list)
    max_top1_drop: float = Field(0.01, ge=0, le=1, description="fp16 graph vs FP32 val top-1 drop that fails "
                                 "the export (quantized graphs: int8/fp8.max_top1_drop)")


class DeepStreamOptions(_Strict):
    """How ``deepstream/config_infer.txt`` runs the classifier in nvinfer.

    ``primary`` classifies whole frames; ``secondary`` classifies the objects of the detector whose
    ``gie-unique-id`` is ``operate_on_gie_id`` (optionally only its classes ``operate_on_class_ids``).
    ``classifier_threshold`` is compared with the winning logit (the graph outputs logits).
    """

    mode: Literal["primary", "secondary"] = "primary"
    gie_unique_id: int = Field(1, ge=1)
    operate_on_gie_id: int | None = Field(None, ge=1)
    operate_on_class_ids: list[int] | None = None
    classifier_threshold: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> DeepStreamOptions:
        if self.mode == "secondary" and self.operate_on_gie_id is None:
            raise ValueError("a secondary classifier needs operate_on_gie_id (the detector's gie-unique-id)")
        if self.mode == "primary" and (self.operate_on_gie_id is not None or self.operate_on_class_ids):
            raise ValueError("operate_on_gie_id / operate_on_class_ids are for mode: secondary")
        if self.operate_on_gie_id == self.gie_unique_id:
            raise ValueError("gie_unique_id must differ from the detector's operate_on_gie_id")
        return self


class InputSpec(_Strict):
    """What the deploy graph's input tensor holds.

    ``normalize: outside`` (the default, today's graph) takes the normalised float NCHW tensor
    ``(x / 255 - mean) / std``; the caller normalises. ``in_graph`` takes raw pixels (``pixels`` uint8 or float, in
    ``range`` ``byte`` [0, 255] or ``unit`` [0, 1]) and the mean/std are folded into the patch-embedding
    convolution (``edgevit.export.preprocess``): no extra op, one Cast for uint8, one Transpose for NHWC.
    """

    pixels: Literal["float", "uint8"] = "float"
    range: Literal["unit", "byte"] = "unit"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    normalize: Literal["in_graph", "outside"] = "outside"

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if self.normalize == "outside" and (self.pixels, self.range) != ("float", "unit"):
            raise ValueError("pixels/range describe raw pixels: they need normalize: in_graph "
                             "(with normalize: outside the graph takes the normalised float tensor)")
        if self.pixels == "uint8" and self.range != "byte":
            raise ValueError("uint8 pixels are in range: byte")
        return self

    @property
    def raw(self) -> bool:
        """The graph takes raw pixels (normalisation folded into it)."""
        return self.normalize == "in_graph"


class Parity(_Strict):
    """How close the ONNX graph must be to torch on real images; over tolerance, the export fails."""

    images: int = Field(64, ge=1)
    split: Literal["val", "test"] = "val"
    max_abs_diff: float = Field(1e-4, gt=0)
    # Element-wise |onnx - torch| <= max_abs_diff + rtol * |torch| (numpy.allclose): a logit of 200 carries fp32
    # rounding of its own size, which an absolute bound alone would fail.
    rtol: float = Field(1e-5, ge=0)
    min_cosine: float = Field(0.99999, ge=-1, le=1)
    min_top1_agreement: float = Field(1.0, ge=0, le=1)


class Profile(_Strict):
    """One export target x precision."""

    name: str
    description: str = ""
    target: str  # one of edgevit.export.targets.TARGETS
    runtime: str  # one of edgevit.export.runtimes.RUNTIMES
    precision: Literal["fp32", "fp16", "int8", "fp8"]
    batch: int | BatchSpec = 1
    opset: int = Field(17, ge=13)
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    ort_fusions: Literal["session", "transformers", "none"] = "session"
    calibration: Calibration = Field(default_factory=Calibration)
    int8: QuantOptions = Field(default_factory=QuantOptions)
    fp8: QuantOptions = Field(default_factory=QuantOptions)
    tensorrt: TensorRTOptions = Field(default_factory=TensorRTOptions)
    deepstream: DeepStreamOptions = Field(default_factory=DeepStreamOptions)
    input: InputSpec = Field(default_factory=InputSpec)
    parity: Parity = Field(default_factory=Parity)

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        return _known(value, TARGETS, "target")

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        from edgevit.export.runtimes import RUNTIMES

        return _known(value, RUNTIMES, "runtime")

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        from edgevit.export.runtimes import runtime_of

        problem = runtime_of(self).refusal(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def batch_spec(self) -> BatchSpec:
        b = self.batch
        return b if isinstance(b, BatchSpec) else BatchSpec(min=b, opt=b, max=b)

    @property
    def quantized(self) -> bool:
        """The deploy graph carries Q/DQ (INT8 or FP8)."""
        return self.precision in QUANTIZED

    @property
    def quant(self) -> QuantOptions:
        """The section that says how the quantized graph is made (``fp8`` for FP8 profiles, else ``int8``)."""
        return self.fp8 if self.precision == "fp8" else self.int8


def _known(value: str, names, kind: str) -> str:
    if value not in names:
        close = difflib.get_close_matches(value, list(names), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(names)}"
        raise ValueError(f"unknown {kind} {value!r}; {hint}")
    return value


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at ``loc`` (for typo suggestions)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def _explain(err: ValidationError, source: str) -> str:
    errors = err.errors()
    # A misspelt key is reported as the typo (with the closest name), not as the field it left missing.
    # ``batch`` is ``int | BatchSpec``: a mapping fails both branches; the BatchSpec branch says why.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), None)
    first = first or next((e for e in errors if "int" not in e["loc"]), errors[0])
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and (p == "int" or "BatchSpec" in p)))
    where = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        owner = _model_at(Profile, loc[:-1])
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{source}: unknown key {where!r}{hint}"
    return f"{source}: {where}: {first['msg']}"


def parse_profile(raw: Any, source: str = "profile") -> Profile:
    """Validate a profile mapping; every problem becomes one :class:`EdgeVitError` line."""
    if not isinstance(raw, dict):
        raise EdgeVitError(f"{source}: a profile must be a YAML mapping")
    try:
        return Profile.model_validate(raw)
    except ValidationError as err:
        raise EdgeVitError(_explain(err, source)) from None


def search_dirs(folder: str = PROFILE_DIR, env: str = PROFILE_ENV) -> list[Path]:
    """Where named profiles (or calibration manifests) live: ``$env`` folders, ``./folder``, and the folder
    next to the package (the repository root in a source checkout)."""
    dirs = [Path(p) for p in os.environ.get(env, "").split(os.pathsep) if p]
    dirs += [Path.cwd() / folder, shipped_dir(folder)]
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def find_yaml(name: str, folder: str, env: str, kind: str) -> Path:
    """A YAML file given as a path or as a name looked up in :func:`search_dirs`."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise EdgeVitError(f"{kind} file {name} does not exist")
        return path
    for d in search_dirs(folder, env):
        for suffix in (".yaml", ".yml"):
            if (d / f"{name}{suffix}").is_file():
                return d / f"{name}{suffix}"
    known = sorted({p.stem for d in search_dirs(folder, env) for p in d.glob("*.y*ml")})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known) or 'none'}"
    raise EdgeVitError(f"no {kind} named {name!r} (searched ${env}, ./{folder}, the package's {folder}/){hint}")


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise EdgeVitError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None


def load_profile(name: str) -> Profile:
    """A profile by name (see the module docstring for where it is looked up) or by path."""
    path = find_yaml(name, PROFILE_DIR, PROFILE_ENV, "export profile")
    return parse_profile(read_yaml(path), str(path))


def list_profiles() -> list[tuple[Profile, Path]]:
    """Every named profile, first found wins (the search order of :func:`search_dirs`)."""
    seen: dict[str, tuple[Profile, Path]] = {}
    for d in search_dirs():
        for path in sorted(d.glob("*.y*ml")):
            if path.stem not in seen:
                seen[path.stem] = (parse_profile(read_yaml(path), str(path)), path)
    return [seen[k] for k in sorted(seen)]
