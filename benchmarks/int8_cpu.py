"""INT8 on the CPU: which ONNX Runtime recipe holds its accuracy on every CPU, and what each costs.

ONNX Runtime multiplies uint8 activations by the weights. On x86 without VNNI (AVX2, AVX-512 before VNNI) its
u8s8 kernels add pairs of products in int16 with saturation (:mod:`edgevit.cpu`), so the same graph computes
different logits on different CPUs. Recipes, all on edgevit's cpu-ort fp32 graph (ORT's fused Attention becomes
QAttention where weights are int8/int7), per-channel weights:

- ``dynamic-int8``: ``quantize_dynamic``, int8 weights (the cpu-ort-int8 recipe before #28; needs VNNI/AMX/ARM);
- ``dynamic-int7``: the same with ``reduce_range`` (weights within +-64: no pair can saturate; shipped);
- ``dynamic-uint8``: uint8 weights (ORT's u8u8 kernels: 16-bit products, no saturation);
- ``static-u8s8`` / ``static-s8s8``: calibrated Q/DQ on MatMul/Gemm inputs (uint8 or int8 activations, int8
  weights, minmax), which ORT also runs on its u8s8 kernels.

Accuracy on a trained bundle (``--bundle``; default: a 16 px digits baseline trained here in ~10 s): val and test
top-1 and the largest logit error against the fp32 graph, on this machine's arithmetic (its flags are printed).
Latency: ``--model`` (random weights, 224 px) at ``--batch``, ``--threads``, interleaved rounds in one process.

    python benchmarks/int8_cpu.py --threads 1 --rounds 10 [--bundle RUN]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgevit.bench.latency import TimingConfig, interleaved_times, ort_session
from edgevit.cpu import cpu_info
from edgevit.data import split_arrays
from edgevit.export import checks, ort_graph, quantize
from edgevit.export import onnx as onnx_export
from edgevit.export.profiles import BatchSpec, Calibration, QuantOptions
from edgevit.vit import create_vit, load_bundle

MATMULS = ["MatMul", "Gemm"]


def fp32_graph(model: torch.nn.Module, sample: np.ndarray, work: Path) -> Path:
    """edgevit's fp32 ORT graph of ``model`` (TorchScript export + onnxslim + ORT's fused Attention)."""
    onnx_export.export_onnx(model, work / "raw.onnx", torch.from_numpy(sample[:1]), BatchSpec(min=1, opt=1, max=64))
    onnx_export.simplify(work / "raw.onnx", work / "base.onnx")
    ort_graph.rewrite(work / "base.onnx", work / "fp32.onnx")
    return work / "fp32.onnx"


def int8_graphs(fp32: Path, calib: np.ndarray, work: Path) -> dict[str, Path]:
    paths = {"fp32": fp32}
    for weights in ("int8", "int7", "uint8"):
        paths[f"dynamic-{weights}"] = work / f"dynamic-{weights}.onnx"
        opts = QuantOptions(quantizer="dynamic", ops=[*MATMULS, "Attention"], weight_type=weights)
        quantize.quantize_dynamic(fp32, paths[f"dynamic-{weights}"], opts)
    for activation in ("u8", "s8"):
        paths[f"static-{activation}s8"] = work / f"static-{activation}s8.onnx"
        static_qdq(fp32, paths[f"static-{activation}s8"], calib, activation)
    return paths


def static_qdq(src: Path, dst: Path, calib: np.ndarray, activation: str) -> None:
    """ORT static Q/DQ of MatMul/Gemm weights (per channel, symmetric int8) and activations (minmax), FP32 graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with quantize._named_copy(src, dst) as (named, graph), quantize._quiet():
        quantize_static(str(named), str(dst), quantize._Reader("input", calib, 8), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=MATMULS, per_channel=True,
                        nodes_to_quantize=quantize.weight_nodes(graph, MATMULS, attention_matmuls=False),
                        activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": activation == "s8"})
    for leftover in dst.parent.glob("augmented_model*.onnx"):
        leftover.unlink(missing_ok=True)


def digits_bundle(work: Path) -> Path:
    from edgevit.methods.baseline import BaselineConfig, train_baseline
    from edgevit.train import TrainConfig

    cfg = TrainConfig(epochs=12, batch_size=64, lr=3e-3, warmup_epochs=1, augment=None, label_smoothing=0.0)
    arch = BaselineConfig(img_size=16, patch_size=4, embed_dim=48, depth=4, heads=3)
    return Path(train_baseline("vit_tiny_patch16_224", "digits", work / "digits", arch, cfg))


def accuracy(paths: dict[str, Path], meta) -> dict[str, tuple[float, float, float]]:
    """Per recipe: val top-1, test top-1, the largest |logit - fp32 logit| over both splits."""
    splits = [split_arrays(meta, split) for split in ("val", "test")]
    logits = {k: [checks.run_onnx(p, x, 64) for x, _ in splits] for k, p in paths.items()}
    return {k: (*(float(np.mean(out.argmax(1) == y)) for out, (_, y) in zip(outs, splits, strict=True)),
                max(float(np.abs(out - ref).max()) for out, ref in zip(outs, logits["fp32"], strict=True)))
            for k, outs in logits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--bundle", type=Path, help="a trained bundle for the accuracy columns (default: digits)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "acc").mkdir()
        (work / "vit").mkdir()
        bundle = args.bundle or digits_bundle(work)
        model, meta = load_bundle(bundle)
        calib = quantize.calibration_images(Calibration(samples=256), meta)[0]
        top1 = accuracy(int8_graphs(fp32_graph(model, calib, work / "acc"), calib, work / "acc"), meta)

        torch.manual_seed(0)
        vit = create_vit(args.model, num_classes=10).eval()
        for key, p in vit.named_parameters():  # non-zero biases, as trained models have
            if key.endswith("bias") or "norm" in key:
                p.data.add_(torch.randn_like(p) * 0.02)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
        # Calibration for latency only (random weights): Gaussian images, the ranges' values do not change speed.
        vit_calib = rng.standard_normal((16, 3, 224, 224), dtype=np.float32)
        paths = int8_graphs(fp32_graph(vit, x, work / "vit"), vit_calib, work / "vit")
        sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
        runners = {k: (lambda i, s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
        start = os.getloadavg()
        t0 = time.perf_counter()
        times = interleaved_times(runners, args.rounds, TimingConfig(warmup=2, iterations=args.iters))
        here = cpu_info()
        print(f"CPU: {here.model} ({', '.join(here.features)}; u8s8 {here.u8s8}); {args.model} @224 batch "
              f"{args.batch}, {args.threads} threads, {args.rounds} rounds x {args.iters} runs in "
              f"{time.perf_counter() - t0:.0f} s; load {start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
        print(f"accuracy: {bundle} ({meta.base.name}, {meta.preprocessing.size} px, data {meta.data.source})")
        ref = np.median(times["fp32"])
        print(f"  {'recipe':15s} {'val top-1':>9s} {'test top-1':>10s} {'max |dlogit|':>12s} {'p50 ms':>8s} "
              f"{'vs fp32':>7s}")
        for k, t in times.items():
            val, test, err = top1[k]
            print(f"  {k:15s} {val:9.4f} {test:10.4f} {err:12.3f} {np.median(t):8.2f} {np.median(t) / ref:6.2f}x")


if __name__ == "__main__":
    main()
