"""Method 5 (BPT): whitening, burstiness, prompt variants, and the exact merge of prompts into a plain graph.

The backbone is ``digits_bundle_04`` (trained on digits 0-4); the downstream task is digits 5-9.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgevit.data import calibration_batch, load_split
from edgevit.errors import EdgeVitError
from edgevit.methods.prompts import (
    PromptConfig,
    build_tuner,
    downstream_classes,
    heavy_tail,
    measure_whitening,
    merge_prompts,
    zca,
)
from edgevit.train import TrainConfig
from edgevit.vit import load_bundle, read_meta
from edgevit.vit.model import num_tokens

DOWNSTREAM = list("56789")


@pytest.fixture(scope="module")
def downstream_images(digits_bundle_04):
    _, meta = load_bundle(digits_bundle_04)
    train = load_split("digits", "train", meta.preprocessing, DOWNSTREAM)
    val = load_split("digits", "val", meta.preprocessing, DOWNSTREAM)
    return calibration_batch(train, 60), calibration_batch(val, 16)


def _tuner(bundle, images, **cfg):
    vit, _ = load_bundle(bundle)
    config = PromptConfig(**cfg)
    whitening = measure_whitening(vit, images, config.eps)
    resolved = config.resolved(vit.embed_dim, len(whitening.blocks) if config.deep else 1, num_tokens(vit))
    tuner = build_tuner(vit, len(DOWNSTREAM), resolved, whitening if resolved.whiten else None, seed=0)
    with torch.no_grad():  # prompts as large as trained ones, so the merge check has something to match
        tuner.factors.A.mul_(50.0)
    return tuner.eval()


def _export(model, path, image):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (image,), str(path), dynamo=False, opset_version=17, input_names=["image"])
    return path


def _score_shapes(path):
    """(queries, keys) of every attention-score MatMul (rank-4 output) in the ONNX graph."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    scores = [shapes[n.output[0]] for n in graph.node if n.op_type == "MatMul" and n.output[0] in shapes]
    # rank-4 MatMuls are q k^T (B H N keys) and probs v (B H N d_h); the scores are the first of each pair
    return [tuple(s[2:]) for s in scores if len(s) == 4][::2]


def test_deep_merge_equals_token_appended_and_onnx_keeps_n_queries(digits_bundle_04, downstream_images, tmp_path):
    fit, probe = downstream_images
    tuner = _tuner(digits_bundle_04, fit, deep=True, variant="bilinear", prompts=12, rank=16)
    merged, ops = merge_prompts(tuner)
    assert ops == [{"op": "prefix_kv", "tokens": 12}]
    with torch.no_grad():
        expected, got = tuner(probe), merged(probe)
        without = tuner.vit(probe)  # the same frozen backbone and head without prompts
    assert (expected - got).abs().max().item() < 1e-5
    assert (expected - without).abs().max().item() > 1e-2, "prompts had no effect; the check above proves nothing"

    n, m = 1 + merged.patch_embed.num_patches, 12
    onnx_merged = _score_shapes(_export(merged, tmp_path / "merged.onnx", probe[:1]))
    onnx_tokens = _score_shapes(_export(tuner, tmp_path / "tokens.onnx", probe[:1]))
    assert onnx_merged == [(n, n + m)] * len(merged.blocks)
    assert onnx_tokens == [(n + m, n + m)] * len(merged.blocks)

    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": probe[:1].numpy()})
    assert np.abs(logits - got[:1].numpy()).max() < 1e-4


@pytest.mark.parametrize("variant", ["vpt", "fwhiten"])
def test_shallow_merge_keeps_prompt_tokens_and_equals_training_graph(digits_bundle_04, downstream_images, variant):
    fit, probe = downstream_images
    tuner = _tuner(digits_bundle_04, fit, deep=False, variant=variant, prompts=9)
    merged, ops = merge_prompts(tuner)
    assert ops == [{"op": "prompt_tokens", "tokens": 9}]
    with torch.no_grad():
        expected, got, without = tuner(probe), merged(probe), tuner.vit(probe)
        tokens = merged.forward_features(probe).shape[1]
    assert (expected - got).abs().max().item() < 1e-5
    assert (expected - without).abs().max().item() > 1e-2
    assert tokens == 1 + merged.patch_embed.num_patches + 9


