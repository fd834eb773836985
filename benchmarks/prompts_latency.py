"""Latency of deep prompts in ONNX Runtime (CPU): token-appended graph vs merged prefix-K/V graph vs no prompts.

``vit_small_patch16_224`` (random weights, 224 px, N = 197 tokens) with 50 deep prompts per block. The
token-appended graph carries the 50 prompts through every block (N + M = 247 queries, qkv and MLP on them);
the merged graph (surgery op ``prefix_kv``) keeps 197 queries and only adds 50 constant keys/values per block.
All three graphs are exported and timed in one process, interleaved over rounds, same threads and inputs.

Usage:

    OMP_NUM_THREADS=1 python benchmarks/prompts_latency.py --threads 1 --rounds 3 --seconds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from edgevit.bench.latency import TimingConfig, ort_session, rotation_inputs, time_onnx
from edgevit.bench.schema import machine_info
from edgevit.methods.prompts import PromptConfig, build_tuner, merge_prompts
from edgevit.vit import create_vit
from edgevit.vit.model import num_tokens


def export(model: torch.nn.Module, path: Path, image: torch.Tensor) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (image,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per graph")
    parser.add_argument("--seconds", type=float, default=5.0, help="time budget per graph per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    plain = create_vit(args.model).eval()
    vit = create_vit(args.model).eval()
    vit.load_state_dict(plain.state_dict())
    blocks = len(vit.blocks)
    cfg = PromptConfig(deep=True, variant="vpt", prompts=args.prompts).resolved(vit.embed_dim, blocks, num_tokens(vit))
    tokens = build_tuner(vit, plain.num_classes, cfg, None, seed=0).eval()
    merged, _ = merge_prompts(tokens)
    with torch.no_grad():
        merged.head.load_state_dict(tokens.vit.head.state_dict())

    size = plain.patch_embed.img_size
    image = torch.randn(args.batch, 3, *size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"no prompts": export(plain, Path(tmp) / "plain.onnx", image),
                 "token-appended": export(tokens, Path(tmp) / "tokens.onnx", image),
                 "prefix-K/V": export(merged, Path(tmp) / "prefix.onnx", image)}
        outputs = {name: ort_session(path, args.threads).run(None, {"image": image.numpy()})[0]
                   for name, path in paths.items()}
        diff = float(np.abs(outputs["token-appended"] - outputs["prefix-K/V"]).max())
        inputs = rotation_inputs(tuple(image.shape))
        timing = TimingConfig(warmup=5, seconds=args.seconds)
        p50s: dict[str, list[float]] = {name: [] for name in paths}
        p90s: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, path in paths.items():
                latency = time_onnx(path, inputs, args.threads, timing)
                p50s[name].append(latency.p50)
                p90s[name].append(latency.p90)

    n = plain.patch_embed.num_patches + plain.num_prefix_tokens
    info = machine_info(args.threads)
    print(f"{args.model}, {args.prompts} deep prompts x {blocks} blocks, batch {args.batch}, ORT CPU "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds x {args.seconds:.0f} s; "
          f"cpu: {info.get('cpu', '?')}")
    print(f"token-appended vs prefix-K/V logits max abs diff (ORT): {diff:.2e}")
    print(f"{'graph':16s} {'queries':>7s} {'keys':>5s} {'p50 ms':>8s} {'p90 ms':>8s}")
    shapes = {"no prompts": (n, n), "token-appended": (n + args.prompts, n + args.prompts),
              "prefix-K/V": (n, n + args.prompts)}
    median = {name: statistics.median(v) for name, v in p50s.items()}
    for name in paths:
        q, k = shapes[name]
        print(f"{name:16s} {q:7d} {k:5d} {median[name]:8.2f} {statistics.median(p90s[name]):8.2f}")
    print(f"ratios (median p50): token-appended / prefix-K/V = {median['token-appended'] / median['prefix-K/V']:.3f}, "
          f"prefix-K/V / no prompts = {median['prefix-K/V'] / median['no prompts']:.3f}, "
          f"token-appended / no prompts = {median['token-appended'] / median['no prompts']:.3f}")


if __name__ == "__main__":
    main()
