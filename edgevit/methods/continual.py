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

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from edgevit.data import calibration_batch, data_ref, load_split
from edgevit.errors import EdgeVitError
from edgevit.train import TrainConfig, evaluate, fit, is_main_process
from edgevit.train.loop import CHECKPOINT
from edgevit.train.run import check_run_dir, finish_run, method_train_config, unseen_classes
from edgevit.vit import BundleMeta, apply_surgery, create_vit, load_bundle
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

log = logging.getLogger("edgevit")

PROTOCOLS = ("class", "domain")
LEARNERS = ("data", "lora", "finetune", "head")
FORMS = ("merged", "exact")
DOMAINS = ("identity", "invert", "rot90", "hflip", "noise")
NOISE_STD = 0.3  # of the [0, 1] pixel range


@dataclass
class ContinualConfig:
    """A continual-learning run.

    Args:
        protocol: ``class`` (class-incremental, growing head) or ``domain`` (same classes, new transform
            per task, shared head).
        tasks: number of tasks T; default: ``classes // 2`` (class), 4 (domain).
        ranks: ranks (r1, r2) of the task-shared low-rank and task-specific high-rank paths.
        components: rows M per task of each router's K, A, W (per path).
        group_size: blocks per router group (default :func:`default_group_size`).
        ortho_weight: weight of the orthogonality loss (the authors' ``ortho_mu``).
        form: the bundle written to the run directory (the other form goes to ``RUN/<other form>/``).
        learner: ``data``; the baselines of ``benchmarks/study_continual.py`` are ``lora`` (sequential LoRA),
            ``finetune`` (sequential full fine-tuning) and ``head`` (frozen backbone, heads only).
        lora_rank: rank of the ``lora`` baseline.
        calibration_images: unlabeled val images per task the merged form's mean scales are measured on.
        head_scale: the cosine heads' logit scale (:class:`CosineHead`).
    """

    protocol: str = "class"
    tasks: int | None = None
    ranks: tuple[int, ...] = (4, 16)
    components: int = 8
    group_size: int | None = None
    ortho_weight: float = 1.0
    form: str = "merged"
    learner: str = "data"
    lora_rank: int = 8
    calibration_images: int = 64
    head_scale: float = 16.0

    def resolved(self, classes: int, depth: int, dim: int) -> ContinualConfig:
        """Defaults filled in for ``classes`` task classes and a ``depth`` x ``dim`` ViT; validated."""
        for name, value, allowed in (("protocol", self.protocol, PROTOCOLS), ("learner", self.learner, LEARNERS),
                                     ("form", self.form, FORMS)):
            if value not in allowed:
                raise EdgeVitError(f"unknown {name} {value!r} ({', '.join(allowed)})")
        tasks = self.tasks or (classes // 2 if self.protocol == "class" else 4)
        if self.protocol == "class" and not 1 <= tasks <= classes // 2:
            raise EdgeVitError(f"{classes} classes make 1..{classes // 2} class-incremental tasks of >= 2 "
                               f"classes, got --tasks {tasks}")
        if self.protocol == "domain" and not 1 <= tasks <= len(DOMAINS):
            raise EdgeVitError(f"domain-incremental runs have 1..{len(DOMAINS)} tasks ({', '.join(DOMAINS)}), "
                               f"got --tasks {tasks}")
        if classes < 2:
            raise EdgeVitError(f"continual tasks need at least 2 classes, got {classes}")
        if len(self.ranks) != 2 or min(self.ranks) < 1:
            raise EdgeVitError(f"--ranks takes two positive ranks r1,r2, got {list(self.ranks)}")
        if self.components < 1 or self.components * tasks > dim:
            raise EdgeVitError(f"--components {self.components} x {tasks} tasks must be in 1..{dim} (the width): "
                               "each task's components are orthogonal to the earlier ones")
        group = self.group_size or default_group_size(depth)
        if not 1 <= group <= depth:
            raise EdgeVitError(f"group size must be in 1..{depth}, got {group}")
        if not (math.isfinite(self.ortho_weight) and self.ortho_weight >= 0):
            raise EdgeVitError(f"ortho weight must be >= 0, got {self.ortho_weight}")
        if self.calibration_images < 1:
            raise EdgeVitError(f"calibration images must be positive, got {self.calibration_images}")
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

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.rows[i]]
        return domain_transform(image, self.domain, self.pre, self.rows[i]), label


@dataclass
class Task:
    """One task: its name, the head labels it uses (``[lo, hi)``) and its splits."""

    name: str
    labels: tuple[int, int]
    splits: dict[str, Dataset] = field(repr=False)


def task_classes(meta: BundleMeta, data: str, classes: list[str] | None) -> list[str]:
    """The classes to learn: given, or DATA's classes the backbone was not trained on (see ``unseen_classes``)."""
    return unseen_classes(meta, data, classes, "continual tasks")


