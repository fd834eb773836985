"""Low-data study of MoViT memory on the embedded digits: plain fine-tune vs full memory vs summarized tables.

An upstream tiny ViT is trained on digits 0-4 only; each regime then fine-tunes it on all ten classes with
a class-stratified fraction of the training split, the same way (same steps, lr, seed, fresh head) with
and without a memory in the last block. The memory is then summarized into P prototypes (k-means PAL,
and the learned PAL: k-means + a brief distillation of the table). Test top-1 and table sizes are printed
as a markdown table. ~5-8 min on one core:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_memory.py
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

from edgevit.data import load_split
from edgevit.methods.baseline import BaselineConfig, train_baseline
from edgevit.methods.memory import (
    MemoryConfig,
    learn_table,
    prepare_task,
    summarize_table,
    train_full_memory,
    with_table,
)
from edgevit.train import TrainConfig, evaluate, fit

ARCH = {"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3}
UPSTREAM = TrainConfig(epochs=15, batch_size=64, lr=3e-3, warmup_epochs=1, label_smoothing=0.0)


def finetune_config(images: int, steps: int, seed: int) -> TrainConfig:
    """The same optimisation for every arm: about ``steps`` steps whatever the amount of data."""
    per_epoch = max(1, images // 64)
    return TrainConfig(epochs=max(1, math.ceil(steps / per_epoch)), batch_size=64, lr=1e-3, warmup_epochs=1.0,
                       label_smoothing=0.0, seed=seed)


def run_fraction(upstream: Path, fraction: float, seed: int, steps: int, prototypes: list[int], work: Path,
                 cfg: MemoryConfig) -> dict:
    plain = prepare_task(upstream, "digits", fraction, TrainConfig(seed=seed))
    test = load_split("digits", "test", plain.meta.preprocessing)
    train_cfg = finetune_config(len(plain.train_set), steps, seed)
    (work / f"plain-{fraction}-{seed}").mkdir()
    fit(plain.model, plain.train_set, train_cfg, work / f"plain-{fraction}-{seed}")
    row = {"images": len(plain.train_set), "plain": evaluate(plain.model, test)}

    task = prepare_task(upstream, "digits", fraction, train_cfg)
    trainer, _ = train_full_memory(task, cfg, train_cfg, work / f"memory-{fraction}-{seed}")
    full = trainer.table
    row.update(slots=full.slots, full=evaluate(trainer.model, test), full_bytes=full.table_bytes())
    pal_cfg = replace(train_cfg, epochs=max(1, train_cfg.epochs // 3))
    for p in prototypes:
        table = summarize_table(full, p, seed=seed)
        row[f"kmeans{p}"] = evaluate(with_table(trainer.model, trainer.block, table), test)
        learned = learn_table(trainer.model, trainer.block, table, task, pal_cfg.epochs, pal_cfg,
                              work / f"pal-{fraction}-{seed}-{p}")
        row[f"learned{p}"] = evaluate(learned, test)
        row[f"bytes{p}"] = table.table_bytes()
    row["gate"] = full.gate().flatten().tolist()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="0.03,0.1,0.3,1.0")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (rows report the mean)")
    parser.add_argument("--steps", type=int, default=120, help="fine-tune steps per arm")
    parser.add_argument("--prototypes", default="16,64")
    parser.add_argument("--slots", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--momentum", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    prototypes = [int(p) for p in args.prototypes.split(",")]
    cfg = MemoryConfig(slots=args.slots, topk=args.topk, momentum=args.momentum)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        arch = BaselineConfig(img_size=16, patch_size=ARCH["patch_size"], embed_dim=ARCH["embed_dim"],
                              depth=ARCH["depth"], heads=ARCH["num_heads"], classes=list("01234"))
        upstream = train_baseline("vit_tiny_patch16_224", "digits", work / "upstream", arch, UPSTREAM)
        rows = {f: [run_fraction(upstream, f, s, args.steps, prototypes, work, cfg) for s in seeds]
                for f in fractions}

    def mean(key: str, f: float) -> float:
        return statistics.mean(r[key] for r in rows[f])

    cols = [f"{kind}{p}" for p in prototypes for kind in ("kmeans", "learned")]
    print(f"\nupstream: tiny ViT {ARCH} on digits 0-4; arms fine-tuned ~{args.steps} steps on all 10 classes; "
          f"memory in the last block, S <= {args.slots}, top-k {args.topk}, ATMA beta {args.momentum}; "
          f"test top-1 (%), mean over seeds {seeds}\n")
    print("| fraction | train images | plain | full memory | " + " | ".join(cols) + " | full bytes | "
          + " | ".join(f"P={p} bytes (ratio)" for p in prototypes) + " | gate |")
    print("|" + "---|" * (6 + len(cols) + len(prototypes)))
    for f in fractions:
        r0 = rows[f][0]
        sizes = " | ".join(f"{r0[f'bytes{p}']} ({r0[f'bytes{p}'] / r0['full_bytes']:.3f})" for p in prototypes)
        accs = " | ".join(f"{100 * mean(c, f):.1f}" for c in cols)
        gate = ",".join(f"{g:.2f}" for g in r0["gate"])
        print(f"| {f:g} | {r0['images']} | {100 * mean('plain', f):.1f} | {100 * mean('full', f):.1f} | {accs} "
              f"| {r0['full_bytes']} | {sizes} | {gate} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
