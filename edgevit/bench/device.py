"""Rows measured on the device: trtexec ``--exportTimes`` traces and tegrastats power logs.

The jetson/ scripts run ``trtexec --loadEngine=engine.plan --exportTimes=times.json`` while ``tegrastats
--logfile power.log`` samples the power rails; these parsers turn the two files into the same
:class:`ResultRow` that ``edgevit profile`` writes, so ``edgevit report`` puts device points on the plot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.bench.latency import summarize
from edgevit.bench.schema import Latency, ResultRow
from edgevit.errors import EdgeVitError

# Board input rails, most complete first: Orin (JetPack 5/6) reports VDD_IN, Nano/TX2/Xavier POM_5V_IN.
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
# "VDD_IN 5037mW/4890mW" (JetPack 5+) or "POM_5V_IN 3266/3266" (JetPack 4): instantaneous/average.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?\b")


@dataclass(frozen=True)
class TrtexecTimes:
    """Per-inference latencies of one trtexec run (ms per batch) and its throughput (batches/s)."""

    latency: Latency
    batches_per_s: float
    metric: str


def parse_trtexec_times(path: str | Path, metric: str = "latencyMs") -> TrtexecTimes:
    """Read a trtexec ``--exportTimes`` JSON file.

    Args:
        path: the JSON file (a list with one object per inference).
        metric: ``latencyMs`` (host-to-device + compute + device-to-host, trtexec's "Latency") or
            ``computeMs`` (GPU compute only, trtexec's "GPU Compute Time").
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeVitError(f"trtexec times file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EdgeVitError(f"{path} is not trtexec --exportTimes JSON: {err}") from None
    entries = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
    times = [_entry_ms(e, metric) for e in entries]
    times = [t for t in times if t is not None]
    if not times:
        raise EdgeVitError(f"{path} has no per-inference {metric} entries (is it trtexec --exportTimes output?)")
    starts = [e.get("startH2dMs", e.get("startInMs", e.get("startComputeMs"))) for e in entries]
    ends = [e.get("endD2hMs", e.get("endOutMs", e.get("endComputeMs"))) for e in entries]
    starts, ends = [s for s in starts if s is not None], [e for e in ends if e is not None]
    span_ms = max(ends) - min(starts) if starts and ends else 0.0
    # trtexec's own throughput: inferences over the host wall time they span; fall back to 1/mean.
    per_s = len(times) * 1e3 / span_ms if span_ms > 0 else 1e3 / float(np.mean(times))
    return TrtexecTimes(summarize(times), round(per_s, 3), metric)


def _entry_ms(entry: dict[str, Any], metric: str) -> float | None:
    if metric in entry:
        return float(entry[metric])
    if metric == "computeMs" and {"startComputeMs", "endComputeMs"} <= entry.keys():
        return float(entry["endComputeMs"]) - float(entry["startComputeMs"])
    return None


def parse_tegrastats(path: str | Path, rail: str | None = None) -> float:
    """Average power in watts over a tegrastats log (instantaneous readings, one a line).

    Args:
        path: the ``tegrastats --logfile`` output.
        rail: the rail to average (default: the board input, ``VDD_IN`` or ``POM_5V_IN``; without either,
            the sum of all rails).
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeVitError(f"tegrastats log {path} does not exist")
    samples = []
    for line in path.read_text(errors="replace").splitlines():
        rails = {name: int(now) for name, now, _ in _RAIL.findall(line)}
        if not rails:
            continue
        if rail:
            if rail in rails:
                samples.append(rails[rail])
            continue
        total = next((rails[r] for r in TOTAL_RAILS if r in rails), None)
        samples.append(total if total is not None else sum(rails.values()))
    if not samples:
        where = f"rail {rail!r}" if rail else "power rail readings"
        raise EdgeVitError(f"{path} has no {where} (is it a tegrastats log?)")
    return round(float(np.mean(samples)) / 1e3, 4)


def device_row(times: TrtexecTimes, batch: int, base: dict[str, Any], power_w: float | None = None,
               machine: dict[str, Any] | None = None) -> ResultRow:
    """A ``trtexec`` row: latency per batch, throughput, and energy per image when power is known.

    Args:
        times: the parsed trace.
        batch: images per inference (the engine's input batch).
        base: row fields known from the artifact (artifact, method, settings, label, precision, params,
            gflops, artifact_mb).
        power_w: average board power during the run.
        machine: the device description.
    """
    ips = times.batches_per_s * batch
    energy = round(power_w * 1e3 / ips, 4) if power_w is not None and ips > 0 else None
    return ResultRow(**{"precision": "fp32", "method": "unknown", **base}, backend="trtexec", batch=batch,
                     latency_ms=times.latency, throughput_ips=round(ips, 3), power_w=power_w,
                     energy_mj_per_image=energy, machine={**(machine or {}), "latency_metric": times.metric},
                     source="trtexec --exportTimes" + (" + tegrastats" if power_w is not None else ""))


def profile_device(times_path: str | Path, artifact: str | Path | None = None, tegrastats: str | Path | None = None,
                   batch: int = 1, metric: str = "latencyMs", machine: str = "jetson", label: str | None = None,
                   rail: str | None = None) -> ResultRow:
    """The row for one on-device run: a trtexec trace, optionally its tegrastats log and the export directory
    the engine came from (for method, settings, precision, parameters and GFLOPs).

    Args:
        times_path: trtexec ``--exportTimes`` JSON.
        artifact: the export directory the engine was built from.
        tegrastats: the tegrastats log recorded during the run (average power, energy per image).
        batch: images per inference.
        metric: ``latencyMs`` or ``computeMs`` (see :func:`parse_trtexec_times`).
        machine: the device's name, e.g. "Jetson Orin Nano 8GB".
        label: plot label (default: as ``edgevit profile`` names the artifact).
        rail: tegrastats rail to average (default: the board input).
    """
    from edgevit.bench.backends import open_artifact
    from edgevit.bench.profile import artifact_fields, default_label
    from edgevit.export.artifacts import ENGINE

    times = parse_trtexec_times(times_path, metric)
    power = parse_tegrastats(tegrastats, rail) if tegrastats else None
    base: dict[str, Any] = {"artifact": str(times_path), "label": label or Path(times_path).stem}
    if artifact:
        art = open_artifact(artifact)
        engine = art.path / ENGINE
        size = engine.stat().st_size if engine.is_file() else None
        base = {**artifact_fields(art), "artifact": str(art.path), "label": label or default_label(art),
                "precision": art.profile_precision, "artifact_mb": round(size / 1e6, 3) if size else None}
    return device_row(times, batch, base, power, {"device": machine})
