"""Method 4: DATA continual learning with reparameterized (folded) adapters.

Liao et al., *Decomposed Attention-based Task Adaptation for Rehearsal-Free Continual Learning* (arXiv
2502.11482; code github.com/Xnhyacinth/DATA, ``inject_data.py`` and ``patch/modeling_llama.py``). The paper
adapts LLMs; the port to ViTs is ours. The graph side (adapted linears, routers, folding, the
``adapter_scales`` surgery op) is :mod:`edgevit.vit.adapters`; this module trains it.

What follows the authors' code:

* the backbone is frozen; every qkv/proj/fc1/fc2 gets a low-rank (r1, task-shared) and a high-rank (r2,
  task-specific) adapter path, ``U = 0``; both paths keep training on every task (their code trains both
  throughout);
* per group of blocks, components ``K, A, W`` per path: ``M`` rows per task; at the start of a task its rows
  are drawn at random and orthonormalised against the earlier tasks' rows, which are frozen; the scales use
  the rows of every task seen so far (no task id at inference);
* loss = cross-entropy + ``ortho_weight * mean((T T^T - I)^2)`` over ``normalize(K)``, ``A``, ``W`` (their
  ``ortho_mu = 1``), averaged over the three matrices, the paths and the groups; no rehearsal.

Ours:

* ``D ~ N(0, 1/r^2)`` read as variance ``1/r^2`` (std ``1/r``, as METHODS.md writes it); the authors' code
  draws std ``1/r^2``. With AdamW at our learning rate (3e-3, 30x their 1e-4) an update step is as large
  as those weights (std 0.004 for r2 = 16): measured on the tiny digits backbone, task 2 then collapsed to
  chance-level logits (0-1% top-1) while std ``1/r`` (or LoRA's init) learned it.
* Gram-Schmidt is done against an orthonormal basis of the earlier rows (a QR of ``[old; new]``): after
  training, the earlier rows are no longer orthogonal to each other, and the authors' sequential projection
  then leaves the new rows slightly inside their span.
* Groups of 4 blocks (theirs), fewer in models under 8 blocks so that there are at least two groups.
* The router sums over all N tokens, as theirs sums over the sequence; on ViTs (N = 17..197) the sigmoid is
  then mostly saturated near 1 (measured on digits), so the per-sample scales vary little and the merged
  form stays close to the exact one.
* Heads (not in the paper, whose LLM reuses its vocabulary): cosine classifiers, each new one started at
  its classes' mean feature direction (:meth:`ContinualLearner.prototypes`); see the protocols below.

``--bounds`` also trains the two references every continual learner sits between, recorded in the bundle:
sequential fine-tuning (the lower bound) and joint training on every task at once (the upper bound). More
baselines (sequential LoRA, heads only) are built from these pieces in ``benchmarks/study_continual.py``
(:class:`ContinualLearner`'s ``adapt`` argument).

Protocols (the backbone must not have seen the tasks' labels):

* ``class`` (class-incremental): the task classes are DATA's classes the backbone was not trained on
  (same source: its ``data.classes`` must be disjoint from them; a backbone trained on every class is
  refused). They are cut into ``T`` consecutive tasks of >= 2 classes, e.g. backbone on digits 0-4, tasks
  {5,6}, {7,8,9}. The head grows: task ``t`` adds a cosine classifier for its classes (:class:`CosineHead`);
  earlier task heads are frozen, and the loss only reads the current task's logits (the usual
  rehearsal-free choice, e.g. L2P/CODA-Prompt: without old images, a loss over old logits only pushes them
  down). Inference takes the argmax over every seen class. Cosine heads because heads that never saw each
  other's data must still be comparable: with plain Linear heads, measured on the tiny digits backbone,
  even a frozen backbone lost task 1 almost entirely to the new task's larger logits. Every baseline uses
  the same heads.
* ``domain`` (domain-incremental): the same (backbone-unseen) classes in every task, each task under its
  own fixed image transform (identity, invert, rot90, hflip, noise: chosen so no class turns into another,
  unlike rot180 with 6/9); one shared cosine head trained on every task.

Deployable forms (both bundles, no ``edgevit.methods`` needed to load them):

* ``exact``: base weights + adapters + routers (surgery op ``adapter_scales``): per-sample scales.
* ``merged``: mean scales calibrated on unlabeled images of every task (``calibration_images`` per task
  from the val splits: deployment data, like an INT8 calibration set; never trained on) folded into the
  weights, ``W' = W0 + s1_bar U1 D1 + s2_bar U2 D2``: exactly the base graph.

Metrics after each task: test top-1 on every seen task (``accuracy[i][j]``: after task i, on task j), final
average accuracy (mean of the last row), average forgetting (mean over all but the last task of the best
earlier accuracy minus the final one).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from edgevit.data import augmentation, calibration_batch, data_ref, load_split
from edgevit.errors import EdgeVitError
from edgevit.methods.registry import MethodConfig, Source, references_line, register
from edgevit.settings import setting
from edgevit.train import Augment, TrainConfig, TrainResult, evaluate, fit
from edgevit.train.loop import CHECKPOINT
from edgevit.train.probe import features as probe_features
from edgevit.train.probe import linear_probe, logistic
from edgevit.train.run import check_run_dir, finish_run, unseen_classes
from edgevit.vit import BundleMeta, apply_surgery, create_vit, load_bundle, read_meta
from edgevit.vit.adapters import (
    ROUTERS,
    Router,
    ScaledLinear,
    block_groups,
    default_group_size,
    folded_state_dict,
    inject_adapters,
    mean_scales,
    routers_of,
)
from edgevit.vit.bundle import BaseArch, Preprocessing
from edgevit.vit.model import num_blocks, pooled_features

log = logging.getLogger("edgevit")

ALIGN_C = 10.0  # the aligned head's logistic regression (no old-task images are kept to choose it on)
# The bounds fine-tune the whole backbone: at the adapters' 3e-3 it falls apart (benchmarks/study_continual.py).
FINETUNE_LR = 5e-4
DOMAINS = ("identity", "invert", "rot90", "hflip", "noise")
NOISE_STD = 0.3  # of the [0, 1] pixel range


@dataclass
class ContinualConfig(MethodConfig):
    """Learn a task sequence with DATA (no rehearsal, no task id) and write exact and merged bundles.

    \b
    Example (backbone on digits 0-4, tasks {5,6}, {7,8,9}):
      edgevit train baseline --data digits --classes 0,1,2,3,4 -o runs/base04
      edgevit train continual --model runs/base04 --data digits -o runs/data --tasks 2
    """

    # Per task. At 3e-3 the first task's adapters pull the features toward its 2-3 classes: final average accuracy
    # 0.67 on digits 5-9 and 0.81 on photographs, 3 seeds; at 1e-4, 0.88 and 0.96 (docs/references.md).
    training: ClassVar[dict] = {"epochs": 10, "lr": 1e-4, "warmup_epochs": 1.0}

    tasks: int | None = setting(None, "Number of tasks (default: classes // 2 for class, 4 for domain).")
    protocol: Literal["class", "domain"] = setting("class", "class: disjoint classes per task, growing head; "
                                                            "domain: same classes, a new image transform per task "
                                                            "(identity, invert, rot90, hflip, noise).")
    ranks: tuple[int, ...] = setting((4, 16), "Ranks r1,r2 of the task-shared and task-specific adapter paths.")
    components: int = setting(8, "Router components per task (M).")
    group_size: int | None = setting(None, "Blocks per router group (default 4, fewer for shallow models).")
    ortho_weight: float = setting(1.0, "Orthogonality loss weight (the authors' ortho_mu).")
    form: Literal["merged", "exact"] = setting("merged", "Bundle written to OUT: merged (mean scales folded, the base "
                                                         "graph) or exact (per-sample scale branch); the other form "
                                                         "goes to OUT/<form>/.")
    classes: list[str] | None = setting(None, "Task classes (default: DATA's classes the backbone was not trained "
                                              "on).")
    calibration_images: int = setting(64, "Unlabeled val images per task the merged form's mean scales are "
                                          "measured on.")
    align: int = setting(1024, "Class protocol: after each task, re-fit every seen class's head on this many "
                               "features per class drawn from its stored Gaussian (classifier alignment; 0: off).")
    head_scale: float = setting(16.0, "Logit scale of the cosine task heads.")
    bounds: bool = setting(False, "Also train the references a continual learner sits between, on the same tasks "
                                  "with the same heads and epochs (whole backbone at lr 5e-4): sequential "
                                  "fine-tuning (the lower bound) and joint training on every task at once (the "
                                  "upper bound).", flag="--bounds/--no-bounds")
    adapters: Literal["first-task", "every-task"] = setting(
        "first-task", "Tasks that train the adapter paths: the first only, later ones adding their router "
                      "components and heads (old classes' features drift ~5x less, so their stored Gaussians stay "
                      "true), or every task, as the paper trains them.")

    def check(self) -> None:
        if len(self.ranks) != 2 or min(self.ranks) < 1:
            raise EdgeVitError(f"--ranks takes two positive ranks r1,r2, got {list(self.ranks)}")
        if not (math.isfinite(self.ortho_weight) and self.ortho_weight >= 0):
            raise EdgeVitError(f"ortho weight must be >= 0, got {self.ortho_weight}")
        if self.calibration_images < 1:
            raise EdgeVitError(f"calibration images must be positive, got {self.calibration_images}")
        if self.align < 0:
            raise EdgeVitError(f"align takes a number of sampled features per class >= 0, got {self.align}")

    def resolved(self, classes: int, depth: int, dim: int) -> ContinualConfig:
        """Defaults filled in for ``classes`` task classes and a ``depth`` x ``dim`` ViT; validated."""
        tasks = self.tasks or (classes // 2 if self.protocol == "class" else 4)
        if self.protocol == "class" and not 1 <= tasks <= classes // 2:
            raise EdgeVitError(f"{classes} classes make 1..{classes // 2} class-incremental tasks of >= 2 "
                               f"classes, got --tasks {tasks}")
        if self.protocol == "domain" and not 1 <= tasks <= len(DOMAINS):
            raise EdgeVitError(f"domain-incremental runs have 1..{len(DOMAINS)} tasks ({', '.join(DOMAINS)}), "
                               f"got --tasks {tasks}")
        if classes < 2:
            raise EdgeVitError(f"continual tasks need at least 2 classes, got {classes}")
        if self.components < 1 or self.components * tasks > dim:
            raise EdgeVitError(f"--components {self.components} x {tasks} tasks must be in 1..{dim} (the width): "
                               "each task's components are orthogonal to the earlier ones")
        group = self.group_size or default_group_size(depth)
        if not 1 <= group <= depth:
            raise EdgeVitError(f"group size must be in 1..{depth}, got {group}")
        return replace(self, tasks=tasks, group_size=group, ranks=tuple(self.ranks))


# -------------------------------------------------------------------------------------------------- tasks


def domain_transform(image: torch.Tensor, domain: str, pre: Preprocessing, index: int) -> torch.Tensor:
    """``image`` (normalised ``C x H x W``) as seen in ``domain``; ``noise`` is seeded by ``index``."""
    if domain == "identity":
        return image
    if domain == "rot90":
        return torch.rot90(image, 1, (-2, -1))
    if domain == "hflip":
        return image.flip(-1)
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    pixels = image * std + mean
    if domain == "invert":
        pixels = 1 - pixels
    elif domain == "noise":
        noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(index))
        pixels = (pixels + NOISE_STD * noise).clamp(0, 1)
    else:
        raise ValueError(f"unknown domain {domain!r}")
    return (pixels - mean) / std


class TaskView(Dataset):
    """Rows of a labelled split, optionally seen through a domain transform."""

    def __init__(self, base: Dataset, rows: Sequence[int], domain: str, pre: Preprocessing) -> None:
        self.base, self.rows, self.domain, self.pre = base, list(rows), domain, pre
        self.targets = [base.targets[i] for i in self.rows]
        self.classes = base.classes
        self.augmentation = augmentation(base)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.rows[i]]
        return domain_transform(image, self.domain, self.pre, self.rows[i]), label


@dataclass
class Task:
    """One task: its name, the head labels it uses (``[lo, hi)``), its splits as evaluated and its training
    images as trained on (augmented)."""

    name: str
    labels: tuple[int, int]
    splits: dict[str, Dataset] = field(repr=False)
    train_set: Dataset = field(repr=False)


def task_classes(meta: BundleMeta, data: str, classes: list[str] | None) -> list[str]:
    """The classes to learn: given, or DATA's classes the backbone was not trained on (see ``unseen_classes``)."""
    return unseen_classes(meta, data, classes, "continual tasks")


