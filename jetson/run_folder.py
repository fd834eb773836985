#!/usr/bin/env python3
"""Run an engine on an image folder and report top-1: the on-device accuracy check.

The folder holds one sub-folder per class, named like the bundle's classes (export.json ``output.classes``);
images are preprocessed as export.json ``input.preprocessing`` says (grayscale/RGB, resize, centre crop, then
mean/std, or raw pixels for a graph that normalises itself: profile ``input: {normalize: in_graph}``).
Needs python3, numpy, tensorrt, cuda-python and an image decoder (Pillow, else OpenCV; JetPack has one).

    python3 jetson/run_folder.py build/base/orin-int8 /data/line3/test [--batch 1] [--csv predictions.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import check, check_engine, cudart, graph_input, load_image, read_export

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def preprocess(path: Path, pre: dict) -> np.ndarray:
    """One image as the engine takes it: export.json's preprocessing (resize, centre crop, mean/std or raw)."""
    return graph_input(load_image(path, pre), pre)


class Engine:
    """One TensorRT engine with device buffers for a fixed batch (tensor-address API, TensorRT 10+)."""

    def __init__(self, path: Path, batch: int) -> None:
        import tensorrt as trt

        self.rt = cudart()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        shape = list(self.engine.get_tensor_shape(self.input))
        shape[0] = batch if shape[0] == -1 else shape[0]
        self.batch = shape[0]
        self.context.set_input_shape(self.input, shape)
        self.in_dtype = trt.nptype(self.engine.get_tensor_dtype(self.input))
        self.out_shape = tuple(self.context.get_tensor_shape(self.output))
        self.out_dtype = trt.nptype(self.engine.get_tensor_dtype(self.output))
        self.in_bytes = int(np.prod(shape)) * np.dtype(self.in_dtype).itemsize
        self.out_host = np.empty(self.out_shape, self.out_dtype)
        self.d_in = check(self.rt.cudaMalloc(self.in_bytes))
        self.d_out = check(self.rt.cudaMalloc(self.out_host.nbytes))
        self.stream = check(self.rt.cudaStreamCreate())
        self.context.set_tensor_address(self.input, int(self.d_in))
        self.context.set_tensor_address(self.output, int(self.d_out))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x.astype(self.in_dtype))
        h2d, d2h = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self.rt.cudaMemcpyAsync(self.d_in, x.ctypes.data, self.in_bytes, h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise SystemExit("TensorRT execute_async_v3 failed")
        check(self.rt.cudaMemcpyAsync(self.out_host.ctypes.data, self.d_out, self.out_host.nbytes, d2h, self.stream))
        check(self.rt.cudaStreamSynchronize(self.stream))
        return self.out_host.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--csv", type=Path, help="write file,label,prediction rows here")
    args = parser.parse_args()
    export = read_export(args.export_dir)
    check_engine(args.export_dir)
    classes = export["output"]["classes"]
    files = [(p, c) for c in classes for p in sorted((args.folder / c).rglob("*")) if p.suffix.lower() in SUFFIXES]
    if not files:
        raise SystemExit(f"no images under {args.folder}/<class>/ for classes {classes}")
    engine = Engine(args.export_dir / "engine.plan", args.batch)
    pre = export["input"]["preprocessing"]
    rows, correct = [], 0
    for i in range(0, len(files), engine.batch):
        chunk = files[i:i + engine.batch]
        x = np.stack([preprocess(p, pre) for p, _ in chunk])
        pad = engine.batch - len(chunk)
        if pad:  # a fixed-batch engine: repeat the last image, ignore its predictions
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        predictions = engine(x)[:len(chunk)].argmax(1)
        for (path, label), k in zip(chunk, predictions, strict=True):
            correct += classes[k] == label
            rows.append(f"{path},{label},{classes[k]}")
    if args.csv:
        args.csv.write_text("file,label,prediction\n" + "\n".join(rows) + "\n")
    print(f"top-1 {correct / len(files):.4f} on {len(files)} images ({export['profile']['name']}, "
          f"engine {args.export_dir / 'engine.plan'})")


if __name__ == "__main__":
    main()
