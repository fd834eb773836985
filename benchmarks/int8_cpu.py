"""INT8 on the CPU: which ONNX Runtime quantization of edgevit's ORT graph is fastest at equal accuracy.

Variants, all of edgevit's cpu-ort fp32 graph (TorchScript export + onnxslim + :mod:`edgevit.export.ort_graph`
rewrites) and per-channel int8 weights unless named otherwise:

- ``dynamic``: ``quantize_dynamic`` of MatMul/Gemm (the qkv projection inside ``Attention`` stays fp32).
- ``dynamic+attn``: the same plus ``Attention`` -> ``QAttention`` (int8 qkv weights).
- ``dynamic-tensor``: ``dynamic+attn`` with per-tensor weight scales.
- ``static-u8s8`` / ``static-s8s8``: calibrated Q/DQ on MatMul/Gemm inputs (uint8 or int8 activations,
  minmax); ORT's QDQ MatMul leaves the outputs fp32, so ORT runs MatMulIntegerToFloat-style kernels.
- ``nbits8-b32`` / ``nbits8-b128`` / ``nbits4-b32``: ORT ``MatMulNBits`` block-wise weights, int8 compute.
- ``base-dynamic``: dynamic MatMul/Gemm of the graph without the rewrites (edgevit before #19).

Latency: ``--model`` (random weights, 224 px) at ``--batch``, ``--threads`` threads, interleaved rounds in one
process, load average printed. Accuracy: the same recipes applied to a trained bundle (``--bundle``, e.g. a
224 px image-folder model; default: a digits baseline trained here in ~10 s, 16 px), test-split top-1 of each
INT8 graph against its fp32 graph.

    OMP_NUM_THREADS=2 python benchmarks/int8_cpu.py --threads 2 --rounds 10 [--bundle RUN]
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
from edgevit.data import split_arrays
from edgevit.export import checks, ort_graph, quantize
from edgevit.export import onnx as onnx_export
from edgevit.export.profiles import BatchSpec, Calibration, Int8Options
from edgevit.vit import create_vit, load_bundle

MATMULS = ["MatMul", "Gemm"]


def fp32_graphs(model: torch.nn.Module, sample: np.ndarray, work: Path) -> dict[str, Path]:
    """edgevit's fp32 ORT graph of ``model`` with and without the ORT rewrites."""
    onnx_export.export_onnx(model, work / "raw.onnx", torch.from_numpy(sample[:1]), BatchSpec(min=1, opt=1, max=64))
    onnx_export.simplify(work / "raw.onnx", work / "base.onnx")
    ort_graph.rewrite(work / "base.onnx", work / "fp32.onnx")
    return {"base": work / "base.onnx", "fp32": work / "fp32.onnx"}


def static_qdq(src: Path, dst: Path, calib: np.ndarray, activation: str) -> None:
    """ORT static Q/DQ of MatMul/Gemm weights (per channel, symmetric) and activations (minmax)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with quantize._named_copy(src, dst) as (named, graph), quantize._quiet():
        nodes = quantize.weight_nodes(graph, MATMULS, attention_matmuls=False)
        quantize_static(
            str(named),
            str(dst),
            quantize._Reader("input", calib, 8),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=MATMULS,
            nodes_to_quantize=nodes,
            per_channel=True,
            activation_type=QuantType.QUInt8 if activation == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": activation == "s8"},
        )
    for leftover in dst.parent.glob("augmented_model*.onnx"):
        leftover.unlink(missing_ok=True)


def nbits(src: Path, dst: Path, bits: int, block: int) -> None:
    """ORT's ``MatMulNBits`` (block-wise symmetric int weights, accuracy level 4: int8 activations, VNNI/AMX)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits)
    with quantize._quiet():
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True, accuracy_level=4, algo_config=cfg
        )
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), False)


def int8_graphs(fp32: dict[str, Path], calib: np.ndarray, work: Path) -> dict[str, Path]:
    paths = {"fp32": fp32["fp32"]}
    recipes = {
        "dynamic": (fp32["fp32"], MATMULS, True),
        "dynamic+attn": (fp32["fp32"], [*MATMULS, "Attention"], True),
        "dynamic-tensor": (fp32["fp32"], [*MATMULS, "Attention"], False),
        "base-dynamic": (fp32["base"], MATMULS, True),
    }
    for name, (src, ops, per_channel) in recipes.items():
        paths[name] = work / f"{name}.onnx"
        quantize.quantize_dynamic(src, paths[name], Int8Options(quantizer="dynamic", ops=ops, per_channel=per_channel))
    for activation in ("u8", "s8"):
        paths[f"static-{activation}s8"] = work / f"static-{activation}.onnx"
        static_qdq(fp32["fp32"], paths[f"static-{activation}s8"], calib, activation)
    for bits, block in ((8, 32), (8, 128), (4, 32)):
        paths[f"nbits{bits}-b{block}"] = work / f"nbits{bits}-{block}.onnx"
        nbits(fp32["fp32"], paths[f"nbits{bits}-b{block}"], bits, block)
    return paths


def digits_bundle(work: Path) -> Path:
    from edgevit.methods.baseline import train_baseline
    from edgevit.train import TrainConfig

    cfg = TrainConfig(epochs=12, batch_size=64, lr=3e-3, warmup_epochs=1, augment="none", label_smoothing=0.0)
    arch = {"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3}
    return Path(train_baseline("digits", work / "digits", img_size=16, arch=arch, cfg=cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument(
        "--bundle", type=Path, help="a trained bundle for the accuracy column (default: train a digits one)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
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
        images, labels = split_arrays(meta, "test")
        acc_paths = int8_graphs(fp32_graphs(model, images, work / "acc"), calib, work / "acc")
        top1 = {k: checks.onnx_top1(p, images, labels, 64) for k, p in acc_paths.items()}

        torch.manual_seed(0)
        vit = create_vit(args.model, num_classes=10).eval()
        for key, p in vit.named_parameters():  # non-zero biases, as trained models have
            if key.endswith("bias") or "norm" in key:
                p.data.add_(torch.randn_like(p) * 0.02)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
        # Calibration for latency only (random weights): Gaussian images, the ranges' values do not change speed.
        vit_calib = rng.standard_normal((16, 3, 224, 224), dtype=np.float32)
        paths = int8_graphs(fp32_graphs(vit, x, work / "vit"), vit_calib, work / "vit")
        sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}
        runners = {k: (lambda i, s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
        start = os.getloadavg()
        t0 = time.perf_counter()
        times = interleaved_times(runners, args.rounds, TimingConfig(warmup=2, iterations=args.iters))
        print(
            f"{args.model} @224 batch {args.batch}, {args.threads} threads, {args.rounds} rounds x {args.iters} "
            f"runs in {time.perf_counter() - t0:.0f} s; load {start[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
            f"accuracy: {bundle} ({meta.base.name}, {meta.preprocessing.size} px, data {meta.data.source}, "
            f"{len(labels)} test images)"
        )
        ref = np.median(times["fp32"])
        for k, t in times.items():
            p50, p90 = np.percentile(t, [50, 90])
            print(
                f"  {k:15s} p50 {p50:7.2f} ms  p90 {p90:7.2f} ms  {p50 / ref:5.2f}x fp32   "
                f"test top-1 {top1[k]:.4f} ({top1[k] - top1['fp32']:+.4f})"
            )


if __name__ == "__main__":
    main()