def make_tasks(data: str, classes: list[str], pre: Preprocessing, cfg: ContinualConfig,
               augment: Augment | None = None) -> list[Task]:
    """The task sequence of a resolved ``cfg`` over ``classes`` of ``data`` (training images augmented with
    ``augment``)."""
    splits = {s: load_split(data, s, pre, classes) for s in ("train", "val", "test")}
    training = load_split(data, "train", pre, classes, augment=augment)
    if cfg.protocol == "domain":
        return [Task(domain, (0, len(classes)), {s: TaskView(d, range(len(d)), domain, pre) for s, d in splits.items()},
                     TaskView(training, range(len(training)), domain, pre)) for domain in DOMAINS[:cfg.tasks]]
    cuts = [round(i * len(classes) / cfg.tasks) for i in range(cfg.tasks + 1)]
    tasks = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        views = {s: TaskView(d, [i for i, y in enumerate(d.targets) if lo <= y < hi], "identity", pre)
                 for s, d in splits.items()}
        tasks.append(Task(",".join(classes[lo:hi]), (lo, hi), views,
                          TaskView(training, views["train"].rows, "identity", pre)))
    return tasks


def joint_task(tasks: Sequence[Task]) -> Task:
    """Every task's data as one task (the joint-training upper bound)."""
    def joined(parts: list[Dataset]) -> ConcatDataset:
        concat = ConcatDataset(parts)
        concat.targets = [y for part in parts for y in part.targets]
        concat.augmentation = augmentation(parts[0])
        return concat

    splits = {s: joined([t.splits[s] for t in tasks]) for s in ("train", "val", "test")}
    return Task("joint", (min(t.labels[0] for t in tasks), max(t.labels[1] for t in tasks)), splits,
                joined([t.train_set for t in tasks]))


