"""Attention transfer: students that inherit a frozen teacher's attention patterns.

Paper: Li et al., *On the Surprising Effectiveness of Attention Transfer for Vision Transformers*,
NeurIPS 2024 (arXiv 2411.09702); read alongside the authors' ``models_dual_vit.py`` and
``engine_finetune.py``.

* **distill** [code]: the student runs alone; the loss is
  ``CE(labels) + weight * sum_l mean_{b,h,i} [-sum_j softmax(A_T^l)_ij log_softmax(A_S^l)_ij]`` over the
  transferred layers, in fp32, ``weight`` 3.0 and no temperature as in the code. The teacher is frozen,
  in eval mode, and sees the same augmented batch (resized if the student's input side differs).
  Attention logits are materialised only during training steps, and only in the transferred layers;
  evaluation and the exported student use the fused attention path.
* **copy** [code]: in each transferred layer the student attends with the teacher's probabilities,
  ``softmax(A_T) @ V_S``; its own queries and keys there are unused.
* Transferred layers [code]: the student's first ``K`` layers, ``K`` = depth - 3 by default (the code's
  ``end_layer=-3``; at least 1 layer for students of depth <= 3).

Smaller students [ours]:

* **Layer map**: student layer ``i`` takes teacher layer ``round((i + 1) * L_T / L_S) - 1``, rounding
  halves up (so 4 student layers of a 6-layer teacher read teacher layers 1, 2, 4, 5); equal depths map
  one to one and the last student layer always meets the last teacher layer.
* **Head map** ``average`` (default): teacher head ``t`` belongs to student head ``floor(t * H_S / H_T)``
  (contiguous groups; with more student than teacher heads, student head ``h`` copies teacher head
  ``floor(h * H_T / H_S)``); a student head's target is the mean of its group's *probabilities*, which is
  again a distribution. Used as the distillation target and as the copied map.
* **Head map** ``learned``: a 1x1 mixing of attention *logits* across heads, one matrix per transferred
  layer, initialised to the same grouping and trained with the student (training-only state: it stays in
  the run's checkpoint). In distill mode it maps the student's ``H_S`` logits to the teacher's ``H_T``
  heads and each teacher head is matched (a regressor on the student side, like FitNets): mixing the
  teacher's side instead would let it sharpen its own target and shrink the loss without teaching
  anything. In copy mode it mixes the teacher's logits into ``H_S`` maps, trained by the task loss.

Deployability. A distilled student is a plain ViT bundle. A copy student cannot run without its teacher;
we **refuse to deploy it** rather than export teacher + student as one graph: the paper presents copy as
an analysis tool, and a joint graph would need a second ViT inside the surgery registry for a model that
costs more than its teacher. The copy run still writes a plain, loadable student bundle (empty surgery)
so it can be inspected, but its ``bundle.json`` says ``provenance.deployable = false`` with
``provenance.not_deployable_reason`` and ``provenance.needs_teacher`` (the teacher run); its metrics are
those of the teacher + student system (``student_alone_test_top1`` records the student without the
teacher). :func:`load_transfer` rebuilds the runnable teacher + student model from a run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgevit.data import classifier_classes, data_ref, fraction_subset, load_ref, load_split
from edgevit.errors import EdgeVitError
from edgevit.methods.baseline import Architecture
from edgevit.methods.registry import Source, bundle_report, register
from edgevit.settings import setting
from edgevit.train import TrainConfig, evaluate, fit
from edgevit.train.loop import CHECKPOINT, load_checkpoint
from edgevit.train.run import check_run_dir, finish_run, source_reference, split_metrics
from edgevit.vit import (
    BundleMeta,
    attention,
    capture_attention_logits,
    create_vit,
    injected_attention,
    load_bundle,
    read_meta,
)
from edgevit.vit.bundle import BaseArch
from edgevit.vit.model import input_size, num_blocks, num_tokens

UNTRANSFERRED_TOP = 3  # the authors' end_layer=-3: the last layers learn their own attention


@dataclass
class TransferConfig(Architecture):
    """Train a student from scratch that inherits a frozen teacher's attention patterns (Li et al. 2024).

    \b
    Example (a student half as wide and two blocks shallower than its teacher):
      edgevit train baseline --data digits -o runs/base
      edgevit train transfer --teacher runs/base --data digits -o runs/student --embed-dim 48 --depth 4
    \b
    The paper's setting (a teacher pre-trained elsewhere, a small downstream task):
      edgevit train baseline --data digits --classes 0,1,2,3,4 -o runs/base04
      edgevit train transfer --teacher runs/base04 --data digits --classes 5,6,7,8,9 --data-fraction 0.03 \\
        -o runs/student59 --embed-dim 32 --depth 4 --heads 2
    """

    model: str | None = setting(None, "Student timm ViT architecture (default: the teacher's); --depth maps "
                                      "student layer i to teacher layer round((i+1)*L_T/L_S)-1.")
    mode: Literal["distill", "copy"] = setting("distill", "distill: the student learns the maps and runs alone; copy: "
                                                          "it attends with the teacher's maps (needs the teacher at "
                                                          "inference: not deployable).")
    layers: int | None = setting(None, "Transferred student layers, from the first (default: depth - 3).")
    weight: float = setting(3.0, "Attention-distillation loss weight.")
    head_map: Literal["average", "learned"] = setting("average", "Fewer student heads: average teacher head groups' "
                                                                 "probabilities, or learn a 1x1 head mixing of logits.")
    data_fraction: float = setting(1.0, "Class-stratified fraction of the training split (low-data regimes).")
    classes: list[str] | None = setting(None, "Comma-separated subset of the data's classes for the student "
                                              "(default: all).")

    def check(self) -> None:
        if self.weight < 0:
            raise EdgeVitError(f"--weight must be >= 0, got {self.weight}")


def default_layers(student_depth: int) -> int:
    """All but the last three layers (at least one)."""
    return max(1, student_depth - UNTRANSFERRED_TOP)


def layer_map(teacher_depth: int, student_depth: int, layers: int | None = None) -> list[int]:
    """The teacher layer of each transferred student layer ``0 .. layers-1``:
    ``round((i + 1) * L_T / L_S) - 1`` with halves rounded up (integer arithmetic, no float ties)."""
    layers = default_layers(student_depth) if layers is None else layers
    if not 1 <= layers <= student_depth:
        raise EdgeVitError(f"--layers must be in 1..{student_depth} for a {student_depth}-layer student, "
                           f"got {layers}")
    return [(2 * (i + 1) * teacher_depth + student_depth) // (2 * student_depth) - 1 for i in range(layers)]


def head_groups(teacher_heads: int, student_heads: int) -> torch.Tensor:
    """Row-stochastic ``H_S x H_T`` matrix: row ``h`` averages the teacher heads assigned to student head
    ``h`` (contiguous groups; the identity when the head counts are equal)."""
    groups = torch.zeros(student_heads, teacher_heads)
    if student_heads <= teacher_heads:
        groups[torch.arange(teacher_heads) * student_heads // teacher_heads, torch.arange(teacher_heads)] = 1.0
    else:
        groups[torch.arange(student_heads), torch.arange(student_heads) * teacher_heads // student_heads] = 1.0
    return groups / groups.sum(dim=1, keepdim=True)


def mix_heads(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Mix ``B x H_in x N x N`` maps over heads with an ``H_out x H_in`` matrix."""
    return torch.einsum("oh,bhij->boij", weights.to(maps.dtype), maps)


