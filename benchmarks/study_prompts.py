"""Study: VPT vs BPT (shallow and deep) on digits, accuracy per epoch and epochs to reach a target.

Upstream/downstream split: the backbone (digits ViT, patch 4, width 96, depth 6; 16 px by default) is
trained on digits 0-4 only; prompts and a new head are tuned on digits 5-9, which the backbone never saw. For
each depth mode the target is VPT's final validation top-1; the study reports the first epoch each variant
reaches it, and the burstiness of the backbone's ``X~ = W_q W_k^T X^T`` before/after whitening.

Usage (about 5-10 minutes on one core):

    OMP_NUM_THREADS=1 python benchmarks/study_prompts.py --work /tmp/study_prompts
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgevit.methods.baseline import DIGITS_ARCH, BaselineConfig, train_baseline
from edgevit.methods.prompts import PromptConfig, measure_burstiness, train_prompts
from edgevit.train import TrainConfig
from edgevit.vit import read_meta

UPSTREAM, DOWNSTREAM = list("01234"), list("56789")


def backbone(work: Path, epochs: int, img_size: int) -> Path:
    """The upstream backbone (digits 0-4), trained once and reused."""
    out = work / f"backbone04-{img_size}px-e{epochs}"
    if not (out / "bundle.json").exists():
        arch = BaselineConfig(img_size=img_size, patch_size=DIGITS_ARCH["patch_size"],
                              embed_dim=DIGITS_ARCH["embed_dim"], depth=DIGITS_ARCH["depth"],
                              heads=DIGITS_ARCH["num_heads"], classes=UPSTREAM)
        train_baseline("vit_tiny_patch16_224", "digits", out, arch, TrainConfig(epochs=epochs, lr=2e-3),
                       resume=(out / "checkpoint.pt").exists())
    return out


def epochs_to(curve: list[float], target: float) -> int | None:
    """First epoch (1-based) whose accuracy reaches ``target``; None if never."""
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target - 1e-9), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/study_prompts"))
    parser.add_argument("--img-size", type=int, default=16, help="input side (patch 4: 16 px -> 17 tokens)")
    parser.add_argument("--backbone-epochs", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--deep-prompts", type=int, default=50)
    parser.add_argument("--shallow-prompts", type=int, default=50)
    parser.add_argument("--variants", default="vpt,bilinear", help="comma-separated; vpt first (the target)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    base = backbone(args.work, args.backbone_epochs, args.img_size)
    print(f"backbone (digits 0-4): test top-1 {read_meta(base).metrics['test_top1']:.4f}")
    for covariance in ("tokens", "mean"):
        m = measure_burstiness(base, "digits", DOWNSTREAM, covariance=covariance)["mean"]
        print(f"burstiness on 5-9 ({covariance} covariance, eps 0.1, 100 fit / 90 held-out images): "
              f"kurtosis {m['kurtosis_before']:.2f} -> {m['kurtosis_after']:.2f}, "
              f"max/median {m['max_median_before']:.1f} -> {m['max_median_after']:.1f}")

    results = {}
    variants = args.variants.split(",")
    for deep in (False, True):
        mode = "deep" if deep else "shallow"
        for variant in variants:
            out = args.work / f"{base.name}-{mode}-{variant}-e{args.epochs}-s{args.seed}"
            if not (out / "bundle.json").exists():
                cfg = PromptConfig(deep=deep, variant=variant,
                                   prompts=args.deep_prompts if deep else args.shallow_prompts)
                train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
                train_prompts(base, "digits", out, cfg, train_cfg, resume=(out / "checkpoint.pt").exists())
            meta = read_meta(out)
            results[(mode, variant)] = meta.metrics

    print(f"\nval top-1 per epoch ({args.epochs} epochs, AdamW lr {args.lr}, cosine, seed {args.seed}):")
    for (mode, variant), m in results.items():
        print(f"  {mode:7s} {variant:9s} " + " ".join(f"{a:.3f}" for a in m["val_top1_per_epoch"]))
    print("\nepochs to reach VPT's final val top-1 (same mode):")
    for mode in ("shallow", "deep"):
        target = results[(mode, variants[0])]["val_top1_per_epoch"][-1]
        reach = {v: epochs_to(results[(mode, v)]["val_top1_per_epoch"], target) for v in variants}
        vpt_epochs = reach[variants[0]]
        cells = ", ".join(f"{v} {reach[v] if reach[v] else 'never'}" + (
            f" ({vpt_epochs / reach[v]:.2f}x fewer)" if reach[v] and v != variants[0] else "") for v in variants)
        finals = ", ".join(f"{v} val {results[(mode, v)]['val_top1_per_epoch'][-1]:.3f} "
                           f"test {results[(mode, v)]['test_top1']:.3f}" for v in variants)
        print(f"  {mode:7s} target {target:.3f}: {cells}\n          final: {finals}")
    summary = {f"{mode}-{variant}": {k: m[k] for k in ("val_top1_per_epoch", "test_top1", "merge_max_abs_diff")}
               for (mode, variant), m in results.items()}
    (args.work / "study.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{time.perf_counter() - start:.0f} s; per-run bundles and study.json under {args.work}")


if __name__ == "__main__":
    main()
