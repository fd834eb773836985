"""ORT-only graph rewrites: each fused graph computes what the standard graph computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgevit.export import onnx as onnx_export
from edgevit.export import ort_graph
from edgevit.export.checks import run_onnx
from edgevit.export.profiles import BatchSpec
from edgevit.vit import create_vit
from edgevit.vit.surgery import apply_surgery

ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "num_classes": 5}


def exported(tmp_path: Path, surgery: list[dict] | None = None) -> Path:
    """A random tiny ViT with non-zero biases and norm parameters (onnxslim drops zero biases), exported the
    way edgevit exports it (TorchScript exporter + onnxslim, dynamic batch)."""
    torch.manual_seed(0)
    model = apply_surgery(create_vit("vit_tiny_patch16_224", **ARCH), surgery or []).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.data.add_(torch.randn_like(p) * 0.1)
    raw, path = tmp_path / "raw.onnx", tmp_path / "model.onnx"
    onnx_export.export_onnx(model, raw, torch.zeros(1, 3, 32, 32), BatchSpec(min=1, opt=1, max=8))
    onnx_export.simplify(raw, path)
    return path


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize(
    ("rewrites", "counts"),
    [
        (("attention",), {"attention": 3}),
        (("skip_layernorm",), {"skip_layernorm": 6}),
        (("multihead_attention",), {"multihead_attention": 3}),
        (("attention", "skip_layernorm"), {"attention": 3, "skip_layernorm": 6}),
    ],
)
def test_rewrites_match_every_block_and_keep_the_logits(tmp_path, rewrites, counts):
    src = exported(tmp_path)
    dst = tmp_path / "fused.onnx"
    assert ort_graph.rewrite(src, dst, rewrites) == counts
    fused = ops(dst)
    if "attention" in rewrites:
        assert fused.count("Attention") == 3 and "Softmax" not in fused and "Split" not in fused
    if "multihead_attention" in rewrites:
        assert fused.count("MultiHeadAttention") == 3 and "Softmax" not in fused
    if "skip_layernorm" in rewrites:  # the first norm reads the embeddings (no residual), the others fuse
        assert fused.count("SkipLayerNormalization") == 6 and fused.count("LayerNormalization") == 1
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    ref, out = run_onnx(src, x, batch=5), run_onnx(dst, x, batch=5)  # batch stays dynamic
    assert np.abs(ref - out).max() < 1e-5 and np.abs(ref).max() > 0.1


def test_attention_with_prefix_kv_does_not_match_and_is_left_as_it_is(tmp_path):
    src = exported(tmp_path, [{"op": "prefix_kv", "tokens": 4, "blocks": [1]}])
    dst = tmp_path / "fused.onnx"
    assert ort_graph.rewrite(src, dst, ("attention",)) == {"attention": 2}
    assert ops(dst).count("Softmax") == 1 and ops(dst).count("Attention") == 2
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    assert np.abs(run_onnx(src, x, batch=2) - run_onnx(dst, x, batch=2)).max() < 1e-5
