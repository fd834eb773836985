"""One training loop for every method.

AdamW with linear warm-up and cosine decay, label smoothing, AMP on CUDA, a checkpoint after every epoch
(``checkpoint.pt``: model, optimizer, epoch, step, history) from which ``resume=True`` continues after a
kill, a progress bar, seeded data order and augmentation (a resumed run replays the same batches), optional
mixup/cutmix (timm's ``Mixup`` with ``SoftTargetCrossEntropy``), and DistributedDataParallel when started
under ``torchrun`` (gloo on CPU, NCCL on GPU).

The training DataLoader is built once per run with persistent workers: :class:`EpochBatches` yields each epoch's
seeded batches after ``set_epoch`` (as ``DistributedSampler`` does), and every image is augmented from its own
seed (:class:`SeededItems`), so an image's augmentation depends on the seed, epoch and position only, never
on which worker draws it or on how many epochs that worker has already run: a resumed run replays the same
augmented batches.

Methods customise training through ``loss_fn(model, images, labels) -> (loss, logits)`` and by passing
a module that holds everything trainable (frozen parts simply have ``requires_grad=False``). The training
images arrive augmented by the dataset (``edgevit.data.load_split(..., augment=cfg.augment)``): the loop only
seeds each image's draw.

:func:`fit` is made of small pieces, each usable alone: :class:`TrainState` (what a checkpoint holds; save and
resume), :class:`Stepper` (one optimizer step: schedule, AMP, clipping), :func:`train_epoch`, :func:`evaluate`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from edgevit.data import augmentation, class_balanced_weights, class_counts
from edgevit.errors import EdgeVitError
from edgevit.train.config import TrainConfig

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
CHECKPOINT = "checkpoint.pt"
# Evaluation batch: large enough to keep a CPU busy, small enough that a split's peak memory (decoded batch,
# prefetched batches in each worker, activations) stays the same for any folder size.
EVAL_BATCH = 64
console = Console(stderr=True)


@dataclass
class TrainResult:
    """What :func:`fit` did: epochs and optimizer steps in all, seconds of this call, one record per epoch, and
    the augmentation the training images went through (the dataset's own record; None: none)."""

    epochs: int
    steps: int
    seconds: float
    history: list[dict]
    augment: dict | None = None


def cross_entropy_loss(label_smoothing: float) -> LossFn:
    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing), logits

    return loss_fn


def soft_target_loss() -> LossFn:
    """timm's ``SoftTargetCrossEntropy`` on mixed targets (``N x classes`` probabilities)."""
    from timm.loss import SoftTargetCrossEntropy

    criterion = SoftTargetCrossEntropy()

    def loss_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = model(images)
        return criterion(logits, targets), logits

    return loss_fn


def batch_mixer(cfg: TrainConfig, num_classes: int):
    """timm's ``Mixup`` for ``cfg`` (None when mixup and cutmix are off; ``cfg`` has checked the alphas and the
    batch). It draws from numpy's global generator, which :func:`train_epoch` seeds before every batch from the
    epoch seed and step, so that a resumed run mixes the same pairs with the same weights."""
    if not cfg.mixes:
        return None
    if num_classes < 2:
        raise EdgeVitError("mixup/cutmix need a training set that names its classes")
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (no_decay if flat else decay).append(p)
    if not decay and not no_decay:
        raise EdgeVitError("nothing to train: every parameter is frozen")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(device_for_rank())
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (also before the process group starts), or a plain single process."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0


