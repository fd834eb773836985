"""The skip-pruning sweep: top-1 and ONNX Runtime latency of every (ratio, selection), before and after healing.

Built from public pieces only: each configuration is pruned by :func:`~edgevit.methods.skip.train_skip` (once
without healing, once with), every resulting bundle is exported by :func:`~edgevit.export.export_bundle` (so
each measured graph passed the export's parity check) and measured by
:func:`~edgevit.bench.profile.profile_artifacts`; a row is the profiler's row with the sweep's label and
settings. The sweep directory holds::

    sweep.jsonl                    one ResultRow per measured configuration
    baseline/                      the bundle pointed at the sweep's data, nothing removed
    <select>-<k>of<n>/             the healed bundle of a configuration
    <select>-<k>of<n>-unhealed/    the same pruning before healing
    exports/<bundle folder>/       the export directory that was profiled
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from edgevit.bench.latency import TimingConfig
from edgevit.bench.profile import ProfileConfig, profile_artifacts
from edgevit.bench.schema import ResultRow, append_rows, read_rows
from edgevit.export import EXPORT_JSON, export_bundle
from edgevit.methods.skip import SELECTIONS, SkipConfig, candidate_blocks, count_to_drop, prepare_skip, train_skip
from edgevit.train import TrainConfig
from edgevit.train.run import check_run_dir
from edgevit.vit import attention_blocks
from edgevit.vit.bundle import META, read_meta

log = logging.getLogger("edgevit")

SWEEP_RATIOS = (0.0, 1 / 6, 1 / 3, 1 / 2)
SWEEP_FILE = "sweep.jsonl"
SWEEP_TIMING = TimingConfig(seconds=2.0)
# fp32 ONNX for ONNX Runtime on the CPU: the sweep compares graphs, not precisions.
SWEEP_PROFILE = "cpu-ort-fp32"
EXPORTS = "exports"
SOURCE = "edgevit train skip --sweep"


def ratio_label(k: int, total: int) -> str:
    """``2 of 6`` -> ``1/3``."""
    return str(Fraction(k, total)) if total else "0"


def row_label(select: str, k: int, total: int, healed: bool) -> str:
    """``baseline`` (nothing removed, not healed), else ``skip <select> <ratio>[ healed]``."""
    if k == 0 and not healed:
        return "baseline"
    return f"skip {select} {ratio_label(k, total)}" + (" healed" if healed else "")


def run_name(select: str, k: int, total: int, healed: bool) -> str:
    """The folder of a configuration's bundle in the sweep directory."""
    if k == 0 and not healed:
        return "baseline"
    return f"{select}-{k}of{total}" + ("" if healed else "-unhealed")


def sweep_skip(
        model_dir: str | Path,
        data: str,
        out: str | Path,
        train_cfg: TrainConfig,
        ratios: Sequence[float] = SWEEP_RATIOS,
        selects: Sequence[str] = SELECTIONS,
        calib: int = 64,
        distill: float = 0.5,
        threads: int = 2,
        timing: TimingConfig = SWEEP_TIMING,
        resume: bool = False,
        profile: str = SWEEP_PROFILE,
) -> Path:
    """For each ratio and selection strategy: prune, measure, heal, measure; rows go to ``out/sweep.jsonl``.

    The unpruned model is one ``baseline`` row; ratio 0 healed (fine-tuning alone) is a ``skip none 0
    healed`` control; every other configuration gives a ``skip <select> <ratio>`` row before healing and a
    ``... healed`` row after. A resumed sweep skips the rows already written and reuses finished bundles and
    exports.

    Args:
        model_dir: the bundle to prune.
        data: its data source.
        out: the sweep directory.
        train_cfg: the healing fine-tune of every configuration (``epochs=0``: before-healing rows only).
        ratios: fractions of attention sub-layers to remove (rounded to whole blocks; duplicates merged).
        selects: the strategies to compare.
        calib: calibration images for the cosine scores.
        distill: the healing loss's distillation weight (see :class:`~edgevit.methods.skip.SkipConfig`).
        threads: ONNX Runtime intra-op threads for latency.
        timing: warm-up and iterations of each latency measurement.
        resume: continue a killed sweep in ``out``.
        profile: the export profile every bundle is exported with.

    Returns:
        The path of ``sweep.jsonl``.
    """
    for select in selects:  # refuse a bad strategy, calibration or weight before anything runs
        SkipConfig(select=select, calib=calib, distill=distill)
    model, _ = prepare_skip(model_dir, data)  # the bundle loads and ``data`` holds its classes
    started = resume and (Path(out) / SWEEP_FILE).exists()
    out = Path(out) if started else check_run_dir(out, resume)
    results = out / SWEEP_FILE
    done = {r.label for r in read_rows(results)} if started else set()
    profiling = ProfileConfig("ort", (1,), threads=threads, timing=timing)
    for select, k, total in _configurations(model, ratios, selects):
        # ratio 0 selects nothing whatever the strategy; "none" only names that control.
        cfg = SkipConfig(select="cosine" if select == "none" else select, ratio=k / total, calib=calib,
                         distill=distill)
        for healed in (False, True) if train_cfg.epochs > 0 else (False,):
            if row_label(select, k, total, healed) not in done:
                append_rows(results, [_row(model_dir, data, out, cfg, train_cfg, (select, k, total, healed), profile,
                                           profiling, resume)])
    return results


