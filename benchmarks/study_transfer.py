"""Low-data study of attention transfer on the embedded digits: which student gets closest to its teacher?

A teacher (16 px, patch 4, width 64, depth 6, 4 heads) is trained on the whole digits training split. Each
student is a smaller ViT (width 32, depth 4, 2 heads by default) trained from scratch on a class-stratified
``--fraction`` of the training split (a different subset per seed), all with the same optimisation (steps,
lr, augmentation, seed):

* scratch: cross-entropy only;
* attention distillation: + 3.0 x soft cross-entropy to the teacher's maps in the first ``--layers`` layers
  (4 teacher heads averaged in pairs, teacher layers mapped by ``round((i+1)*6/4)-1``);
* attention copy: the student attends with the teacher's maps in those layers (the teacher runs at
  inference too: not deployable, its latency includes the teacher's first blocks);
* logit distillation (Hinton): ``0.5 * CE + 0.5 * T^2 KL(teacher || student)`` at ``T = 4``.

Prints test top-1 mean +- std over seeds and torch CPU latency at batch 1 (one thread) as a markdown table.
About 3 min of CPU time on one core including the teacher (pass ``--teacher RUN`` to reuse one):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_transfer.py
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from edgevit.bench.flops import count_flops
from edgevit.bench.latency import TimingConfig, rotation_inputs, time_torch
from edgevit.data import fraction_subset, load_split
from edgevit.methods.baseline import train_baseline
from edgevit.methods.transfer import TransferConfig, TransferStudent, mix_heads, soft_cross_entropy, transfer_loss
from edgevit.train import TrainConfig, evaluate, fit
from edgevit.vit import create_vit, load_bundle, read_meta

TEACHER_ARCH = {"patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4}
TEACHER_TRAIN = TrainConfig(epochs=30, batch_size=64, lr=2e-3, warmup_epochs=2, augment="shift")
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
    """KL(teacher's mapped maps || student's maps), summed over transferred layers, averaged over images:
    how well the distilled student reproduces the teacher's attention on ``dataset``."""
    total, seen = 0.0, 0
    for x, _ in DataLoader(dataset, batch_size=128):
        targets = [mix_heads(model.groups, m.softmax(-1)) for m in model.teacher_logits(x)]
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
        train_baseline("digits", out, img_size=16, arch=TEACHER_ARCH, cfg=TEACHER_TRAIN, resume=out.exists())
    return out


def run_seed(teacher_dir: Path, args: argparse.Namespace, seed: int, work: Path) -> dict[str, float]:
    teacher, meta = load_bundle(teacher_dir)
    pre = meta.preprocessing
    subset = fraction_subset(load_split("digits", "train", pre), args.fraction, seed)
    times = max(1, math.ceil(args.steps / EPOCHS * args.batch_size / len(subset)))
    train_set, test_set = repeated(subset, times), load_split("digits", "test", pre)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=args.batch_size, lr=args.lr, warmup_epochs=1, augment="shift",
                      seed=seed)
    student_kwargs = {**meta.base.kwargs, **args.student_arch, "num_classes": 10}
    transfer = TransferConfig(layers=args.layers, weight=args.weight, head_map=args.head_map)

    def student() -> nn.Module:
        torch.manual_seed(seed)
        return create_vit(meta.base.name, **student_kwargs)

    arms = {
        "scratch": (student(), None),
        "attention distillation": (TransferStudent(student(), teacher, transfer), transfer_loss(args.weight, 0.1)),
        "attention copy": (TransferStudent(student(), teacher, TransferConfig(mode="copy", layers=args.layers,
                                                                            head_map=args.head_map)),
                           transfer_loss(0.0, 0.1)),
        "logit distillation": (LogitDistillation(student(), teacher), logit_distillation_loss()),
    }
    arms = {name: arm for name, arm in arms.items() if name in args.arms}
    row = {}
    for name, (model, loss_fn) in arms.items():
        out = work / f"{name.replace(' ', '-')}-{seed}"
        out.mkdir()
        start = time.perf_counter()
        fit(model, train_set, cfg, out, loss_fn=loss_fn, description=f"{name} seed {seed}")
        row[name] = evaluate(model, test_set)
        print(f"seed {seed} {name:24s} test top-1 {row[name]:.4f} ({time.perf_counter() - start:.0f} s, "
              f"{len(subset)} images)", flush=True)
        if name == "attention distillation":
            row["kl_train"], row["kl_test"] = map_kl(model, subset), map_kl(model, test_set)
            print(f"seed {seed} attention-map KL to the teacher: train {row['kl_train']:.3f}, "
                  f"test {row['kl_test']:.3f}", flush=True)
    row["_images"] = len(subset)
    row["_models"] = {name: model for name, (model, _) in arms.items()}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="reuse a teacher bundle (default: train one in --work)")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--fraction", type=float, default=0.1, help="class-stratified share of the train split")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=450, help="optimizer steps per student")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--student", default="32,4,2", help="student width,depth,heads")
    parser.add_argument("--layers", type=int, default=3, help="transferred student layers")
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
        teacher, _ = load_bundle(teacher_dir)
        models = rows[-1]["_models"]
        # every deployable student has the same graph: time one of them
        student = create_vit(teacher_meta.base.name, **{**teacher_meta.base.kwargs, **args.student_arch})
        timed = {"teacher": teacher, "student": student}
        if "attention copy" in models:
            timed["attention copy"] = models["attention copy"]
        latency = latencies_ms(timed, size)
        mflops = {name: count_flops(model, (1, 1, size, size)) / 1e6 for name, model in timed.items()}
        total = time.perf_counter() - start

    arch = args.student_arch
    print(f"\nteacher: width {teacher_meta.base.kwargs['embed_dim']}, depth {teacher_meta.base.kwargs['depth']}, "
          f"{teacher_meta.base.kwargs['num_heads']} heads, trained on the full train split; students: width "
          f"{arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads, trained on {args.fraction:.0%} "
          f"({rows[0]['_images']} images), {args.steps} steps; transferred layers {args.layers}, weight "
          f"{args.weight}, head map {args.head_map}; seeds {args.seeds}; total {total:.0f} s\n")
    print("| model | test top-1 (mean ± std) | per seed | MFLOPs | CPU latency b1 (ms) | latency vs teacher |")
    print("|---|---|---|---|---|---|")
    t_top1 = teacher_meta.metrics["test_top1"]
    print(f"| teacher (full train split) | {100 * t_top1:.1f} | - | {mflops['teacher']:.2f} | "
          f"{latency['teacher']:.3f} | 1.00 |")
    for name in args.arms:
        accs = [100 * r[name] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        timed_as = "attention copy" if name == "attention copy" else "student"
        ms = latency[timed_as]
        note = " (+ teacher, not deployable)" if name == "attention copy" else ""
        print(f"| student, {name}{note} | {statistics.mean(accs):.1f} ± {std:.1f} | "
              f"{', '.join(f'{a:.1f}' for a in accs)} | {mflops[timed_as]:.2f} | {ms:.3f} | "
              f"{ms / latency['teacher']:.2f} |")

    if "kl_test" in rows[0]:
        train_kl, test_kl = (statistics.mean(r[k] for r in rows) for k in ("kl_train", "kl_test"))
        print(f"\nattention-map KL(teacher || distilled student), summed over transferred layers: train "
              f"{train_kl:.3f}, test {test_kl:.3f}")


if __name__ == "__main__":
    main()