def soft_cross_entropy(target_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``mean_{b,h,i} [-sum_j p_ij log_softmax(A_S)_ij]`` in fp32 (``B x H x N x N`` inputs)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        log_q = student_logits.float().log_softmax(dim=-1)
        return -(target_probs.float() * log_q).sum(dim=-1).mean()


def attention_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of ``softmax(logits)``: the soft cross-entropy's minimum."""
    return soft_cross_entropy(logits.float().softmax(dim=-1), logits)


class HeadMixer(nn.Module):
    """A learned 1x1 mixing of attention logits across heads (``H_out x H_in``), initialised to a grouping."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.clone())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return mix_heads(self.weight, logits)


class TransferStudent(nn.Module):
    """The student, its frozen teacher and the (optional) learned head mixers, trained as one module.

    ``forward(images)`` is the student's prediction (copy mode: with the teacher's maps injected);
    ``forward(images, attention_loss=True)`` also returns the distillation loss (one call, so torchrun's
    DDP sees the whole step).

    Args:
        student: the student ViT (built with :func:`edgevit.vit.create_vit`).
        teacher: the teacher ViT; frozen here and kept in eval mode.
        cfg: transfer settings.
    """

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer, cfg: TransferConfig) -> None:
        super().__init__()
        self.student, self.teacher, self.mode = student, teacher.eval(), cfg.mode
        self.teacher.requires_grad_(False)
        self.pairs = list(enumerate(layer_map(num_blocks(teacher), num_blocks(student), cfg.layers)))
        try:
            heads_t = {attention(teacher, t).num_heads for _, t in self.pairs}
            heads_s = {attention(student, s).num_heads for s, _ in self.pairs}
        except ValueError as err:
            raise EdgeVitError(f"attention transfer needs attention in every mapped layer: {err}") from None
        if len(heads_t) != 1 or len(heads_s) != 1:
            raise EdgeVitError("teacher and student must each use one head count in every layer")
        groups = head_groups(heads_t.pop(), heads_s.pop())
        self.register_buffer("groups", groups, persistent=False)
        self.mixers: nn.ModuleList | None = None
        if cfg.head_map == "learned":
            # distill: student logits -> teacher heads; copy: teacher logits -> student heads (see module doc)
            init = (groups.T > 0).float() if cfg.mode == "distill" else groups
            self.mixers = nn.ModuleList(HeadMixer(init / init.sum(1, keepdim=True)) for _ in self.pairs)
        self.teacher_size = input_size(teacher)
        self.tokens, teacher_tokens = num_tokens(student), num_tokens(teacher)
        if teacher_tokens != self.tokens:
            raise EdgeVitError(f"the student has {self.tokens} tokens and the teacher {teacher_tokens}: attention "
                               "maps transfer only between equal patch grids (match --img-size/--patch-size)")

    def train(self, mode: bool = True) -> TransferStudent:
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout or drop-path noise in its maps
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """fp32 attention logits of the teacher's mapped layers, one per transferred student layer."""
        if tuple(images.shape[-2:]) != tuple(self.teacher_size):
            # Normalisation is per-channel affine and bilinear weights sum to one: resizing the normalised
            # batch equals normalising the resized images.
            images = F.interpolate(images, size=self.teacher_size, mode="bilinear", align_corners=False)
        blocks = sorted({t for _, t in self.pairs})
        with capture_attention_logits(self.teacher, blocks) as captured:
            self.teacher.forward_intermediates(images, indices=[blocks[-1]], stop_early=True,
                                               intermediates_only=True, output_fmt="NLC")
            maps = [captured[t].detach() for _, t in self.pairs]
        if maps[0].shape[-2:] != (self.tokens, self.tokens):
            raise EdgeVitError(f"the teacher's maps are {tuple(maps[0].shape[-2:])} but the student attends over "
                               f"{self.tokens} tokens (a teacher with prefix keys or prompt tokens cannot teach)")
        return maps

    def copied_probs(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """The attention probabilities each transferred student layer uses in copy mode."""
        probs = {}
        for k, ((s, _), logits) in enumerate(zip(self.pairs, self.teacher_logits(images), strict=True)):
            if self.mixers is not None:
                probs[s] = self.mixers[k](logits).softmax(dim=-1)
            else:
                probs[s] = mix_heads(self.groups, logits.softmax(dim=-1))
        return probs

    def attention_loss(self, teacher: list[torch.Tensor], student: dict[int, torch.Tensor]) -> torch.Tensor:
        """Sum over transferred layers of the soft cross-entropy between mapped teacher and student maps."""
        total = torch.zeros((), device=teacher[0].device)
        with torch.autocast(teacher[0].device.type, enabled=False):  # the maps and their mixing stay fp32
            for k, ((s, _), logits_t) in enumerate(zip(self.pairs, teacher, strict=True)):
                probs_t, logits_s = logits_t.float().softmax(dim=-1), student[s].float()
                if self.mixers is not None:
                    total = total + soft_cross_entropy(probs_t, self.mixers[k](logits_s))
                else:
                    total = total + soft_cross_entropy(mix_heads(self.groups, probs_t), logits_s)
        return total

    def forward(self, images: torch.Tensor, attention_loss: bool = False):
        if self.mode == "copy":
            probs = self.copied_probs(images)
            with injected_attention(self.student, probs):
                logits = self.student(images)
            return (logits, torch.zeros((), device=logits.device)) if attention_loss else logits
        if not attention_loss:
            return self.student(images)
        teacher = self.teacher_logits(images)
        with capture_attention_logits(self.student, [s for s, _ in self.pairs]) as captured:
            logits = self.student(images)
            student = dict(captured)
        return logits, self.attention_loss(teacher, student)


def transfer_loss(weight: float, label_smoothing: float):
    """``loss_fn`` for :func:`edgevit.train.fit`: ``CE + weight * attention loss`` (weight 0: the plain
    cross-entropy, and no attention map is materialised)."""

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits, attn = model(images, attention_loss=True) if weight else (model(images), 0.0)
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing) + weight * attn, logits

    return loss_fn