@pytest.mark.parametrize(("deep", "arch"), [(True, {"qk_norm": True, "global_pool": "avg"}),
                                            (False, {"pre_norm": True, "global_pool": "avg"})])
def test_merge_is_exact_with_qk_norm_pre_norm_and_average_pooling(deep, arch):
    """k_norm applies to the constant keys, norm_pre to shallow prompts, and average pooling skips prompts."""
    from edgevit.vit import create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                     **arch).eval()
    cfg = PromptConfig(deep=deep, variant="vpt", prompts=5).resolved(48, 2 if deep else 1, 17)
    tuner = build_tuner(vit, 4, cfg, None, seed=0).eval()
    with torch.no_grad():
        for module in tuner.vit.modules():  # LayerNorms away from identity, so a skipped norm would show
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    merged, _ = merge_prompts(tuner)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (tuner(images) - merged(images)).abs().max().item() < 1e-5
        assert (tuner(images) - tuner.vit(images)).abs().max().item() > 1e-3


def test_variants_train_the_documented_parameters(digits_bundle_04, downstream_images):
    fit, _ = downstream_images
    trainable = {}
    for variant in ("vpt", "fwhiten", "twhiten", "bilinear"):
        tuner = _tuner(digits_bundle_04, fit, deep=True, variant=variant, prompts=4, trainable_top=2)
        trainable[variant] = sorted(n for n, p in tuner.named_parameters() if p.requires_grad)
    head = ["vit.head.bias", "vit.head.weight"]
    assert trainable["vpt"] == ["factors.A", *head]
    assert trainable["fwhiten"] == ["factors.A", *head]
    assert trainable["twhiten"] == ["factors.A", "factors.B.2", "factors.B.3", *head]
    assert trainable["bilinear"] == ["factors.A", "factors.B.2", "factors.B.3", *head]


def test_zca_whitens_and_validates_eps():
    torch.manual_seed(0)
    mixing = torch.randn(8, 8) * torch.logspace(-1, 1, 8)
    x = mixing @ torch.randn(8, 4000)
    w, checks = zca(x, eps=1e-10)
    covariance = (w @ x) @ (w @ x).T / x.shape[1]
    assert torch.allclose(covariance, torch.eye(8), atol=1e-3)
    assert torch.allclose(w, w.T, atol=1e-4)  # ZCA: the symmetric whitening
    assert checks["effective_rank"] == 8
    # rank-deficient statistics (fewer columns than features) stay finite thanks to the ridge
    w_low, checks_low = zca(torch.randn(8, 3), eps=0.1)
    assert torch.isfinite(w_low).all() and checks_low["effective_rank"] <= 3
    with pytest.raises(EdgeVitError, match="eps"):
        PromptConfig(eps=0.0).resolved(48, 4, 17)


def test_heavy_tail_separates_gaussian_from_bursty():
    torch.manual_seed(0)
    gaussian = heavy_tail(torch.randn(20_000))
    bursty = torch.randn(20_000)
    bursty[:20] *= 100
    spiky = heavy_tail(bursty)
    assert abs(gaussian["kurtosis"]) < 0.2 and gaussian["max_median"] < 10
    assert spiky["kurtosis"] > 50 and spiky["max_median"] > 100


def test_downstream_split_refuses_the_backbones_classes(digits_bundle_04):
    from edgevit.vit import DataRef

    _, meta04 = load_bundle(digits_bundle_04)
    assert downstream_classes(meta04, "digits", None) == DOWNSTREAM
    with pytest.raises(EdgeVitError, match=r"\['4'\]"):
        downstream_classes(meta04, "digits", ["4", "5"])
    meta_all = meta04.model_copy(update={"data": DataRef(source="digits")})  # a backbone trained on 0-9
    with pytest.raises(EdgeVitError, match="every class"):
        downstream_classes(meta_all, "digits", None)


