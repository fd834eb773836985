"""Where a ViT block's attention time goes in ONNX Runtime on the CPU, and whether an INT8 core pays.

One attention sub-layer (``[1, tokens, width]`` in, qkv Linear, ``heads`` heads) in four graphs, timed in
interleaved rounds in one process; "core" is each graph's time minus the qkv projection alone:

- ``qkv``: the qkv MatMul + bias only (the baseline subtracted from the others);
- ``Attention``: ``com.microsoft::Attention`` (what edgevit's ORT graphs use; QAttention keeps this core fp32);
- ``MHA``: qkv MatMul + Split + ``com.microsoft::MultiHeadAttention``;
- ``standard``: standard ops (Reshape/Transpose, MatMul, Softmax, MatMul), fp32;
- ``int8-core``: standard ops with both attention products in INT8 (``DynamicQuantizeLinear`` on q, k, v,
  the softmax output quantized at 1/255, ``MatMulInteger``), the core an INT8 attention would run.

    OMP_NUM_THREADS=2 python benchmarks/attention_core.py [--tokens 197 --width 192 --heads 3]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgevit.bench.latency import TimingConfig, interleaved_times

MS = "com.microsoft"


def session(nodes: list, consts: dict[str, np.ndarray], tokens: int, width: int, threads: int):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "attention", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def graphs(tokens: int, width: int, heads: int) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    node = helper.make_node
    rng = np.random.default_rng(0)
    head = width // heads
    consts = {
        "w": (rng.standard_normal((width, 3 * width)) * 0.1).astype(np.float32),
        "b": (rng.standard_normal(3 * width) * 0.02).astype(np.float32),
        "sizes": np.array([width] * 3, np.int64),
        "heads": np.array([1, tokens, heads, head], np.int64),
        "merged": np.array([1, tokens, width], np.int64),
        "scale": np.array(head**-0.5, np.float32),
        "p_scale": np.array(1 / 255, np.float32),
        "p_zero": np.array(0, np.uint8),
    }
    qkv = [node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["mb"])]
    split = [*qkv, node("Split", ["mb", "sizes"], ["q", "k", "v"], axis=-1)]

    def to_heads(name: str, perm: list[int]) -> list:
        return [
            node("Reshape", [name, "heads"], [f"{name}_r"]),
            node("Transpose", [f"{name}_r"], [f"{name}_h"], perm=perm),
        ]

    def split_heads(suffix: str) -> list:
        return [
            *to_heads(f"q{suffix}", [0, 2, 1, 3]),
            *to_heads(f"k{suffix}", [0, 2, 3, 1]),
            *to_heads(f"v{suffix}", [0, 2, 1, 3]),
        ]

    merge = [node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1, 3]), node("Reshape", ["o_t", "merged"], ["y"])]
    standard = [
        *split,
        *split_heads(""),
        node("MatMul", ["q_h", "k_h"], ["s"]),
        node("Mul", ["s", "scale"], ["s_scaled"]),
        node("Softmax", ["s_scaled"], ["p"], axis=-1),
        node("MatMul", ["p", "v_h"], ["o"]),
        *merge,
    ]
    int8 = [
        *split,
        *(node("DynamicQuantizeLinear", [t], [f"{t}8", f"{t}_s", f"{t}_z"]) for t in "qkv"),
        *split_heads("8"),
        node("MatMulInteger", ["q8_h", "k8_h", "q_z", "k_z"], ["s32"]),
        node("Cast", ["s32"], ["s"], to=TensorProto.FLOAT),
        node("Mul", ["q_s", "k_s"], ["qk_s"]),
        node("Mul", ["qk_s", "scale"], ["s_factor"]),
        node("Mul", ["s", "s_factor"], ["s_scaled"]),
        node("Softmax", ["s_scaled"], ["p"], axis=-1),
        node("QuantizeLinear", ["p", "p_scale", "p_zero"], ["p8"]),
        node("MatMulInteger", ["p8", "v8_h", "p_zero", "v_z"], ["o32"]),
        node("Cast", ["o32"], ["o_f"], to=TensorProto.FLOAT),
        node("Mul", ["p_scale", "v_s"], ["pv_s"]),
        node("Mul", ["o_f", "pv_s"], ["o"]),
        *merge,
    ]
    return {
        "qkv": [*qkv, node("Identity", ["mb"], ["y"])],
        "Attention": [node("Attention", ["x", "w", "b"], ["y"], domain=MS, num_heads=heads, scale=head**-0.5)],
        "MHA": [
            node("MatMul", ["x", "w"], ["m"]),
            node("Split", ["m", "sizes"], ["q", "k", "v"], axis=-1),
            node("MultiHeadAttention", ["q", "k", "v", "b"], ["y"], domain=MS, num_heads=heads, scale=head**-0.5),
        ],
        "standard": standard,
        "int8-core": int8,
    }, consts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    nodes, consts = graphs(args.tokens, args.width, args.heads)
    sessions = {}
    for name, graph in nodes.items():
        used = {i for n in graph for i in n.input}
        sessions[name] = session(
            graph, {k: v for k, v in consts.items() if k in used}, args.tokens, args.width, args.threads
        )
    feed = {"x": np.random.default_rng(1).standard_normal((1, args.tokens, args.width), dtype=np.float32)}
    outputs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
    ref = outputs["Attention"]
    start = os.getloadavg()[0]
    runners = {k: (lambda i, s=s: s.run(None, feed)) for k, s in sessions.items()}
    times = interleaved_times(runners, args.rounds, TimingConfig(warmup=3, iterations=args.iters))  # ms
    print(
        f"attention: {args.tokens} tokens, width {args.width}, {args.heads} heads, {args.threads} threads, "
        f"onnxruntime {ort.__version__}; {args.rounds} rounds x {args.iters}; load {start:.2f} -> "
        f"{os.getloadavg()[0]:.2f}"
    )
    base = float(np.median(times["qkv"]))
    core = float(np.median(times["Attention"])) - base
    for k, t in times.items():
        p50 = float(np.median(t))
        err = (
            ""
            if k == "qkv"
            else f"  max rel. diff vs Attention {np.abs(outputs[k] - ref).max() / np.abs(ref).max():.1e}"
        )
        print(
            f"  {k:10s} p50 {p50:7.3f} ms  core {p50 - base:7.3f} ms "
            f"({(p50 - base) / core if k != 'qkv' else 0:5.2f}x Attention's){err}"
        )


if __name__ == "__main__":
    main()
