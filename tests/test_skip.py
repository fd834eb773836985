"""Skip-pruned graphs: the surgery removes exactly the attention sub-layer, selection, the method (the sweep
study: test_skip_sweep.py)."""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_ARCH

from edgevit.cli import main
from edgevit.data import load_split
from edgevit.errors import EdgeVitError
from edgevit.methods.skip import (
    SkipConfig,
    attention_similarity,
    select_blocks,
    skipped,
    train_skip,
)
from edgevit.train import TrainConfig, evaluate
from edgevit.vit import BundleMeta, apply_surgery, create_vit, load_bundle, read_meta, save_bundle
from edgevit.vit.bundle import BaseArch
from edgevit.vit.surgery import MlpOnlyBlock

# With LayerScale (init_values), so removing ls1 is tested too.
KWARGS = {"img_size": 16, "in_chans": 1, "num_classes": 10, **TINY_ARCH, "init_values": 1e-2}
ATTENTION_PARTS = ("norm1", "attn", "ls1")
# One short epoch: these tests check plumbing, not how well healing works.
HEAL = TrainConfig(epochs=1, batch_size=256, lr=1e-3, warmup_epochs=0.5, augment=None)


def tiny_vit(seed: int = 0):
    """A tiny ViT whose every tensor is distinct: the ONNX exporter merges equal initializers (fresh
    LayerNorms are all ones/zeros) through Identity nodes, which would blur the node count."""
    torch.manual_seed(seed)
    model = create_vit("vit_tiny_patch16_224", **KWARGS).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def onnx_nodes(model) -> list[onnx.NodeProto]:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, 1, 16, 16),), buffer, dynamo=False, opset_version=17)
    return list(onnx.load_from_string(buffer.getvalue()).graph.node)


def attention_nodes(nodes, block: int) -> list[onnx.NodeProto]:
    """Nodes the exporter scoped to ``block``'s attention branch: norm1, attn.*, ls1."""
    return [n for n in nodes if n.name.startswith(tuple(f"/blocks/blocks.{block}/{p}/" for p in ATTENTION_PARTS))]


def test_skip_attention_removes_exactly_the_attention_parameters():
    full = tiny_vit()
    pruned = skipped(full, [1, 3])
    removed = {k for k in full.state_dict() if k not in pruned.state_dict()}
    expected = {k for k in full.state_dict()
                if any(k.startswith(f"blocks.{b}.{p}.") for b in (1, 3) for p in ATTENTION_PARTS)}
    assert removed == expected
    assert not set(pruned.state_dict()) - set(full.state_dict())
    assert {k.split(".")[2] for k in expected} == set(ATTENTION_PARTS)  # ls1 really was there and went
    attention_params = sum(p.numel() for b in (1, 3) for part in ATTENTION_PARTS
                           for p in getattr(full.blocks[b], part).parameters())
    n_full, n_pruned = (sum(p.numel() for p in m.parameters()) for m in (full, pruned))
    assert n_full - n_pruned == attention_params > 0
    for b, block in enumerate(pruned.blocks):  # the other blocks keep their weights
        assert isinstance(block, MlpOnlyBlock) == (b in (1, 3))
        for name, tensor in block.state_dict().items():
            torch.testing.assert_close(tensor, full.blocks[b].state_dict()[name], rtol=0, atol=0)


def test_skip_attention_drops_exactly_the_attention_nodes_from_onnx():
    full, pruned = tiny_vit(), skipped(tiny_vit(), [1, 3])
    full_nodes, pruned_nodes = onnx_nodes(full), onnx_nodes(pruned)
    per_block = len(attention_nodes(full_nodes, 1))
    assert per_block == len(attention_nodes(full_nodes, 3)) > 10
    # Each removed branch also takes its residual Add with it.
    assert len(full_nodes) - len(pruned_nodes) == 2 * (per_block + 1)
    assert not attention_nodes(pruned_nodes, 1) and not attention_nodes(pruned_nodes, 3)
    assert len(attention_nodes(pruned_nodes, 0)) == per_block
    ops_full, ops_pruned = Counter(n.op_type for n in full_nodes), Counter(n.op_type for n in pruned_nodes)
    assert ops_full["Softmax"] - ops_pruned["Softmax"] == 2
    assert ops_full["LayerNormalization"] - ops_pruned["LayerNormalization"] == 2
    assert ops_full["MatMul"] - ops_pruned["MatMul"] == 2 * 4  # qkv, q k^T, attn v, proj


