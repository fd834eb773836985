"""``export_bundle``: a bundle -> an export directory for one profile.

It writes the directory (see the export contract) atomically: everything
is built in a hidden temporary directory next to OUT and renamed at the end, so a failed or killed export
leaves no OUT. It reads bundles only (``edgevit.vit``), never ``edgevit.methods``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgevit.data import split_arrays
from edgevit.errors import EdgeVitError
from edgevit.export import checks, deepstream, devicekit, preprocess, quantize, triton
from edgevit.export import onnx as onnx_export
from edgevit.export.artifacts import BUNDLE_DIR, FP32_ONNX, QUANTIZED_ONNX, SCHEMA_VERSION, write_export
from edgevit.export.profiles import InputSpec, Profile, load_profile
from edgevit.export.runtimes import Runtime, runtime_of
from edgevit.export.tensorrt import sha256
from edgevit.vit.bundle import META, WEIGHTS, load_bundle

log = logging.getLogger("edgevit")

OWNER = ".owner"  # in a temporary export directory: "<host> <pid>" of the export writing it
# Deployment targets written beside the graph: each module's ``emit(out, export, profile, parity_images)`` writes
# its own folder and returns what export.json records under ``targets[NAME]`` (None: not for this profile).
EMITTERS = (triton, deepstream, devicekit)


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("edgevit", "torch", "timm", "onnx", "onnxruntime", "onnxslim", "nvidia-modelopt"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _prepare_out(out: Path) -> Path:
    """A fresh temporary directory next to ``out`` (which must not exist yet, or be empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgeVitError(f"{out} already exists; remove it or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")
    return tmp


def _remove_stale_tmp(parent: Path) -> None:
    """Remove temporary export directories in ``parent`` left by killed exports: those whose writer ran on
    this host and is no longer alive. Directories of live exports, of other hosts or not ours stay."""
    for tmp in parent.glob(".*.tmp"):
        owner = (tmp / OWNER).read_text().split() if (tmp / OWNER).is_file() else []
        if len(owner) == 2 and owner[0] == socket.gethostname() and owner[1].isdigit() and not _alive(int(owner[1])):
            log.info("removing %s, left by a killed export (pid %s)", tmp, owner[1])
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def export_bundle(run: str | Path, profile: str | Profile, out: str | Path) -> dict[str, Any]:
    """Export the bundle in ``run`` for ``profile`` into the export directory ``out``; returns export.json.

    Args:
        run: a bundle directory (a run directory holds its bundle at its top level).
        profile: a profile name, a path to a profile YAML, or a validated :class:`Profile`.
        out: the export directory to create; it must not exist (or be empty).
    """
    profile = profile if isinstance(profile, Profile) else load_profile(str(profile))
    run, out = Path(run), Path(out)
    model, meta = load_bundle(run)  # fails early, naming the user's path, before anything is written
    if meta.provenance.get("deployable") is False:
        reason = meta.provenance.get("not_deployable_reason", "its method marked it not deployable")
        raise EdgeVitError(f"{run} cannot be exported: {reason}")
    cal_images = cal_info = None
    if profile.quantized and profile.quant.quantizer != "dynamic":
        cal_images, cal_info = quantize.calibration_images(profile.calibration, meta)
    tmp = _prepare_out(out)
    try:
        export = _export_into(tmp, run, model, meta, profile, cal_images, cal_info)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export


def _export_into(tmp: Path, run: Path, model, meta, profile: Profile, cal_images: np.ndarray | None,
                 cal_info: dict[str, Any] | None) -> dict[str, Any]:
    (tmp / BUNDLE_DIR).mkdir()
    for name in (WEIGHTS, META):
        shutil.copy2(run / name, tmp / BUNDLE_DIR / name)
    batch = profile.batch_spec
    tol = profile.parity
    images, _ = split_arrays(meta, tol.split, limit=tol.images)
    if len(images) < tol.images:
        log.warning("the %s split has only %d images; parity runs on those", tol.split, len(images))
    pre = meta.preprocessing
    # What the graph takes (the profile's ``input``); every image handed to the graph goes through graph_pixels.
    graph_pre = preprocess.recorded(pre, profile.input)
    dims = preprocess.input_dims(pre.channels, pre.size, profile.input)
    graph_info = _fp32_graph(tmp, model, meta, profile, images[:1])
    reference = model
    if profile.input != InputSpec():  # parity compares the adapted graph with torch normalising the same pixels
        reference = preprocess.NormalizedInput(model, pre.mean, pre.std, profile.input)
        images = preprocess.graph_pixels(images, graph_pre)
        cal_images = None if cal_images is None else preprocess.graph_pixels(cal_images, graph_pre)
    runtime = runtime_of(profile)
    graph_info |= runtime.fp32_graph(tmp, model, profile)

    result = checks.parity(reference, tmp / FP32_ONNX, images, tol, batch.opt if batch.dynamic else batch.max)
    if not result["passed"]:
        raise EdgeVitError(checks.parity_error(result))

    deploy = FP32_ONNX
    if profile.quantized:
        deploy = QUANTIZED_ONNX[profile.precision]
        low_precision = _quantize(tmp, meta, profile, runtime, deploy, cal_images, cal_info)
    else:
        low_precision = runtime.low_precision(tmp, meta, profile)
    graph_info |= runtime.finish(tmp, model, profile, deploy, dims)

    batch_dim = -1 if batch.dynamic else batch.max
    export = {
        "schema_version": SCHEMA_VERSION,
        "profile": profile.model_dump(mode="json"),
        "deploy_onnx": deploy,
        "input": {"name": onnx_export.INPUT, "shape": [batch_dim, *dims],
                  "dtype": preprocess.input_dtype(profile.input), "preprocessing": graph_pre},
        "output": {"name": onnx_export.OUTPUT, "shape": [batch_dim, len(meta.classes)], "dtype": "float32",
                   "classes": meta.classes},
        "parity": result,
        "graph": graph_info,
        "method": meta.provenance.get("method", "unknown"),
        "settings": meta.provenance.get("config", {}),
        "source_run": str(run.resolve()),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if low_precision is not None:
        export[profile.precision] = low_precision
    export["targets"] = {e.NAME: info for e in EMITTERS if (info := e.emit(tmp, export, profile, images)) is not None}
    (tmp / OWNER).unlink()  # finished: only the export's own files are hashed and renamed into place
    export["hashes"] = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_export(tmp, export)
    return export


def _fp32_graph(tmp: Path, model, meta, profile: Profile, sample: np.ndarray) -> dict[str, Any]:
    """Write ``model.onnx`` (exported, onnxslim'ed, taking the profile's input) and return what export.json records
    of it; its LayerNorms must each stay one op, and a ``standard_ops_only`` runtime's graph has no contrib op."""
    raw = tmp / "raw.onnx"
    onnx_export.export_onnx(model, raw, torch.from_numpy(sample), profile.batch_spec, profile.opset, profile.exporter)
    info = onnx_export.simplify(raw, tmp / FP32_ONNX)
    raw.unlink()
    if profile.input != InputSpec():
        pre = meta.preprocessing
        info["input"] = preprocess.adapt_input(tmp / FP32_ONNX, onnx_export.INPUT, pre.mean, pre.std, profile.input)
    graph = onnx.load(str(tmp / FP32_ONNX))
    layer_norms = checks.check_layernorm(graph, model, FP32_ONNX)
    if runtime_of(profile).standard_ops_only:
        checks.check_standard_ops(graph, FP32_ONNX)
    return {**info, "layer_norms": layer_norms, "opset": checks.opset_of(graph)}


def _quantize(tmp: Path, meta, profile: Profile, runtime: Runtime, deploy: str, cal_images: np.ndarray | None,
              cal_info: dict[str, Any] | None) -> dict[str, Any]:
    """Write the quantized graph ``deploy`` with the runtime's quantizer and compare its top-1 with FP32."""
    info = runtime.quantize(tmp, deploy, cal_images, profile)
    samples = {"samples": cal_info["samples"] if cal_info else 0, "calibration": cal_info}
    calibrated = profile.calibration if cal_info else None
    return {**checks.low_precision_accuracy(tmp, meta, profile, deploy, runtime, calibrated), **samples, **info}
