"""Timing: one loop for every backend, so their numbers are comparable.

Every backend is timed the same way: a fixed rotation of input batches (made once, before timing, from a
seed), a warm-up, then iterations until a count or a time budget is reached, each iteration's clock read
after the backend has synchronised (CUDA events on GPU). :func:`time_onnx` and :func:`time_torch` are the
reusable entry points for side-by-side studies in ``benchmarks/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevit.bench.schema import Latency
from edgevit.export.artifacts import ort_session

# Below this many timed iterations p99 is just the maximum; a time budget never stops earlier.
MIN_ITERATIONS = 20
MAX_ITERATIONS = 100_000
ROTATION = 4


@dataclass(frozen=True)
class TimingConfig:
    """How long to time.

    Args:
        warmup: untimed iterations first (allocator, thread pool and kernel caches settle).
        iterations: exact number of timed iterations; ``None`` uses ``seconds``.
        seconds: time budget for the timed iterations when ``iterations`` is ``None`` (at least
            ``MIN_ITERATIONS`` are run whatever the budget).
    """

    warmup: int = 10
    iterations: int | None = None
    seconds: float = 3.0


def rotation_inputs(shape: Sequence[int], count: int = ROTATION, seed: int = 0) -> list[np.ndarray]:
    """``count`` float32 batches of ``shape`` from a fixed seed: the inputs every backend cycles through,
    so no backend gets a cache advantage from seeing one tensor over and over."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(shape), dtype=np.float32) for _ in range(count)]


def summarize(times_ms: Sequence[float]) -> Latency:
    """Percentiles and mean of per-iteration times in milliseconds."""
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return Latency(p50=round(float(p50), 4), p90=round(float(p90), 4), p99=round(float(p99), 4),
                   mean=round(float(t.mean()), 4), iterations=len(t))


def time_loop(run: Callable[[int], object], cfg: TimingConfig, timer: Callable[[], Timer] | None = None,
              on_step: Callable[[], None] | None = None) -> Latency:
    """Time ``run(i)`` (``i`` indexes the input rotation) under ``cfg``.

    Args:
        run: one synchronous inference on rotation input ``i % ROTATION``.
        cfg: warm-up and iteration count or time budget.
        timer: makes the per-iteration clock; default wall clock (CPU work is synchronous).
        on_step: called after every timed iteration (progress bars).
    """
    return summarize(timed_runs(run, cfg, timer, on_step))


def timed_runs(run: Callable[[int], object], cfg: TimingConfig, timer: Callable[[], Timer] | None = None,
               on_step: Callable[[], None] | None = None) -> list[float]:
    """The per-iteration milliseconds :func:`time_loop` summarizes (same arguments)."""
    for i in range(cfg.warmup):
        run(i)
    clock = (timer or WallTimer)()
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while True:
        times.append(clock.time(lambda i=i: run(i)))
        i += 1
        if on_step:
            on_step()
        if cfg.iterations is not None:
            if i >= cfg.iterations:
                break
        elif (i >= MIN_ITERATIONS and time.perf_counter() - start >= cfg.seconds) or i >= MAX_ITERATIONS:
            break
    return times


class Timer:
    """Milliseconds one call takes, read after the work is finished."""

    def time(self, fn: Callable[[], object]) -> float:
        raise NotImplementedError


class WallTimer(Timer):
    def time(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


class CudaEventTimer(Timer):
    """CUDA events around the call on the current stream, read after the end event has completed."""

    def __init__(self) -> None:
        import torch

        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def time(self, fn: Callable[[], object]) -> float:
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


def time_onnx(path: str | Path, inputs: Sequence[np.ndarray], threads: int, cfg: TimingConfig = TimingConfig(),
              optimization: str = "all", config: dict[str, str] | None = None) -> Latency:
    """Latency of an ONNX graph in ONNX Runtime (CPU) on a rotation of ``inputs``.

    Args:
        path: the ONNX file (single input).
        inputs: the batches to cycle through (see :func:`rotation_inputs`).
        threads: intra-op threads.
        cfg: warm-up and iterations.
        optimization: ORT graph optimisation level.
        config: ORT session config entries.
    """
    session = ort_session(path, threads, optimization, config)
    name = session.get_inputs()[0].name
    feeds = [{name: x} for x in inputs]
    return time_loop(lambda i: session.run(None, feeds[i % len(feeds)]), cfg)


def time_torch(model, inputs: Sequence[np.ndarray], threads: int, cfg: TimingConfig = TimingConfig(),
               device: str = "cpu") -> Latency:
    """Latency of a torch module in eval mode under ``torch.inference_mode`` on a rotation of ``inputs``.

    Args:
        model: the module.
        inputs: the batches to cycle through (see :func:`rotation_inputs`).
        threads: ``torch.set_num_threads`` for the duration (restored afterwards).
        cfg: warm-up and iterations.
        device: ``cpu`` or ``cuda`` (timed with CUDA events).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.eval().to(device)
        tensors = [torch.from_numpy(x).to(device) for x in inputs]
        with torch.inference_mode():
            return time_loop(lambda i: model(tensors[i % len(tensors)]), cfg,
                             timer=CudaEventTimer if device.startswith("cuda") else None)
    finally:
        torch.set_num_threads(previous)


def interleaved_times(runners: dict[str, Callable[[int], object]], rounds: int,
                      cfg: TimingConfig) -> dict[str, np.ndarray]:
    """Per-run milliseconds of several runners timed side by side: ``rounds`` rounds, each runner once per round
    (``cfg.warmup`` untimed then ``cfg.iterations`` timed runs of ``run(i)``), the order rotated every round, so
    drift on a shared machine hits every runner alike: the comparison the ``benchmarks/`` scripts print."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k] += timed_runs(runners[k], cfg)
    return {k: np.asarray(v) for k, v in times.items()}


def interleaved_p50_ms(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int, iters: int,
                       warmup: int = 3) -> dict[str, float]:
    """Median ms per run of several ONNX graphs on one input, timed by :func:`interleaved_times`.

    Args:
        paths: graph name -> ONNX file (single input named ``input``).
        x: the input batch.
        threads: ORT intra-op threads.
        rounds: interleaved rounds over all graphs.
        iters: timed runs per graph per round (after ``warmup`` untimed ones).
    """
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    runners = {k: (lambda i, session=session: session.run(None, {"input": x})) for k, session in sessions.items()}
    times = interleaved_times(runners, rounds, TimingConfig(warmup=warmup, iterations=iters))
    return {k: float(np.median(v)) for k, v in times.items()}
