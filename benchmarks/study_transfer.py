"""Low-data study of attention transfer on the embedded digits, set up as in the paper: a pre-trained teacher,
a small labelled downstream task, and students that learn it from scratch.

Pre-training: a teacher ViT (16 px, patch 4, width 64, depth 6, 4 heads) is trained on digits 0-4 (the whole
train split of those classes). Downstream task: digits 5-9, of which each seed draws a different
class-stratified ``--fraction`` of the train split. Every arm trains on that subset with the same steps,
learning rate schedule and augmentation:

* teacher fine-tuned: the pre-trained weights with a new head, fine-tuned (lr 5e-4): the paper's baseline;
* student from scratch: a smaller ViT (width 32, depth 4, 2 heads by default), cross-entropy only;
* attention distillation: + 3.0 x soft cross-entropy to the *pre-trained* teacher's maps in the student's
  first ``--layers`` layers (default depth - 3; 4 teacher heads averaged in pairs, teacher layers mapped by
  ``round((i+1)*6/4)-1``);
* attention copy: the student attends with the pre-trained teacher's maps in those layers (the teacher runs
  at inference too: not deployable; its latency includes the teacher's first blocks);
* logit distillation (Hinton): ``0.5 * CE + 0.5 * T^2 KL(teacher || student)`` at ``T = 4``, from the
  fine-tuned teacher of the same seed (the pre-trained one does not know classes 5-9).

Accuracy is measured on every 5-9 image outside the seed's training subset (the rest of the train split, val
and test: ~830 images, a binomial standard error of ~1 point where the 179-image test split alone gives ~2).
Prints mean +- std over seeds, the paired per-seed differences (a seed's subset is much of the spread: 20
images are easier or harder to learn from), and torch CPU latency at batch 1 (one thread) as a markdown
table. About 25 min on one core for the default 10 seeds (``--seeds 0,1,2`` for a quick look; pass
``--teacher RUN`` to reuse a pre-trained teacher):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_transfer.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from edgevit.bench.flops import count_flops
from edgevit.bench.latency import TimingConfig, rotation_inputs, time_torch
from edgevit.data import fraction_subset, load_split
from edgevit.methods.baseline import BaselineConfig, train_baseline
from edgevit.methods.transfer import TransferConfig, TransferStudent, mix_heads, soft_cross_entropy, transfer_loss
from edgevit.train import Augment, TrainConfig, evaluate, fit
from edgevit.vit import create_vit, load_bundle, read_meta

PRETRAIN_CLASSES = [str(c) for c in range(5)]
DOWNSTREAM_CLASSES = [str(c) for c in range(5, 10)]
TEACHER_ARCH = {"patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4}
TEACHER_TRAIN = TrainConfig(epochs=30, batch_size=64, lr=2e-3, warmup_epochs=2)
FINE_TUNE_LR = 5e-4
EPOCHS = 10  # checkpoints per run: each "epoch" repeats the small subset, so overheads stay small


class LogitDistillation(nn.Module):
    """A student trained against a frozen teacher's class distribution (Hinton et al. 2015)."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LogitDistillation:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)


def logit_distillation_loss(temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.1):
    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        with torch.no_grad():
            target = model.teacher(images)
        kl = F.kl_div((logits / temperature).log_softmax(-1), (target / temperature).log_softmax(-1),
                      log_target=True, reduction="batchmean") * temperature ** 2
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        return (1 - alpha) * ce + alpha * kl, logits

    return loss_fn


@torch.no_grad()
def map_kl(model: TransferStudent, dataset: Dataset) -> float:
    """KL(teacher's maps || student's maps), summed over transferred layers, averaged over images: how well the
    distilled student reproduces the teacher's attention on ``dataset``. The targets are those of the loss: the
    group-averaged teacher maps, or with learned mixers each teacher head (matched by mixed student logits)."""
    total, seen = 0.0, 0
    for x, _ in DataLoader(dataset, batch_size=128):
        targets = [m.softmax(-1) for m in model.teacher_logits(x)]
        if model.mixers is None:
            targets = [mix_heads(model.groups, p) for p in targets]
        entropy = sum(soft_cross_entropy(p, p.clamp_min(1e-12).log()) for p in targets)
        _, cross_entropy = model.eval()(x, attention_loss=True)
        total += (cross_entropy - entropy).item() * len(x)
        seen += len(x)
    return total / seen


def repeated(dataset: Dataset, times: int) -> Subset:
    """``dataset`` repeated ``times`` over, so that one epoch holds several passes of a small subset."""
    subset = Subset(dataset, list(range(len(dataset))) * times)
    subset.targets = list(dataset.targets) * times
    return subset


