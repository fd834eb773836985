"""``edgevit profile``: one :class:`ResultRow` per (artifact, backend, precision, batch).

Each row's backend is opened afresh inside a memory meter, timed on the shared input rotation
(:mod:`edgevit.bench.latency`) and then evaluated on the bundle's test split through the same backend, so
latency, memory and accuracy describe one and the same runtime configuration.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgevit.bench.accuracy import backend_top1
from edgevit.bench.backends import Artifact, backend_class, open_artifact, open_backend
from edgevit.bench.flops import count_params, gflops_per_image
from edgevit.bench.latency import TimingConfig, rotation_inputs, time_loop
from edgevit.bench.schema import ResultRow, machine_info
from edgevit.data import split_arrays
from edgevit.errors import EdgeVitError
from edgevit.vit import load_bundle

log = logging.getLogger("edgevit")

ACCURACY_SPLIT = "test"


@dataclass(frozen=True)
class ProfileConfig:
    """What to measure.

    Args:
        backend: ``torch``, ``ort`` or ``trt``.
        batches: batch sizes, one row each.
        threads: CPU threads for every backend (fixed, so rows are comparable).
        timing: warm-up and iterations / time budget.
        device: the torch backend's device (default: CUDA when available).
        accuracy: measure top-1 on the test split (off only for pure-latency studies).
    """

    backend: str
    batches: Sequence[int] = (1,)
    threads: int = 2
    timing: TimingConfig = field(default_factory=TimingConfig)
    device: str | None = None
    accuracy: bool = True


class PeakMemory:
    """Peak memory of what runs inside the context, in MB: CUDA max allocated on GPU (torch's allocator;
    backends add what their runtime allocates privately); on CPU the peak resident set (VmHWM, reset on entry
    through ``/proc/self/clear_refs``) minus the resident set on entry."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _proc_status_kb("VmRSS")
            self.reset = _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mb = round((torch.cuda.max_memory_allocated() - self.base) / 2**20, 2)
        elif self.reset and self.base is not None:
            self.peak_mb = round((_proc_status_kb("VmHWM") - self.base) / 1024, 2)


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        log.warning("cannot reset the peak RSS (/proc/self/clear_refs); peak memory is not reported")
        return False


def default_label(artifact: Artifact) -> str:
    """The export directory's name, or its parent's when the directory is named after the export profile
    (``build/<run>/<profile>/``)."""
    profile = (artifact.export or {}).get("profile", {}).get("name")
    path = artifact.path.resolve()
    return path.parent.name if profile and path.name == profile else path.name


def artifact_fields(artifact: Artifact) -> dict[str, Any]:
    """Row fields that depend on the artifact only: method, settings, parameters and GFLOPs per image
    (counted on the bundle's graph)."""
    model, meta = load_bundle(artifact.bundle_dir)
    return {"method": artifact.method, "settings": artifact.settings, "params": count_params(model),
            "gflops": round(gflops_per_image(model, meta), 4), "task": task_name(meta)}


def task_name(meta) -> str:
    """``source`` or ``source[classes]``: accuracies are comparable only within one task."""
    source = Path(meta.data.source).name  # "digits", or the image folder's name
    return source + (f"[{','.join(meta.data.classes)}]" if meta.data.classes else "")


def profile_artifacts(paths: Sequence[str | Path], cfg: ProfileConfig, labels: Sequence[str] | None = None,
                      show_progress: bool = True) -> list[ResultRow]:
    """Measure every artifact at every batch size with ``cfg.backend``.

    Args:
        paths: export directories (or bundles for the torch backend).
        cfg: backend, batches, threads, timing.
        labels: one plot label per path (default :func:`default_label`).
        show_progress: draw a progress bar on stderr.
    """
    backend = backend_class(cfg.backend)
    if labels is not None and len(labels) != len(paths):
        raise EdgeVitError(f"{len(labels)} labels for {len(paths)} artifacts")
    if any(b < 1 for b in cfg.batches) or cfg.threads < 1:
        raise EdgeVitError("--batch and --threads must be positive")
    artifacts = [open_artifact(p) for p in paths]
    for artifact in artifacts:  # every problem before any time is spent measuring
        backend.check(artifact)
    device = backend.resolve_device(cfg.device)
    machine = machine_info(cfg.threads)
    machine["device"] = machine.get("gpu") if device.startswith("cuda") else machine["cpu"]
    rows = []
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), disable=not show_progress,
                        transient=True)
    with progress:
        for i, artifact in enumerate(artifacts):
            static = artifact_fields(artifact)
            meta = artifact.meta
            data = split_arrays(meta, ACCURACY_SPLIT) if cfg.accuracy else None
            label = labels[i] if labels else default_label(artifact)
            for batch in cfg.batches:
                task = progress.add_task(f"{label} {cfg.backend} b{batch}", total=cfg.timing.iterations)
                row = profile_one(artifact, cfg, batch, device, data, lambda task=task: progress.advance(task))
                rows.append(row.model_copy(update={"label": label, "machine": machine, **static}))
                progress.remove_task(task)
    return rows


def profile_one(artifact: Artifact, cfg: ProfileConfig, batch: int, device: str,
                data: tuple[np.ndarray, np.ndarray] | None, on_step: Callable[[], None] | None = None) -> ResultRow:
    """One row: open the backend, time ``batch`` on the input rotation, then top-1 through it."""
    pre = artifact.meta.preprocessing
    with PeakMemory(cuda=device.startswith("cuda")) as memory:
        backend = open_backend(artifact, cfg.backend, cfg.threads, device)
        backend.check_batch(batch)
        natives = [backend.to_native(x) for x in rotation_inputs((batch, pre.channels, pre.size, pre.size))]
        latency = time_loop(lambda i: backend.infer(natives[i % len(natives)]), cfg.timing, timer=backend.timer,
                            on_step=on_step)
        top1 = backend_top1(backend, *data, batch) if data is not None else None
    size = sum(f.stat().st_size for f in backend.measured_files)
    peak = round(memory.peak_mb + backend.private_memory_mb, 2) if memory.peak_mb is not None else None
    return ResultRow(
        artifact=str(artifact.path), method=artifact.method, settings=artifact.settings, backend=backend.name,
        precision=backend.precision, batch=batch, threads=cfg.threads, latency_ms=latency,
        throughput_ips=round(batch * 1e3 / latency.mean, 3), peak_memory_mb=peak,
        top1=round(top1, 5) if top1 is not None else None, top1_split=ACCURACY_SPLIT if data is not None else None,
        artifact_mb=round(size / 1e6, 3))