# ------------------------------------------------------------------------------------------------ learner


def orthonormal_rows(earlier: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random unit rows orthogonal to each other and to the span of ``earlier`` (``R0 x d``)."""
    dim = earlier.shape[-1]
    if earlier.shape[0] + count > dim:
        raise EdgeVitError(f"{earlier.shape[0] + count} orthogonal components do not fit in width {dim}")
    fresh = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(torch.cat([earlier.detach().double().cpu(), fresh]).T).Q
    return q[:, earlier.shape[0]:].T.float()


class TaskRouter(Router):
    """A router whose components grow by ``M`` rows per task; earlier tasks' rows are frozen.

    Args:
        dim: model width d.
        paths: adapter paths P.
        components: rows M per task.
    """

    def __init__(self, dim: int, paths: int, components: int) -> None:
        super().__init__()
        self.dim, self.paths, self.per_task = dim, paths, components
        self.keys, self.attn, self.weights = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()

    def add_task(self, generator: torch.Generator) -> None:
        """Freeze the rows so far and add this task's, orthonormal to them (per matrix and path)."""
        for pieces in (self.keys, self.attn, self.weights):
            earlier = torch.cat(list(pieces), dim=1) if len(pieces) else torch.zeros(self.paths, 0, self.dim)
            for p in pieces:
                p.requires_grad_(False)
            fresh = torch.stack([orthonormal_rows(earlier[path], self.per_task, generator)
                                 for path in range(self.paths)])
            pieces.append(nn.Parameter(fresh.to(earlier.device)))

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(list(pieces), dim=1) for pieces in (self.keys, self.attn, self.weights))

    def ortho_loss(self) -> torch.Tensor:
        """``mean((T T^T - I)^2)`` over normalize(K), A and W of every path, averaged."""
        keys, attn, weights = self.components()
        eye = torch.eye(keys.shape[1], device=keys.device)
        terms = [((t @ t.transpose(-2, -1) - eye) ** 2).mean() for t in (F.normalize(keys, dim=-1), attn, weights)]
        return torch.stack(terms).mean()


