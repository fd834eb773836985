"""Test helper: an export directory built by hand to the export contract (until `edgevit export` lands)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from edgevit.vit import load_bundle
from edgevit.vit.bundle import META, WEIGHTS


def make_export_dir(bundle: Path, out: Path, method: str | None = None, settings: dict | None = None,
                    dynamic: bool = True, profile: str = "cpu-fp32") -> Path:
    """OUT/ with bundle/ (copy), model.onnx (torch.onnx.export, fp32) and export.json (contract keys)."""
    model, meta = load_bundle(bundle)
    out.mkdir(parents=True)
    (out / "bundle").mkdir()
    for name in (META, WEIGHTS):
        shutil.copy2(Path(bundle) / name, out / "bundle" / name)
    pre = meta.preprocessing
    torch.onnx.export(model, (torch.zeros(1, pre.channels, pre.size, pre.size),), str(out / "model.onnx"),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None)
    batch = "batch" if dynamic else 1
    export = {
        "schema_version": 1,
        "profile": {"name": profile, "target": "cpu", "runtime": "onnxruntime", "precision": "fp32",
                    "batch": [1, 8] if dynamic else [1]},
        "deploy_onnx": "model.onnx",
        "input": {"name": "input", "shape": [batch, pre.channels, pre.size, pre.size], "dtype": "float32"},
        "output": {"name": "logits", "shape": [batch, len(meta.classes)]},
        "parity": {"images": 0, "max_abs_diff": 0.0, "cosine": 1.0, "top1_agreement": 1.0, "tolerances": {},
                   "passed": True},
        "hashes": {"model.onnx": hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()},
        "versions": {"torch": torch.__version__},
        "method": method or meta.provenance.get("method", "baseline"),
        "settings": settings if settings is not None else meta.provenance.get("config", {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "export.json").write_text(json.dumps(export, indent=2))
    return out
