"""edgevit report: tables with speed-up / accuracy change against the baseline, the Pareto plot, JSON."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from edgevit.bench.report import build_report, pareto_front
from edgevit.bench.schema import Latency, ResultRow, append_rows
from edgevit.cli import main

CPU = {"cpu": "AMD EPYC", "device": "AMD EPYC", "threads": 2}
# (label, method, top-1, p50 ms at batch 1): a synthetic but plausible sweep of all six methods.
POINTS = [("base", "baseline", 0.970, 4.0), ("distilled", "transfer", 0.955, 2.1),
          ("skip 1/3", "skip", 0.962, 2.9), ("skip 1/2", "skip", 0.931, 2.2),
          ("continual", "continual", 0.940, 4.1), ("movit 64", "memory", 0.965, 3.4),
          ("bpt 8", "prompts", 0.968, 4.4)]


def _row(label, method, top1, p50, batch=1, backend="ort", machine=CPU, **extra) -> ResultRow:
    lat = Latency(p50=p50 * batch, p90=p50 * batch * 1.1, p99=p50 * batch * 1.3, mean=p50 * batch * 1.02,
                  iterations=200)
    return ResultRow(artifact=f"build/{label}", method=method, label=label, backend=backend, precision="fp32",
                     batch=batch, latency_ms=lat, throughput_ips=1e3 / (p50 * 1.02), top1=top1, top1_split="test",
                     gflops=0.1, params=680_000, artifact_mb=2.7, threads=2, machine=machine, **extra)


@pytest.fixture()
def results(tmp_path):
    rows = [_row(*p) for p in POINTS] + [_row(*p, batch=8) for p in POINTS]
    rows.append(ResultRow(artifact="times.json", method="skip", label="skip 1/3", backend="trtexec",
                          precision="fp16", batch=1, latency_ms=Latency(p50=0.8, p90=0.9, p99=1.0, mean=0.85,
                                                                         iterations=500),
                          throughput_ips=1176.0, power_w=7.5, energy_mj_per_image=6.4,
                          machine={"device": "Jetson Orin Nano"}, source="trtexec --exportTimes + tegrastats"))
    path = tmp_path / "results.jsonl"
    append_rows(path, rows)
    return path


def test_pareto_front():
    assert pareto_front([(1, 0.9), (2, 0.95), (3, 0.94), (2, 0.95), (0.5, 0.5)]) == [True, True, False, True, True]


def test_report_tables_plot_and_json(results, tmp_path):
    report = build_report(results, tmp_path / "report")
    settings = {(s["machine"], s["backend"], s["batch"]): s for s in report["settings"]}
    assert [s["threads"] for s in report["settings"]] == [2, 2, None]
    assert set(settings) == {("AMD EPYC", "ort", 1), ("AMD EPYC", "ort", 8), ("Jetson Orin Nano", "trtexec", 1)}
    rows = {r["label"]: r for r in settings["AMD EPYC", "ort", 1]["rows"]}
    assert rows["base"]["baseline"] and rows["base"]["speedup"] == pytest.approx(1.0)
    assert rows["distilled"]["speedup"] == pytest.approx(4.0 / 2.1, rel=1e-3)
    assert rows["skip 1/3"]["delta_top1_pp"] == pytest.approx(-0.8)
    assert [r["label"] for r in settings["AMD EPYC", "ort", 1]["rows"]][0] == "distilled"  # sorted by p50
    front = {label for label, r in rows.items() if r["pareto"]}
    assert front == {"distilled", "skip 1/3", "movit 64", "base"}  # skip 1/2, continual and bpt 8 are dominated
    device = settings["Jetson Orin Nano", "trtexec", 1]["rows"][0]
    assert device["top1"] is None and device["speedup"] is None and device["energy_mj_per_image"] == 6.4

    md = (tmp_path / "report" / "report.md").read_text()
    for label, *_ in POINTS:
        assert label in md
    assert "| ★ | distilled | transfer | 95.50% | -1.50 | 2.100 | 2.730 | 1.91× |" in md
    assert "No baseline row in this setting" in md  # the device setting has no baseline
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == json.loads(json.dumps(report))
    with Image.open(tmp_path / "report" / "pareto.png") as png:
        assert png.size[0] >= 1600 and png.size[1] >= 700  # two panels, slide resolution


def test_throughput_vs_batch_plot_and_table(tmp_path):
    rows = [_row("base", "baseline", 0.97, 4.0 / b**0.5, batch=b) for b in (1, 2, 4, 8, 16, 32)]
    rows += [_row("skip 1/3", "skip", 0.96, 3.0 / b**0.5, batch=b) for b in (1, 8)]
    rows.append(_row("once", "memory", 0.95, 3.5))  # one batch size: no curve
    append_rows(tmp_path / "results.jsonl", rows)
    report = build_report(tmp_path / "results.jsonl", tmp_path / "report")
    curves = {c["label"]: c["images_per_s"] for c in report["throughput_vs_batch"]}
    assert report["throughput_png"] and set(curves) == {"base", "skip 1/3"}
    assert list(curves["base"]) == [1, 2, 4, 8, 16, 32] and curves["base"][32] > curves["base"][1]
    assert curves["skip 1/3"][8] == pytest.approx(rows[7].throughput_ips)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Throughput vs batch (images/s)" in md and "| batch 1 | batch 2 | batch 4 | batch 8 |" in md
    with Image.open(tmp_path / "report" / "throughput.png") as png:
        assert png.size[0] >= 900


def test_report_baseline_label(results, tmp_path):
    report = build_report(results, tmp_path / "r", baseline_label="skip 1/3")
    rows = {r["label"]: r for r in report["settings"][0]["rows"]}
    assert rows["skip 1/3"]["baseline"] and rows["base"]["speedup"] == pytest.approx(2.9 / 4.0, rel=1e-3)


@pytest.mark.parametrize("case", ["missing", "garbage", "label"])
def test_report_bad_input_exit_2(case, results, tmp_path):
    args = {"missing": [str(tmp_path / "none.jsonl")],
            "garbage": [str(tmp_path / "bad.jsonl")],
            "label": [str(results), "--baseline-label", "nope"]}[case]
    (tmp_path / "bad.jsonl").write_text('{"not": "a row"}\n')
    result = CliRunner().invoke(main, ["report", *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_cli_report(results, tmp_path):
    result = CliRunner().invoke(main, ["report", str(results), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "pareto.png" in result.stdout and (tmp_path / "rep" / "pareto.png").stat().st_size > 20_000


def test_rows_of_different_tasks_are_never_compared():
    from edgevit.bench.report import group_rows
    from edgevit.bench.schema import Latency, ResultRow

    def row(label, method, task):
        return ResultRow(artifact=label, method=method, label=label, backend="ort", precision="fp32", batch=1,
                         threads=1, task=task, top1=0.9, latency_ms=Latency(p50=1, p90=1, p99=1, mean=1, iterations=20))

    groups = group_rows([row("base", "baseline", "digits"), row("skip", "skip", "digits"),
                         row("data", "continual", "digits[5,6,7,8,9]")])
    assert sorted(len(rows) for rows in groups.values()) == [1, 2]
    assert {s.task for s in groups} == {"digits", "digits[5,6,7,8,9]"}
    assert any(s.title().endswith("digits[5,6,7,8,9]") for s in groups)


def _entry(top1, speedup=None, **references):
    from edgevit.bench.report import Entry

    return Entry(label="m", method="prompts", top1=top1, p50_ms=1.0, p99_ms=None, throughput_ips=None, gflops=None,
                 params=None, artifact_mb=None, peak_memory_mb=None, energy_mj_per_image=None, speedup=speedup,
                 references={name: {"test_top1": t, "graph": g, **({"bound": b[0]} if b else {})}
                             for name, (t, g, *b) in references.items()})


@pytest.mark.parametrize(("entry", "expected"), [
    (_entry(0.90, probe=(0.903, "source")), ("pays", "probe", -0.3)),  # within the tolerance, same graph
    (_entry(0.80, probe=(0.90, "source")), ("does not pay here", "probe", -10.0)),
    (_entry(0.95, 2.0, teacher=(0.97, "source")), ("costs", "teacher", -2.0)),  # 2x faster for 2 points
    (_entry(0.966, 0.9, plain=(0.969, "source")), ("does not pay here", "plain", -0.3)),  # slower, no gain
    (_entry(0.98, 0.9, plain=(0.96, "source")), ("costs", "plain", 2.0)),  # slower, more accurate
    (_entry(0.90, 0.5, probe=(0.95, "same"), full=(0.80, "same")), ("does not pay here", "probe", -5.0)),
    # a continual learner: judged against its lower bound, not what trains on every task at once, unless alone
    (_entry(0.66, 1.0, sequential=(0.48, "source", "lower"), joint=(0.95, "source", "upper")),
     ("pays", "sequential", 18.0)),
    (_entry(0.66, 1.0, probe=(0.90, "source", "upper")), ("does not pay here", "probe", -24.0)),
])
def test_verdict_against_the_most_accurate_reference(entry, expected):
    from edgevit.bench.report import verdict

    word, name, gap, _ = verdict(entry)
    assert (word, name) == expected[:2] and gap == pytest.approx(expected[2])


def test_budget_names_the_most_accurate_row_within_it(results, tmp_path):
    out = CliRunner().invoke(main, ["report", str(results), "-o", str(tmp_path / "r"), "--budget-ms", "3.0"])
    assert out.exit_code == 0, out.output
    assert "within 3.0 ms: AMD EPYC: skip 1/3, ort fp32, batch 1, 2 CPU threads: top-1 96.20% at 2.900 ms" in out.output
    budget = json.loads((tmp_path / "r" / "report.json").read_text())["budget"]
    assert [(b["machine"], b["best"] and b["best"]["label"]) for b in budget] == [
        ("AMD EPYC", "skip 1/3"), ("Jetson Orin Nano", None)]  # the device rows have no top-1
    assert "## Most accurate within 3.0 ms" in (tmp_path / "r" / "report.md").read_text()


def test_findings_are_listed_under_their_label():
    from edgevit.bench.report import findings_markdown

    metrics = {"MoViT": {"findings": ["the memory gate stayed at its initial 0.27"]}, "baseline": {"test_top1": 0.9}}
    assert findings_markdown(metrics) == ["## Findings", "", "- **MoViT**: the memory gate stayed at its initial 0.27",
                                          ""]
    assert findings_markdown({"baseline": {"test_top1": 0.9}}) == []


def test_verdict_row_lists_the_other_references():
    from edgevit.bench.report import Setting, verdict_markdown

    entry = _entry(0.66, 1.0, frozen=(0.65, "source"), sequential=(0.48, "source", "lower"),
                   joint=(0.95, "source", "upper"))
    row = next(line for line in verdict_markdown({Setting("cpu", "ort", "fp32", 1): [entry]}) if line.startswith("| m"))
    assert "| frozen 65.00%; lower bound sequential 48.00%; upper bound joint 95.00% | +1.00 |" in row
    assert row.endswith("| **pays** |")


def test_runs_of_one_label_are_one_row_with_their_seed_spread():
    """Three seeds of a method, profiled under one label: one row, the mean top-1 at the median latency, and the
    verdict table gives the spread."""
    from edgevit.bench.report import Setting, merge_seeds, setting_entries, verdict_markdown
    from edgevit.bench.schema import Latency, ResultRow

    def row(artifact, top1, p50):
        return ResultRow(artifact=artifact, method="prompts", label="BPT", backend="ort", precision="fp32", batch=1,
                         top1=top1, latency_ms=Latency(p50=p50, p90=p50, p99=p50, mean=p50, iterations=20))

    rows = [row("s0", 0.86, 1.2), row("s1", 0.90, 1.0), row("s2", 0.91, 1.1), row("other", 0.5, 9.0)]
    rows[3].label = "probe only"
    merged, seeds = merge_seeds(rows)
    assert [(r.artifact, r.top1) for r in merged] == [("s2", pytest.approx(0.89)), ("other", 0.5)]
    assert seeds == {"BPT": [0.90, 0.91, 0.86]}
    entries = setting_entries(rows, references={"BPT": {"linear probe": {"test_top1": 0.88, "graph": "source"}}})
    line = next(x for x in verdict_markdown({Setting("cpu", "ort", "fp32", 1): entries}) if x.startswith("| BPT"))
    assert "| 89.00% (mean of 3 runs, spread 5.00) | linear probe 88.00% | +1.00 |" in line


def test_references_of_several_runs_are_averaged():
    from edgevit.bench.report import mean_references

    runs = [{"references": {"probe": {"test_top1": 0.8, "graph": "source"}, "only here": {"test_top1": 0.1}}},
            {"references": {"probe": {"test_top1": 0.9, "graph": "source"}}}]
    assert mean_references(runs) == {"references": {"probe": {"test_top1": pytest.approx(0.85), "graph": "source"}}}
    assert mean_references(runs[:1]) == {}
