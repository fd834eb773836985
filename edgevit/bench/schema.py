"""The one row format every measurement is written in (``results.jsonl``: one JSON object a line).

``edgevit profile``, the skip-pruning sweep and the device-side parsers (trtexec, tegrastats) all write
:class:`ResultRow`, so ``edgevit report`` reads any of them.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Latency(BaseModel):
    """Milliseconds per batch."""

    p50: float
    p90: float
    p99: float
    mean: float
    iterations: int


class ResultRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact: str  # export dir, bundle dir or engine path that was measured
    method: str  # baseline, transfer, skip, continual, memory, prompts
    settings: dict[str, Any] = Field(default_factory=dict)  # the method's settings (ratio, prompts, ...)
    label: str = ""  # short human name for plots, e.g. "skip cosine 1/3"
    backend: str  # torch | ort | trt | trtexec
    precision: str  # fp32 | fp16 | int8
    batch: int
    threads: int | None = None
    latency_ms: Latency | None = None
    throughput_ips: float | None = None
    peak_memory_mb: float | None = None
    top1: float | None = None  # 0..1, measured through the same backend and precision
    top1_split: str | None = None
    task: str = ""  # the data the accuracy is on, e.g. "digits" or "digits[5,6,7,8,9]": rows compare within a task
    artifact_mb: float | None = None
    params: int | None = None
    gflops: float | None = None  # per image
    power_w: float | None = None
    energy_mj_per_image: float | None = None
    machine: dict[str, Any] = Field(default_factory=dict)
    source: str = "edgevit profile"


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, core count, threads, GPU and library versions of this process's machine."""
    from edgevit.cpu import cpu_info

    here = cpu_info()
    info: dict[str, Any] = {"hostname": platform.node(), "os": platform.platform(), "cpu": here.model,
                            "cpu_features": here.features, "u8s8": here.u8s8, "cores": os.cpu_count(),
                            "threads": threads, "python": platform.python_version()}
    for module in ("torch", "onnxruntime", "tensorrt"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def append_rows(path: str | Path, rows: list[ResultRow]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(row.model_dump_json(exclude_none=True) + "\n")


def read_rows(path: str | Path) -> list[ResultRow]:
    return [ResultRow.model_validate(json.loads(line)) for line in Path(path).read_text().splitlines()
            if line.strip()]
