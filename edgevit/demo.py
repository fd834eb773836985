"""``edgevit demo``: the whole pipeline on the embedded digits, offline, resumable.

Trains the baseline and the five methods, exports every result for the CPU (fp32 and int8) and prepares
the baseline's Jetson Orin Nano int8 export (ONNX + build script, the device path), profiles all CPU exports
with ONNX Runtime and writes the latency-vs-accuracy report, where each method stands next to its natural
references (recorded by the method: the teacher, the unpruned model, the plain model, a linear probe of the
backbone; for DATA also the frozen backbone as a continual learner, and sequential fine-tuning and joint training,
the bounds it sits between) with a verdict. Digits are read at 16 px (their own resolution is 8 px): as accurate
as 32 px for these models, and 3x faster to train, so the demo fits in about five minutes on a 2-core CPU.

Each step records a hash of its inputs (its settings and the files it reads) in ``DIR/demo.json``: re-running
skips the steps whose inputs are unchanged, resumes a training that was killed, and redoes a step whose upstream
changed.

Continual learning (DATA) and prompt tuning (BPT) need a backbone that never saw their task's labels, so
they start from an *upstream* model trained on digits 0-4 and are measured on digits 5-9: their accuracy is
on that 5-class task, not on the 10-class task of the other rows.
"""

from __future__ import annotations

import dataclasses
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
DEVICE_PROFILE = "jetson-orin-nano-int8"  # exported for the baseline: the device path, shown once
IMG_SIZE = 16
PROFILE_SECONDS = 1.0  # per row: ~1 ms graphs get hundreds of iterations
UPSTREAM_CLASSES = list("01234")
DOWNSTREAM_CLASSES = list("56789")
# One ORT thread: at ~1 ms per image a second thread adds more synchronisation jitter than speed (measured).
THREADS = 1


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
        h = hashlib.sha256(json.dumps([self.name, self.settings], sort_keys=True, default=_jsonable).encode())
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


def call_step(name: str, output: Path, fn: Callable, kwargs: dict, reads: list[Path] | None = None) -> Step:
    """A step that calls ``fn(**kwargs, resume=...)``; its settings are ``kwargs`` themselves (configs included),
    so changing any argument, e.g. the skip step's learning rate, re-runs the step."""
    settings = {"fn": f"{fn.__module__}.{fn.__qualname__}",  # paths are hashed by content, through ``reads``
                **{k: v for k, v in kwargs.items() if not isinstance(v, Path)}}
    return Step(name, output, lambda resume: fn(**kwargs, resume=resume), settings, list(reads or []))


def _jsonable(value):
    """What a setting hashes as: a config dataclass as its fields, anything else as its text."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


@dataclass(frozen=True)
class Training:
    """One training step of the demo: a registered method, what it starts from, and only the settings the demo
    changes (small for speed); every other setting is the method's default object, the one the CLI and the
    Python API use.

    Args:
        label: the step's name.
        method: the registered method.
        out: its run directory under ``runs/``.
        source: the run it starts from (under ``runs/``), or None: the method's default source (a timm
            architecture for the baseline).
        settings: changes to the method's config.
        training: changes to its optimisation settings.
    """

    label: str
    method: str
    out: str
    source: str | None
    settings: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def step(self, runs: Path) -> Step:
        from edgevit.methods.registry import discover

        method = discover()[self.method]
        source = method.source.default if self.source is None else runs / self.source
        kwargs = dict(source=source, data="digits", out=runs / self.out, cfg=method.config(**self.settings),
                      train_cfg=method.train_config(**self.training))
        return call_step(self.label, runs / self.out, method.train, kwargs, [] if self.source is None else [source])


TRAINING = (
    Training("baseline", "baseline", "baseline", None, {"img_size": IMG_SIZE}, {"epochs": 30}),
    Training("upstream backbone (digits 0-4)", "baseline", "upstream-0-4", None,
             {"img_size": IMG_SIZE, "classes": UPSTREAM_CLASSES}, {"epochs": 30}),
    Training("transfer: attention-distilled student", "transfer", "transfer", "baseline",
             {"embed_dim": 64, "depth": 4, "heads": 2}, {"lr": 2e-3}),
    Training("skip: a third of attention removed (cosine-pooled)", "skip", "skip", "baseline",
             {"select": "cosine-pooled", "ratio": 1 / 3}, {"lr": 3e-4}),
    Training("continual: DATA on digits 5-9", "continual", "continual", "upstream-0-4",
             {"tasks": 2, "classes": DOWNSTREAM_CLASSES, "bounds": True}, {"epochs": 8}),
    Training("memory: MoViT table", "memory", "memory", "baseline", {"prototypes": 64, "topk": None}, {"epochs": 5}),
    Training("prompts: BPT deep, merged", "prompts", "prompts", "upstream-0-4", {}, {"epochs": 10}),
)


def plan(root: Path) -> tuple[list[Step], dict[str, Path]]:
    """The demo's steps, and the bundles it profiles keyed by their report label."""
    runs = root / "runs"
    steps = [run.step(runs) for run in TRAINING]
    bundles = {
        "baseline": runs / "baseline",
        "transfer student": runs / "transfer",
        "skip 1/3 attention": runs / "skip",
        "DATA merged (0-4 -> 5-9)": runs / "continual",
        "DATA exact (0-4 -> 5-9)": runs / "continual" / "exact",
        "MoViT table P=64": runs / "memory",
        "BPT deep merged (0-4 -> 5-9)": runs / "prompts",
    }
    return steps + _export_steps(root, bundles) + _measure_steps(root, bundles), bundles