def _steps(n: int, batch: int, world: int) -> int:
    """Batches per epoch: full global batches only (at least one)."""
    return max(1, n // (max(1, batch // world) * world))


def _batches(n: int, batch: int, rank: int, world: int, seed: int, epoch: int,
             weights: torch.Tensor | None = None) -> list[list[int]]:
    """This rank's share of a seeded permutation (or, with ``weights``, of ``n`` seeded weighted draws with
    replacement), cut into ``batch // world`` sized batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        perm = torch.randperm(n, generator=generator).tolist()
    else:
        perm = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    per_rank = max(1, batch // world)
    steps = _steps(n, batch, world)
    return [perm[(s * world + rank) * per_rank:(s * world + rank + 1) * per_rank] for s in range(steps)]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """A batch sampler over one rank's seeded batches of an epoch (:func:`_batches`); call :meth:`set_epoch`
    before each epoch, as with ``DistributedSampler``. Yields ``(index, item seed)`` pairs for
    :class:`SeededItems`; the item seed is a function of the run seed, epoch, rank and position.

    Args:
        n: images in the training split.
        batch: global batch size.
        rank: this process's rank.
        world: number of processes.
        seed: the run seed.
        weights: per-image draw weights (class-balanced sampling), or None for a permutation.
    """

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int,
                 weights: torch.Tensor | None = None) -> None:
        self.n, self.batch, self.rank, self.world, self.seed, self.weights = n, batch, rank, world, seed, weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return _steps(self.n, self.batch, self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = _batches(self.n, self.batch, self.rank, self.world, self.seed, self.epoch, self.weights)
        base = ((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) * 1_000_003
        for step, batch in enumerate(batches):
            yield [(i, (base + step * len(batch) + slot) % 2**32) for slot, i in enumerate(batch)]


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)``: a dataset that augments itself (timm's transforms draw from
    python's, numpy's and torch's global generators) is seeded with ``seed`` before the item is read."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.augments = augmentation(dataset) is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if self.augments:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)  # CPU transforms: torch.manual_seed costs 100x (every device)
        return self.dataset[index]


def _decodes_files(dataset: Dataset) -> bool:
    """Whether ``dataset`` (or the dataset under a ``Subset``) decodes files: worth DataLoader workers."""
    base = getattr(dataset, "dataset", dataset)
    return hasattr(base, "files")


def train_loader(dataset: Dataset, sampler: EpochBatches, workers: int, device: torch.device) -> DataLoader:
    """The run's training loader: file decoding and augmentation in ``workers`` processes that persist across
    epochs (no re-spawn and re-import per epoch), pinned memory on CUDA. In-memory tensor sources are read in
    this process."""
    workers = workers if _decodes_files(dataset) else 0
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise EdgeVitError(f"cannot resume from {path}: {type(err).__name__}: {str(err)[:120]}") from None


@torch.no_grad()
def confusion_matrix(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = EVAL_BATCH,
                     workers: int = 0) -> torch.Tensor:
    """``num_classes x num_classes`` counts of (true label, predicted label) of ``model`` on ``dataset``
    (image files decoded in ``workers`` processes); the model's logits are the ``num_classes`` labels."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    workers = workers if _decodes_files(dataset) else 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        logits = model(images.to(device))
        if logits.shape[-1] != num_classes:
            raise ValueError(f"the model has {logits.shape[-1]} outputs for {num_classes} classes")
        predicted = logits.argmax(-1).cpu()
        matrix += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view_as(matrix)
    model.train(was_training)
    return matrix


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH, workers: int = 0) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``dataset`` (image files decoded in ``workers`` processes)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    workers = workers if _decodes_files(dataset) else 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        correct += (model(images.to(device)).argmax(-1).cpu() == labels).sum().item()
    model.train(was_training)
    return correct / max(1, len(dataset))


