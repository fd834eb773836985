"""The ``edgevit`` command line: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import logging

import click

from edgevit.errors import EdgeVitError
from edgevit.methods.registry import discover
from edgevit.options import data_option, json_option, method_command


class Group(click.Group):
    """A click group that turns :class:`EdgeVitError` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeVitError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; finished epochs are checkpointed (re-run with --resume)", err=True)
            ctx.exit(130)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("onnxruntime", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _emit(result: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else text)


def _numbers(value: str | None, kind: type = float) -> list | None:
    """A comma-separated flag value as a list of ``kind`` (None when the flag is not given)."""
    if value is None:
        return None
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise click.BadParameter(f"expected comma-separated {what}, got {value!r}") from None


def classes_option(help: str):
    """``--classes A,B,C``, passed on as a list of class names (None when not given)."""
    return click.option("--classes", help=help, callback=lambda ctx, param, value: value.split(",") if value else None)


class BackendName(click.ParamType):
    """A backend registered in :data:`edgevit.bench.backends.BACKENDS`. The registry is read only when the option
    is parsed or its help shown (it imports torch), so ``edgevit --help`` stays instant; an unknown name is the
    library's one-line error."""

    name = "backend"

    def convert(self, value, param, ctx):
        from edgevit.bench.backends import backend_class

        backend_class(value)
        return value

    def get_metavar(self, param, ctx=None) -> str:
        from edgevit.bench.backends import BACKENDS

        return "[" + "|".join(BACKENDS) + "]"


backend_option = click.option("--backend", type=BackendName(), default="ort", show_default=True,
                              help="Runtime (a registered profiling backend).")


class TrainGroup(Group):
    """``edgevit train``: one command per registered method (:mod:`edgevit.methods.registry`), generated from its
    config when first asked for: the methods import torch, so ``edgevit --help`` does not load them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(discover())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        method = discover().get(name)
        return method_command(method) if method else None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgevit")
def main() -> None:
    """edgevit: attention-centred ViT compression, exported to ONNX Runtime and TensorRT.

    \b
    Example:
      edgevit demo -o demo
    """
    _setup_logging()


@main.group(cls=TrainGroup)
def train() -> None:
    """Train a baseline or apply one of the five methods; each writes a bundle to -o RUN."""


@main.group("inspect", cls=Group)
def inspect_group() -> None:
    """Look inside a bundle: statistics that guide a method's settings."""


@inspect_group.command("burstiness")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@data_option
@classes_option("Classes of DATA to measure on (default: all).")
@click.option("--images", default=100, show_default=True, help="Training images to fit the whitening on "
                                                               "(as many validation images are measured).")
@click.option("--eps", default=0.1, show_default=True, help="Whitening ridge, relative to the mean eigenvalue.")
@click.option("--covariance", type=click.Choice(["tokens", "mean"]), default="tokens", show_default=True)
@json_option
def inspect_burstiness(run, data, classes, images, eps, covariance, as_json):
    """Heavy-tail statistics of X~ = W_q W_k^T X^T per block, before and after ZCA whitening.

    \b
    Example:
      edgevit inspect burstiness runs/base04 --data digits --classes 5,6,7,8,9
    """
    from edgevit.methods.prompts import measure_burstiness

    report = measure_burstiness(run, data, classes, images, eps, covariance)
    lines = [f"{'block':>5} {'kurtosis':>17} {'max/median':>17}"]
    lines += [f"{r['block']:>5} {r['kurtosis_before']:>8.2f} -> {r['kurtosis_after']:<6.2f} "
              f"{r['max_median_before']:>8.1f} -> {r['max_median_after']:<6.1f}" for r in report["blocks"]]
    m = report["mean"]
    lines.append(f" mean {m['kurtosis_before']:>8.2f} -> {m['kurtosis_after']:<6.2f} "
                 f"{m['max_median_before']:>8.1f} -> {m['max_median_after']:<6.1f}   (before -> after whitening)")
    _emit(report, as_json, "\n".join(lines))


# --- export / build / profiles (edgevit.export) ---------------------------------------------------------------

@main.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--profile", "profile_name", required=True,
              help="Export profile name (see `edgevit profiles list`) or a path to a profile YAML.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Export directory to create (must not exist).")
