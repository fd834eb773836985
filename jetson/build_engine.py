#!/usr/bin/env python3
"""Build engine.plan on this device from an export directory, and record engine.json.

Runs the export's build_engine.sh (the trtexec command generated from the export profile, so the flags
are the profile's), then writes engine.json (TensorRT version, GPU name, compute capability, ONNX hash)
in the same format as ``edgevit build``, so ``edgevit profile --backend trt`` and run_folder.py accept it.

    python3 jetson/build_engine.py build/base/orin-int8 [-- extra trtexec flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from common import gpu_info, read_export, sha256


def built_onnx(export: dict, trt_major: int) -> str:
    """The ONNX file build_engine.sh feeds trtexec: fp16 builds the strongly typed fp16 graph on TensorRT 11, and on
    TensorRT 10 where the profile builds strongly typed (Jetson Thor)."""
    strongly_typed = trt_major >= 11 or export["profile"]["tensorrt"].get("strongly_typed", False)
    if export["profile"]["precision"] == "fp16" and strongly_typed:
        return "model.fp16.onnx"
    return export["deploy_onnx"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("trtexec_args", nargs="*", help="extra trtexec flags, e.g. --verbose")
    args = parser.parse_args()
    import tensorrt as trt

    out = args.export_dir
    export = read_export(out)
    script = out / "build_engine.sh"
    if not script.is_file():
        raise SystemExit(f"{script} is missing: export with a TensorRT profile (edgevit export --profile jetson-...)")
    started = time.perf_counter()
    subprocess.run(["bash", str(script), *args.trtexec_args], check=True)
    onnx_name = built_onnx(export, int(trt.__version__.split(".")[0]))
    info = {"trt_version": trt.__version__, **gpu_info(), "onnx": onnx_name, "onnx_sha256": sha256(out / onnx_name),
            "deploy_onnx": export["deploy_onnx"], "profile": export["profile"]["name"],
            "precision": export["profile"]["precision"], "engine_sha256": sha256(out / "engine.plan"),
            "builder": "trtexec", "build_seconds": round(time.perf_counter() - started, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = out / ".engine.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / "engine.json")
    print(f"wrote {out / 'engine.plan'} and engine.json: TensorRT {info['trt_version']} on {info['gpu_name']}")


if __name__ == "__main__":
    main()
