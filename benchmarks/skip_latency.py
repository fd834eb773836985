"""ORT CPU latency at batch 1: a ViT with a third of its attention sub-layers removed vs the full graph.

``vit_small_patch16_224`` (random weights, 3 x 224 x 224) and the same model after ``skip_attention`` on
a third of its blocks (the deepest ones short of the final block; which blocks does not change the cost).
Both graphs are exported to ONNX and timed side by side in one process, in interleaved rounds, so drift on
a shared machine hits both alike. Prints p50 latencies, the latency ratio (skipped / full) next to the FLOP
ratio (what the ratio should roughly be), the parameter ratio and the ONNX node counts.

    OMP_NUM_THREADS=2 python benchmarks/skip_latency.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from edgevit.bench.flops import count_flops, count_params
from edgevit.bench.latency import interleaved_p50_ms as p50_ms
from edgevit.export.onnx import export_onnx
from edgevit.export.profiles import BatchSpec
from edgevit.methods.skip import count_to_drop, select_blocks, skipped
from edgevit.vit import create_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--ratio", type=float, default=1 / 3, help="Fraction of attention sub-layers removed.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = create_vit(args.model).eval()
    blocks = select_blocks(full, "last", count_to_drop(args.ratio, len(full.blocks)))
    models = {"full": full, "skipped": skipped(full, blocks)}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: Path(tmp) / f"{k}.onnx" for k in models}
        nodes = {}
        for k, m in models.items():
            export_onnx(m, paths[k], torch.from_numpy(x), BatchSpec())
            nodes[k] = len(onnx.load(str(paths[k])).graph.node)
        ms = p50_ms(paths, x, args.threads, args.rounds, args.iters)
    flops = {k: count_flops(m, x.shape) for k, m in models.items()}
    params = {k: count_params(m) for k, m in models.items()}
    print(f"{args.model}, 224 px, batch 1, ONNX Runtime CPU, {args.threads} threads; "
          f"attention removed from blocks {blocks} ({len(blocks)} of {len(full.blocks)})")
    for k in models:
        print(f"  {k:8s} p50 {ms[k]:8.2f} ms  {flops[k] / 1e9:6.3f} GFLOPs  {params[k] / 1e6:6.2f} M params  "
              f"{nodes[k]:4d} ONNX nodes")
    speedup = ms["full"] / ms["skipped"]
    print(f"  latency ratio skipped/full {ms['skipped'] / ms['full']:.3f}  (speed-up {speedup:.3f}x)")
    print(f"  FLOP ratio    skipped/full {flops['skipped'] / flops['full']:.3f}")
    print(f"  param ratio   skipped/full {params['skipped'] / params['full']:.3f}")


if __name__ == "__main__":
    main()