def student_arch(teacher: BundleMeta, cfg: TransferConfig, num_classes: int) -> tuple[str, dict[str, Any]]:
    """The student's timm name and kwargs: the teacher's architecture (or ``cfg.model``'s own defaults) with the
    teacher's channels, ``cfg.img_size`` (default the teacher's) and ``cfg``'s architecture overrides."""
    kwargs = dict(teacher.base.kwargs) if cfg.model in (None, teacher.base.name) else {}
    kwargs.update(img_size=cfg.img_size or teacher.preprocessing.size, in_chans=teacher.preprocessing.channels,
                  num_classes=num_classes, **cfg.arch())
    dim, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise EdgeVitError(f"student width {dim} is not divisible by its {heads} heads")
    return cfg.model or teacher.base.name, kwargs


def copy_metrics(model: TransferStudent, meta: BundleMeta, teacher_dir: Path) -> tuple[dict, dict, dict]:
    """What a copy student is measured and recorded as: (split top-1s of student + teacher together, the
    student alone, the provenance that marks the bundle not deployable)."""
    alone = evaluate(model.student, load_ref(meta.data, "test", meta.preprocessing))
    metrics = {"how": "top-1 of the student with the teacher's attention injected (the teacher runs too), torch "
                      "fp32, eval mode, on the bundle's data splits", "student_alone_test_top1": round(alone, 5)}
    deploy = {"deployable": False, "needs_teacher": str(teacher_dir.resolve()),
              "not_deployable_reason": "attention copy: the student attends with the teacher's maps, so the teacher "
                                       "must run at inference (see edgevit.methods.transfer)"}
    return split_metrics(model, meta), metrics, deploy