def teacher_run(args: argparse.Namespace, work: Path) -> Path:
    if args.teacher:
        return Path(args.teacher)
    out = work / "teacher"
    if not (out / "bundle.json").exists():
        arch = BaselineConfig(img_size=16, patch_size=TEACHER_ARCH["patch_size"], embed_dim=TEACHER_ARCH["embed_dim"],
                              depth=TEACHER_ARCH["depth"], heads=TEACHER_ARCH["num_heads"], classes=PRETRAIN_CLASSES)
        train_baseline("vit_tiny_patch16_224", "digits", out, arch, TEACHER_TRAIN, resume=out.exists())
    return out


def fine_tuned(teacher_dir: Path, num_classes: int, seed: int) -> nn.Module:
    """The pre-trained teacher with a new, seeded ``num_classes`` head (all its weights train)."""
    model, _ = load_bundle(teacher_dir)
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    return model


def run_seed(teacher_dir: Path, args: argparse.Namespace, seed: int, work: Path) -> dict:
    teacher, meta = load_bundle(teacher_dir)
    pre = meta.preprocessing
    full = load_split("digits", "train", pre, DOWNSTREAM_CLASSES)
    subset = fraction_subset(full, args.fraction, seed)
    held_out = ConcatDataset([Subset(full, sorted(set(range(len(full))) - set(subset.indices))),
                              *(load_split("digits", split, pre, DOWNSTREAM_CLASSES) for split in ("val", "test"))])
    times = max(1, math.ceil(args.steps / EPOCHS * args.batch_size / len(subset)))
    augmented = load_split("digits", "train", pre, DOWNSTREAM_CLASSES, augment=Augment())
    train_set = repeated(fraction_subset(augmented, args.fraction, seed), times)  # the same images as ``subset``
    cfg = TrainConfig(epochs=EPOCHS, batch_size=args.batch_size, lr=args.lr, warmup_epochs=1, seed=seed)
    num_classes = len(DOWNSTREAM_CLASSES)
    student_kwargs = {**meta.base.kwargs, **args.student_arch, "num_classes": num_classes}
    transfer = TransferConfig(layers=args.layers, weight=args.weight, head_map=args.head_map)

    def student() -> nn.Module:
        torch.manual_seed(seed)
        return create_vit(meta.base.name, **student_kwargs)

    row: dict = {}

    def train(name: str, model: nn.Module, loss_fn=None, lr: float | None = None) -> nn.Module:
        out = work / f"{name.replace(' ', '-')}-{seed}"
        out.mkdir()
        start = time.perf_counter()
        fit(model, train_set, replace(cfg, lr=lr or cfg.lr), out, loss_fn=loss_fn, description=f"{name} seed {seed}")
        row[name] = evaluate(model, held_out)
        print(f"seed {seed} {name:24s} held-out top-1 {row[name]:.4f} ({time.perf_counter() - start:.0f} s, "
              f"{len(subset)} training images, {len(held_out)} held out)", flush=True)
        return model

    teacher_ft = train("teacher fine-tuned", fine_tuned(teacher_dir, num_classes, seed), lr=FINE_TUNE_LR)
    arms = {
        "scratch": lambda: (student(), None),
        "attention distillation": lambda: (TransferStudent(student(), teacher, transfer),
                                           transfer_loss(args.weight, 0.1)),
        "attention copy": lambda: (TransferStudent(student(), teacher, replace(transfer, mode="copy")),
                                   transfer_loss(0.0, 0.1)),
        "logit distillation": lambda: (LogitDistillation(student(), teacher_ft), logit_distillation_loss()),
    }
    models = {"teacher fine-tuned": teacher_ft}
    for name in args.arms:
        models[name] = train(name, *arms[name]())
        if name == "attention distillation":
            row["kl_train"], row["kl_held_out"] = map_kl(models[name], subset), map_kl(models[name], held_out)
            print(f"seed {seed} attention-map KL to the teacher: train {row['kl_train']:.3f}, "
                  f"held out {row['kl_held_out']:.3f}", flush=True)
    row["_images"], row["_held_out"], row["_models"] = len(subset), len(held_out), models
    return row


def latencies_ms(models: dict[str, nn.Module], size: int, rounds: int = 9) -> dict[str, float]:
    """Batch-1 p50 per model: the best of ``rounds`` interleaved timings, so a load spike from another process
    on a shared machine hits neither model more than the other."""
    inputs = rotation_inputs((1, 1, size, size))
    best = dict.fromkeys(models, math.inf)
    for _ in range(rounds):
        for name, model in models.items():
            p50 = time_torch(model, inputs, threads=1, cfg=TimingConfig(warmup=10, seconds=0.3)).p50
            best[name] = min(best[name], p50)
    return best


