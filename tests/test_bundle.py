"""Bundles round-trip bit-exactly and every kind of damage is one clear error."""

import json

import pytest
import torch

from edgevit.data import data_ref, default_preprocessing
from edgevit.errors import EdgeVitError
from edgevit.vit import BundleMeta, create_vit, load_bundle, read_meta, save_bundle
from edgevit.vit.bundle import BaseArch

KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 3, "num_heads": 3, "in_chans": 1,
          "num_classes": 10}


@pytest.fixture()
def bundle(tmp_path):
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", **KWARGS)
    meta = BundleMeta(base=BaseArch(name="vit_tiny_patch16_224", kwargs=KWARGS),
                      surgery=[{"op": "skip_attention", "blocks": [1]}],
                      preprocessing=default_preprocessing(16, 1), classes=[str(i) for i in range(10)],
                      data=data_ref("digits"))
    from edgevit.vit import apply_surgery

    apply_surgery(model, meta.surgery)
    save_bundle(tmp_path / "b", model, meta)
    return tmp_path / "b", model


def test_round_trip_is_bit_exact(bundle):
    path, model = bundle
    loaded, meta = load_bundle(path)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert meta.surgery == [{"op": "skip_attention", "blocks": [1]}]
    assert not any(p.name.endswith(".tmp") for p in path.iterdir())


def test_truncated_weights_are_a_clear_error(bundle):
    path, _ = bundle
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(EdgeVitError, match="not a readable safetensors file"):
        load_bundle(path)


def test_missing_field_names_the_field(bundle):
    path, _ = bundle
    raw = json.loads((path / "bundle.json").read_text())
    del raw["preprocessing"]
    (path / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(EdgeVitError, match="'preprocessing'"):
        read_meta(path)


def test_unknown_surgery_op_lists_the_known_ones(bundle):
    path, _ = bundle
    raw = json.loads((path / "bundle.json").read_text())
    raw["surgery"].append({"op": "skip_attentoin", "blocks": [2]})
    (path / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(EdgeVitError, match="unknown surgery op 'skip_attentoin'.*skip_attention"):
        load_bundle(path)


def test_weights_that_do_not_fit_the_graph(bundle):
    path, _ = bundle
    raw = json.loads((path / "bundle.json").read_text())
    raw["surgery"] = []  # the weights lack block 1's attention
    (path / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(EdgeVitError, match="do not match the recorded graph"):
        load_bundle(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(EdgeVitError, match="not a bundle"):
        read_meta(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(EdgeVitError, match="not valid JSON"):
        read_meta(tmp_path)
