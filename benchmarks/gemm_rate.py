"""Achieved GFLOP/s of a ViT in ONNX Runtime against this machine's measured GEMM rate, in one process.

1. The GEMM rate: fp32 matmuls at the model's own linear-layer shapes (tokens x width x out, batch 1) with
   ``--threads`` threads, in numpy and torch; the faster library's FLOP-weighted rate is the reference.
2. The model: ``--model`` (random weights) is written as an export directory (bundle/ + model.onnx +
   export.json, the export contract) and timed by ``edgevit profile``'s own code path (ORT, fp32, batch 1,
   ``--threads``), ``--repeats`` times, to check that repeated runs agree at p50.
3. Optionally (``--sweep``) ORT session options: graph optimisation level, thread spinning, affinity.

Prints achieved GFLOP/s = FLOPs per image / p50, and its fraction of the GEMM rate.

Example:
    OMP_NUM_THREADS=2 python benchmarks/gemm_rate.py --threads 2 --repeats 3 --keep /tmp/vit_tiny_out
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgevit.bench.flops import count_flops
from edgevit.bench.latency import TimingConfig, rotation_inputs, time_onnx
from edgevit.bench.profile import ProfileConfig, profile_artifacts
from edgevit.data import data_ref
from edgevit.data.transforms import default_preprocessing
from edgevit.vit import BundleMeta, create_vit, save_bundle
from edgevit.vit.bundle import BaseArch


def linear_shapes(model) -> list[tuple[int, int, int]]:
    """(M, K, N) of every nn.Linear in the blocks at batch 1: M = tokens."""
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    return [(tokens, m.in_features, m.out_features) for m in model.blocks.modules()
            if isinstance(m, torch.nn.Linear)]


def _time_call(fn, seconds: float) -> float:
    """Median seconds per call of ``fn`` over ``seconds`` (after a short warm-up)."""
    for _ in range(5):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 20:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gemm_rate(shapes: list[tuple[int, int, int]], threads: int, seconds: float) -> dict[str, float]:
    """FLOP-weighted GFLOP/s over ``shapes`` (each distinct shape timed once, weighted by its count)."""
    torch.set_num_threads(threads)
    rates = {}
    counts = {s: shapes.count(s) for s in set(shapes)}
    for lib in ("numpy", "torch"):
        flops = total = 0.0
        for (m, k, n), count in counts.items():
            a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
            b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
            if lib == "torch":
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                out = torch.empty(m, n)
                t = _time_call(lambda ta=ta, tb=tb, out=out: torch.mm(ta, tb, out=out), seconds)
            else:
                out = np.empty((m, n), dtype=np.float32)
                t = _time_call(lambda a=a, b=b, out=out: np.matmul(a, b, out=out), seconds)
            flops += 2 * m * k * n * count
            total += t * count
        rates[lib] = flops / total / 1e9
    return rates


def write_export_dir(name: str, out: Path) -> Path:
    """A random-weight ``name`` at 224 px as an export directory (contract: bundle/, model.onnx,
    export.json); its data reference is digits so accuracy can be measured if asked."""
    pre = default_preprocessing(224, 3)
    torch.manual_seed(0)
    model = create_vit(name, num_classes=10).eval()
    meta = BundleMeta(base=BaseArch(name=name, kwargs={"num_classes": 10}), preprocessing=pre,
                      classes=[str(c) for c in range(10)], data=data_ref("digits"),
                      provenance={"method": "baseline", "config": {"weights": "random"}})
    save_bundle(out / "bundle", model, meta)
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(out / "model.onnx"), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    export = {"schema_version": 1, "deploy_onnx": "model.onnx", "method": "baseline", "settings": {},
              "profile": {"name": "cpu-fp32", "target": "cpu", "runtime": "onnxruntime", "precision": "fp32",
                          "batch": [1]},
              "input": {"name": "input", "shape": ["batch", 3, 224, 224], "dtype": "float32"},
              "output": {"name": "logits", "shape": ["batch", 10]}, "parity": {},
              "hashes": {"model.onnx": hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()},
              "versions": {"torch": torch.__version__}, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "export.json").write_text(json.dumps(export, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="time budget per profile run")
    parser.add_argument("--gemm-seconds", type=float, default=1.0, help="time budget per GEMM shape")
    parser.add_argument("--repeats", type=int, default=3, help="profile runs (p50 agreement check)")
    parser.add_argument("--sweep", action="store_true", help="also time ORT session option variants")
    parser.add_argument("--keep", type=Path, help="write the export directory here instead of a temp dir")
    args = parser.parse_args()

    model = create_vit(args.model, num_classes=10).eval()
    gflops = count_flops(model, (1, 3, 224, 224)) / 1e9
    shapes = linear_shapes(model)
    linear_gflops = sum(2 * m * k * n for m, k, n in shapes) / 1e9
    print(f"{args.model}: {gflops:.3f} GFLOPs/image ({linear_gflops:.3f} in block linears), "
          f"threads {args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "out"
        if not (out / "export.json").is_file():
            write_export_dir(args.model, out)
        cfg = ProfileConfig(backend="ort", batches=(1,), threads=args.threads, accuracy=False,
                            timing=TimingConfig(warmup=10, seconds=args.seconds))
        # The 2 cores may be shared: each profile run is paired with a GEMM measurement taken just before
        # it, so a fraction compares numbers taken under the same load.
        p50s, fractions, gemms = [], [], []
        for i in range(args.repeats):
            rates = gemm_rate(shapes, args.threads, args.gemm_seconds)
            gemm = max(rates.values())
            row = profile_artifacts([out], cfg, show_progress=False)[0]
            achieved = gflops / (row.latency_ms.p50 / 1e3)
            p50s.append(row.latency_ms.p50)
            fractions.append(achieved / gemm)
            gemms.append(gemm)
            print(f"run {i + 1} (load avg {os.getloadavg()[0]:.2f}): GEMM "
                  + ", ".join(f"{lib} {r:.1f}" for lib, r in rates.items())
                  + f" GFLOP/s | profile ORT fp32 b1 p50 {row.latency_ms.p50:.2f} ms (p90 {row.latency_ms.p90:.2f}, "
                  f"p99 {row.latency_ms.p99:.2f}, {row.latency_ms.iterations} it) -> {achieved:.1f} GFLOP/s = "
                  f"{achieved / gemm:.1%} of the GEMM rate")
        spread = (max(p50s) - min(p50s)) / min(p50s)
        print(f"RESULT p50 over {args.repeats} profile runs: {', '.join(f'{p:.2f}' for p in p50s)} ms "
              f"(spread {spread:.1%}); fraction of the GEMM rate: median {np.median(fractions):.1%} "
              f"(runs: {', '.join(f'{f:.1%}' for f in fractions)}); GEMM median {np.median(gemms):.1f} GFLOP/s")
        gemm = float(np.median(gemms))

        if args.sweep:
            inputs = rotation_inputs((1, 3, 224, 224))
            timing = TimingConfig(warmup=10, seconds=args.seconds)
            variants = [(level, {}) for level in ("disable", "basic", "extended", "all")]
            variants += [("all", {"session.intra_op.allow_spinning": "0"}),
                         ("all", {"session.intra_op_thread_affinities": ";".join(
                             str(c + 1) for c in range(1, args.threads))})]
            for level, config in variants:
                lat = time_onnx(out / "model.onnx", inputs, args.threads, timing, optimization=level, config=config)
                print(f"sweep optimization={level:8s} {config or ''} p50 {lat.p50:.2f} ms -> "
                      f"{gflops / (lat.p50 / 1e3) / gemm:.1%} of the GEMM rate")


if __name__ == "__main__":
    main()
