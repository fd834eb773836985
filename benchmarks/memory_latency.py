"""ONNX Runtime CPU latency of a memory ViT: plain vs full-memory graph vs summarized tables, in one process.

Each graph is the digits ViT (32 px, patch 4, dim 96, depth 6, heads 3) with a memory table in the last
block (``S`` rows for the full memory, ``P`` for the summaries; dense or top-k read). Latency does not
depend on the table's contents, so random tables are used unless ``--run`` points at a real memory run
(then: its bundle, its full memory from checkpoint.pt, and its base bundle's plain graph are timed).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_latency.py [--slots 1257] [--topk 32] [--batch 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from edgevit.bench.latency import TimingConfig, rotation_inputs, time_onnx
from edgevit.methods.baseline import DIGITS_ARCH
from edgevit.methods.memory import full_memory_model, with_table
from edgevit.vit import create_vit, load_bundle
from edgevit.vit.memory import MemoryTable, memory_of


def random_table(heads: int, slots: int, head_dim: int, topk: int | None) -> MemoryTable:
    table = MemoryTable(heads, slots, head_dim, topk)
    with torch.no_grad():
        table.keys.normal_()
        table.values.normal_()
        table.gate_logit.zero_()
    return table


def synthetic_models(slots: int, prototypes: list[int], topk: int | None) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    plain = create_vit("vit_tiny_patch16_224", img_size=32, in_chans=1, num_classes=10, **DIGITS_ARCH).eval()
    block = len(plain.blocks) - 1
    heads, head_dim = DIGITS_ARCH["num_heads"], DIGITS_ARCH["embed_dim"] // DIGITS_ARCH["num_heads"]
    models = {"plain": plain,
              f"full memory S={slots}": with_table(plain, block, random_table(heads, slots, head_dim, topk))}
    for p in prototypes:
        models[f"summarized P={p}"] = with_table(plain, block, random_table(heads, p, head_dim, topk))
    return models


def run_models(run: Path) -> dict[str, torch.nn.Module]:
    summarized, meta = load_bundle(run)
    plain, _ = load_bundle(meta.provenance["base"])
    full = full_memory_model(run)
    block = meta.surgery[-1]["block"]
    return {"plain (base bundle)": plain, f"full memory S={memory_of(full, block).slots}": full,
            f"summarized P={memory_of(summarized, block).slots}": summarized}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a memory run directory (default: synthetic tables)")
    parser.add_argument("--slots", type=int, default=1257, help="full memory rows (1257 = digits train split)")
    parser.add_argument("--prototypes", default="16,64")
    parser.add_argument("--topk", type=int, default=32, help="0: dense memory attention")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per graph and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="graphs are timed in interleaved rounds; the best round's p50/p90 are kept, so load "
                             "from other processes on a shared machine biases no graph in particular")
    args = parser.parse_args()
    if args.run:
        models = run_models(args.run)
    else:
        models = synthetic_models(args.slots, [int(p) for p in args.prototypes.split(",")], args.topk or None)
    x = torch.randn(args.batch, 1, 32, 32)
    inputs = rotation_inputs(tuple(x.shape))
    cfg = TimingConfig(warmup=20, seconds=args.seconds)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, model) in enumerate(models.items()):
            paths[name] = Path(tmp) / f"{i}.onnx"
            torch.onnx.export(model.eval(), (x,), str(paths[name]), input_names=["images"], opset_version=18,
                              dynamo=False, dynamic_axes={"images": {0: "batch"}})
        for _ in range(args.rounds):
            for name, path in paths.items():
                latency = time_onnx(path, inputs, args.threads, cfg)
                if name not in results or latency.p50 < results[name].p50:
                    results[name] = latency
    base = next(iter(results.values())).p50
    print(f"\nORT CPU, {args.threads} thread(s), batch {args.batch}, top-k {args.topk or 'dense'}, "
          f"best of {args.rounds} interleaved rounds")
    print("| graph | p50 ms | p90 ms | p50 / plain |")
    print("|---|---|---|---|")
    for name, lat in results.items():
        print(f"| {name} | {lat.p50:.3f} | {lat.p90:.3f} | {lat.p50 / base:.3f} |")


if __name__ == "__main__":
    main()
