"""``edgevit demo``: the whole pipeline on the embedded digits, offline, resumable.

Trains the baseline and the five methods, exports every result for the CPU (fp32 and int8) and prepares
the Jetson Orin Nano int8 export (ONNX + build script), profiles all CPU exports with ONNX Runtime and writes
the latency-vs-accuracy report. Each step records a hash of its inputs (its settings and the files it
reads) in ``DIR/demo.json``: re-running skips the steps whose inputs are unchanged, resumes a training that
was killed, and redoes a step whose upstream changed.

Continual learning (DATA) and prompt tuning (BPT) need a backbone that never saw their task's labels, so
they start from an *upstream* model trained on digits 0-4 and are measured on digits 5-9: their accuracy is
on that 5-class task, not on the 10-class task of the other rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgevit.vit.bundle import atomic_write_json

console = Console(stderr=True)

CPU_PROFILES = ("cpu-ort-fp32", "cpu-ort-int8")
DEVICE_PROFILE = "jetson-orin-nano-int8"
UPSTREAM_CLASSES = list("01234")
DOWNSTREAM_CLASSES = list("56789")
THREADS = 2


@dataclass
class Step:
    """One resumable unit of the demo.

    Args:
        name: shown in the progress lines and the key in ``demo.json``.
        output: the directory or file the step produces.
        run: does the work; gets ``resume=True`` when a killed run of the same inputs left output behind.
        settings: everything besides ``reads`` that decides the result.
        reads: outputs of earlier steps this one reads (their content is hashed into the inputs).
    """

    name: str
    output: Path
    run: Callable[[bool], object]
    settings: dict = field(default_factory=dict)
    reads: list[Path] = field(default_factory=list)

    def inputs_hash(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, self.settings], sort_keys=True, default=str).encode())
        for path in self.reads:
            h.update(_content_hash(path).encode())
        return h.hexdigest()[:16]


def _content_hash(path: Path) -> str:
    """A finished step's identity: its bundle.json / export.json, or the file itself."""
    for marker in ("bundle.json", "export.json"):
        if (path / marker).is_file():
            return hashlib.sha256((path / marker).read_bytes()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def run_steps(steps: list[Step], state_path: Path) -> dict[str, dict]:
    """Run ``steps`` in order, skipping those whose recorded inputs hash is unchanged."""
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        key = step.inputs_hash()
        record = state.get(step.name, {})
        if record.get("inputs") == key and record.get("done") and step.output.exists():
            console.print(f"[dim][{i}/{len(steps)}] {step.name}: up to date ({record['seconds']:.0f} s earlier)")
            continue
        resume = record.get("inputs") == key and step.output.exists()
        if step.output.exists() and not resume:  # stale output of other inputs: the demo owns it
            shutil.rmtree(step.output) if step.output.is_dir() else step.output.unlink()
        console.rule(f"[bold][{i}/{len(steps)}] {step.name}" + (" (resuming)" if resume else ""))
        state[step.name] = {"inputs": key, "done": False}
        atomic_write_json(state_path, state)
        t0 = time.perf_counter()
        step.run(resume)
        seconds = time.perf_counter() - t0
        state[step.name] = {"inputs": key, "done": True, "seconds": round(seconds, 1)}
        atomic_write_json(state_path, state)
        console.print(f"[green]{step.name}: done in {seconds:.0f} s (total {time.perf_counter() - start:.0f} s)")
    return state