@dataclass
class TrainState:
    """What a checkpoint holds and every step advances: the model, its optimizer, the epochs and optimizer steps
    done so far, and one record per finished epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)

    def save(self, path: Path, cfg: TrainConfig) -> None:
        """Write the checkpoint atomically (a kill leaves the previous one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                    "step": self.step, "history": self.history, "config": asdict(cfg)}, tmp)
        os.replace(tmp, path)

    def resume(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``."""
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]


class Stepper:
    """One optimizer step: the warm-up/cosine learning rate of the step, the forward pass under AMP (bf16 where
    the GPU has it, fp16 with loss scaling otherwise, fp32 on the CPU), backward, gradient clipping.

    Args:
        state: the model and optimizer (its ``step`` is advanced).
        cfg: the optimisation settings.
        total: optimizer steps of the whole run.
        steps_per_epoch: for the warm-up length.
        device: where the model runs.
    """

    def __init__(self, state: TrainState, cfg: TrainConfig, total: int, steps_per_epoch: int,
                 device: torch.device) -> None:
        self.state, self.cfg, self.total = state, cfg, total
        self.warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
        self.amp = cfg.amp and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.dtype == torch.float16)

    def __call__(self, module: nn.Module, loss_fn: LossFn, images: torch.Tensor,
                 targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        optimizer = self.state.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr_at(self.state.step, self.total, self.warmup, self.cfg.lr)
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.amp):
            loss, logits = loss_fn(module, images, targets)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.state.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        self.state.step += 1
        return loss, logits


def train_epoch(module: nn.Module, loader: DataLoader, step: Stepper, loss_fn: LossFn, mixer, epoch_seed: int,
                progress: Progress, task: int) -> dict:
    """One pass over ``loader``'s batches (its sampler set to the epoch) through ``step``; returns the epoch's
    record: epoch, step, mean loss and training top-1 (against the unmixed labels)."""
    state, device = step.state, next(step.state.model.parameters()).device
    module.train()
    torch.manual_seed(epoch_seed)  # dropout and drop-path, if the model has them, replay on resume too
    loss_sum, correct, seen = 0.0, 0, 0
    for batch_index, (images, labels) in enumerate(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        targets = labels
        if mixer is not None:
            np.random.seed((epoch_seed * 1_000_003 + batch_index) % 2**32)
            images, targets = mixer(images, labels)
        loss, logits = step(module, loss_fn, images, targets)
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
        progress.update(task, advance=1, status=f"epoch {state.epoch + 1}/{step.cfg.epochs} "
                        f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    state.epoch += 1
    return {"epoch": state.epoch, "step": state.step, "loss": loss_sum / seen, "train_top1": correct / seen}


def log_counts(train_set: Dataset, balance: bool, description: str) -> None:
    """The training images per class, before the first epoch (rank 0)."""
    counts = class_counts(train_set)
    if counts and is_main_process():
        sampling = " (class-balanced sampling)" if balance else ""
        console.print(f"{description}: {len(train_set)} training images{sampling}; per class: "
                      + ", ".join(f"{c} {n}" for c, n in counts.items()), highlight=False, soft_wrap=True)


def log_epoch(description: str, epochs: int, record: dict) -> None:
    val = f" val {record['val_top1']:.3f}" if "val_top1" in record else ""
    console.print(f"{description} epoch {record['epoch']}/{epochs} loss {record['loss']:.3f} "
                  f"train {record['train_top1']:.3f}{val}", highlight=False)


def start_state(model: nn.Module, cfg: TrainConfig, checkpoint: Path, resume: bool, description: str) -> TrainState:
    """``model`` and a fresh AdamW, or, when resuming, what ``checkpoint`` holds (if it exists)."""
    state = TrainState(model, torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr))
    if resume and checkpoint.exists():
        state.resume(checkpoint)
        if is_main_process():
            console.print(f"[cyan]{description}: resuming after epoch {state.epoch} (step {state.step})")
    return state


def epoch_batches(train_set: Dataset, cfg: TrainConfig, rank: int, world: int,
                  device: torch.device) -> tuple[EpochBatches, DataLoader]:
    """This rank's seeded batches (class-balanced with ``cfg.balance``) and the loader that reads them."""
    weights = class_balanced_weights(train_set) if cfg.balance else None
    sampler = EpochBatches(len(train_set), cfg.batch_size, rank, world, cfg.seed, weights)
    return sampler, train_loader(train_set, sampler, cfg.workers, device)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                    disable=not is_main_process(), transient=True)


def fit(
        model: nn.Module,
        train_set: Dataset,
        cfg: TrainConfig,
        checkpoint_dir: str | Path,
        *,
        loss_fn: LossFn | None = None,
        val_set: Dataset | None = None,
        eval_model: Callable[[nn.Module], nn.Module] | None = None,
        resume: bool = False,
        description: str = "train",
) -> TrainResult:
    """Train ``model`` (in place) on ``train_set``.

    Args:
        model: the module whose trainable parameters are optimised (frozen ones are left alone).
        train_set: a dataset of ``(image tensor, label)``, augmented by itself if at all.
        cfg: optimisation settings.
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch.
        loss_fn: ``(model, images, labels) -> (loss, logits)``; default cross-entropy.
        val_set: evaluated after every epoch for the progress line and history.
        eval_model: picks the module to evaluate on ``val_set`` (default: ``model``).
        resume: continue from ``checkpoint.pt`` when one exists.
        description: label for the progress bar.
    """
    cfg.check_loss(description if loss_fn is not None else None)
    rank, world = init_distributed()
    mixer = batch_mixer(cfg, len(getattr(train_set, "classes", [])))
    loss_fn = loss_fn or (soft_target_loss() if mixer else cross_entropy_loss(cfg.label_smoothing))
    device = device_for_rank()
    torch.manual_seed(cfg.seed)
    ckpt = Path(checkpoint_dir) / CHECKPOINT
    state = start_state(model.to(device), cfg, ckpt, resume, description)
    module = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    log_counts(train_set, cfg.balance, description)
    sampler, loader = epoch_batches(train_set, cfg, rank, world, device)
    step = Stepper(state, cfg, len(sampler) * cfg.epochs, len(sampler), device)
    start = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(description, total=step.total, completed=state.step, status="")
        while state.epoch < cfg.epochs:
            sampler.set_epoch(state.epoch)
            record = train_epoch(module, loader, step, loss_fn, mixer, cfg.seed * 7919 + state.epoch * 31 + rank,
                                 progress, task)
            if val_set is not None and is_main_process():
                record["val_top1"] = evaluate(eval_model(model) if eval_model else model, val_set, workers=cfg.workers)
            state.history.append(record)
            if is_main_process():
                state.save(ckpt, cfg)
                log_epoch(description, cfg.epochs, record)
    if world > 1:
        dist.barrier()
    return TrainResult(state.epoch, state.step, time.perf_counter() - start, state.history, augmentation(train_set))