@json_option
def export_cmd(run, profile_name, out, as_json):
    """Export the bundle in RUN for a target: ONNX (+ INT8 Q/DQ), parity check, export.json.

    \b
    Example:
      edgevit export runs/base --profile jetson-orin-nano-int8 -o build/base/orin-int8
    """
    from edgevit.export import export_bundle
    from edgevit.export.gate import describe
    from edgevit.export.runtimes import RUNTIMES

    export = export_bundle(run, profile_name, out)
    p = export["parity"]
    text = (f"wrote {out} ({export['deploy_onnx']}): parity on {p['images']} images max abs diff "
            f"{p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f}")
    precision = export["profile"]["precision"]
    if precision in export:  # the low-precision graph's accuracy, as its runtime computes it (TensorRT: fake quant)
        q = export[precision]
        text += (f"; {q['graph']} top-1 val {q['fp32_val_top1']:.4f} -> {q[f'{precision}_val_top1']:.4f}, "
                 f"test {q['fp32_test_top1']:.4f} -> {q[f'{precision}_test_top1']:.4f} (fp32 -> {precision})"
                 f"\ngate (fails when the interval is above {100 * q['gate']['max_drop']:.1f} points): "
                 f"{describe(q['gate'])}")
    if "precision" in export["graph"]:
        text += f"\nprecision: {export['graph']['precision']['line']}"
    if RUNTIMES[export["profile"]["runtime"]].builds_engine:
        text += f"\nbuild the engine on the target: edgevit build {out}  (or {out}/build_engine.sh)"
    _emit(export, as_json, text)


@main.command("build")
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@json_option
def build_cmd(out, as_json):
    """Build the TensorRT engine of an export directory ON the target GPU (engine.plan + engine.json).

    \b
    Example:
      edgevit build build/base/orin-int8
    """
    from pathlib import Path

    from edgevit.export.artifacts import SCRIPT
    from edgevit.export.tensorrt import build_engine, import_tensorrt

    try:
        import_tensorrt()
    except EdgeVitError:
        raise EdgeVitError(f"tensorrt is not importable here; build on the target with `pip install "
                           f"'edgevit[trt]'` or run {Path(out) / SCRIPT} (the equivalent trtexec command)") from None
    info = build_engine(out)
    _emit(info, as_json, f"wrote {out}/engine.plan: TensorRT {info['trt_version']} on {info['gpu_name']} "
                         f"(sm {info['compute_capability']}) in {info['build_seconds']} s")


@main.group("profiles", cls=Group)
def profiles_group() -> None:
    """List and show export profiles ($EDGEVIT_PROFILES, ./export_profiles, the package's export_profiles/)."""


@profiles_group.command("list")
@json_option
def profiles_list(as_json):
    """List every export profile.

    \b
    Example:
      edgevit profiles list
    """
    from edgevit.export.profiles import list_profiles

    found = list_profiles()
    rows = [{"name": p.name, "target": p.target, "runtime": p.runtime, "precision": p.precision,
             "path": str(path), "description": p.description} for p, path in found]
    _emit({"profiles": rows}, as_json, "\n".join(
        f"{r['name']:26s} {r['target']:18s} {r['runtime']:12s} {r['precision']:5s} {r['description']}" for r in rows))


@profiles_group.command("show")
@click.argument("name")
@json_option
def profiles_show(name, as_json):
    """Show one profile with every default filled in.

    \b
    Example:
      edgevit profiles show jetson-orin-nano-int8
    """
    import yaml

    from edgevit.export.profiles import load_profile

    profile = load_profile(name)
    _emit(profile.model_dump(mode="json"), as_json,
          yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False).rstrip())