def _configurations(model: VisionTransformer, ratios: Sequence[float],
                    selects: Sequence[str]) -> list[tuple[str, int, int]]:
    """(strategy, sub-layers removed, of) for each ratio and strategy that ``model`` has enough candidate blocks
    for: ``none`` for ratio 0 (the fine-tuning control), then every strategy per nonzero count."""
    total = len(attention_blocks(model))
    counts = sorted({count_to_drop(r, total) for r in ratios})
    groups = ([("none", 0)] if 0 in counts else []) + [(s, k) for k in counts if k > 0 for s in selects]
    for select, k in groups:
        if k > len(candidate_blocks(model, select)):
            log.warning("sweep: skipping %s: only %d candidate blocks", row_label(select, k, total, False),
                        len(candidate_blocks(model, select)))
    return [(s, k, total) for s, k in groups if k <= len(candidate_blocks(model, s))]


def _row(model_dir: str | Path, data: str, out: Path, cfg: SkipConfig, train_cfg: TrainConfig,
         where: tuple[str, int, int, bool], profile: str, profiling: ProfileConfig, resume: bool) -> ResultRow:
    """Prune (and heal) one configuration ``where`` = (select, removed, of, healed), export and profile it."""
    select, k, total, healed = where
    run_dir = out / run_name(select, k, total, healed)
    _prune(model_dir, data, run_dir, cfg, train_cfg if healed else replace(train_cfg, epochs=0), resume)
    settings = {"select": select, "ratio": round(k / total, 4), "removed": k, "of": total,
                "blocks": read_meta(run_dir).metrics["removed_blocks"], "healed": healed,
                "heal_epochs": train_cfg.epochs if healed else 0, "distill": cfg.distill if healed else None}
    label = row_label(select, k, total, healed)
    row = _profile(run_dir, out / EXPORTS / run_dir.name, profile, profiling)
    return row.model_copy(update={"label": label, "method": "baseline" if label == "baseline" else "skip",
                                  "settings": settings, "source": SOURCE})


def _prune(model_dir: str | Path, data: str, run_dir: Path, cfg: SkipConfig, train_cfg: TrainConfig,
           resume: bool) -> None:
    """``train_skip`` into ``run_dir``, unless a resumed sweep finds its bundle finished there."""
    if resume and (run_dir / META).is_file():
        return
    # The same strategy, ratio, calibration and seed in every run: each picks the same blocks.
    train_skip(model_dir, data, run_dir, cfg, train_cfg, resume=resume and any(run_dir.glob("*")))


def _profile(bundle_dir: Path, export_dir: Path, profile: str, cfg: ProfileConfig) -> ResultRow:
    """Export ``bundle_dir`` (unless a resumed sweep finds the export finished) and profile it."""
    if not (export_dir / EXPORT_JSON).is_file():
        export_bundle(bundle_dir, profile, export_dir)
    return profile_artifacts([export_dir], cfg, show_progress=False)[0]
