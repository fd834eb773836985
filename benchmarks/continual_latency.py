"""ONNX Runtime CPU latency of DATA's deployable forms against the base model, side by side in one process.

For each architecture (``vit_tiny_patch16_224`` at 224 px and the digits ViT at 32 px, random weights):

* ``base``: the plain ViT;
* ``merged``: the same graph with adapters folded in at constant scales (``W' = W0 + U diag(s_bar) D``);
* ``exact``: base + DATA adapters (ranks r1, r2) on qkv/proj/fc1/fc2 + one scale router per group of blocks
  (surgery op ``adapter_scales``), i.e. the per-sample scale branch.

All three are exported with ``torch.onnx.export`` (TorchScript exporter, opset 17, batch 1) and timed in
interleaved rounds (each round times every model for ``--seconds``; the median of the rounds' p50 is
reported; the order alternates between rounds) so that load from other processes on a shared machine hits
all of them alike.

Example:
    OMP_NUM_THREADS=1 python benchmarks/continual_latency.py --threads 1 --rounds 5 --seconds 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from edgevit.bench.latency import TimingConfig, ort_session, rotation_inputs, time_loop
from edgevit.vit import apply_surgery, create_vit
from edgevit.vit.adapters import block_groups, default_group_size, folded_state_dict

ARCHS = {
    "vit_tiny_224": ("vit_tiny_patch16_224", {"img_size": 224, "num_classes": 10}, 3),
    "digits_32": ("vit_tiny_patch16_224", {"img_size": 32, "in_chans": 1, "num_classes": 10, "patch_size": 4,
                                           "embed_dim": 96, "depth": 6, "num_heads": 3}, 1),
}


def forms(name: str, kwargs: dict, ranks: list[int], rows: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Random-weight base, exact and merged models of one architecture."""
    torch.manual_seed(seed)
    base = create_vit(name, **kwargs).eval()
    op = {"op": "adapter_scales", "ranks": ranks, "group_size": default_group_size(len(base.blocks)), "rows": rows}
    exact = apply_surgery(create_vit(name, **kwargs), [op]).eval()
    state = {**base.state_dict()}
    for key, value in exact.state_dict().items():
        state.setdefault(key, torch.randn_like(value) * 0.02)
    exact.load_state_dict(state, strict=True)
    scales = torch.rand(len(block_groups(len(base.blocks), op["group_size"])), len(ranks))
    merged = create_vit(name, **kwargs).eval()
    merged.load_state_dict(folded_state_dict(exact, scales), strict=True)
    return {"base": base, "merged": merged, "exact": exact}


def export(model: torch.nn.Module, sample: torch.Tensor, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"])
    return onnx.load(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing budget per model per round")
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--rows", type=int, default=16, help="router rows (components x tasks)")
    parser.add_argument("--archs", default=",".join(ARCHS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    cfg = TimingConfig(warmup=10, seconds=args.seconds)

    print(f"ORT CPU, {args.threads} thread(s), batch 1, {args.rounds} interleaved rounds x {args.seconds}s; "
          f"ranks {ranks}, router rows {args.rows}")
    print("| model | form | ONNX nodes | p50 ms (median of rounds) | vs base |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            name, kwargs, chans = ARCHS[arch]
            models = forms(name, kwargs, ranks, args.rows)
            size = kwargs["img_size"]
            sample = torch.randn(1, chans, size, size)
            graphs, sessions = {}, {}
            for form, model in models.items():
                path = Path(tmp) / f"{arch}_{form}.onnx"
                graphs[form] = export(model, sample, path)
                sessions[form] = ort_session(path, args.threads)
            same = Counter(n.op_type for n in graphs["merged"].graph.node) == \
                Counter(n.op_type for n in graphs["base"].graph.node)
            inputs = rotation_inputs((1, chans, size, size))
            p50s: dict[str, list[float]] = {form: [] for form in models}
            for r in range(args.rounds):
                order = list(sessions.items())
                for form, session in order[::-1] if r % 2 else order:  # alternate who goes first
                    feeds = [{"input": x} for x in inputs]
                    p50s[form].append(time_loop(lambda i, s=session, f=feeds: s.run(None, f[i % len(f)]), cfg).p50)
            base = statistics.median(p50s["base"])
            for form in models:
                p50 = statistics.median(p50s[form])
                print(f"| {arch} | {form} | {len(graphs[form].graph.node)} | {p50:.3f} | {p50 / base:.3f} |")
            print(f"|   | merged graph = base graph (op histogram): {same}; per-round p50 ratios merged/base "
                  f"{[round(m / b, 3) for m, b in zip(p50s['merged'], p50s['base'], strict=True)]} | | | |")


if __name__ == "__main__":
    main()
