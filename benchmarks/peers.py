"""edgevit's ONNX Runtime exports side by side with the ways peers run the same ViT, in one process.

Same weights everywhere (a random-weight timm ViT, seed 0). Graphs and runners:

- ``torch-eager``: the plain timm model (timm's own attention), ``torch.inference_mode``.
- ``torch-compile``: the same through ``torch.compile`` (inductor), when it compiles on this CPU.
- ``onnx-plain``: ``torch.onnx.export(dynamo=False)`` of the timm model, run as is in ORT.
- ``onnx-dynamo-slim``: ``torch.onnx.export(dynamo=True)`` + onnxslim (a well-kept peer exporter), in ORT.
- ``onnx-dynamo-int8``: ORT's dynamic INT8 (``quantize_dynamic``, per-channel) of that peer graph.
- ``edgevit-fp32`` / ``edgevit-int8``: ``edgevit export`` with the cpu-ort-fp32 / cpu-ort-int8 profiles
  (edgevit's own export code; the int8 accuracy gate is lifted because random weights have no accuracy).
- ``gemm-floor``: the MatMul/Gemm nodes of the plain export (every linear layer and both attention products)
  at their own shapes (read from a run),
  back to back in one ORT graph: what the model costs if everything but the matrix products were free.

Every runner gets ``--threads`` threads and is timed in interleaved rounds (all runners once per round), so
load from other users of a shared machine hits all of them alike. Prints the machine, the load average at
the start and end, p50/p90 per runner, its ratio to edgevit-fp32 and achieved GFLOP/s as a fraction of the
GEMM rate the floor graph reaches.

    OMP_NUM_THREADS=2 python benchmarks/peers.py --threads 2 --models vit_tiny_patch16_224 --batch 1 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

from edgevit.bench.flops import count_flops
from edgevit.bench.latency import TimingConfig, interleaved_times, ort_session
from edgevit.data import data_ref
from edgevit.data.transforms import default_preprocessing
from edgevit.export import export_bundle, load_profile
from edgevit.vit import BundleMeta, create_vit, save_bundle
from edgevit.vit.bundle import BaseArch

REFERENCE = "edgevit-fp32"
FLOOR = "gemm-floor"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if f" {f}" in flags]
    import onnxruntime as ort

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {' '.join(isa)}; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, timm {timm.__version__}"
    )


@contextlib.contextmanager
def quiet():
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def edgevit_exports(name: str, work: Path) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A random-weight bundle of ``name`` at 224 px, exported by edgevit for cpu-ort-fp32 and cpu-ort-int8."""
    torch.manual_seed(0)
    model = create_vit(name, num_classes=10).eval()
    for key, p in model.named_parameters():  # timm initialises biases to 0, which onnxslim would fold away
        if key.endswith("bias") or "norm" in key:
            p.data.add_(torch.randn_like(p) * 0.02)
    meta = BundleMeta(
        base=BaseArch(name=name, kwargs={"num_classes": 10}),
        preprocessing=default_preprocessing(224, 3),
        classes=[str(c) for c in range(10)],
        data=data_ref("digits"),
        provenance={"method": "baseline", "config": {"weights": "random"}},
    )
    save_bundle(work / "bundle", model, meta)
    paths = {}
    for tag in ("fp32", "int8"):
        profile = load_profile(f"cpu-ort-{tag}")
        if tag == "int8":  # random weights: top-1 means nothing, the gate would only test chance
            profile = profile.model_copy(update={"int8": profile.int8.model_copy(update={"max_top1_drop": 1.0})})
        t0 = time.perf_counter()
        export = export_bundle(work / "bundle", profile, work / f"edgevit-{tag}")
        paths[f"edgevit-{tag}"] = work / f"edgevit-{tag}" / export["deploy_onnx"]
        print(
            f"  edgevit export cpu-ort-{tag}: {time.perf_counter() - t0:.1f} s, parity max abs diff "
            f"{export['parity']['max_abs_diff']:.2e}, ORT session fusions {export['graph'].get('ort_session_fusions')}"
        )
    return model, paths