def test_default_prompt_count_is_the_papers_but_never_more_than_the_tokens():
    """50 deep / 100 shallow on ViT-B at 224 px (197 tokens); a 17-token model gets 17; a given count is kept."""
    assert PromptConfig().resolved(768, 12, 197).prompts == 50
    assert PromptConfig(deep=False).resolved(768, 1, 197).prompts == 100
    assert PromptConfig().resolved(96, 6, 17).prompts == 17
    assert PromptConfig(deep=False).resolved(96, 1, 17).prompts == 17
    assert PromptConfig(prompts=64).resolved(96, 6, 17).prompts == 64


def test_config_errors_are_user_errors():
    with pytest.raises(EdgeVitError, match="plain prompts"):
        PromptConfig(variant="vpt", whiten=True).resolved(48, 4, 17)
    with pytest.raises(EdgeVitError, match="whitened by definition"):
        PromptConfig(variant="fwhiten", whiten=False).resolved(48, 4, 17)
    with pytest.raises(EdgeVitError, match="rank"):
        PromptConfig(rank=49).resolved(48, 4, 17)
    with pytest.raises(EdgeVitError, match="variant"):
        PromptConfig(variant="lora").resolved(48, 4, 17)


def test_tuning_starts_from_the_probe_of_the_prompted_features(digits_bundle_04, tmp_path):
    """LP-FT: before any prompt step the head is the logistic regression of the (freshly prompted) features, so
    zero epochs already score about what the backbone's linear probe scores; a random head scores chance."""
    from edgevit.methods.prompts import PromptConfig, train_prompts

    out = train_prompts(digits_bundle_04, "digits", tmp_path / "p", PromptConfig(prompts=6, rank=8),
                        TrainConfig(epochs=0))
    meta = read_meta(out)
    assert meta.metrics["val_top1"] >= meta.metrics["references"]["linear probe"]["val_top1"] - 0.1 > 0.4


def test_cli_train_prompts_bundle_round_trip_and_burstiness(digits_bundle_04, tmp_path):
    from edgevit.cli import main

    out = tmp_path / "prompts"
    args = ["train", "prompts", "--model", str(digits_bundle_04), "--data", "digits", "-o", str(out),
            "--deep", "--prompts", "6", "--rank", "8", "--epochs", "2", "--lr", "1e-2", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output[result.output.index("{"):])
    assert 0.0 <= reported["test_top1"] <= 1.0

    model, meta = load_bundle(out)  # rebuilt from base + surgery + strict weights, no edgevit.methods needed
    assert meta.surgery == [{"op": "prefix_kv", "tokens": 6}]
    assert meta.classes == DOWNSTREAM and meta.base.kwargs["num_classes"] == 5
    assert meta.metrics["merge_max_abs_diff"] < 1e-4  # trained prompts, larger logits than the strict test
    assert len(meta.metrics["val_top1_per_epoch"]) == 2
    probe = meta.metrics["references"]["linear probe"]  # the frozen backbone's probe: what BPT must beat
    assert 0.2 < probe["test_top1"] <= 1 and "linear probe" in meta.metrics["against_references"]["linear probe"]
    burst = meta.provenance["burstiness"]
    assert len(burst["blocks"]) == len(model.blocks) and burst["mean"]["kurtosis_before"] is not None
    assert not any("factors" in k or "whiten" in k for k in model.state_dict())  # training state stays out
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "factors.A" in checkpoint["model"]

    test = load_split("digits", "test", meta.preprocessing, meta.classes)
    images = torch.stack([test[i][0] for i in range(32)])
    labels = torch.tensor([test[i][1] for i in range(32)])
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.3  # 5 classes: chance is 0.2

    # --resume on a finished run re-merges from the checkpoint: same weights
    again = CliRunner().invoke(main, [*args[:-1], "--resume"])
    assert again.exit_code == 0, again.output
    reloaded, _ = load_bundle(out)
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))

    overlap = CliRunner().invoke(main, [*args[:7], str(tmp_path / "x"), "--classes", "3,5"])
    assert overlap.exit_code == 2 and "backbone" in overlap.output

    inspect = CliRunner().invoke(main, ["inspect", "burstiness", str(digits_bundle_04), "--data", "digits",
                                        "--images", "40", "--json"])
    assert inspect.exit_code == 0, inspect.output
    report = json.loads(inspect.output[inspect.output.index("{"):])
    assert report["fit_images"] == 40 and len(report["blocks"]) == len(model.blocks)
