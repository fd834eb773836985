"""Image-folder data pipeline at line scale: loader throughput by worker count, and peak RSS of one training
epoch for a folder of N vs M photos (memory must not grow with the folder).

Generates 640x480 RGB JPEGs (3 classes, imbalanced 8:1:1) under --work, then
  1. decoded + augmented images/s through timm's training transform and a DataLoader with 0, 1, 2 workers;
  2. peak RSS of ``train baseline`` for one epoch (a one-block ViT at 224 px, so the data path dominates),
     each size in a fresh process; workers' peaks are reported separately (RUSAGE_CHILDREN).

    python benchmarks/data_pipeline.py --images 1000,3000 --throughput-images 400
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = {"good": 0.8, "scratch": 0.1, "dent": 0.1}
ARCH = ["--model", "vit_tiny_patch16_224", "--depth", "1", "--embed-dim", "48", "--heads", "3"]


def write_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 640x480 JPEGs split over the classes; files already there are kept (folders grow by linking)."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    for name, share in CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(round(n * share)):
            path = root / name / f"{i:06d}.jpg"
            if not path.exists():
                base = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)  # smooth-ish content compresses like photos
                Image.fromarray(base).resize((640, 480), Image.BILINEAR).save(path, quality=90)
    return root


def link_folder(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` images of ``src`` (per class share) as hard links: no second copy on disk."""
    for name, share in CLASSES.items():
        (dst / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / name).iterdir())[:round(n * share)]:
            if not (dst / name / path.name).exists():
                os.link(path, dst / name / path.name)
    return dst


def throughput(folder: Path, workers: int, images: int, batch: int = 32) -> float:
    """Decoded + augmented images/s of the training split through timm's transform and a DataLoader."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from edgevit.data import load_split
    from edgevit.data.transforms import Augment, pretrained_config, pretrained_preprocessing

    pre = pretrained_preprocessing(pretrained_config("vit_tiny_patch16_224"), 3, 224)
    dataset = load_split(str(folder), "train", pre, augment=Augment())
    subset = Subset(dataset, range(min(images, len(dataset))))
    loader = DataLoader(subset, batch_size=batch, num_workers=workers, generator=torch.Generator().manual_seed(0))
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def epoch_rss(folder: Path, out: Path, workers: int) -> dict:
    """Peak RSS (MB) of one baseline epoch on ``folder`` in a fresh process, and of its largest worker."""
    code = ("import json, resource, sys; from edgevit.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "r = resource.getrusage; print(json.dumps({'main_mb': r(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            "'worker_mb': r(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "train", "baseline", "--data", str(folder), *ARCH,
                           "--epochs", "1", "--batch-size", "32", "--workers", str(workers), "-o", str(out)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: round(v, 1) for k, v in result.items()} | {"seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="1000,3000", help="folder sizes for the RSS comparison")
    parser.add_argument("--throughput-images", type=int, default=400)
    parser.add_argument("--rss-workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgevit-data-bench"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.images.split(",")]
    pool = write_folder(args.work / "pool", max(sizes))
    print(f"generated {max(sizes)} 640x480 JPEGs under {pool} (cpus: {os.cpu_count()})")

    import torch

    threads = torch.get_num_threads()
    rates = {w: throughput(pool, w, args.throughput_images) for w in (0, 1, 2)}
    for w, rate in rates.items():
        print(f"loader, {w} workers: {rate:.1f} images/s ({rate / rates[0]:.2f}x of 0 workers; main process "
              f"torch threads {threads}, workers 1)")
    # Workers run torch single-threaded; the same in the main process separates threading from parallelism.
    torch.set_num_threads(1)
    single = throughput(pool, 0, args.throughput_images)
    torch.set_num_threads(threads)
    print(f"loader, 0 workers, main process torch threads 1: {single:.1f} images/s "
          f"(2 workers: {rates[2] / single:.2f}x of it)")

    rows = {}
    for n in sizes:
        folder = link_folder(pool, args.work / f"n{n}", n)
        run = args.work / f"run{n}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        rows[n] = epoch_rss(folder, run, args.rss_workers)
        print(f"one epoch on {n} photos ({args.rss_workers} workers): peak RSS main {rows[n]['main_mb']} MB, "
              f"largest worker {rows[n]['worker_mb']} MB, {rows[n]['seconds']} s")
    lo, hi = rows[sizes[0]], rows[sizes[-1]]
    print(f"peak RSS ratio {sizes[-1]} / {sizes[0]} photos: main {hi['main_mb'] / lo['main_mb']:.2f}x, "
          f"workers {hi['worker_mb'] / max(lo['worker_mb'], 1e-9):.2f}x "
          f"(self peak of this script: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
