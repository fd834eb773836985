"""``edgevit report``: results.jsonl -> report.md (tables), pareto.png (latency vs accuracy), throughput.png
(images/s vs batch, when ``edgevit profile --batch 1,2,4,...`` measured several batches), report.json.

Rows are compared only within a *setting*: the same machine, backend, precision and batch. In each
setting the baseline (``--baseline-label``, else the row whose method is ``baseline``) gives every other
row its speed-up (baseline p50 / row p50) and accuracy change (row top-1 - baseline top-1, points).

Each method is also judged against its natural references, which its bundle records (``metrics.references``: a
linear probe of the backbone for prompts and continual, the unpruned model for skip, the teacher for transfer, the
plain model for memory): the reference top-1s are drawn as hollow markers beside the row, and the report ends with
a verdict per row (:func:`verdict`), then what the methods recorded about their own runs (``metrics.findings``).
``--budget-ms`` names the most accurate export within a latency budget.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevit.bench.schema import ResultRow
from edgevit.errors import EdgeVitError
from edgevit.vit.bundle import atomic_write_bytes, atomic_write_json

METHOD_ORDER = ("baseline", "transfer", "skip", "continual", "memory", "prompts")
# Colour-blind-safe (Okabe-Ito), one per method, fixed so a method keeps its colour across reports.
METHOD_COLOURS = {"baseline": "#000000", "transfer": "#0072B2", "skip": "#E69F00", "continual": "#009E73",
                  "memory": "#CC79A7", "prompts": "#D55E00"}
OTHER_COLOURS = ("#56B4E9", "#F0E442", "#7F7F7F", "#8C564B")


@dataclass(frozen=True)
class Setting:
    machine: str
    backend: str
    precision: str
    batch: int
    threads: int | None = None
    task: str = ""

    def title(self) -> str:
        threads = f", {self.threads} CPU thread{'s' if self.threads > 1 else ''}" if self.threads else ""
        task = f" - {self.task}" if self.task else ""
        return f"{self.backend} {self.precision}, batch {self.batch}{threads}{task}"


@dataclass
class Entry:
    """One row of a setting's table."""

    label: str
    method: str
    top1: float | None
    p50_ms: float | None
    p99_ms: float | None
    throughput_ips: float | None
    gflops: float | None
    params: int | None
    artifact_mb: float | None
    peak_memory_mb: float | None
    energy_mj_per_image: float | None
    speedup: float | None = None
    delta_top1_pp: float | None = None
    pareto: bool = False
    baseline: bool = False
    references: dict | None = None  # name -> {test_top1, graph}, from the bundle (the mean over its seeds' bundles)
    verdict: str | None = None
    seed_top1: list[float] | None = None  # one top-1 per run when the label was measured on several (seeds)


# A method pays when it is within this many points of its best reference and no slower; the seed spread of a
# digits run is about this size.
VERDICT_TOLERANCE_PP = 0.5


def verdict(entry: Entry) -> tuple[str, str, float, float] | None:
    """``(verdict, reference, gap in points, speed vs the reference)`` of a row with references, or None.

    The reference is the most accurate one the method could stand in for: an upper bound (``bound: upper``, a
    reference that trains on every task's data at once, which a continual learner never has) is shown beside it,
    not judged against, unless it is all there is. Its speed: 1 when it runs the method's own graph (``graph:
    same``), the row's speed-up when it runs the source's graph and the setting's baseline is that source, else
    unknown (taken as 1). One word: *pays* (no slower and no worse than the reference, within the tolerance);
    *costs* (a trade: faster for an accuracy loss, or more accurate for latency); *does not pay here* (worse and
    not faster, or slower without being more accurate).
    """
    if not entry.references or entry.top1 is None:
        return None
    name, ref = max(judged_references(entry.references).items(), key=lambda kv: kv[1]["test_top1"])
    gap = round(100 * (entry.top1 - ref["test_top1"]), 2)
    speed = reference_speed(entry, ref)
    if speed < 0.97:
        word = "costs" if gap > VERDICT_TOLERANCE_PP else "does not pay here"
    elif gap >= -VERDICT_TOLERANCE_PP:
        word = "pays"
    else:
        word = "costs" if speed > 1.03 else "does not pay here"
    return word, name, gap, speed