def test_mlp_only_block_is_the_mlp_branch_alone():
    full = tiny_vit()
    pruned = skipped(full, [2])
    x = torch.randn(2, 17, KWARGS["embed_dim"])
    block = full.blocks[2]
    with torch.no_grad():
        torch.testing.assert_close(pruned.blocks[2](x), x + block.ls2(block.mlp(block.norm2(x))))


def test_skip_attention_rejects_bad_blocks():
    with pytest.raises(EdgeVitError, match="no attention left"):
        apply_surgery(tiny_vit(), [{"op": "skip_attention", "blocks": [1, -3]}])  # -3 is block 1 at depth 4
    with pytest.raises(EdgeVitError, match="does not fit"):
        apply_surgery(tiny_vit(), [{"op": "skip_attention", "blocks": [4]}])
    model = tiny_vit()
    model.blocks[0] = torch.nn.Identity()
    with pytest.raises(EdgeVitError, match="not a pre-norm timm Block"):
        apply_surgery(model, [{"op": "skip_attention", "blocks": [0]}])


def test_attention_similarity_is_the_cosine_of_the_residual_update():
    model = tiny_vit()
    with torch.no_grad():  # block 2's attention adds nothing: its score must be exactly 1
        model.blocks[2].attn.proj.weight.zero_()
        model.blocks[2].attn.proj.bias.zero_()
    images = torch.randn(6, 1, 16, 16)
    scores = attention_similarity(model, images, batch_size=4)
    assert sorted(scores["all"]) == sorted(scores["pooled"]) == [0, 1, 2, 3]
    assert scores["all"][2] == pytest.approx(1.0, abs=1e-6) and scores["pooled"][2] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():  # block 0 by hand
        x = model.patch_embed(images)
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        block = model.blocks[0]
        cos = torch.nn.functional.cosine_similarity(x, x + block.ls1(block.attn(block.norm1(x))), dim=-1)
    assert scores["all"][0] == pytest.approx(cos.mean().item(), abs=1e-5)
    assert scores["pooled"][0] == pytest.approx(cos[:, 0].mean().item(), abs=1e-5)  # the class token
    assert select_blocks(model, "cosine", 1, scores) == select_blocks(model, "cosine-pooled", 1, scores) == [2]
    assert attention_similarity(skipped(model, [2]), images)["all"].keys() == {0, 1, 3}


def test_selection_strategies():
    model = tiny_vit()
    scores = {"all": {0: 0.9, 1: 0.99, 2: 0.5, 3: 0.95}, "pooled": {0: 0.2, 1: 0.8, 2: 0.9, 3: 0.7}}
    assert select_blocks(model, "cosine", 2, scores) == [1, 3]
    assert select_blocks(model, "cosine-pooled", 2, scores) == [1, 2]
    assert select_blocks(model, "last", 2) == [1, 2]  # the final block is always kept
    assert select_blocks(model, "last", 3) == [0, 1, 2]
    with pytest.raises(EdgeVitError, match="only 3 candidate"):
        select_blocks(model, "last", 4)
    draws = {tuple(select_blocks(model, "random", 2, seed=s)) for s in range(20)}
    assert select_blocks(model, "random", 2, seed=5) == select_blocks(model, "random", 2, seed=5)
    assert len(draws) > 1 and all(len(set(d)) == 2 for d in draws)
    assert select_blocks(skipped(model, [1]), "last", 2) == [0, 2]  # already skipped blocks are not candidates