def transfer_report(out: Path, cfg: TransferConfig) -> tuple[dict, str]:
    result, text = bundle_report(out, cfg)
    if cfg.mode == "copy":
        text += "\nnote: attention copy needs the teacher at inference; the bundle is marked not deployable"
    return result, text


@register("transfer", TransferConfig, own_loss=True, report=transfer_report, source=Source(
    "--teacher", "Teacher bundle (frozen); only its attention maps are used, so its classes may differ."))
def train_transfer(source: str | Path, data: str, out: Path, cfg: TransferConfig, train_cfg: TrainConfig,
                   resume: bool) -> Path:
    """Train a student on ``data`` with the frozen teacher ``source``'s attention and write its bundle to ``out``.

    Args:
        source: the teacher bundle (its classes may differ from ``data``'s: only its attention is used).
        data: ``digits`` or an image folder.
        out: the run directory (student bundle + training checkpoint holding the teacher and mixers).
        cfg: transfer settings and the student's architecture (default: the teacher's; same patch grid).
        train_cfg: optimisation settings.
        resume: continue a killed run in ``out``.
    """
    out = check_run_dir(out, resume)
    teacher, teacher_meta = load_bundle(source)
    classes = classifier_classes(data, cfg.classes)
    name, kwargs = student_arch(teacher_meta, cfg, len(classes))
    # Teacher and student read the same batch: the student keeps the teacher's normalisation, interpolation and
    # crop (a pretrained teacher's own), at its own input side.
    pre = teacher_meta.preprocessing.model_copy(update={"size": kwargs["img_size"]})
    torch.manual_seed(train_cfg.seed)
    model = TransferStudent(create_vit(name, **kwargs), teacher, cfg)
    meta = BundleMeta(base=BaseArch(name=name, kwargs=kwargs), preprocessing=pre, classes=classes,
                      data=data_ref(data, classes))
    train_set = fraction_subset(load_split(data, "train", pre, classes, augment=train_cfg.augment),
                                cfg.data_fraction, train_cfg.seed)
    with torch.no_grad():  # fail early, with a clear line, on maps that do not fit
        model(train_set[0][0][None], attention_loss=True)
    result = fit(model, train_set, train_cfg, out, loss_fn=transfer_loss(cfg.weight, train_cfg.label_smoothing),
                 val_set=load_split(data, "val", pre, classes), resume=resume, description=f"transfer-{cfg.mode}")
    model.eval()
    top1, metrics, deploy = (copy_metrics(model, meta, Path(source)) if cfg.mode == "copy"
                             else (None, {}, {"deployable": True}))
    metrics = {"train_images": len(train_set), **metrics, "references": source_reference("teacher", teacher_meta, meta)}
    return finish_run(out, model.student, meta, "transfer", cfg, train_cfg, result, metrics, top1,
                      teacher=str(Path(source).resolve()),
                      layer_map=[[s, t] for s, t in model.pairs], head_groups=model.groups.tolist(),
                      **deploy)


def load_transfer(run: str | Path) -> TransferStudent:
    """Rebuild a transfer run's teacher + student model (copy runs need it to predict) in eval mode, from
    its bundle, its teacher bundle and its training checkpoint."""
    meta = read_meta(run)
    if meta.provenance.get("method") != "transfer":
        raise EdgeVitError(f"{run} is not an attention-transfer run")
    student, _ = load_bundle(run)
    teacher, _ = load_bundle(meta.provenance["teacher"])
    config = meta.provenance["config"]
    model = TransferStudent(student, teacher, TransferConfig(**{f.name: config[f.name] for f in fields(TransferConfig)
                                                                if f.name in config}))
    ckpt = Path(run) / CHECKPOINT
    if model.mixers is not None:
        if not ckpt.exists():
            raise EdgeVitError(f"{ckpt} is missing: the learned head mixers live only there")
        state = load_checkpoint(ckpt)["model"]
        model.mixers.load_state_dict({k.removeprefix("mixers."): v for k, v in state.items()
                                      if k.startswith("mixers.")})
    return model.eval()