def judged_references(references: dict[str, dict]) -> dict[str, dict]:
    """The references a verdict may be against: all but the upper bounds, or the upper bounds when that is all."""
    return {n: r for n, r in references.items() if r.get("bound") != "upper"} or references


def reference_speed(entry: Entry, ref: dict) -> float:
    """How much faster the row runs than its reference: its speed-up when the reference runs the source's graph
    and the setting's baseline is that source (the methods record the source as the reference), else 1."""
    return entry.speedup if ref.get("graph") == "source" and entry.speedup else 1.0


def machine_name(row: ResultRow) -> str:
    m = row.machine
    return str(m.get("device") or m.get("gpu") or m.get("cpu") or "unknown machine")


def row_label(row: ResultRow) -> str:
    return row.label or row.method


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points: ``True`` where no other point is at least as fast and as accurate
    and strictly better in one of the two."""
    return [not any(lx <= x and ay >= y and (lx < x or ay > y) for lx, ay in points) for x, y in points]


def group_rows(rows: Sequence[ResultRow]) -> dict[Setting, list[ResultRow]]:
    groups: dict[Setting, list[ResultRow]] = {}
    for row in rows:
        key = Setting(machine_name(row), row.backend, row.precision, row.batch, row.threads, row.task)
        groups.setdefault(key, []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].machine, kv[0].task, kv[0].backend, kv[0].precision,
                                                       kv[0].batch, kv[0].threads or 0)))


def _find_baseline(rows: Sequence[ResultRow], baseline_label: str | None) -> ResultRow | None:
    if baseline_label:
        return next((r for r in rows if row_label(r) == baseline_label), None)
    return next((r for r in rows if r.method == "baseline"), None)


def merge_seeds(rows: Sequence[ResultRow]) -> tuple[list[ResultRow], dict[str, list[float]]]:
    """One row per label: a label measured on several artifacts (a run per seed) becomes its median-latency row
    with the mean top-1. Returns the rows and, for those labels, the top-1 of each run."""
    by_label: dict[str, list[ResultRow]] = {}
    for row in rows:
        by_label.setdefault(row_label(row), []).append(row)
    merged, seeds = [], {}
    for label, group in by_label.items():
        group = sorted(group, key=lambda r: r.latency_ms.p50 if r.latency_ms else math.inf)
        row = group[(len(group) - 1) // 2]
        top1s = [r.top1 for r in group if r.top1 is not None]
        if len(group) > 1 and top1s:
            seeds[label] = top1s
            row = row.model_copy(update={"top1": statistics.mean(top1s)})
        merged.append(row)
    return merged, seeds


def setting_entries(rows: Sequence[ResultRow], baseline_label: str | None = None,
                    references: dict[str, dict] | None = None) -> list[Entry]:
    """The table of one setting, sorted by p50, with speed-up, accuracy change, Pareto membership, and each row's
    references (``references``: label -> the bundle's) and verdict. A label measured on several runs (seeds) is
    one row: :func:`merge_seeds`."""
    rows, seeds = merge_seeds(rows)
    base = _find_baseline(rows, baseline_label)
    entries = []
    for row in rows:
        lat = row.latency_ms
        entry = Entry(label=row_label(row), method=row.method, top1=row.top1, p50_ms=lat.p50 if lat else None,
                      p99_ms=lat.p99 if lat else None, throughput_ips=row.throughput_ips, gflops=row.gflops,
                      params=row.params, artifact_mb=row.artifact_mb, peak_memory_mb=row.peak_memory_mb,
                      energy_mj_per_image=row.energy_mj_per_image, baseline=row is base,
                      references=(references or {}).get(row_label(row)), seed_top1=seeds.get(row_label(row)))
        if base is not None and base.latency_ms and lat:
            entry.speedup = round(base.latency_ms.p50 / lat.p50, 3)
        if base is not None and base.top1 is not None and row.top1 is not None:
            entry.delta_top1_pp = round(100 * (row.top1 - base.top1), 2)
        judged = verdict(entry)
        entry.verdict = judged[0] if judged else None
        entries.append(entry)
    plotted = [e for e in entries if e.top1 is not None and e.p50_ms is not None]
    for e, front in zip(plotted, pareto_front([(e.p50_ms, e.top1) for e in plotted]), strict=True):
        e.pareto = front
    return sorted(entries, key=lambda e: (e.p50_ms is None, e.p50_ms or 0.0))


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def markdown(tables: dict[Setting, list[Entry]], source: str) -> str:
    """The report as Markdown: one table per setting, grouped by machine."""
    lines = ["# edgevit latency vs accuracy", "",
             f"Source: `{source}`. Speed-up = baseline p50 / p50 and Δ top-1 = top-1 - baseline top-1, within "
             "the same machine, backend, precision, batch and threads. ★ = on the Pareto front (no other row is both "
             "faster and more accurate). Latency is per batch; top-1 on the bundle's test split through the "
             "same backend and precision.", ""]
    machine = None
    for setting, entries in tables.items():
        if setting.machine != machine:
            machine = setting.machine
            lines += [f"## {machine}", ""]
        lines += [f"### {setting.title()}", "",
                  "| | label | method | top-1 | Δ top-1 (pp) | p50 (ms) | p99 (ms) | speed-up | img/s | GFLOPs/img "
                  "| params (M) | size (MB) | peak mem (MB) | energy (mJ/img) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in entries:
            mark = "★" if e.pareto else ""
            label = f"**{e.label}** (baseline)" if e.baseline else e.label
            lines.append(
                f"| {mark} | {label} | {e.method} | {_fmt(e.top1 and 100 * e.top1, '.2f', '%')} "
                f"| {_fmt(e.delta_top1_pp, '+.2f')} | {_fmt(e.p50_ms, '.3f')} | {_fmt(e.p99_ms, '.3f')} "
                f"| {_fmt(e.speedup, '.2f', '×')} | {_fmt(e.throughput_ips, '.1f')} | {_fmt(e.gflops, '.3f')} "
                f"| {_fmt(e.params and e.params / 1e6, '.3f')} | {_fmt(e.artifact_mb, '.2f')} "
                f"| {_fmt(e.peak_memory_mb, '.1f')} | {_fmt(e.energy_mj_per_image, '.2f')} |")
        if not any(e.baseline for e in entries):
            lines.append("\n_No baseline row in this setting: speed-up and Δ top-1 are not computed._")
        lines.append("")
    return "\n".join(lines)


def bundle_metrics(rows: Sequence[ResultRow]) -> dict[str, dict]:
    """Per label: its bundle's classes and metrics (measured at training time, torch fp32), for the artifacts that
    are still where they were profiled. A label with several runs (seeds) keeps its first run's metrics and the
    mean of its runs' references."""
    from edgevit.bench.backends import open_artifact

    found: dict[str, dict[str, dict]] = {}  # label -> run (its provenance) -> its metrics
    for row in {row.artifact: row for row in rows}.values():  # each artifact once, whatever its batches and backends
        for path in (Path(row.artifact), Path(row.artifact).parent):  # an engine file sits in its export dir
            try:
                artifact = open_artifact(path)
            except EdgeVitError:
                continue
            found.setdefault(row_label(row), {})[str(artifact.meta.provenance)] = {"classes": artifact.meta.classes,
                                                                                  **artifact.meta.metrics}
            break
    return {label: {**next(iter(runs.values())), **mean_references(list(runs.values()))}
            for label, runs in found.items()}


def mean_references(runs: list[dict]) -> dict[str, dict]:
    """``{"references": ...}`` with each reference's test top-1 the mean over ``runs`` (several seeds), or {}."""
    if len(runs) < 2 or not all(r.get("references") for r in runs):
        return {}
    names = [n for n in runs[0]["references"] if all(n in r["references"] for r in runs)]
    return {"references": {n: {**runs[0]["references"][n],
                                "test_top1": statistics.mean(r["references"][n]["test_top1"] for r in runs)}
                           for n in names}}


def class_metrics(per_label: dict[str, dict]) -> dict[str, dict]:
    """Per label: per-class test top-1 and the confusion matrix, where the bundle has them."""
    return {label: {"classes": m["classes"], "top1": m["test_per_class_top1"], "confusion": m.get("test_confusion")}
            for label, m in per_label.items() if "test_per_class_top1" in m}


def verdict_markdown(tables: dict[Setting, list[Entry]]) -> list[str]:
    """The closing table: every row with references, against the most accurate one."""
    lines = []
    for setting, entries in tables.items():
        for e in entries:
            judged = verdict(e)
            if judged:
                word, name, gap, speed = judged
                others = "".join(f"; {r['bound'] + ' bound ' if r.get('bound') else ''}{n} "
                                 f"{_fmt(100 * r['test_top1'], '.2f', '%')}"
                                 for n, r in e.references.items() if n != name)
                seeds = (f" (mean of {len(e.seed_top1)} runs, spread {100 * (max(e.seed_top1) - min(e.seed_top1)):.2f})"
                         if e.seed_top1 else "")
                lines.append(f"| {e.label} | {setting.title()} | {_fmt(100 * e.top1, '.2f', '%')}{seeds} | {name} "
                             f"{_fmt(100 * e.references[name]['test_top1'], '.2f', '%')}{others} | {gap:+.2f} "
                             f"| {_fmt(speed, '.2f', '×')} | **{word}** |")
    if not lines:
        return []
    return ["## Verdicts", "",
            "Each method against its most accurate reference that is not an upper bound (recorded in its bundle; "
            "hollow markers in pareto.png); its other references are listed beside it. *pays*: no slower and no "
            f"more than {VERDICT_TOLERANCE_PP} points less accurate; *costs*: a trade (faster for an accuracy loss, "
            "or more accurate for latency); *does not pay here*: less accurate and not faster, or slower and not "
            "more accurate. Speed is vs the reference's graph (1× when the reference runs the same graph, or it is "
            "not profiled here).",
            "", "| label | setting | top-1 | reference | Δ (pp) | speed | verdict |",
            "|---|---|---:|---|---:|---:|---|", *lines, ""]


def findings_markdown(metrics: dict[str, dict]) -> list[str]:
    """What the methods recorded about their own runs (``metrics.findings``): what a reader needs to read the
    number right, e.g. a memory gate that never moved from its initial value."""
    lines = [f"- **{label}**: {finding}" for label, m in metrics.items() for finding in m.get("findings") or []]
    return ["## Findings", "", *lines, ""] if lines else []


def within_budget(tables: dict[Setting, list[Entry]], budget_ms: float) -> list[dict]:
    """Per machine and task: the most accurate row whose p50 is within ``budget_ms`` (None when none is)."""
    best: dict[tuple[str, str], dict | None] = {}
    for setting, entries in tables.items():
        key = (setting.machine, setting.task)
        best.setdefault(key, None)
        fits = [e for e in entries if e.top1 is not None and e.p50_ms is not None and e.p50_ms <= budget_ms]
        for e in fits:
            if best[key] is None or e.top1 > best[key]["top1"]:
                best[key] = {"label": e.label, "setting": setting.title(), "top1": e.top1, "p50_ms": e.p50_ms}
    return [{"machine": m, "task": t, "budget_ms": budget_ms, "best": b} for (m, t), b in best.items()]


def budget_line(choice: dict) -> str:
    """``machine (task): label, setting: top-1 at p50`` of one :func:`within_budget` choice."""
    task = f" ({choice['task']})" if choice["task"] else ""
    b = choice["best"]
    found = f"{b['label']}, {b['setting']}: top-1 {100 * b['top1']:.2f}% at {b['p50_ms']:.3f} ms" if b else "none"
    return f"{choice['machine']}{task}: {found}"


def budget_markdown(choices: list[dict]) -> list[str]:
    if not choices:
        return []
    return [f"## Most accurate within {choices[0]['budget_ms']} ms", "", *(f"- {budget_line(c)}" for c in choices), ""]


def class_markdown(per_label: dict[str, dict]) -> list[str]:
    """One confusion-matrix table per label (rows: true class, columns: predicted), with per-class top-1."""
    if not per_label:
        return []
    lines = ["## Per-class test top-1 and confusion matrix", "",
             "From each bundle's metrics (torch fp32 at training time); rows are the true class, columns the "
             "predicted one.", ""]
    for label, found in per_label.items():
        classes = found["classes"]
        lines += [f"### {label}", "", "| true \\ predicted | " + " | ".join(classes) + " | top-1 |",
                  "|---|" + "---:|" * (len(classes) + 1)]
        for i, c in enumerate(classes):
            counts = found["confusion"][i] if found["confusion"] else ["–"] * len(classes)
            top1 = found["top1"].get(c)
            cells = " | ".join(str(n) for n in counts)
            lines.append(f"| {c} | {cells} | {_fmt(top1 and 100 * top1, '.2f', '%')} |")
        lines.append("")
    return lines


def method_colour(method: str, others: list[str]) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    if method not in others:
        others.append(method)
    return OTHER_COLOURS[others.index(method) % len(OTHER_COLOURS)]


def pareto_png(tables: dict[Setting, list[Entry]], path: Path) -> bool:
    """Latency (x) vs top-1 (y), one panel per setting with accuracy, one colour per method, the Pareto
    front drawn as a staircase. Returns ``False`` (and writes nothing) when no row has both numbers."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = {s: [e for e in es if e.top1 is not None and e.p50_ms is not None] for s, es in tables.items()}
    panels = {s: es for s, es in panels.items() if es}
    if not panels:
        return False
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 5.4 * rows), squeeze=False)
    machines = sorted({s.machine for s in panels})
    others: list[str] = []
    methods_seen: list[str] = []
    for ax, (setting, entries) in zip(axes.flat, panels.items(), strict=False):
        _draw_panel(ax, setting, entries, len(machines) > 1, others, methods_seen)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    ordered = sorted(methods_seen, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
    handles = [Line2D([], [], marker="D" if m == "baseline" else "o", linestyle="", markersize=9,
                      color=method_colour(m, others), label=m) for m in ordered]
    handles.append(Line2D([], [], color="#444444", linewidth=2, label="Pareto front"))
    if any(e.references for es in panels.values() for e in es):
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor="none",
                              color="#444444", label="reference"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False, fontsize=11,
               bbox_to_anchor=(0.5, 0.0))
    title = "Latency vs accuracy" + (f" on {machines[0]}" if len(machines) == 1 else "")
    fig.suptitle(title, fontsize=15, fontweight="bold")
    height = fig.get_figheight()  # legend and title take fixed inches, whatever the number of panels
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.35 / height))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=160)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _draw_panel(ax, setting: Setting, entries: list[Entry], name_machine: bool, others: list[str],
                methods_seen: list[str]) -> None:
    placed: list[tuple[float, float]] = []  # label anchors in axes fractions, to step labels off each other
    hollow: dict[tuple[float, float], tuple[str, list[str]]] = {}  # reference marker -> colour, names
    base = next((e for e in entries if e.baseline), None)
    xs_all, ys_all = [e.p50_ms for e in entries], [100 * e.top1 for e in entries]
    span_x, span_y = max(max(xs_all) - min(xs_all), 1e-9), max(max(ys_all) - min(ys_all), 1e-9)
    for e in sorted(entries, key=lambda e: (e.p50_ms, -e.top1)):
        colour = method_colour(e.method, others)
        if e.method not in methods_seen:
            methods_seen.append(e.method)
        ax.scatter(e.p50_ms, 100 * e.top1, s=110 if e.pareto else 60, color=colour, alpha=1.0 if e.pareto else 0.5,
                   edgecolors="black" if e.pareto else "none", linewidths=1.2, zorder=3,
                   marker="D" if e.baseline else "o")
        at = ((e.p50_ms - min(xs_all)) / span_x, (100 * e.top1 - min(ys_all)) / span_y)
        clashes = sum(abs(at[0] - x) < 0.4 and abs(at[1] - y) < 0.1 for x, y in placed)
        placed.append(at)
        ax.annotate(e.label, (e.p50_ms, 100 * e.top1), textcoords="offset points", xytext=(7, 5 + 13 * clashes),
                    fontsize=9, color="#222222" if e.pareto else "#777777")
        for name, ref in (e.references or {}).items():  # a reference as a hollow marker, at its own latency
            at = (e.p50_ms * reference_speed(e, ref), 100 * ref["test_top1"])
            if base is not None and math.isclose(at[0], base.p50_ms, rel_tol=0.01) and at[1] == 100 * base.top1:
                continue  # the reference is the baseline row itself
            if any(name in names and y == at[1] for (_, y), (_, names) in hollow.items()):
                continue  # shared by two forms of one run (DATA's merged and exact): drawn by the faster
            hollow.setdefault(at, (colour, []))[1].append(name)
    for at, (colour, names) in hollow.items():  # references that coincide share one marker and one label
        ax.scatter(*at, s=60, facecolors="none", edgecolors=colour, linewidths=1.4, zorder=3)
        ax.annotate(" = ".join(names), at, textcoords="offset points", xytext=(7, -11), fontsize=8, color=colour,
                    style="italic")
    front = sorted((e.p50_ms, 100 * e.top1) for e in entries if e.pareto)
    xs, ys = zip(*front, strict=True)
    ax.step(xs, ys, where="post", color="#444444", linewidth=2, alpha=0.8, zorder=2)
    if base is not None:
        ax.axhline(100 * base.top1, color="#999999", linestyle=":", linewidth=1, zorder=1)
        ax.axvline(base.p50_ms, color="#999999", linestyle=":", linewidth=1, zorder=1)
    latencies = [e.p50_ms for e in entries]
    if max(latencies) / max(min(latencies), 1e-9) > 20:
        ax.set_xscale("log")
    per = "ms" if setting.batch == 1 else f"ms per batch of {setting.batch}"
    ax.set_xlabel(f"p50 latency ({per})  ← faster", fontsize=12)
    ax.set_ylabel("top-1 on test split (%)  more accurate →", fontsize=12)
    ax.set_title(setting.title() + (f"\n{setting.machine}" if name_machine else ""), fontsize=12)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.12)
    ax.tick_params(labelsize=10)


def throughput_curves(rows: Sequence[ResultRow]) -> dict[tuple[str, str], dict[int, float]]:
    """``{(setting title without batch, label): {batch: images/s}}`` for every artifact profiled at two or more
    batch sizes in one setting (machine, backend, precision, threads, task)."""
    curves: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        lat = row.latency_ms
        ips = row.throughput_ips or (1e3 * row.batch / lat.p50 if lat and lat.p50 else None)
        if ips is None:
            continue
        threads = f", {row.threads} threads" if row.threads else ""
        title = f"{machine_name(row)}: {row.backend} {row.precision}{threads}" + (f" - {row.task}" if row.task else "")
        curves.setdefault((title, row_label(row)), {})[row.batch] = ips
    return {key: dict(sorted(c.items())) for key, c in curves.items() if len(c) >= 2}


def throughput_markdown(curves: dict[tuple[str, str], dict[int, float]]) -> list[str]:
    """One table row per artifact profiled at several batch sizes: images/s at each batch (throughput.png)."""
    if not curves:
        return []
    batches = sorted({b for c in curves.values() for b in c})
    lines = ["## Throughput vs batch (images/s)", "", "![throughput vs batch](throughput.png)", "",
             "| setting | label | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|" + "---:|" * len(batches)]
    for (title, label), curve in curves.items():
        lines.append(f"| {title} | {label} | " + " | ".join(_fmt(curve.get(b), ".1f") for b in batches) + " |")
    return [*lines, ""]


def throughput_png(curves: dict[tuple[str, str], dict[int, float]], path: Path) -> bool:
    """Images/s (y) vs batch (x, log 2), one panel per setting, one line per artifact. Returns ``False`` (and
    writes nothing) when no artifact was profiled at two or more batch sizes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return False
    titles = list(dict.fromkeys(title for title, _ in curves))
    fig, axes = plt.subplots(1, len(titles), figsize=(6.4 * len(titles), 4.8), squeeze=False)
    for ax, title in zip(axes.flat, titles, strict=True):
        for (t, label), curve in curves.items():
            if t == title:
                ax.plot(list(curve), list(curve.values()), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({b for (t, _), c in curves.items() if t == title for b in c}))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.set_xlabel("batch", fontsize=12)
        ax.set_ylabel("throughput (images/s)", fontsize=12)
        ax.set_title(title, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=160)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def build_report(results: str | Path, out_dir: str | Path, baseline_label: str | None = None,
                 budget_ms: float | None = None) -> dict:
    """Write report.md, pareto.png and report.json for ``results`` into ``out_dir``; returns report.json's
    content.

    Args:
        results: a results.jsonl file (:class:`ResultRow` lines).
        out_dir: the report directory (created).
        baseline_label: the label of the reference row in each setting (default: the ``baseline`` method).
        budget_ms: also name the most accurate row within this p50 latency, per machine and task.
    """
    from pydantic import ValidationError

    results = Path(results)
    if not results.is_file():
        raise EdgeVitError(f"results file {results} does not exist")
    try:
        from edgevit.bench.schema import read_rows

        rows = read_rows(results)
    except (ValidationError, json.JSONDecodeError) as err:
        raise EdgeVitError(f"{results} is not a results.jsonl of result rows: {str(err).splitlines()[0]}") from None
    if not rows:
        raise EdgeVitError(f"{results} has no rows")
    if baseline_label and not any(row_label(r) == baseline_label for r in rows):
        raise EdgeVitError(f"no row has label {baseline_label!r} (labels: {sorted({row_label(r) for r in rows})})")
    metrics = bundle_metrics(rows)
    references = {label: m["references"] for label, m in metrics.items() if m.get("references")}
    tables = {s: setting_entries(rs, baseline_label, references) for s, rs in group_rows(rows).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_class = class_metrics(metrics)
    curves = throughput_curves(rows)
    budget = within_budget(tables, budget_ms) if budget_ms is not None else []
    text = "\n".join([markdown(tables, str(results)), *throughput_markdown(curves), *class_markdown(per_class),
                      *verdict_markdown(tables), *findings_markdown(metrics), *budget_markdown(budget)])
    atomic_write_bytes(out / "report.md", text.encode())
    report = {"source": str(results), "baseline_label": baseline_label,
              "pareto_png": pareto_png(tables, out / "pareto.png"),
              "throughput_png": throughput_png(curves, out / "throughput.png"),
              "throughput_vs_batch": [{"setting": t, "label": label, "images_per_s": c}
                                      for (t, label), c in curves.items()],
              "settings": [{**asdict(s), "rows": [asdict(e) for e in es]} for s, es in tables.items()],
              "per_class": per_class, "budget": budget}
    atomic_write_json(out / "report.json", report)
    return report