# --- profile / report (edgevit.bench) -------------------------------------------------------------------------

@main.command("profile")
@click.argument("artifacts", nargs=-1, required=True)
@backend_option
@click.option("--batch", "batches", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", default=2, show_default=True, type=int, help="CPU threads for every backend.")
@click.option("--warmup", default=10, show_default=True, type=int, help="Untimed iterations first.")
@click.option("--iterations", type=int, help="Exact timed iterations (default: run for --seconds).")
@click.option("--seconds", default=3.0, show_default=True, type=float,
              help="Time budget per row when --iterations is not given (at least 20 iterations).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="torch backend device (default: cuda if any).")
@click.option("--label", "labels", multiple=True, help="Plot label per artifact, in order (default: dir name).")
@click.option("--no-accuracy", is_flag=True, help="Skip top-1 on the test split (latency-only studies).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="results.jsonl to append to.")
@json_option
def profile_cmd(artifacts, backend, batches, threads, warmup, iterations, seconds, device, labels, no_accuracy,
                out, as_json):
    """Measure export directories: one row per (artifact, backend, precision, batch) appended to -o.

    Each row holds p50/p90/p99/mean latency (ms per batch), throughput, peak memory, top-1 on the bundle's
    test split through the same backend and precision, size, parameters, GFLOPs, method and machine.
    Rows measured on a Jetson (trtexec --exportTimes + tegrastats): see `edgevit profile-device`.

    \b
    Example:
      edgevit profile build/base/cpu-fp32 build/skip/cpu-fp32 --backend ort --batch 1,8 -o results.jsonl
    """
    from edgevit.bench.latency import TimingConfig
    from edgevit.bench.profile import ProfileConfig, profile_artifacts
    from edgevit.bench.schema import append_rows

    cfg = ProfileConfig(backend=backend, batches=_numbers(batches, int), threads=threads, device=device,
                        timing=TimingConfig(warmup=warmup, iterations=iterations, seconds=seconds),
                        accuracy=not no_accuracy)
    rows = profile_artifacts(artifacts, cfg, labels=list(labels) or None)
    append_rows(out, rows)
    text = "\n".join(
        f"{r.label:24s} {r.backend:5s} {r.precision:5s} b{r.batch:<3d} p50 {r.latency_ms.p50:9.3f} ms  "
        f"p99 {r.latency_ms.p99:9.3f} ms  {r.throughput_ips:9.1f} img/s  top-1 "
        + (f"{r.top1:.4f}" if r.top1 is not None else "  -   ") for r in rows) + f"\nappended {len(rows)} rows to {out}"
    _emit({"results": out, "rows": [r.model_dump(exclude_none=True) for r in rows]}, as_json, text)


@main.command("profile-device")
@click.option("--trtexec-times", "times", required=True, type=click.Path(dir_okay=False),
              help="trtexec --exportTimes JSON from the device.")
@click.option("--tegrastats", type=click.Path(dir_okay=False), help="tegrastats log recorded during the run.")
@click.option("--artifact", help="The export directory the engine was built from (method, precision, GFLOPs).")
@click.option("--batch", default=1, show_default=True, type=int, help="Images per inference.")
@click.option("--metric", default="latencyMs", show_default=True, type=click.Choice(["latencyMs", "computeMs"]),
              help="latencyMs includes host<->device copies; computeMs is GPU compute only.")
@click.option("--machine", default="jetson", show_default=True, help="Device name, e.g. 'Jetson Orin Nano 8GB'.")
@click.option("--label", help="Plot label (default: the artifact's directory name).")
@click.option("--rail", help="tegrastats rail to average (default: board input VDD_IN / POM_5V_IN).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="results.jsonl to append to.")
@json_option
def profile_device_cmd(times, tegrastats, artifact, batch, metric, machine, label, rail, out, as_json):
    """Turn an on-device trtexec trace (+ tegrastats power log) into a result row appended to -o.

    Latency percentiles come from the per-inference trace, average power from the board input rail, energy
    per image = power / throughput.

    \b
    Example:
      edgevit profile-device --trtexec-times times.json --tegrastats power.log \\
          --artifact build/skip/orin-fp16 --machine "Jetson Orin Nano" -o results.jsonl
    """
    from edgevit.bench.device import profile_device
    from edgevit.bench.schema import append_rows

    row = profile_device(times, artifact, tegrastats, batch, metric, machine, label, rail)
    append_rows(out, [row])
    power = f", {row.power_w:.2f} W, {row.energy_mj_per_image:.2f} mJ/img" if row.power_w is not None else ""
    _emit(row.model_dump(exclude_none=True), as_json,
          f"{row.label}: p50 {row.latency_ms.p50:.3f} ms, {row.throughput_ips:.1f} img/s{power}; appended to {out}")


@main.command("report")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--baseline-label", help="Reference row label in each setting (default: the baseline method).")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True),
              help="Also name the most accurate export whose p50 latency is within this budget.")
@json_option
def report_cmd(results, out, baseline_label, budget_ms, as_json):
    """Write report.md, pareto.png, throughput.png (several --batch sizes) and report.json from a results.jsonl:
    every method against its baseline and its natural references, with a verdict.

    \b
    Example:
      edgevit report results.jsonl -o report/ --budget-ms 1.5
    """
    from edgevit.bench.report import budget_line, build_report

    report = build_report(results, out, baseline_label, budget_ms)
    n = sum(len(s["rows"]) for s in report["settings"])
    _emit(report, as_json, f"wrote {out}/report.md, report.json" + (", pareto.png" if report["pareto_png"] else "")
          + (", throughput.png" if report["throughput_png"] else "")
          + f" ({n} rows in {len(report['settings'])} settings)"
          + "".join(f"\nwithin {budget_ms} ms: {budget_line(c)}" for c in report["budget"]))


# --- demo ----------------------------------------------------------------------------------------------------

@main.command("demo")
@click.option("-o", "--out", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for runs, exports, results and the report.")
def demo_cmd(out):
    """The whole pipeline on the embedded digits, offline: train the baseline and the five methods, export
    each for the CPU (fp32, int8) and the Jetson Orin Nano (int8), profile, report. Re-running skips
    finished steps and resumes an interrupted one.

    \b
    Example:
      edgevit demo -o demo
    """
    from edgevit.demo import run_demo

    report = run_demo(out)
    click.echo(f"report: {report / 'report.md'} and {report / 'pareto.png'}")


# --- doctor --------------------------------------------------------------------------------------------------

@main.command("doctor")
@json_option
def doctor_cmd(as_json):
    """What this machine has (torch + CUDA, ONNX Runtime providers, TensorRT, ModelOpt, a Jetson?) and, for
    every profile, whether it can export here and whether its engine can be built here (and why not).

    \b
    Example:
      edgevit doctor --json
    """
    from edgevit.doctor import diagnose, format_report

    report = diagnose()
    _emit(report, as_json, format_report(report))


# --- predict -------------------------------------------------------------------------------------------------

@main.command("predict")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True)
@backend_option
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="Classes shown per image.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write one row per image here.")
@click.option("--threads", default=1, show_default=True, type=int, help="CPU threads of the runtime.")
@json_option
def predict_cmd(out, images, backend, top_k, csv_path, threads, as_json):
    """Classify IMAGES (files, folders, globs) with the export in OUT, preprocessed as its export.json says.

    Folders of class sub-folders (named like the export's classes) are also scored: top-1, per-class
    accuracy and a confusion matrix.

    \b
    Example:
      edgevit predict build/base/orin-int8 /data/line3/test --backend trt --csv predictions.csv
    """
    from edgevit.predict import format_result, predict_files, write_csv

    result = predict_files(out, images, backend, top_k, threads)
    if csv_path:
        write_csv(result, csv_path)
    _emit(result, as_json, format_result(result) + (f"\nwrote {csv_path}" if csv_path else ""))