def test_bundle_round_trip_keeps_logits(tmp_path):
    model = skipped(tiny_vit(), [0, 2])
    meta = BundleMeta(base=BaseArch(name="vit_tiny_patch16_224", kwargs=KWARGS),
                      surgery=[{"op": "skip_attention", "blocks": [0, 2]}],
                      preprocessing={"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]},
                      classes=[str(c) for c in range(10)], data={"source": "digits"})
    save_bundle(tmp_path / "b", model, meta)
    loaded, _ = load_bundle(tmp_path / "b")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_train_skip_writes_a_healed_bundle(digits_bundle, tmp_path):
    out = train_skip(digits_bundle, "digits", tmp_path / "skip", SkipConfig(select="cosine", ratio=0.5, calib=40),
                     HEAL)
    model, meta = load_bundle(out)
    blocks = meta.provenance["removed_blocks"]
    scores = {int(b): s for b, s in meta.provenance["attention_similarity"].items()}
    assert len(blocks) == 2 and meta.surgery[-1] == {"op": "skip_attention", "blocks": blocks}
    assert sorted(scores) == [0, 1, 2, 3] and blocks == sorted(sorted(scores, key=scores.get)[-2:])
    assert sorted(meta.provenance["attention_similarity_pooled"]) == ["0", "1", "2", "3"]
    assert meta.provenance["method"] == "skip" and meta.provenance["calibration"]["images"] == 40
    assert [isinstance(b, MlpOnlyBlock) for b in model.blocks] == [b in blocks for b in range(4)]
    # The bundle reloads into the same function: top-1 recomputed from the loaded bundle matches the
    # metric taken in memory before saving, and ONNX Runtime agrees with torch on the logits.
    test = load_split("digits", "test", meta.preprocessing)
    assert round(evaluate(model, test), 5) == meta.metrics["test_top1"]
    assert 0 <= meta.metrics["before_heal"]["test_top1"] <= 1 and meta.metrics["heal_epochs"] == 1
    # its reference is the unpruned model itself, measured on the same task
    unpruned = read_meta(digits_bundle).metrics
    assert meta.metrics["references"] == {"unpruned model": {"val_top1": unpruned["val_top1"],
                                                             "test_top1": unpruned["test_top1"], "graph": "source"}}
    buffer = io.BytesIO()
    images = torch.stack([test[i][0] for i in range(8)])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (images[:1],), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})
        expected = model(images).numpy()
    got = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": images.numpy()})
    np.testing.assert_allclose(got[0], expected, atol=1e-4)
    # Killed before the bundle was written: --resume reuses the recorded selection and healed checkpoint.
    (out / "bundle.json").unlink()
    (out / "model.safetensors").unlink()
    train_skip(digits_bundle, "digits", out, SkipConfig(select="cosine", ratio=0.5, calib=40), HEAL, resume=True)
    _, resumed = load_bundle(out)
    assert resumed.surgery == meta.surgery and resumed.metrics["test_top1"] == meta.metrics["test_top1"]


def test_cli_skip_and_its_errors(digits_bundle, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "skip", "--model", str(digits_bundle), "--data", "digits", "-o", str(out)]
    result = runner.invoke(main, [*args, "--blocks", "1,2", "--heal-epochs", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["removed_blocks"] == [1, 2]
    _, meta = load_bundle(out)
    assert meta.metrics["test_top1"] == meta.metrics["before_heal"]["test_top1"]  # no healing ran
    said = runner.invoke(main, ["train", "skip", "--model", str(digits_bundle), "--data", "digits", "-o",
                                str(tmp_path / "said"), "--blocks", "1", "--heal-epochs", "0"])
    assert said.exit_code == 0, said.output  # the run's place against its reference, in words
    assert said.output.strip().splitlines()[-1] == read_meta(tmp_path / "said").metrics["against_references"][
        "unpruned model"]
    for extra, message in ((["--ratio", "1/3", "--blocks", "1"], "not both"),
                           (["--blocks", "7"], "does not exist"),
                           (["--blocks", "1,1"], "twice"),
                           (["--ratio", "1"], "must be in")):
        result = runner.invoke(main, ["train", "skip", "--model", str(digits_bundle), "--data", "digits", "-o",
                                      str(tmp_path / "bad"), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