def make_tasks(data: str, classes: list[str], pre: Preprocessing, cfg: ContinualConfig) -> list[Task]:
    """The task sequence of a resolved ``cfg`` over ``classes`` of ``data``."""
    splits = {s: load_split(data, s, pre, classes) for s in ("train", "val", "test")}
    if cfg.protocol == "domain":
        return [Task(domain, (0, len(classes)),
                     {s: TaskView(d, range(len(d)), domain, pre) for s, d in splits.items()})
                for domain in DOMAINS[:cfg.tasks]]
    cuts = [round(i * len(classes) / cfg.tasks) for i in range(cfg.tasks + 1)]
    tasks = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        views = {s: TaskView(d, [i for i, y in enumerate(d.targets) if lo <= y < hi], "identity", pre)
                 for s, d in splits.items()}
        tasks.append(Task(",".join(classes[lo:hi]), (lo, hi), views))
    return tasks


def joint_task(tasks: Sequence[Task]) -> Task:
    """Every task's data as one task (the joint-training upper bound)."""
    splits = {}
    for s in ("train", "val", "test"):
        joined = ConcatDataset([t.splits[s] for t in tasks])
        joined.targets = [y for t in tasks for y in t.splits[s].targets]
        splits[s] = joined
    return Task("joint", (min(t.labels[0] for t in tasks), max(t.labels[1] for t in tasks)), splits)


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


