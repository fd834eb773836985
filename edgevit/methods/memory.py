"""Memorizing ViT (MoViT) and its compact summarized memory tables.

Paper vs ours (see also :mod:`edgevit.vit.memory`):

* [paper: MoViT, arXiv 2303.15553, abstract only] an external memory caches attention snapshots during
  training; *attention temporal moving average* (ATMA) updates stored memories with their history to avoid
  overfitting; *prototypical attention learning* (PAL) distils the memory into a small representative
  set for fast inference. No code or equations were available.
* [paper: Memorizing Transformers, Wu et al. 2022] a non-differentiable key/value cache written from past
  activations, read by top-k attention with the layer's own queries, blended by a learned per-head gate.
* [ours] the concrete algorithm:

  - one block (default the last) gets a memory of ``S`` slots per head (``S`` <= number of training
    images); each training image writes one slot: the key and value of its pooled token (the class token,
    or the mean over patch tokens for mean-pooled models) in every head, with its label kept alongside;
  - slots are split between classes in proportion to their share of the training set and each class
    writes its slots round-robin, so a slot never mixes classes; the first write copies, a rewrite is ATMA
    ``M <- beta*M + (1-beta)*M_new`` for keys and values;
  - the memory is prefilled by one pass over the training set, then every training step reads it (the
    gate, queries and the whole backbone learn) and writes its batch *after* the optimizer step (a
    one-step delay, so autograd never sees a table that changed under it); evaluation only reads;
  - PAL ``kmeans``: per head, k-means (k-means++ init, seeded) on the ``S`` keys into ``P`` prototypes;
    a prototype's value is the softmax(bias)-weighted mean of its members' values and its bias the
    logsumexp of their biases (``log(count)`` for a full memory), so with ``P = S`` the table is the
    memory itself and with near-duplicate keys a prototype keeps its members' attention mass;
  - PAL ``learned``: the k-means table is then fine-tuned briefly (keys, values, bias, gate; backbone
    frozen) to match the full-memory model's class distribution (KL distillation).

The deployable result is a bundle whose graph carries the ``P``-row table as constants (surgery op
``memory_table``); the full memory (slots, labels, counts) stays in the run's ``checkpoint.pt``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgevit.data import data_ref, fraction_subset, load_split, source_classes
from edgevit.errors import EdgeVitError
from edgevit.methods.registry import MethodConfig, Source, register
from edgevit.settings import setting
from edgevit.train import TrainConfig, TrainResult, fit
from edgevit.train.loop import CHECKPOINT, load_checkpoint
from edgevit.train.run import check_run_dir, finish_run, source_reference, split_metrics
from edgevit.vit import BundleMeta, apply_surgery, load_bundle, read_meta
from edgevit.vit.bundle import build_model
from edgevit.vit.memory import MemoryTable, capture_pooled_kv, memory_of, set_memory
from edgevit.vit.model import block_index, num_blocks

FULL_MEMORY_SLOTS = "full_memory_slots"
GATE_MOVED = 0.01  # a gate closer than this to its initial value was not learned


@dataclass
class MemoryConfig(MethodConfig):
    """Fine-tune a bundle with a MoViT memory (ATMA updates) and deploy a compact summarized table (PAL).

    \b
    Example:
      edgevit train memory --model runs/base --data digits -o runs/memory --prototypes 64
    """

    training: ClassVar[dict] = {"epochs": 15, "lr": 5e-4, "warmup_epochs": 1.0}

    block: int = setting(-1, "Block that gets the memory branch (negative counts from the end).")
    slots: int = setting(2048, "Full training memory size S per head (capped at the number of training images).")
    topk: int | None = setting(32, "Memory rows each query attends to (0 or None: dense attention over all rows).")
    momentum: float = setting(0.9, "ATMA beta: a rewritten slot becomes beta*old + (1-beta)*new.")
    prototypes: int = setting(64, "Rows P of the deployed table (PAL summarization); 0 deploys the full memory.")
    summarize: Literal["kmeans", "learned"] = setting("kmeans", "PAL: k-means on keys (values averaged), or k-means "
                                                                "then a brief distillation of the table.")
    summarize_epochs: int = setting(5, "Epochs of --summarize learned.")
    gate_init: float = setting(-1.0, "Initial per-head gate logit (sigmoid(-1) = 0.27).")
    data_fraction: float = setting(1.0, "Class-stratified fraction of the training split (low-data regimes).")

    def __post_init__(self) -> None:
        if self.topk == 0:  # as the command line says dense attention
            self.topk = None
        super().__post_init__()

    def check(self) -> None:
        if self.slots < 1:
            raise EdgeVitError(f"--slots must be positive, got {self.slots}")
        if self.topk is not None and self.topk < 1:
            raise EdgeVitError(f"--topk must be positive, got {self.topk}")
        if not 0.0 <= self.momentum < 1.0:
            raise EdgeVitError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.prototypes < 0:
            raise EdgeVitError(f"--prototypes must be >= 0 (0 deploys the full memory), got {self.prototypes}")


def atma(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """Attention temporal moving average: ``momentum * old + (1 - momentum) * new``."""
    return momentum * old + (1.0 - momentum) * new


class SlotMemory(nn.Module):
    """Bookkeeping of a full training memory: which slots belong to which class, and how often each was
    written. The keys and values themselves live in the block's :class:`MemoryTable` (``S`` rows).

    Everything is a buffer, so the memory is part of the training checkpoint and a resumed run continues
    with the same contents.

    Args:
        targets: labels of the training images (slots are split between classes in proportion).
        slots: requested size ``S`` (capped at ``len(targets)``).
        num_classes: classes of the task.
    """

    def __init__(self, targets: list[int], slots: int, num_classes: int) -> None:
        super().__init__()
        counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=num_classes)
        budget = min(slots, len(targets))
        share = counts * budget / max(1, len(targets))
        per_class = torch.where(counts > 0, share.floor().long().clamp(min=1), 0)
        # Largest remainders get the slots that flooring left over, so the memory has exactly `budget` rows.
        for c in torch.argsort(share - share.floor(), descending=True)[:max(0, budget - int(per_class.sum()))]:
            per_class[c] += 1
        self.register_buffer("class_slots", per_class)
        self.register_buffer("class_start", torch.cumsum(per_class, 0) - per_class)
        self.register_buffer("cursor", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("labels", torch.repeat_interleave(torch.arange(num_classes), per_class))
        self.register_buffer("writes", torch.zeros(int(per_class.sum()), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.writes.numel()

    @torch.no_grad()
    def write(self, table: MemoryTable, keys: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
              momentum: float) -> None:
        """Write one slot per image (``keys``/``values``: ``B x H x d_h``) into its class's next slot:
        a copy into an empty slot, ATMA into a used one."""
        for key, value, label in zip(keys, values, labels.tolist(), strict=True):
            if self.class_slots[label] == 0:
                raise EdgeVitError(f"class {label} has no memory slots (it had no training images)")
            slot = int(self.class_start[label] + self.cursor[label] % self.class_slots[label])
            self.cursor[label] += 1
            beta = momentum if self.writes[slot] > 0 else 0.0
            table.keys[:, slot] = atma(table.keys[:, slot], key.to(table.keys), beta)
            table.values[:, slot] = atma(table.values[:, slot], value.to(table.values), beta)
            self.writes[slot] += 1


class MemoryTrainer(nn.Module):
    """The module ``fit`` trains: a ViT whose ``block`` reads a full memory, and that memory's bookkeeping.

    Args:
        model: the ViT, with an ``S``-row :class:`MemoryTable` in ``block``.
        block: the memory block (non-negative).
        memory: the slot bookkeeping for that table.
        momentum: ATMA ``beta``.
        label_smoothing: of the training loss.
    """

    def __init__(self, model: VisionTransformer, block: int, memory: SlotMemory, momentum: float,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.memory = memory
        self.block = block
        self.momentum = momentum
        self.label_smoothing = label_smoothing
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def table(self) -> MemoryTable:
        return memory_of(self.model, self.block)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy of a forward pass that reads the memory; the batch is written at the next call."""
        self.flush()
        with capture_pooled_kv(self.model, self.block) as kv:
            logits = self.model(images)
        self._pending = (kv["keys"], kv["values"], labels.detach())
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits

    def flush(self) -> None:
        """Write the last training batch (held back until its backward pass and optimizer step are done)."""
        if self._pending is not None:
            self.memory.write(self.table, *self._pending, momentum=self.momentum)
            self._pending = None

    def flushed(self) -> MemoryTrainer:
        """``self`` after :meth:`flush`: ``fit`` evaluates through this at every epoch end, right before it
        checkpoints, so validation and the checkpoint (hence a resumed run) see every write."""
        self.flush()
        return self

    @torch.no_grad()
    def prefill(self, dataset: Dataset, batch_size: int = 256) -> None:
        """One pass over ``dataset`` in order, writing every image: the memory's starting contents."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            with capture_pooled_kv(self.model, self.block) as kv:
                self.model(images.to(device))
            self.memory.write(self.table, kv["keys"], kv["values"], labels, momentum=self.momentum)
        self.train(was_training)


def kmeans(points: torch.Tensor, k: int, iterations: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding on ``points`` (``S x d``). Returns ``(centroids, assignment)``.

    An empty cluster keeps its centroid. With ``k = S`` and distinct points every point is its own cluster.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} points")
    generator = torch.Generator().manual_seed(seed)
    points = points.float()
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (points - points[chosen[0]]).pow(2).sum(1)
    for _ in range(1, k):
        # Chosen points have distance 0 and are never drawn again; all-zero distances mean duplicates only.
        weights = nearest if nearest.sum() > 0 else torch.ones(n).index_fill_(0, torch.tensor(chosen), 0)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        nearest = torch.minimum(nearest, (points - points[pick]).pow(2).sum(1))
    centroids = points[chosen].clone()
    assignment = torch.cdist(points, centroids).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        sizes = torch.bincount(assignment, minlength=k)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled].unsqueeze(1)
        new = torch.cdist(points, centroids).argmin(1)
        if torch.equal(new, assignment):
            break
        assignment = new
    return centroids, assignment


@torch.no_grad()
def summarize_table(table: MemoryTable, prototypes: int, seed: int = 0, topk: int | None = None) -> MemoryTable:
    """PAL by k-means: a ``prototypes``-row table standing in for ``table`` (see the module docstring).

    Args:
        table: the full memory table (``S`` rows).
        prototypes: ``P`` rows per head (``P > S`` returns a copy of the table).
        seed: seeds the k-means++ draw.
        topk: the new table's top-k (default: the full table's).
    """
    heads, slots, head_dim = table.keys.shape
    device = table.keys.device
    topk = table.topk if topk is None else topk
    if prototypes > slots:
        return copy.deepcopy(table)
    table = copy.deepcopy(table).cpu().float()
    summary = MemoryTable(heads, prototypes, head_dim, topk)
    for h in range(heads):
        centroids, assignment = kmeans(table.keys[h], prototypes, seed=seed + h)
        weights = torch.zeros(prototypes, slots).index_put_((assignment, torch.arange(slots)), table.bias[h])
        weights = weights.masked_fill(F.one_hot(assignment, prototypes).T == 0, float("-inf"))
        empty = weights.isinf().all(1)
        # An empty cluster keeps its centroid with a -inf bias: it is never attended to.
        summary.bias[h] = torch.where(empty, float("-inf"), weights.logsumexp(1))
        weights[empty] = 0.0
        summary.values[h] = weights.softmax(1) @ table.values[h].float()
        summary.keys[h] = centroids
    summary.gate_logit.copy_(table.gate_logit)
    return summary.to(device)


def with_table(model: VisionTransformer, block: int, table: MemoryTable) -> VisionTransformer:
    """A copy of ``model`` whose ``block`` reads ``table`` instead of its own memory."""
    other = copy.deepcopy(model)
    set_memory(other, block, copy.deepcopy(table))
    return other


class TableDistiller(nn.Module):
    """Learned PAL: a student whose only trainable part is its memory table learns the full-memory teacher's
    class distribution (KL at temperature 1)."""

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer, block: int) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        student.requires_grad_(False)
        memory_of(student, block).requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher(images).log_softmax(-1)
        logits = self.student(images)
        return F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean"), logits


@dataclass
class MemoryTask:
    """A bundle's model readied for a data source: head sized for its classes, the training subset chosen (as
    trained on, augmented, and as evaluated, which prefills the memory)."""

    model: VisionTransformer
    meta: BundleMeta
    train_set: Dataset
    prefill_set: Dataset
    val_set: Dataset


def prepare_task(model_dir: str | Path, data: str, fraction: float, train_cfg: TrainConfig) -> MemoryTask:
    """Load the bundle in ``model_dir`` for training on all classes of ``data``.

    A bundle trained on other classes gets a fresh classifier for ``data``'s classes (transfer); the
    training split is cut to a class-stratified ``fraction`` (seeded by ``train_cfg.seed``).
    """
    model, meta = load_bundle(model_dir)
    meta = meta.model_copy(deep=True)
    classes = source_classes(data)
    if classes != meta.classes:
        torch.manual_seed(train_cfg.seed)
        model.reset_classifier(len(classes))
        meta.base.kwargs["num_classes"] = len(classes)
        meta.classes = classes
    meta.data = data_ref(data)
    train, plain = (fraction_subset(load_split(data, "train", meta.preprocessing, augment=augment), fraction,
                                    train_cfg.seed) for augment in (train_cfg.augment, None))
    return MemoryTask(model.train(), meta, train, plain, load_split(data, "val", meta.preprocessing))


def resolve_block(model: VisionTransformer, block: int) -> int:
    try:
        return block_index(model, block)
    except IndexError:
        raise EdgeVitError(f"--block {block} is out of range for a {num_blocks(model)}-block model") from None


def train_full_memory(task: MemoryTask, cfg: MemoryConfig, train_cfg: TrainConfig, out: Path,
                      resume: bool = False) -> tuple[MemoryTrainer, TrainResult]:
    """Install an ``S``-slot memory in ``cfg.block``, prefill it, and fine-tune the whole model reading it.

    Returns the trainer (its model reads the full memory; the memory is also in ``out/checkpoint.pt``) and
    what the training did.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise EdgeVitError("memory training runs in one process: the memory is written per batch and is not "
                           "synchronised across torchrun ranks")
    model = task.model
    block = resolve_block(model, cfg.block)
    memory = SlotMemory(task.train_set.targets, cfg.slots, len(task.meta.classes))
    apply_surgery(model, [{"op": "memory_table", "block": block, "slots": memory.size, "topk": cfg.topk}])
    table = memory_of(model, block)
    table.keys.requires_grad_(False)
    table.values.requires_grad_(False)
    table.bias.requires_grad_(False)
    with torch.no_grad():
        table.gate_logit.fill_(cfg.gate_init)
    trainer = MemoryTrainer(model, block, memory, cfg.momentum, train_cfg.label_smoothing)
    trainer.prefill(task.prefill_set)
    result = fit(trainer, task.train_set, train_cfg, out, loss_fn=lambda m, x, y: trainer.loss(x, y),
                 val_set=task.val_set, eval_model=MemoryTrainer.flushed, resume=resume, description="memory")
    return trainer.eval(), result