def peer_graphs(model: torch.nn.Module, work: Path) -> dict[str, Path]:
    """The plain and the dynamo + onnxslim exports of ``model`` (dynamic batch) and ORT dynamic INT8 of the
    latter."""
    import onnxslim
    from onnxruntime.quantization import QuantType, quantize_dynamic

    x = torch.zeros(1, 3, 224, 224)
    names = {"input_names": ["input"], "output_names": ["logits"], "opset_version": 17}
    with quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            str(work / "plain.onnx"),
            dynamo=False,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            **names,
        )
        torch.onnx.export(
            model,
            (x,),
            str(work / "dynamo.onnx"),
            dynamo=True,
            external_data=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
            **names,
        )
        onnx.save(onnxslim.slim(onnx.load(str(work / "dynamo.onnx"))), str(work / "dynamo-slim.onnx"))
        quantize_dynamic(
            str(work / "dynamo-slim.onnx"),
            str(work / "dynamo-int8.onnx"),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    return {
        "onnx-plain": work / "plain.onnx",
        "onnx-dynamo-slim": work / "dynamo-slim.onnx",
        "onnx-dynamo-int8": work / "dynamo-int8.onnx",
    }


def floor_graph(src: Path, dst: Path, batch: int) -> float:
    """Write ``dst``: every MatMul/Gemm of ``src`` at the shapes it runs with at ``batch``, each fed from graph
    inputs (activations) and its own initializers (weights), all independent. Returns its GFLOPs."""
    graph = onnx.load(str(src))
    nodes = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm")]
    probe = onnx.ModelProto.FromString(graph.SerializeToString())
    known = {o.name for o in probe.graph.output}
    wanted = [i for n in nodes for i in n.input[:2] if i not in known]
    probe.graph.output.extend(helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in dict.fromkeys(wanted))
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(probe, f"{tmp}/probe.onnx")
        session = ort_session(f"{tmp}/probe.onnx", 1, optimization="disable")
        x = np.zeros((batch, 3, 224, 224), np.float32)
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}), strict=True))
    weights = {i.name for i in graph.graph.initializer}
    inputs, inits, out_nodes, outputs, flops = [], [], [], [], 0
    rng = np.random.default_rng(0)
    for k, node in enumerate(nodes):
        a_shape, b_shape = values[node.input[0]].shape, values[node.input[1]].shape
        if node.op_type == "Gemm":  # as the exporter writes it: transB=1 for Linear weights
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            n_out = b_shape[0] if trans_b else b_shape[1]
            b_shape = (a_shape[-1], n_out)
        a, b = f"a{k}", f"b{k}"
        inputs.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, list(a_shape)))
        if node.input[1] in weights:
            inits.append(numpy_helper.from_array(rng.standard_normal(b_shape).astype(np.float32), b))
        else:
            inputs.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, list(b_shape)))
        out_nodes.append(helper.make_node("MatMul", [a, b], [f"y{k}"]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
        m = (
            int(np.prod(a_shape[:-1]))
            if len(b_shape) == 2
            else int(np.prod(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))) * a_shape[-2]
        )
        flops += 2 * m * a_shape[-1] * b_shape[-1]
    model = helper.make_model(
        helper.make_graph(out_nodes, "gemm_floor", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save(model, str(dst))
    return flops / 1e9


def ort_runner(path: Path, threads: int, inputs: list[np.ndarray]) -> Callable[[int], object]:
    session = ort_session(path, threads)
    if path.name == "floor.onnx":
        feeds = [
            {i.name: np.random.default_rng(j).standard_normal(i.shape, dtype=np.float32) for i in session.get_inputs()}
            for j in range(2)
        ]
    else:
        feeds = [{"input": x} for x in inputs]
    return lambda i: session.run(None, feeds[i % len(feeds)])


def torch_runner(model: torch.nn.Module, inputs: list[np.ndarray]) -> Callable[[int], object]:
    tensors = [torch.from_numpy(x) for x in inputs]

    def run(i: int) -> object:
        with torch.inference_mode():
            return model(tensors[i % len(tensors)])

    return run


def compiled_runner(model: torch.nn.Module, inputs: list[np.ndarray]) -> Callable[[int], object] | str:
    """``torch.compile`` (inductor) of ``model``, compiled and checked here; an error line when it fails."""
    try:
        compiled = torch.compile(model)
        run = torch_runner(compiled, inputs)
        t0 = time.perf_counter()
        with quiet():
            run(0)
        print(f"  torch.compile: first call {time.perf_counter() - t0:.1f} s")
        return run
    except Exception as err:  # inductor fails in many ways (no compiler, unsupported op): report and go on
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def bench(
    name: str, batch: int, peer: torch.nn.Module, paths: dict[str, Path], args: argparse.Namespace, work: Path
) -> None:
    print(f"\n== {name} @224, batch {batch}, {args.threads} threads (load {load()})")
    paths = dict(paths)
    floor_gflops = floor_graph(paths["onnx-plain"], work / "floor.onnx", batch)  # standard ops: every matmul
    paths[FLOOR] = work / "floor.onnx"
    gflops = count_flops(peer, (batch, 3, 224, 224)) / 1e9
    inputs = [np.random.default_rng(s).standard_normal((batch, 3, 224, 224), dtype=np.float32) for s in range(4)]

    runners: dict[str, Callable[[int], object]] = {"torch-eager": torch_runner(peer, inputs)}
    if args.compile:
        compiled = compiled_runner(peer, inputs)
        if isinstance(compiled, str):
            print(f"  torch.compile skipped: {compiled}")
        else:
            runners["torch-compile"] = compiled
    runners |= {k: ort_runner(p, args.threads, inputs) for k, p in paths.items()}

    start = load()
    times = interleaved_times(runners, args.rounds, TimingConfig(warmup=args.warmup, iterations=args.iters))
    ref = float(np.median(times[REFERENCE]))
    floor = float(np.median(times[FLOOR]))
    rate = floor_gflops / (floor / 1e3)
    print(
        f"  model {gflops:.2f} GFLOP/batch (MatMul/Gemm {floor_gflops:.2f}); GEMM rate at the model's shapes "
        f"{rate:.0f} GFLOP/s; load {start} -> {load()}; {args.rounds} rounds x {args.iters} runs"
    )
    print(f"  {'runner':18s} {'p50 ms':>8s} {'p90 ms':>8s} {'x edgevit-fp32':>15s} {'% GEMM rate':>12s}")
    for k, t in times.items():
        p50, p90 = np.percentile(t, [50, 90])
        achieved = (floor_gflops if k == FLOOR else gflops) / (p50 / 1e3)
        print(f"  {k:18s} {p50:8.2f} {p90:8.2f} {p50 / ref:14.2f}x {achieved / rate:11.0%}")
    print(
        f"  RESULT {name} b{batch}: dynamo-slim/edgevit-fp32 {np.median(times['onnx-dynamo-slim']) / ref:.2f}x, "
        f"edgevit-fp32/floor {ref / floor:.2f}x, "
        f"edgevit-int8/edgevit-fp32 {np.median(times['edgevit-int8']) / ref:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224,vit_small_patch16_224")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10, help="timed runs per runner per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per runner per round")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; threads {args.threads}; load {load()}")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            print(f"\n{name}: exporting (load {load()})")
            model, paths = edgevit_exports(name, work)
            peer = timm.create_model(name, num_classes=10).eval()
            peer.load_state_dict(model.state_dict())
            paths |= peer_graphs(peer, work)
            for batch in (int(b) for b in args.batch.split(",")):
                bench(name, batch, peer, paths, args, work)


if __name__ == "__main__":
    main()