def _export_dir(root: Path, label: str, profile: str) -> Path:
    return root / "exports" / label.split(" (")[0].replace(" ", "-").replace("/", "_") / profile


def _export_steps(root: Path, bundles: dict[str, Path]) -> list[Step]:
    from edgevit.export.pipeline import export_bundle

    steps = []
    for label, run in bundles.items():
        for profile in (*CPU_PROFILES, DEVICE_PROFILE) if label == "baseline" else CPU_PROFILES:
            out = _export_dir(root, label, profile)
            steps.append(Step(f"export {label} -> {profile}", out,
                              lambda r, run=run, profile=profile, out=out: export_bundle(run, profile, out),
                              {"profile": profile}, [run]))
    return steps


def _measure_steps(root: Path, bundles: dict[str, Path]) -> list[Step]:
    from edgevit.bench.latency import TimingConfig
    from edgevit.bench.profile import ProfileConfig, profile_artifacts
    from edgevit.bench.report import build_report
    from edgevit.bench.schema import ResultRow

    exports = [(label, _export_dir(root, label, profile)) for label in bundles for profile in CPU_PROFILES]
    results, report = root / "results.jsonl", root / "report"

    def profile(resume: bool) -> None:
        cfg = ProfileConfig(backend="ort", threads=THREADS, timing=TimingConfig(seconds=PROFILE_SECONDS))
        rows: list[ResultRow] = profile_artifacts([p for _, p in exports], cfg, labels=[lb for lb, _ in exports])
        tmp = results.with_suffix(".tmp")
        tmp.write_text("".join(row.model_dump_json(exclude_none=True) + "\n" for row in rows))
        tmp.replace(results)

    return [
        Step("profile CPU exports (ONNX Runtime, batch 1)", results, profile,
             {"threads": THREADS, "seconds": PROFILE_SECONDS}, [p for _, p in exports]),
        Step("report", report, lambda r: build_report(results, report), {},
             [results]),
    ]


def summary(root: Path) -> Table:
    """The demo's closing table: where each method landed and which points are on the Pareto front."""
    report = json.loads((root / "report" / "report.json").read_text())
    table = Table(title=f"ONNX Runtime on this CPU, batch 1, {THREADS} thread(s) ({root / 'report' / 'report.md'})")
    for column in ("model", "precision", "top-1", "p50 ms", "speed-up", "front"):
        table.add_column(column, justify="left" if column in ("model", "precision") else "right")
    for setting in report["settings"]:
        for row in setting["rows"]:
            table.add_row(row["label"], setting["precision"],
                          f"{100 * row['top1']:.1f}%" if row.get("top1") is not None else "-",
                          f"{row['p50_ms']:.2f}" if row.get("p50_ms") else "-",
                          f"{row['speedup']:.2f}x" if row.get("speedup") else "-", "*" if row["pareto"] else "")
    return table


def run_demo(root: str | Path) -> Path:
    """Run (or resume) the demo into ``root``; returns the report directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    steps, _ = plan(root)
    state = run_steps(steps, root / "demo.json")
    table = Table(title="time per step")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step in steps:
        table.add_row(step.name, f"{state[step.name]['seconds']:.0f}")
    console.print(table)
    console.print(summary(root))
    return root / "report"