def learn_table(model: VisionTransformer, block: int, table: MemoryTable, task: MemoryTask, epochs: int,
                train_cfg: TrainConfig, out: Path, resume: bool = False) -> VisionTransformer:
    """Learned PAL: fine-tune ``table`` (keys, values, bias, gate) in a copy of ``model`` to reproduce
    ``model``'s (full memory) predictions, backbone frozen. Returns the student with the learned table."""
    distiller = TableDistiller(with_table(model, block, table), model, block)
    cfg = replace(train_cfg, epochs=epochs, weight_decay=0.0, warmup_epochs=0.0)
    fit(distiller, task.train_set, cfg, out, loss_fn=lambda m, x, y: distiller.loss(x, y),
        val_set=task.val_set, resume=resume, description="pal")
    return distiller.student.requires_grad_(True).eval()


def summarized(full_model: VisionTransformer, block: int, task: MemoryTask, cfg: MemoryConfig,
               train_cfg: TrainConfig, out: Path, resume: bool) -> VisionTransformer:
    """The deployed model: ``full_model`` reading its ``cfg.prototypes``-row PAL table (k-means, then learned
    for ``cfg.summarize`` ``learned``; the learned table trains in ``out/pal``), or the full memory itself."""
    full = memory_of(full_model, block)
    if not 0 < cfg.prototypes < full.slots:
        return full_model
    table = summarize_table(full, cfg.prototypes, seed=train_cfg.seed)
    if cfg.summarize == "learned":
        return learn_table(full_model, block, table, task, cfg.summarize_epochs, train_cfg, out / "pal", resume)
    return with_table(full_model, block, table)


