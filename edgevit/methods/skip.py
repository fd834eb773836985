"""Skip-pruned graphs: attention sub-layers removed, MLPs kept.

Paper vs ours:

* [paper: Tyukin et al., arXiv 2407.15516] drop the attention sub-layers (keep the MLPs) of the deeper
  layers at inference, always keeping the final layer: strategy ``last``.
* [paper: He et al., arXiv 2406.15786, code CASE-Lab-UMD/LLM-Drop] score each attention sub-layer on
  calibration data by ``mean_tokens cos(X, X + Attn(LN(X)))`` and drop the ``k`` most similar ones (the
  sub-layers that change their input least): strategy ``cosine``. The scores are taken once, on the
  unpruned model.
* [ours] ``random`` (seeded) is the control; ``cosine`` and ``random`` may pick any block (MLP Can Be A
  Good Transformer Learner finds early ViT layers the removable ones), ``last`` never drops the final block.
  An optional healing fine-tune of every remaining weight runs in the shared training loop, by default
  partly distilled from the unpruned model (``distill``: the weight of ``KL(teacher || student)`` against
  cross-entropy), which keeps a barely pruned model where it was instead of restarting its optimisation.
* [ours] ``cosine-pooled``: the same score averaged only over the tokens the classifier reads (the class
  token, or the patch tokens under average pooling). An LLM has no class token; in a ViT the mean over
  all tokens is dominated by patch tokens and can miss a sub-layer that is the class token's main input:
  on the digits baseline block 0 scores 0.970 over all tokens (second most removable) but 0.31 on the
  class token, and removing it alone drops test top-1 from 96.9% to 24.8%.

Here ``X`` is the block input and ``Attn(LN(X))`` the residual branch as the block adds it (after
LayerScale), so the score measures exactly what removing the branch changes. The deployable result is a
bundle whose surgery list gains ``{"op": "skip_attention", "blocks": [...]}``: the graph physically lacks
those blocks' norm1, qkv, proj and LayerScale.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import Dataset

from edgevit.data import calibration_batch, data_ref, load_split
from edgevit.errors import EdgeVitError
from edgevit.methods.registry import MethodConfig, Source, bundle_report, register
from edgevit.settings import setting
from edgevit.train import TrainConfig, TrainResult, fit, is_main_process
from edgevit.train.loop import LossFn
from edgevit.train.run import check_run_dir, finish_run, source_reference, split_metrics
from edgevit.vit import BundleMeta, apply_surgery, attention_blocks, load_bundle, read_meta
from edgevit.vit.bundle import atomic_write_json
from edgevit.vit.model import capture_attention_branches, num_blocks, pooled_tokens

log = logging.getLogger("edgevit")

Strategy = Literal["cosine", "cosine-pooled", "last", "random"]
SELECTIONS: tuple[str, ...] = get_args(Strategy)
# cosine-pooled, not the papers' all-token cosine: on ViTs the first block's attention barely moves the patch
# tokens yet is what fills the class token the head reads (see the module docstring).
DEFAULT_SELECT = "cosine-pooled"
# Which similarity score each score-based selection ranks by.
SCORED = {"cosine": "all", "cosine-pooled": "pooled"}
DEFAULT_RATIO = 1 / 3
SELECTION_FILE = "selection.json"


@dataclass
class SkipConfig(MethodConfig):
    """Remove attention sub-layers (LayerNorm, qkv, proj, LayerScale) from a bundle, then heal it (the
    optimisation settings are the healing fine-tune's; --heal-epochs 0: remove only).

    \b
    Examples:
      edgevit train skip --model runs/base --data digits -o runs/skip --ratio 1/3 --select cosine-pooled
      edgevit train skip --model runs/base --data digits -o runs/skip-sweep --sweep --heal-epochs 3
      edgevit report runs/skip-sweep/sweep.jsonl -o report/skip
    """

    training: ClassVar[dict] = {"epochs": 5, "lr": 2e-4, "warmup_epochs": 0.5}  # the healing fine-tune
    flags: ClassVar[dict] = {"epochs": "--heal-epochs"}

    select: Strategy | None = setting(None, "cosine: least-change sub-layers on calibration images (mean over all "
                                            "tokens); cosine-pooled: the same over the tokens the head pools (class "
                                            "token); last: deepest, final block kept; random: seeded control. "
                                            "Default cosine-pooled; with --sweep, limits the sweep to one strategy.")
    ratio: float | None = setting(None, "Fraction of attention sub-layers to remove, e.g. 1/3 (default 1/3).")
    blocks: list[int] | None = setting(None, "Remove exactly these blocks' attention, e.g. 3,7 (instead of "
                                             "--ratio/--select).")
    calib: int = setting(64, "Class-balanced training images the cosine scores are measured on.")
    distill: float = setting(0.5, "Healing loss: (1 - W) * cross-entropy + W * KL(unpruned model || pruned model).")
    sweep: bool = setting(False, "Ratios 0, 1/6, 1/3, 1/2 x every strategy, before/after healing, with ORT CPU "
                                 "latency: result rows in OUT/sweep.jsonl.")
    threads: int = setting(2, "--sweep: ORT CPU threads for latency.")

    def check(self) -> None:
        if self.ratio is not None and self.blocks is not None:
            raise EdgeVitError("give either --ratio or --blocks, not both")
        if self.sweep and (self.ratio is not None or self.blocks is not None):
            raise EdgeVitError("--sweep runs its own ratios; drop --ratio/--blocks")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise EdgeVitError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.calib < 1:
            raise EdgeVitError(f"--calib must be positive, got {self.calib}")
        if not 0 <= self.distill <= 1:
            raise EdgeVitError(f"--distill must be in [0, 1], got {self.distill}")

    @property
    def strategy(self) -> str:
        """How the blocks are chosen: ``select``, or cosine-pooled when not given."""
        return self.select or DEFAULT_SELECT


Scores = dict[str, dict[int, float]]


@torch.no_grad()
def attention_similarity(model: VisionTransformer, images: torch.Tensor, batch_size: int = 64) -> Scores:
    """He et al.'s score of every attention sub-layer: ``cos(X, X + ls1(attn(norm1(X))))`` per token,
    averaged over images and over all tokens (``"all"``) or over the pooled tokens only (``"pooled"``),
    in eval mode and fp32. High = the sub-layer changes its input little.

    Args:
        model: the unpruned (or partly pruned) model; blocks without attention get no score.
        images: calibration images, ``n x C x H x W``.
        batch_size: images per forward pass.

    Returns:
        ``{"all": {block: score}, "pooled": {block: score}}``.
    """
    blocks = attention_blocks(model)
    pooled = pooled_tokens(model)
    sums = {mode: dict.fromkeys(blocks, 0.0) for mode in ("all", "pooled")}
    counts = {mode: dict.fromkeys(blocks, 0) for mode in ("all", "pooled")}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with capture_attention_branches(model, blocks) as captured:
            for batch in images.split(batch_size):
                model(batch.to(device))
                for b, (x, branch) in captured.items():
                    cos = F.cosine_similarity(x, x + branch, dim=-1)  # images x tokens
                    for mode, part in (("all", cos), ("pooled", cos[:, pooled])):
                        sums[mode][b] += part.sum().item()
                        counts[mode][b] += part.numel()
    finally:
        model.train(was_training)
    return {mode: {b: sums[mode][b] / max(1, counts[mode][b]) for b in blocks} for mode in sums}


def count_to_drop(ratio: float, available: int) -> int:
    """Whole sub-layers a ``ratio`` of ``available`` attention sub-layers means (rounded to nearest)."""
    return round(ratio * available)


def candidate_blocks(model: VisionTransformer, select: str) -> list[int]:
    """The blocks ``select`` may remove the attention of: every block that still has it, except the final
    block under ``last``."""
    candidates = attention_blocks(model)
    if select == "last":
        candidates = [b for b in candidates if b != num_blocks(model) - 1]
    return candidates


def select_blocks(model: VisionTransformer, select: str, k: int, scores: Scores | None = None,
                  seed: int = 0) -> list[int]:
    """The ``k`` blocks whose attention sub-layer to remove, ascending.

    Args:
        model: the model to prune.
        select: ``cosine`` / ``cosine-pooled`` (highest all-token / pooled-token score), ``last``
            (deepest, never the final block) or ``random``.
        k: how many.
        scores: :func:`attention_similarity` of ``model`` (the cosine selections only).
        seed: ``random``'s seed.
    """
    candidates = candidate_blocks(model, select)
    if not 0 <= k <= len(candidates):
        raise EdgeVitError(f"cannot drop {k} attention sub-layers with {select!r}: only {len(candidates)} "
                           f"candidate blocks")
    if select in SCORED:
        if scores is None:
            raise ValueError(f"{select} selection needs the similarity scores")
        score = scores[SCORED[select]]
        chosen = sorted(candidates, key=lambda b: (-score[b], b))[:k]
    elif select == "last":
        chosen = candidates[len(candidates) - k:]
    elif select == "random":
        chosen = random.Random(seed).sample(candidates, k)
    else:
        raise EdgeVitError(f"unknown selection {select!r} ({', '.join(SELECTIONS)})")
    return sorted(chosen)


def check_blocks(model: VisionTransformer, blocks: Sequence[int]) -> list[int]:
    """``blocks`` as ascending non-negative indices of blocks that still have attention."""
    depth = num_blocks(model)
    out = []
    for b in blocks:
        if not -depth <= b < depth:
            raise EdgeVitError(f"block {b} does not exist (the model has {depth} blocks)")
        out.append(b % depth)
    if len(set(out)) != len(out):
        raise EdgeVitError(f"--blocks lists a block twice: {list(blocks)}")
    missing = sorted(set(out) - set(attention_blocks(model)))
    if missing:
        raise EdgeVitError(f"blocks {missing} have no attention sub-layer left to remove")
    return sorted(out)


def skip_op(blocks: Sequence[int]) -> list[dict]:
    """The surgery ops that remove ``blocks``' attention (none for an empty list)."""
    return [{"op": "skip_attention", "blocks": list(blocks)}] if blocks else []


def skipped(model: VisionTransformer, blocks: Sequence[int]) -> VisionTransformer:
    """A deep copy of ``model`` without the attention sub-layers of ``blocks`` (``model`` is left whole)."""
    return apply_surgery(copy.deepcopy(model), skip_op(blocks))


@dataclass
class Selection:
    """Which blocks lose their attention and why (kept in the run dir so a resumed run reuses it)."""

    select: str
    blocks: list[int]
    scores: Scores
    calibration: dict


def choose(model: VisionTransformer, cfg: SkipConfig, train_set: Dataset, seed: int) -> Selection:
    """Score ``model``'s attention sub-layers on calibration images and pick the blocks ``cfg`` asks for."""
    n = min(cfg.calib, len(train_set))
    scores = attention_similarity(model, calibration_batch(train_set, n, seed))
    calibration = {"images": n, "split": "train", "seed": seed, "class_balanced": True}
    if cfg.blocks is not None:
        return Selection("manual", check_blocks(model, cfg.blocks), scores, calibration)
    ratio = DEFAULT_RATIO if cfg.ratio is None else cfg.ratio
    k = count_to_drop(ratio, len(attention_blocks(model)))
    return Selection(cfg.strategy, select_blocks(model, cfg.strategy, k, scores, seed), scores, calibration)


def _load_selection(path: Path) -> Selection:
    raw = json.loads(path.read_text())
    raw["scores"] = {mode: {int(b): s for b, s in score.items()} for mode, score in raw["scores"].items()}
    return Selection(**raw)


def heal_loss(teacher: VisionTransformer, distill: float, label_smoothing: float) -> LossFn:
    """``loss_fn`` for :func:`edgevit.train.fit`: ``(1 - distill) * CE + distill * KL(teacher || student)``.

    The teacher (the unpruned model, frozen, eval mode) lives outside the trained module: it is the
    bundle the run started from, so the checkpoint need not carry it.
    """
    teacher.eval().requires_grad_(False)

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if distill == 0:
            return loss, logits
        with torch.no_grad():
            target = teacher.to(images.device)(images).float().log_softmax(-1)
        kl = F.kl_div(logits.float().log_softmax(-1), target, log_target=True, reduction="batchmean")
        return (1 - distill) * loss + distill * kl, logits

    return loss_fn


def _rounded(scores: dict[int, float]) -> dict[str, float]:
    return {str(b): round(s, 6) for b, s in scores.items()}


def prepare_skip(model_dir: str | Path, data: str) -> tuple[VisionTransformer, BundleMeta]:
    """The bundle in ``model_dir`` with its metadata pointed at ``data`` (which must hold its classes)."""
    model, meta = load_bundle(model_dir)
    meta = meta.model_copy(deep=True)
    meta.data = data_ref(data, meta.classes)
    return model, meta


def chosen_blocks(model: VisionTransformer, cfg: SkipConfig, train_set: Dataset, out: Path, resume: bool,
                  seed: int) -> Selection:
    """The blocks to remove: those a resumed run recorded in ``out``, else :func:`choose`'s, recorded there."""
    path = out / SELECTION_FILE
    if resume and path.exists():
        return _load_selection(path)
    chosen = choose(model, cfg, train_set, seed)
    if is_main_process():
        atomic_write_json(path, asdict(chosen))
    return chosen


def heal(model: VisionTransformer, teacher: VisionTransformer | None, meta: BundleMeta, data: str, out: Path,
         cfg: SkipConfig, train_cfg: TrainConfig, resume: bool) -> TrainResult:
    """The healing fine-tune of every remaining weight, partly distilled from the unpruned ``teacher``."""
    pre, classes = meta.preprocessing, meta.classes
    loss_fn = heal_loss(teacher, cfg.distill, train_cfg.label_smoothing) if teacher else None
    return fit(model, load_split(data, "train", pre, classes, augment=train_cfg.augment), train_cfg, out,
               loss_fn=loss_fn, val_set=load_split(data, "val", pre, classes), resume=resume, description="skip heal")


def skip_report(out: Path, cfg: SkipConfig) -> tuple[dict, str]:
    """The bundle's top-1s, or a sweep's rows."""
    if not cfg.sweep:
        return bundle_report(out, cfg)
    from edgevit.bench.schema import read_rows
    from edgevit.studies.skip_sweep import SWEEP_FILE

    rows = read_rows(out / SWEEP_FILE)
    text = "\n".join(f"{r.label:28s} top-1 {r.top1:.4f}  p50 {r.latency_ms.p50:8.3f} ms  blocks "
                     f"{r.settings['blocks']}" for r in rows) + f"\nwrote {out / SWEEP_FILE}"
    return {"results": str(out / SWEEP_FILE), "rows": [r.model_dump(exclude_none=True) for r in rows]}, text


@register("skip", SkipConfig, own_loss=True, report=skip_report,
          source=Source("--model", "The bundle to prune (a run directory)."))
def train_skip(source: str | Path, data: str, out: Path, cfg: SkipConfig, train_cfg: TrainConfig,
               resume: bool) -> Path:
    """Remove attention sub-layers from the bundle ``source``, heal, and write a bundle to ``out`` (or, with
    ``cfg.sweep``, the sweep's rows: :func:`edgevit.studies.skip_sweep.sweep_skip`).

    Args:
        source: the bundle to prune (a run directory).
        data: ``digits`` or an image folder holding the bundle's classes (calibration, healing, metrics).
        out: the run directory to write.
        cfg: what to remove.
        train_cfg: the healing fine-tune; ``epochs=0`` removes without healing.
        resume: continue a killed run in ``out`` (the recorded selection is reused).
    """
    if cfg.sweep:
        from edgevit.studies.skip_sweep import sweep_skip  # it exports and profiles: imported for a sweep only

        sweep_skip(source, data, out, train_cfg, selects=[cfg.select] if cfg.select else SELECTIONS, calib=cfg.calib,
                   distill=cfg.distill, threads=cfg.threads, resume=resume)
        return out
    # A run killed during its first healing epoch has a selection but no checkpoint yet: still resumable.
    if not (resume and (out / SELECTION_FILE).exists()):
        check_run_dir(out, resume)
    model, meta = prepare_skip(source, data)
    base_test = meta.metrics.get("test_top1")
    chosen = chosen_blocks(model, cfg, load_split(data, "train", meta.preprocessing, meta.classes), out, resume,
                           train_cfg.seed)
    teacher = copy.deepcopy(model) if cfg.distill > 0 and train_cfg.epochs > 0 else None
    apply_surgery(model, skip_op(chosen.blocks))
    meta.surgery = [*meta.surgery, *skip_op(chosen.blocks)]
    if is_main_process():
        log.info("skip: removing the attention of blocks %s (%s)", chosen.blocks, chosen.select)
    before = split_metrics(model, meta)
    result = heal(model, teacher, meta, data, out, cfg, train_cfg, resume) if train_cfg.epochs > 0 else None
    metrics = {"before_heal": {k: v for k, v in before.items() if k != "how"}, "base_test_top1": base_test,
               "removed_blocks": chosen.blocks, "heal_epochs": train_cfg.epochs,
               "references": source_reference("unpruned model", read_meta(source), meta)}
    # The settings that rebuild this very graph: blocks = the ones removed, so export.json's settings say what
    # the graph lacks (select: the strategy that chose them, none when they were given).
    resolved = replace(cfg, select=None if cfg.blocks is not None else cfg.strategy, ratio=None, blocks=chosen.blocks)
    return finish_run(out, model, meta, "skip", resolved, train_cfg, result, metrics, top1=None if result else before,
                      base=str(source), removed_blocks=chosen.blocks,
                      attention_similarity=_rounded(chosen.scores["all"]),
                      attention_similarity_pooled=_rounded(chosen.scores["pooled"]), calibration=chosen.calibration)