def paired(rows: list[dict], a: str, b: str) -> str:
    """Mean +- std over seeds of ``a - b`` on the same subset: the seed's subset difficulty cancels."""
    diffs = [100 * (r[a] - r[b]) for r in rows]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.1f} ± {std:.1f} (higher in {sum(d > 0 for d in diffs)}/{len(diffs)} seeds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="reuse a pre-trained teacher bundle (default: train one in --work)")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--fraction", type=float, default=0.03, help="class-stratified share of the 5-9 train split")
    parser.add_argument("--seeds", default=",".join(map(str, range(10))))
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="students' peak lr (the teacher fine-tunes at 5e-4)")
    parser.add_argument("--student", default="32,4,2", help="student width,depth,heads")
    parser.add_argument("--layers", type=int, help="transferred student layers (default depth - 3)")
    parser.add_argument("--weight", type=float, default=3.0)
    parser.add_argument("--head-map", default="average", choices=["average", "learned"])
    parser.add_argument("--arms", default="scratch,attention distillation,attention copy,logit distillation")
    args = parser.parse_args()
    args.arms = args.arms.split(",")
    width, depth, heads = (int(v) for v in args.student.split(","))
    args.student_arch = {"embed_dim": width, "depth": depth, "num_heads": heads}
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        teacher_dir = teacher_run(args, work)
        teacher_meta = read_meta(teacher_dir)
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            seed_dir = work / f"seed{seed}-{time.time_ns()}"
            seed_dir.mkdir()
            rows.append(run_seed(teacher_dir, args, seed, seed_dir))

        size = teacher_meta.preprocessing.size
        models = rows[-1]["_models"]
        # every deployable student has the same graph: time one of them
        timed = {"teacher fine-tuned": models["teacher fine-tuned"],
                 "student": models.get("scratch") or create_vit(teacher_meta.base.name, **{
                     **teacher_meta.base.kwargs, **args.student_arch, "num_classes": len(DOWNSTREAM_CLASSES)})}
        if "attention copy" in models:
            timed["attention copy"] = models["attention copy"]
        latency = latencies_ms(timed, size)
        mflops = {name: count_flops(model, (1, 1, size, size)) / 1e6 for name, model in timed.items()}
        total = time.perf_counter() - start

    arch, kw = args.student_arch, teacher_meta.base.kwargs
    print(f"\nteacher: width {kw['embed_dim']}, depth {kw['depth']}, {kw['num_heads']} heads, pre-trained on digits "
          f"{','.join(PRETRAIN_CLASSES)}; downstream digits {','.join(DOWNSTREAM_CLASSES)}: {args.fraction:.0%} of "
          f"the train split ({rows[0]['_images']} images) per seed, {rows[0]['_held_out']} held-out images; students: "
          f"width {arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads; {args.steps} steps; "
          f"transferred layers {args.layers or max(1, arch['depth'] - 3)}, weight {args.weight}, head map "
          f"{args.head_map}; seeds {args.seeds}; total {total:.0f} s\n")
    print("| model | held-out top-1 (mean ± std) | per seed | MFLOPs | CPU latency b1 (ms) | latency vs teacher |")
    print("|---|---|---|---|---|---|")
    for name in ["teacher fine-tuned", *args.arms]:
        accs = [100 * r[name] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        timed_as = name if name in timed else "student"
        ms = latency[timed_as]
        label = name if name == "teacher fine-tuned" else f"student, {name}"
        note = " (+ teacher, not deployable)" if name == "attention copy" else ""
        print(f"| {label}{note} | {statistics.mean(accs):.1f} ± {std:.1f} | {', '.join(f'{a:.1f}' for a in accs)} | "
              f"{mflops[timed_as]:.2f} | {ms:.3f} | {ms / latency['teacher fine-tuned']:.2f} |")

    print("\npaired differences (same subset and seed), points, mean ± std over seeds:")
    for name in args.arms:
        if name != "scratch" and "scratch" in args.arms:
            print(f"  {name} - scratch: {paired(rows, name, 'scratch')}")
        print(f"  {name} - teacher fine-tuned: {paired(rows, name, 'teacher fine-tuned')}")
    if "kl_train" in rows[0]:
        train_kl, held_kl = (statistics.mean(r[k] for r in rows) for k in ("kl_train", "kl_held_out"))
        print(f"\nattention-map KL(teacher || distilled student), summed over transferred layers: train "
              f"{train_kl:.3f}, held out {held_kl:.3f}")


if __name__ == "__main__":
    main()
