"""ORT CPU latency at batch 1: FP32 vs INT8 static Q/DQ vs INT8 dynamic, same process, interleaved rounds.

Two models: a realistic ViT (``vit_tiny_patch16_224``, random weights, 3 x 224 x 224) and a trained digits
baseline bundle (default /tmp/runs/base, whose test top-1 is also compared). Prints p50 latencies and the
FP32/INT8 ratios (> 1 means INT8 is faster). This is what set ``int8.quantizer`` in cpu-ort-int8.yaml.

    OMP_NUM_THREADS=1 python benchmarks/int8_vs_fp32.py --bundle /tmp/runs/base --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgevit.bench.latency import interleaved_p50_ms as p50_ms
from edgevit.data import split_arrays
from edgevit.export import checks, quantize
from edgevit.export import onnx as onnx_export
from edgevit.export.profiles import BatchSpec, Calibration, QuantOptions
from edgevit.vit import create_vit, load_bundle


def graphs(model: torch.nn.Module, sample: np.ndarray, calib: np.ndarray, work: Path) -> dict[str, Path]:
    """fp32, static Q/DQ (ORT CPU settings) and dynamic INT8 graphs of ``model``."""
    onnx_export.export_onnx(model, work / "raw.onnx", torch.from_numpy(sample), BatchSpec(min=1, opt=1, max=64))
    onnx_export.simplify(work / "raw.onnx", work / "fp32.onnx")
    opts = QuantOptions()
    quantize.quantize_static(work / "fp32.onnx", work / "static.onnx", calib, opts, "minmax", False, 8)
    quantize.quantize_dynamic(work / "fp32.onnx", work / "dynamic.onnx", opts)
    return {k: work / f"{k}.onnx" for k in ("fp32", "static", "dynamic")}



def report(name: str, ms: dict[str, float], top1: dict[str, float] | None = None) -> None:
    print(f"\n{name}")
    for k, v in ms.items():
        acc = f"  test top-1 {top1[k]:.4f}" if top1 else ""
        print(f"  {k:8s} p50 {v:8.3f} ms  fp32/{k} = {ms['fp32'] / v:5.2f}x{acc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="/tmp/runs/base")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vit = create_vit("vit_tiny_patch16_224", num_classes=10).eval()
        x = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
        calib = rng.standard_normal((32, 3, 224, 224), dtype=np.float32)
        (work / "vit").mkdir()
        paths = graphs(vit, x, calib, work / "vit")
        report("vit_tiny_patch16_224 (random weights, 224 px), batch 1",
               p50_ms(paths, x, args.threads, args.rounds, args.iters))

        model, meta = load_bundle(args.bundle)
        calib = quantize.calibration_images(Calibration(samples=256), meta)[0]
        images, labels = split_arrays(meta, "test")
        (work / "digits").mkdir()
        paths = graphs(model, images[:1], calib, work / "digits")
        top1 = {k: checks.onnx_top1(p, images, labels, 64) for k, p in paths.items()}
        report(f"{args.bundle} ({meta.base.name}, {meta.preprocessing.size} px), batch 1",
               p50_ms(paths, images[:1], args.threads, args.rounds, args.iters), top1)


if __name__ == "__main__":
    main()