class ContinualLearner(nn.Module):
    """A backbone plus what a continual learner trains: adapters and routers (``data``), LoRA (``lora``),
    everything (``finetune``) or nothing but heads (``head``); and the heads of the tasks seen so far.

    Args:
        vit: the backbone (modified in place; its classifier is dropped).
        cfg: a resolved :class:`ContinualConfig`.
        seed: seeds the adapters' and components' initialisation.
    """

    def __init__(self, vit: VisionTransformer, cfg: ContinualConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        vit.reset_classifier(0)
        self.vit = vit
        self.heads = nn.ModuleList()
        self.tasks_seen = 0
        torch.manual_seed(seed)
        for p in vit.parameters():
            p.requires_grad_(cfg.learner == "finetune")
        if cfg.learner == "data":
            groups = block_groups(len(vit.blocks), cfg.group_size)
            routers = [TaskRouter(vit.embed_dim, len(cfg.ranks), cfg.components) for _ in groups]
            for linear in inject_adapters(vit, cfg.ranks, cfg.group_size, routers):
                for lo, r in zip((0, cfg.ranks[0]), cfg.ranks, strict=True):
                    nn.init.normal_(linear.down[lo:lo + r], std=1 / r)
        elif cfg.learner == "lora":
            for linear in inject_adapters(vit, (cfg.lora_rank,), cfg.group_size, None):
                nn.init.kaiming_uniform_(linear.down, a=math.sqrt(5))  # PEFT's LoRA init (U = 0)

    def begin_task(self, task: Task) -> None:
        """Make room for ``task``: its router components and its head (class protocol; the domain protocol
        shares one head), initialised from the task's class prototypes."""
        generator = torch.Generator().manual_seed(self.seed * 1009 + self.tasks_seen)
        device = next(self.vit.parameters()).device
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
        device = next(self.vit.parameters()).device
        sums = torch.zeros(hi - lo, self.vit.embed_dim)
        for images, labels in DataLoader(task.splits["train"], batch_size=256):
            features = self.vit.forward_head(self.vit.forward_features(images.to(device)), pre_logits=True)
            sums.index_add_(0, labels - lo, F.normalize(features, dim=-1).cpu())
        self.train(was_training)
        return F.normalize(sums, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
        if self.training:
            features = F.normalize(features, dim=-1)
        return torch.cat([head(features) for head in self.heads], dim=-1)

    def ortho_loss(self) -> torch.Tensor:
        routers = routers_of(self.vit)
        if not routers:
            return torch.zeros(())
        return torch.stack([r.ortho_loss() for r in routers]).mean()

    def head_state(self) -> dict[str, torch.Tensor]:
        """The heads of every seen task as one plain classifier (``head.weight``, ``head.bias``)."""
        weight = torch.cat([h.scaled_weight().detach() for h in self.heads])
        return {"head.weight": weight, "head.bias": torch.zeros(weight.shape[0])}


def task_loss(learner: ContinualLearner, task: Task, label_smoothing: float):
    """Cross-entropy on the current task's logits (class protocol) or all logits (domain), plus the
    orthogonality penalty."""
    lo, hi = task.labels if learner.cfg.protocol == "class" else (0, None)

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        loss = F.cross_entropy(logits[:, lo:hi], labels - lo, label_smoothing=label_smoothing)
        if learner.cfg.ortho_weight > 0 and learner.cfg.learner == "data":
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
              resume: bool = False, evaluate_on: Sequence[Task] | None = None) -> dict[str, Any]:
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
        ``accuracy`` (test top-1 rows), per-task ``history`` and :func:`continual_metrics`.
    """
    accuracy, history = [], []
    for i, task in enumerate(tasks):
        learner.begin_task(task)
        task_dir = Path(out) / f"task{i}"
        task_dir.mkdir(parents=True, exist_ok=True)
        result = fit(learner, task.splits["train"], train_cfg, task_dir,
                     loss_fn=task_loss(learner, task, train_cfg.label_smoothing), val_set=task.splits["val"],
                     resume=resume, description=f"{learner.cfg.learner} task {i + 1}/{len(tasks)} [{task.name}]")
        seen = evaluate_on if evaluate_on is not None else tasks[:i + 1]
        accuracy.append([round(evaluate(learner, t.splits["test"]), 5) for t in seen])
        history.append({"task": task.name, "epochs": result.epochs, "steps": result.steps,
                        "train_seconds": round(result.seconds, 1)})
        log.info("after task %d (%s): test top-1 %s", i + 1, task.name, accuracy[-1])
    return {"accuracy": accuracy, "history": history, **continual_metrics(accuracy)}


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


def train_continual(
        model_run: str | Path,
        data: str,
        out: str | Path,
        cfg: ContinualConfig | None = None,
        train_cfg: TrainConfig | None = None,
        classes: list[str] | None = None,
        resume: bool = False,
) -> Path:
    """Learn a task sequence with DATA on a frozen bundle and write the ``exact`` and ``merged`` bundles.

    Args:
        model_run: the backbone bundle, trained on classes other than the tasks' (e.g. digits 0-4).
        data: ``digits`` or an image folder.
        out: the run directory: the ``cfg.form`` bundle, the other form under ``out/<form>/``, per-task
            checkpoints under ``out/task<i>/``.
        cfg: continual settings (``learner`` must be ``data``).
        train_cfg: optimisation settings of every task.
        classes: the tasks' classes (default: DATA's classes the backbone was not trained on).
        resume: continue a killed run in ``out``.
    """
    cfg = cfg or ContinualConfig()
    if cfg.learner != "data":
        raise EdgeVitError("train_continual writes DATA bundles; baselines run in benchmarks/study_continual.py")
    train_cfg = train_cfg or method_train_config("continual", data)
    out = check_run_dir(out, resume, checkpoint=f"task0/{CHECKPOINT}")
    vit, meta = load_bundle(model_run)
    check_backbone(vit, meta)
    classes = task_classes(meta, data, classes)
    cfg = cfg.resolved(len(classes), len(vit.blocks), vit.embed_dim)
    pre = meta.preprocessing
    tasks = make_tasks(data, classes, pre, cfg)
    learner = ContinualLearner(vit, cfg, train_cfg.seed)
    measured = run_tasks(learner, tasks, train_cfg, out, resume)
    if not is_main_process():
        return out

    learner.cpu().eval()
    calibration = torch.cat([calibration_batch(t.splits["val"], min(cfg.calibration_images, len(t.splits["val"])),
                                               train_cfg.seed) for t in tasks])
    forms = deployable_forms(learner, meta, calibration)
    with torch.no_grad():
        probe = calibration[:64]
        exact_error = float((forms["exact"][0](probe) - learner(probe)).abs().max())
    final = {name: [round(evaluate(model, t.splits["test"]), 5) for t in tasks] for name, (model, _) in forms.items()}
    summary = {name: {"final_accuracy": row, "final_average_accuracy": round(sum(row) / len(row), 5)}
               for name, row in final.items()}
    ref = data_ref(data, classes)
    trainable = sum(p.numel() for n, p in learner.named_parameters() if p.requires_grad and not n.startswith("heads"))
    for name, (model, surgery) in forms.items():
        meta_out = BundleMeta(base=BaseArch(name=meta.base.name, kwargs={**meta.base.kwargs,
                                                                          "num_classes": model.num_classes}),
                              surgery=surgery, preprocessing=pre, classes=classes, data=ref)
        metrics = {
            "form": name,
            "continual": {"protocol": cfg.protocol, "tasks": [t.name for t in tasks],
                          "how": "test top-1 per task after each task, no task id (argmax over all seen classes)",
                          "accuracy": measured["accuracy"],
                          "final_average_accuracy": measured["final_average_accuracy"],
                          "average_forgetting": measured["average_forgetting"], "forms": summary},
            "exact_max_abs_diff": exact_error, "history": measured["history"]}
        finish_run(out if name == cfg.form else out / name, model, meta_out, "continual", cfg, train_cfg,
                   metrics=metrics, backbone=str(model_run), backbone_classes=meta.data.classes or meta.classes,
                   adapter_params=trainable, calibration_images=len(calibration))
    return out