class CosineHead(nn.Module):
    """A task's classifier ``scale * normalize(w_c) . f``: bounded logits, so heads trained on different
    tasks (never on each other's data) are comparable at inference.

    The learner normalises the features ``f`` in training only. At inference, dividing every logit of a
    sample by ``|f| > 0`` cannot change its argmax, so leaving it out keeps the deployed head a plain
    Linear (weight ``scale * normalize(W)``, bias 0) with the same predictions.
    """

    def __init__(self, dim: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes, dim))
        self.scale = scale

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def scaled_weight(self) -> torch.Tensor:
        return self.scale * F.normalize(self.weight, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.scaled_weight().T


def data_adapters(vit: VisionTransformer, cfg: ContinualConfig) -> None:
    """DATA's adapter paths and task routers on every block of the frozen ``vit`` (``U = 0``, ``D ~ N(0, 1/r^2)``
    per path of rank ``r``)."""
    routers = [TaskRouter(vit.embed_dim, len(cfg.ranks), cfg.components)
               for _ in block_groups(num_blocks(vit), cfg.group_size)]
    for linear in inject_adapters(vit, cfg.ranks, cfg.group_size, routers):
        for lo, r in zip((0, cfg.ranks[0]), cfg.ranks, strict=True):
            nn.init.normal_(linear.down[lo:lo + r], std=1 / r)


class ContinualLearner(nn.Module):
    """A frozen backbone plus what a continual learner trains (DATA's adapters and routers, by default) and the
    heads of the tasks seen so far.

    Args:
        vit: the backbone (modified in place; its classifier is dropped and its weights frozen).
        cfg: a resolved :class:`ContinualConfig`.
        seed: seeds the adapters' and components' initialisation.
        adapt: makes ``vit`` trainable for the tasks (default :func:`data_adapters`; the baselines of
            ``benchmarks/study_continual.py`` pass their own).
    """

    def __init__(self, vit: VisionTransformer, cfg: ContinualConfig, seed: int = 0,
                 adapt: Callable[[VisionTransformer, ContinualConfig], None] = data_adapters) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        vit.reset_classifier(0)
        self.vit = vit
        self.heads = nn.ModuleList()
        self.tasks_seen = 0
        self.class_stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # per seen class: feature mean, covariance
        self.aligned: nn.Linear | None = None
        torch.manual_seed(seed)
        vit.requires_grad_(False)
        adapt(vit, cfg)

    def begin_task(self, task: Task) -> None:
        """Make room for ``task``: its router components and its head (class protocol; the domain protocol
        shares one head), initialised from the task's class prototypes. After the first task the adapter paths
        stop training unless ``cfg.adapters`` is ``every-task``."""
        generator = torch.Generator().manual_seed(self.seed * 1009 + self.tasks_seen)
        device = next(self.vit.parameters()).device
        if self.tasks_seen and self.cfg.adapters == "first-task":
            for linear in (m for m in self.vit.modules() if isinstance(m, ScaledLinear)):
                linear.down.requires_grad_(False)
                linear.up.requires_grad_(False)
        for router in routers_of(self.vit):
            router.add_task(generator)
        if self.cfg.protocol == "class" or not self.heads:
            for head in self.heads:
                head.requires_grad_(False)
            head = CosineHead(self.vit.embed_dim, task.labels[1] - task.labels[0], self.cfg.head_scale)
            head.weight.data.copy_(self.prototypes(task))
            self.heads.append(head.to(device))
        self.tasks_seen += 1

    @torch.no_grad()
    def prototypes(self, task: Task) -> torch.Tensor:
        """Mean normalised feature of each of ``task``'s classes (``classes x d``) under the current model.

        Within-task cross-entropy only learns how a task's classes differ from each other; starting each
        head at its classes' mean feature direction also anchors it against the other tasks' classes.
        """
        was_training = self.training
        self.eval()
        lo, hi = task.labels
        features, labels = self.features(task)
        sums = torch.zeros(hi - lo, self.vit.embed_dim).index_add_(0, torch.from_numpy(labels) - lo,
                                                                   F.normalize(torch.from_numpy(features), dim=-1))
        self.train(was_training)
        return F.normalize(sums, dim=-1)

    def features(self, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features of ``task``'s training images under the current model, and their labels."""
        return probe_features(functools.partial(pooled_features, self.vit), task.splits["train"],
                              device=next(self.vit.parameters()).device)

    @torch.no_grad()
    def end_task(self, task: Task) -> None:
        """Class protocol: store ``task``'s class statistics (mean and covariance of the features, no images) and
        re-fit the head of every class seen so far on ``cfg.align`` features per class drawn from them: the
        classifier alignment of SLCA (Zhang et al., ICCV 2023). Heads trained on separate tasks never saw each
        other's classes; without it the newest task's logits win (measured on digits: task 1 fell from 85% to 8%
        of its images after task 2)."""
        if self.cfg.protocol != "class" or self.cfg.align == 0:
            return
        was_training = self.training
        self.eval()
        features, labels = self.features(task)
        for c in range(*task.labels):
            mine = torch.from_numpy(features[labels == c]).double()
            self.class_stats.append((mine.mean(0), torch.cov(mine.T)))
        generator = torch.Generator().manual_seed(self.seed * 1013 + self.tasks_seen)
        sampled = [sample_class(mean, cov, self.cfg.align, generator) for mean, cov in self.class_stats]
        labels = np.repeat(np.arange(len(sampled)), self.cfg.align)
        weight, bias = logistic(torch.cat(sampled).float().numpy(), labels, ALIGN_C)
        device = next(self.vit.parameters()).device
        self.aligned = nn.Linear(weight.shape[1], weight.shape[0]).requires_grad_(False).to(device)  # fitted
        self.aligned.weight.copy_(weight)
        self.aligned.bias.copy_(bias)
        self.train(was_training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = pooled_features(self.vit, images)
        if not self.training and self.aligned is not None:
            return self.aligned(features)
        if self.training:
            features = F.normalize(features, dim=-1)
        return torch.cat([head(features) for head in self.heads], dim=-1)

    def ortho_loss(self) -> torch.Tensor:
        routers = routers_of(self.vit)
        if not routers:
            return torch.zeros(())
        return torch.stack([r.ortho_loss() for r in routers]).mean()

    def head_state(self) -> dict[str, torch.Tensor]:
        """The heads of every seen task as one plain classifier (``head.weight``, ``head.bias``): the aligned head
        where there is one, else the cosine heads."""
        if self.aligned is not None:
            return {"head.weight": self.aligned.weight.detach().cpu(), "head.bias": self.aligned.bias.detach().cpu()}
        weight = torch.cat([h.scaled_weight().detach() for h in self.heads])
        return {"head.weight": weight, "head.bias": torch.zeros(weight.shape[0])}


def sample_class(mean: torch.Tensor, cov: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` features drawn from a class's Gaussian; the covariance of a few hundred images in d dimensions
    needs a ridge to be positive definite."""
    ridge = 1e-3 * cov.diagonal().mean() * torch.eye(len(mean), dtype=cov.dtype)
    factor = torch.linalg.cholesky(cov + ridge)
    return mean + torch.randn(count, len(mean), generator=generator, dtype=cov.dtype) @ factor.T


def task_loss(learner: ContinualLearner, task: Task, label_smoothing: float):
    """Cross-entropy on the current task's logits (class protocol) or all logits (domain), plus the
    orthogonality penalty."""
    lo, hi = task.labels if learner.cfg.protocol == "class" else (0, None)

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        loss = F.cross_entropy(logits[:, lo:hi], labels - lo, label_smoothing=label_smoothing)
        if learner.cfg.ortho_weight > 0 and routers_of(learner.vit):
            loss = loss + learner.cfg.ortho_weight * learner.ortho_loss().to(loss.device)
        return loss, logits

    return loss_fn


def continual_metrics(accuracy: Sequence[Sequence[float]]) -> dict[str, float]:
    """Final average accuracy and average forgetting of ``accuracy[i][j]`` (after task i, on task j <= i)."""
    last = accuracy[-1]
    forgetting = [max(row[j] for row in accuracy[j:-1]) - last[j] for j in range(len(accuracy) - 1)]
    return {"final_average_accuracy": round(sum(last) / len(last), 5),
            "average_forgetting": round(sum(forgetting) / len(forgetting), 5) if forgetting else 0.0}


def run_tasks(learner: ContinualLearner, tasks: Sequence[Task], train_cfg: TrainConfig, out: str | Path,
              resume: bool = False, evaluate_on: Sequence[Task] | None = None) -> tuple[dict[str, Any], TrainResult]:
    """Train ``learner`` on ``tasks`` one after another (checkpoints in ``out/task<i>/``) and measure.

    A resumed run replays the sequence: finished tasks load their final checkpoint instead of training.

    Args:
        learner: a fresh learner.
        tasks: the sequence.
        train_cfg: optimisation settings of every task.
        out: directory of the per-task checkpoints.
        resume: continue a killed sequence.
        evaluate_on: the tasks measured after each step (default: the seen ones; joint training passes the
            original tasks).

    Returns:
        ``accuracy`` (test top-1 rows), per-task ``history`` and :func:`continual_metrics`; and the training of all
        tasks as one :class:`~edgevit.train.TrainResult`.
    """
    accuracy, history, results = [], [], []
    for i, task in enumerate(tasks):
        learner.begin_task(task)
        result = fit(learner, task.train_set, train_cfg, Path(out) / f"task{i}",
                     loss_fn=task_loss(learner, task, train_cfg.label_smoothing), val_set=task.splits["val"],
                     resume=resume, description=f"task {i + 1}/{len(tasks)} [{task.name}]")
        learner.end_task(task)
        seen = evaluate_on if evaluate_on is not None else tasks[:i + 1]
        accuracy.append([round(evaluate(learner, t.splits["test"]), 5) for t in seen])
        history.append({"task": task.name, "epochs": result.epochs, "steps": result.steps,
                        "train_seconds": round(result.seconds, 1)})
        results.append(result)
        log.info("after task %d (%s): test top-1 %s", i + 1, task.name, accuracy[-1])
    total = TrainResult(sum(r.epochs for r in results), sum(r.steps for r in results),
                        sum(r.seconds for r in results), [e for r in results for e in r.history], results[-1].augment)
    return {"accuracy": accuracy, "history": history, **continual_metrics(accuracy)}, total


def finetune(vit: VisionTransformer, cfg: ContinualConfig) -> None:
    """The bounds' learner: every backbone weight trains."""
    vit.requires_grad_(True)


def frozen(vit: VisionTransformer, cfg: ContinualConfig) -> None:
    """Nothing in the backbone trains."""


def frozen_reference(vit: VisionTransformer, tasks: Sequence[Task], cfg: ContinualConfig,
                     seed: int) -> dict[str, dict[str, Any]]:
    """The frozen backbone ``vit`` (not modified) as a class-incremental learner: after each task its classes'
    feature Gaussians are stored and every seen class's head is re-fitted from them, DATA's aligned head without
    the adapters (no images kept, nothing trained by SGD). What DATA's adaptation must beat; seconds."""
    learner = ContinualLearner(copy.deepcopy(vit), replace(cfg, align=cfg.align or ContinualConfig.align), seed, frozen)
    accuracy = []
    for i, task in enumerate(tasks):
        learner.begin_task(task)
        learner.end_task(task)
        accuracy.append([round(evaluate(learner, t.splits["test"]), 5) for t in tasks[:i + 1]])
    return {"frozen backbone": {**reference_record(learner, tasks, accuracy),
                                "note": "no adapters; the head of every seen class re-fitted from stored class "
                                        "Gaussians after each task"}}


def train_bounds(vit: VisionTransformer, tasks: Sequence[Task], cfg: ContinualConfig, train_cfg: TrainConfig,
                 out: Path, resume: bool = False) -> dict[str, dict[str, Any]]:
    """Sequential fine-tuning (lower bound) and joint training (upper bound) of ``vit`` (not modified) on
    ``tasks``, at :data:`FINETUNE_LR`; checkpoints in ``out/sequential`` and ``out/joint``.

    Returns:
        reference records: test top-1 on every task's test images at once (as the method's own test top-1), the
        accuracy matrix and its metrics, and ``bound``.
    """
    train_cfg = replace(train_cfg, lr=FINETUNE_LR)
    references = {}
    for name, bound, sequence, evaluate_on in (("sequential fine-tuning", "lower", tasks, None),
                                               ("joint training", "upper", [joint_task(tasks)], tasks)):
        learner = ContinualLearner(copy.deepcopy(vit), cfg, train_cfg.seed, finetune)
        measured, _ = run_tasks(learner, sequence, train_cfg, out / name.split()[0], resume, evaluate_on)
        references[name] = {**reference_record(learner, tasks, measured["accuracy"]), "bound": bound}
    return references


def reference_record(learner: ContinualLearner, tasks: Sequence[Task], accuracy: list[list[float]]) -> dict[str, Any]:
    """A continual reference as the bundle records it: test top-1 on every task's test images at once (as the
    method's own), the accuracy matrix and its :func:`continual_metrics`; it runs the source's graph."""
    return {"test_top1": round(evaluate(learner, joint_task(tasks).splits["test"]), 5), "graph": "source",
            "accuracy": accuracy, **continual_metrics(accuracy)}


# ----------------------------------------------------------------------------------------------- deploying


def adapter_op(cfg: ContinualConfig, tasks: int) -> dict[str, Any]:
    return {"op": "adapter_scales", "ranks": list(cfg.ranks), "group_size": cfg.group_size,
            "rows": cfg.components * tasks}


@torch.no_grad()
def exact_state_dict(learner: ContinualLearner) -> dict[str, torch.Tensor]:
    """Weights of the ``exact`` form: the learner's, with each router's per-task rows concatenated."""
    state = {k: v.detach().clone() for k, v in learner.vit.state_dict().items() if not k.startswith(ROUTERS)}
    for g, router in enumerate(routers_of(learner.vit)):
        for name, value in zip(("keys", "attn", "weights"), router.components(), strict=True):
            state[f"{ROUTERS}.{g}.{name}"] = value.detach().clone()
    return {**state, **learner.head_state()}


def build_form(meta: BundleMeta, surgery: list[dict[str, Any]], num_classes: int,
               state: dict[str, torch.Tensor]) -> VisionTransformer:
    """The backbone's architecture with ``num_classes`` outputs and ``surgery``, strictly loaded."""
    model = apply_surgery(create_vit(meta.base.name, **{**meta.base.kwargs, "num_classes": num_classes}), surgery)
    model.load_state_dict(state, strict=True)
    return model.eval()


def deployable_forms(learner: ContinualLearner, meta: BundleMeta, calibration: torch.Tensor
                     ) -> dict[str, tuple[VisionTransformer, list[dict[str, Any]]]]:
    """``{"exact": (model, surgery), "merged": (model, surgery)}`` of a trained ``data`` learner."""
    cfg = learner.cfg
    classes = sum(h.out_features for h in learner.heads)
    exact_ops = [*meta.surgery, adapter_op(cfg, learner.tasks_seen)]
    exact = build_form(meta, exact_ops, classes, exact_state_dict(learner))
    scales = mean_scales(exact, calibration)
    merged = build_form(meta, list(meta.surgery), classes, {**folded_state_dict(learner.vit, scales),
                                                            **learner.head_state()})
    return {"exact": (exact, exact_ops), "merged": (merged, list(meta.surgery))}


# ---------------------------------------------------------------------------------------------- the command


def check_backbone(vit: VisionTransformer, meta: BundleMeta) -> None:
    if any(s.get("op") == "adapter_scales" for s in meta.surgery):
        raise EdgeVitError("the backbone already carries DATA adapters; start from a plain bundle")
    if any(isinstance(m, ScaledLinear) for m in vit.modules()):
        raise EdgeVitError("the backbone already carries adapters; start from a plain bundle")


def form_metrics(learner: ContinualLearner, forms: dict, tasks: Sequence[Task], measured: dict,
                 calibration: torch.Tensor, cfg: ContinualConfig) -> dict[str, Any]:
    """What both bundles record: the accuracy matrix of training, each form's final accuracy per task, and how
    far the exact form is from the trained model."""
    with torch.no_grad():
        probe = calibration[:64]
        exact_error = float((forms["exact"][0](probe) - learner(probe)).abs().max())
    final = {name: [round(evaluate(model, t.splits["test"]), 5) for t in tasks] for name, (model, _) in forms.items()}
    summary = {name: {"final_accuracy": row, "final_average_accuracy": round(sum(row) / len(row), 5)}
               for name, row in final.items()}
    return {"continual": {"protocol": cfg.protocol, "tasks": [t.name for t in tasks],
                          "how": "test top-1 per task after each task, no task id (argmax over all seen classes)",
                          "accuracy": measured["accuracy"],
                          "final_average_accuracy": measured["final_average_accuracy"],
                          "average_forgetting": measured["average_forgetting"], "forms": summary},
            "exact_max_abs_diff": exact_error, "history": measured["history"]}


def continual_report(out: Path, cfg: ContinualConfig) -> tuple[dict, str]:
    """The accuracy after each task, and the deployed forms' final average accuracy."""
    metrics = read_meta(out).metrics
    c = metrics["continual"]
    rows = "\n".join(f"  after task {i + 1}: " + " ".join(f"{a:.3f}" for a in row)
                     for i, row in enumerate(c["accuracy"]))
    forms = ", ".join(f"{k} {v['final_average_accuracy']:.4f}" for k, v in c["forms"].items())
    return {"run": str(out), **c}, (f"wrote {out} ({cfg.form}); test top-1 per task ({', '.join(c['tasks'])}):\n"
                                    f"{rows}\nfinal average accuracy {c['final_average_accuracy']:.4f}, average "
                                    f"forgetting {c['average_forgetting']:.4f}; deployed forms: {forms}"
                                    f"{references_line(metrics)}")


@register("continual", ContinualConfig, own_loss=True, report=continual_report, source=Source(
    "--model", "Backbone bundle (frozen), trained on classes other than the tasks' ones."))
def train_continual(source: str | Path, data: str, out: Path, cfg: ContinualConfig, train_cfg: TrainConfig,
                    resume: bool) -> Path:
    """Learn a task sequence with DATA on the frozen bundle ``source``; write the ``exact`` and ``merged`` bundles.

    Args:
        source: the backbone bundle, trained on classes other than the tasks' (e.g. digits 0-4).
        data: ``digits`` or an image folder.
        out: the run directory: the ``cfg.form`` bundle, the other form under ``out/<form>/``, per-task
            checkpoints under ``out/task<i>/``.
        cfg: continual settings, with the tasks' classes (default: DATA's classes the backbone was not trained on).
        train_cfg: optimisation settings of every task.
        resume: continue a killed run in ``out``.
    """
    check_run_dir(out, resume, checkpoint=f"task0/{CHECKPOINT}")
    vit, meta = load_bundle(source)
    check_backbone(vit, meta)
    classes = task_classes(meta, data, cfg.classes)
    cfg = cfg.resolved(len(classes), num_blocks(vit), vit.embed_dim)
    tasks = make_tasks(data, classes, meta.preprocessing, cfg, train_cfg.augment)
    joint = joint_task(tasks).splits
    probe = linear_probe(functools.partial(pooled_features, vit.eval()), joint["train"], joint["val"], joint["test"])
    references = frozen_reference(vit, tasks, cfg, train_cfg.seed) if cfg.protocol == "class" else {}
    if cfg.bounds:
        references.update(train_bounds(vit, tasks, cfg, train_cfg, out, resume))
    learner = ContinualLearner(vit, cfg, train_cfg.seed)
    measured, result = run_tasks(learner, tasks, train_cfg, out, resume)
    learner.cpu().eval()
    calibration = torch.cat([calibration_batch(t.splits["val"], min(cfg.calibration_images, len(t.splits["val"])),
                                               train_cfg.seed) for t in tasks])
    forms = deployable_forms(learner, meta, calibration)
    metrics = form_metrics(learner, forms, tasks, measured, calibration, cfg)
    metrics["references"] = {"linear probe": {**probe.record(), "graph": "source", "bound": "upper",
                                              "note": "frozen backbone, one head fitted on every task's data at "
                                                      "once"}, **references}
    adapted = [p for m in learner.vit.modules() if isinstance(m, ScaledLinear) for p in (m.down, m.up)]
    trainable = sum(p.numel() for p in [*adapted, *(p for r in routers_of(learner.vit) for p in r.parameters())])
    for name, (model, surgery) in forms.items():
        meta_out = BundleMeta(base=BaseArch(name=meta.base.name, kwargs={**meta.base.kwargs,
                                                                          "num_classes": model.num_classes}),
                              surgery=surgery, preprocessing=meta.preprocessing, classes=classes,
                              data=data_ref(data, classes))
        finish_run(out if name == cfg.form else out / name, model, meta_out, "continual", cfg, train_cfg, result,
                   {"form": name, **metrics}, backbone=str(source),
                   backbone_classes=meta.data.classes or meta.classes, adapter_params=trainable,
                   calibration_images=len(calibration))
    return out
