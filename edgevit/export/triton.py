"""Triton Inference Server: a model repository ``triton/<model>/`` inside every export directory.

``config.pbtxt`` describes the deploy graph (platform, batching, tensors, labels, instances) in Triton's
text protobuf format; ``1/model.onnx`` is the deploy ONNX for ONNX Runtime profiles, ``1/model.plan`` the
engine for TensorRT profiles (engines are built on the device: ``edgevit build`` places it, or copy
``engine.plan`` there after ``build_engine.sh``). The repository is written as text here, so edgevit does not
depend on ``tritonclient``; the tests parse every config with Triton's own ``ModelConfig`` proto.

Batching: a graph with a dynamic batch dimension gets ``max_batch_size`` = the profile's batch max, dims
without the batch and dynamic batching over the profile's opt and max sizes. A static-batch graph gets
``max_batch_size: 0`` and its full shape: Triton's TensorRT and ONNX Runtime backends only batch over a
first dimension of -1 and refuse a positive ``max_batch_size`` for a fixed-shape model.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.export.artifacts import ENGINE
from edgevit.export.profiles import Profile

NAME = "triton"
REPOSITORY = "triton"
VERSION = "1"
LABELS = "labels.txt"
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}
QUEUE_DELAY_US = 100  # how long Triton may hold a request to fill a preferred batch


def model_name(export: dict[str, Any]) -> str:
    """``<method>-<profile>``: one repository can hold several exports side by side."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{export['method']}-{export['profile']['name']}")


def _tensor(kind: str, name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    return (
        f'{kind} [\n  {{\n    name: "{name}"\n    data_type: {DTYPES[dtype]}\n'
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n{extra}  }}\n]\n"
    )


def config_pbtxt(export: dict[str, Any], profile: Profile) -> str:
    """The ``config.pbtxt`` of the export described by ``export`` (export.json's contents)."""
    from edgevit.export.runtimes import runtime_of
    from edgevit.export.targets import TARGETS

    runtime = runtime_of(profile)
    batch = profile.batch_spec
    inp, out = export["input"], export["output"]
    dynamic = inp["shape"][0] == -1
    cut = 1 if dynamic else 0
    text = (
        f'name: "{model_name(export)}"\nplatform: "{runtime.triton_platform}"\n'
        f'default_model_filename: "{runtime.triton_file}"\n'
        f"max_batch_size: {batch.max if dynamic else 0}\n"
    )
    text += _tensor("input", inp["name"], inp["dtype"], inp["shape"][cut:])
    text += _tensor("output", out["name"], out["dtype"], out["shape"][cut:], f'    label_filename: "{LABELS}"\n')
    if dynamic:
        sizes = sorted({batch.opt, batch.max})
        text += (
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, sizes))} ]\n"
            f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
        )
    kind = "KIND_GPU" if TARGETS[profile.target].gpu else "KIND_CPU"
    text += f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    return text


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (no second copy of the weights), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def emit(out: Path, export: dict[str, Any], profile: Profile, images: np.ndarray) -> dict[str, Any]:
    """Write ``triton/<model>/`` into the export directory ``out``; returns what export.json records."""
    from edgevit.export.runtimes import runtime_of

    del images  # the repository is fully determined by export.json
    runtime = runtime_of(profile)
    model_dir = out / REPOSITORY / model_name(export)
    (model_dir / VERSION).mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(export, profile))
    (model_dir / LABELS).write_text("".join(f"{c}\n" for c in export["output"]["classes"]))
    source = ENGINE if runtime.builds_engine else export["deploy_onnx"]  # an engine is placed when it is built
    if not runtime.builds_engine:
        _link_or_copy(out / source, model_dir / VERSION / runtime.triton_file)
    return {"model": model_name(export), "repository": REPOSITORY, "model_file": f"{VERSION}/{runtime.triton_file}",
            "model_file_from": source}


def place_engine(out_dir: Path) -> Path | None:
    """After a build: put ``engine.plan`` into the export's Triton repository as the model file its config names."""
    configs = sorted((out_dir / REPOSITORY).glob("*/config.pbtxt"))
    if not configs:  # an export made before edgevit wrote Triton repositories
        return None
    filename = re.search(r'default_model_filename: "([^"]+)"', configs[0].read_text())[1]
    target = configs[0].parent / VERSION / filename
    target.unlink(missing_ok=True)
    _link_or_copy(out_dir / ENGINE, target)
    return target