def memory_metrics(task: MemoryTask, full_top1: dict, full: MemoryTable, table: MemoryTable) -> dict:
    """The full memory's top-1s (``split_metrics`` of the full model) and sizes next to the deployed table's."""
    return {"train_images": len(task.train_set), FULL_MEMORY_SLOTS: full.slots,
            "full_memory_val_top1": full_top1["val_top1"], "full_memory_test_top1": full_top1["test_top1"],
            "table_bytes": table.table_bytes(), "full_memory_bytes": full.table_bytes(),
            "gate": [round(g, 4) for g in table.gate().flatten().tolist()]}


def gate_findings(table: MemoryTable, cfg: MemoryConfig, steps: int) -> list[str]:
    """A sentence when the gates did not move from their initial value: then the memory's share of the output is
    the one ``--gate-init`` set, not one training found (few optimizer steps: small data, few epochs)."""
    start = torch.sigmoid(torch.tensor(cfg.gate_init)).item()
    moved = float((table.gate() - start).abs().max())
    if moved >= GATE_MOVED:
        return []
    return [f"the memory gate stayed at its initial {start:.2f} (moved {moved:.3f} in {steps} optimizer steps): the "
            "memory's share was set by --gate-init, not learned; train longer or on more data"]


@register("memory", MemoryConfig, own_loss=True, source=Source(
    "--model", "The bundle to start from (a run directory); its head is replaced if DATA has other classes."))
