"""A Triton Inference Server model repository inside every export directory.

``triton/<model>/config.pbtxt`` + ``triton/<model>/labels.txt`` + ``triton/<model>/1/model.onnx`` (ONNX
Runtime exports: the deployed graph, hard-linked) or ``1/model.plan`` (TensorRT exports: the engine is
built on the device, and ``edgevit build`` / ``build_engine.sh`` place it there). Point Triton at the
``triton/`` folder (``tritonserver --model-repository=OUT/triton``).

The config follows Triton's model configuration (``model_config.proto``): the batch dimension is implicit
when ``max_batch_size > 0`` (dynamic-batch exports and static batch 1), explicit with ``max_batch_size: 0``
for a static batch above 1, which Triton cannot split.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from edgevit.export.profiles import Profile

TRITON = "triton"
LABELS = "labels.txt"
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8"}


def model_name(export_dir_name: str) -> str:
    """A Triton model name from the export directory's name (letters, digits, ``-``, ``_``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", export_dir_name).strip(".") or "edgevit"


def model_file(profile: Profile) -> str:
    """The file Triton serves in the model's version folder."""
    return "model.plan" if profile.runtime == "tensorrt" else "model.onnx"


def config_pbtxt(name: str, profile: Profile, export: dict[str, Any]) -> str:
    """The text-format ``ModelConfig`` for an export (see the module docstring for the batch rule)."""
    batch = profile.batch_spec
    implicit = batch.dynamic or batch.max == 1
    inp, out = export["input"], export["output"]

    def dims(shape: list[int]) -> str:
        return ", ".join(str(d) for d in (shape[1:] if implicit else [batch.max, *shape[1:]]))

    lines = [
        f'name: "{name}"',
        f'platform: "{"tensorrt_plan" if profile.runtime == "tensorrt" else "onnxruntime_onnx"}"',
        f"max_batch_size: {batch.max if implicit else 0}",
        f'default_model_filename: "{model_file(profile)}"',
        f'input [{{ name: "{inp["name"]}", data_type: {DTYPES[inp["dtype"]]}, dims: [ {dims(inp["shape"])} ] }}]',
        f'output [{{ name: "{out["name"]}", data_type: {DTYPES[out["dtype"]]}, dims: [ {dims(out["shape"])} ], '
        f'label_filename: "{LABELS}" }}]',
    ]
    if implicit and batch.max > 1:
        preferred = sorted({b for b in (batch.opt, batch.max) if b > 1})
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ], "
                     "max_queue_delay_microseconds: 100 }")
    lines.append(f"instance_group [{{ count: 1, kind: {'KIND_CPU' if profile.target == 'cpu' else 'KIND_GPU'} }}]")
    return "\n".join(lines) + "\n"


def write_repository(out_dir: Path, name: str, profile: Profile, export: dict[str, Any]) -> dict[str, Any]:
    """Write ``out_dir/triton/<name>/`` for an export whose ``export.json`` content is ``export``."""
    model_dir = out_dir / TRITON / name
    version = model_dir / "1"
    version.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, profile, export))
    (model_dir / LABELS).write_text("\n".join(export["output"]["classes"]) + "\n")
    if profile.runtime == "onnxruntime":
        _link(out_dir / export["deploy_onnx"], version / model_file(profile))
    return {"repository": TRITON, "model": name, "model_file": f"{TRITON}/{name}/1/{model_file(profile)}"}


def place_engine(out_dir: Path, engine: Path) -> Path | None:
    """Put a freshly built engine into the export's Triton repository (None when the export has none)."""
    configs = sorted((out_dir / TRITON).glob("*/config.pbtxt"))
    if not configs:
        return None
    target = configs[0].parent / "1" / "model.plan"
    target.unlink(missing_ok=True)
    _link(engine, target)
    return target


def _link(src: Path, dst: Path) -> None:
    """A hard link (no second copy of a large graph or engine), a copy where the filesystem has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
