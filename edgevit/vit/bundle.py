"""Bundles: the seam between training and deployment.

A bundle is a directory holding ``model.safetensors`` (the weights of a *plain* graph) and
``bundle.json`` (:class:`BundleMeta`). Loading one is: build the timm base architecture, apply the recorded
surgery ops, strict ``load_state_dict``. Nothing else, so the export stage never needs a method's code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from edgevit.errors import EdgeVitError
from edgevit.vit.model import create_vit
from edgevit.vit.surgery import apply_surgery

SCHEMA_VERSION = 1
WEIGHTS = "model.safetensors"
META = "bundle.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseArch(_Strict):
    """The timm architecture and the constructor arguments it was built with."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Preprocessing(_Strict):
    """How an image becomes the model's input tensor (timm's eval transform; see ``edgevit.data.transforms``).

    ``crop_mode`` ``squash`` resizes both sides to ``size / crop_pct``; ``center`` resizes the shorter side to
    ``floor(size / crop_pct)``; both then cut the centre ``size x size``.
    """

    size: int
    channels: int = Field(ge=1, le=3)
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    crop_pct: float = Field(default=1.0, gt=0, le=1)
    crop_mode: Literal["squash", "center"] = "squash"


class DataRef(_Strict):
    """Where the model's data came from, so export and profiling can evaluate on the same splits."""

    source: str
    classes: list[str] | None = None
    fingerprint: str = ""


class BundleMeta(_Strict):
    schema_version: int = SCHEMA_VERSION
    base: BaseArch
    surgery: list[dict[str, Any]] = Field(default_factory=list)
    preprocessing: Preprocessing
    classes: list[str]
    data: DataRef
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_versioned_json(path: Path, schema_version: int) -> dict[str, Any]:
    """A JSON object whose ``schema_version`` is ``schema_version`` (bundle.json, export.json); not JSON or
    another version is one :class:`EdgeVitError` naming ``path``."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EdgeVitError(f"{path} is not valid JSON: {err}") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != schema_version:
        raise EdgeVitError(f"{path}: schema_version {version!r} is not supported (expected {schema_version})")
    return raw


def save_bundle(directory: str | Path, model: VisionTransformer, meta: BundleMeta) -> Path:
    """Write ``model`` and ``meta`` as a bundle. Weights first, ``bundle.json`` last: a bundle directory
    without ``bundle.json`` is unfinished and never loads."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "edgevit_schema": str(SCHEMA_VERSION)})
        os.replace(tmp, directory / WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(directory / META, meta.model_dump(mode="json"))
    return directory


def read_meta(directory: str | Path) -> BundleMeta:
    """Read and validate ``bundle.json``; every problem becomes one clear :class:`EdgeVitError`."""
    path = Path(directory) / META
    if not path.is_file():
        raise EdgeVitError(f"{directory} is not a bundle: {META} is missing")
    raw = read_versioned_json(path, SCHEMA_VERSION)
    try:
        return BundleMeta.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EdgeVitError(f"{path}: field {where!r}: {first['msg'].lower()}") from None


def build_model(meta: BundleMeta) -> VisionTransformer:
    """The bundle's graph with fresh weights: base architecture + surgery."""
    return apply_surgery(create_vit(meta.base.name, **meta.base.kwargs), meta.surgery)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise EdgeVitError(f"{path} is not a readable safetensors file: {err}") from None


def load_bundle(directory: str | Path) -> tuple[VisionTransformer, BundleMeta]:
    """Load a bundle: build, apply surgery, strict-load weights. Returns the model in eval mode."""
    meta = read_meta(directory)
    try:
        model = build_model(meta)
    except (AssertionError, TypeError, ValueError, RuntimeError, KeyError) as err:
        raise EdgeVitError(f"{Path(directory) / META}: the recorded graph ({meta.base.name} with "
                           f"{meta.base.kwargs}) cannot be built: {str(err) or type(err).__name__}") from None
    state = read_weights(Path(directory) / WEIGHTS)
    own = model.state_dict()
    misfit = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if misfit:
        k = misfit[0]
        raise EdgeVitError(f"{directory}: {WEIGHTS} does not fit the recorded graph: {k} is "
                           f"{tuple(state[k].shape)} there but {tuple(own[k].shape)} in the graph "
                           f"({len(misfit)} tensor(s) of another shape)")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EdgeVitError(
            f"{directory}: weights do not match the recorded graph "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return model.eval(), meta