def train_memory(source: str | Path, data: str, out: Path, cfg: MemoryConfig, train_cfg: TrainConfig,
                 resume: bool) -> Path:
    """Fine-tune the bundle ``source`` with a MoViT memory on ``data``; write the summarized bundle.

    Args:
        source: the starting bundle (its classifier is replaced when ``data`` has other classes).
        data: ``digits`` or an image folder.
        out: the run directory: the bundle (``P``-row table) plus ``checkpoint.pt`` holding the full memory
            (``pal/checkpoint.pt`` for the learned summarization).
        cfg: memory settings.
        train_cfg: optimisation settings of the memory fine-tune.
        resume: continue a killed run in ``out``.
    """
    out = check_run_dir(out, resume)
    task = prepare_task(source, data, cfg.data_fraction, train_cfg)
    block = resolve_block(task.model, cfg.block)
    trainer, result = train_full_memory(task, cfg, train_cfg, out, resume)
    deployed = summarized(trainer.model, block, task, cfg, train_cfg, out, resume)
    table = memory_of(deployed, block)
    meta = task.meta
    meta.surgery = [*meta.surgery, {"op": "memory_table", "block": block, "slots": table.slots, "topk": table.topk}]
    full_top1 = split_metrics(trainer.model, meta)
    metrics = memory_metrics(task, full_top1, trainer.table, table)
    metrics["references"] = source_reference("plain ViT it started from", read_meta(source), meta)
    metrics["findings"] = gate_findings(table, cfg, result.steps)
    return finish_run(out, deployed, meta, "memory", cfg, train_cfg, result, metrics,
                      top1=full_top1 if deployed is trainer.model else None, base=str(source))


def full_memory_model(run_dir: str | Path) -> VisionTransformer:
    """The run's model reading its full training memory (from ``checkpoint.pt``), e.g. to compare it with
    the summarized bundle. Analysis only: the full memory is never part of a bundle."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    slots = meta.metrics.get(FULL_MEMORY_SLOTS)
    if not meta.surgery or meta.surgery[-1].get("op") != "memory_table" or not slots:
        raise EdgeVitError(f"{run_dir} is not a memory run (no memory_table op / {FULL_MEMORY_SLOTS})")
    full = meta.model_copy(deep=True)
    full.surgery[-1]["slots"] = slots
    full.surgery[-1]["topk"] = meta.provenance.get("config", {}).get("topk")
    model = build_model(full)
    state = load_checkpoint(run_dir / CHECKPOINT)["model"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    return model.eval()
