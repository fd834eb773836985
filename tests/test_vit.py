"""EdgeAttention is a faithful drop-in for timm's Attention, and its hooks do what they say."""

import pytest
import timm
import torch

from edgevit.vit import attention, capture_attention_logits, create_vit, split_qkv


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    ours = create_vit("vit_tiny_patch16_224").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours, torch.randn(2, 3, 224, 224)


def test_timm_weights_load_unchanged_and_logits_match(pair):
    reference, ours, x = pair
    with torch.no_grad():
        assert torch.allclose(reference(x), ours(x), atol=1e-5, rtol=0)


def test_capture_leaves_outputs_unchanged_and_returns_logits(pair):
    reference, ours, x = pair
    with torch.no_grad(), capture_attention_logits(ours, [0, 11]) as captured:
        out = ours(x)
        shapes = {b: tuple(t.shape) for b, t in captured.items()}
        dtypes = {t.dtype for t in captured.values()}
    with torch.no_grad():
        assert torch.allclose(out, reference(x), atol=1e-5, rtol=0)
    assert shapes == {0: (2, 3, 197, 197), 11: (2, 3, 197, 197)}
    assert dtypes == {torch.float32}
    assert not attention(ours, 0).capture_logits and attention(ours, 0).logits is None


def test_injected_probabilities_replace_the_layers_own(pair):
    _, ours, x = pair
    with torch.no_grad(), capture_attention_logits(ours, [3]) as captured:
        expected = ours(x)
        probs = captured[3].softmax(-1)
    layer = attention(ours, 3)
    try:
        layer.injected_probs = probs
        with torch.no_grad():
            assert torch.allclose(ours(x), expected, atol=1e-5, rtol=0)
        layer.injected_probs = torch.full_like(probs, 1 / probs.shape[-1])
        with torch.no_grad():
            assert not torch.allclose(ours(x), expected, atol=1e-3)
    finally:
        layer.injected_probs = None


def test_prefix_keys_values_equal_extra_key_tokens():
    """Prefix K/V equal attending over extra tokens whose keys/values are those constants."""
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    layer = attention(model, 0)
    x = torch.randn(2, 17, 192)
    keys, values = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    layer.set_prefix(keys, values)
    with torch.no_grad():
        out = layer(x)
        q, k, v = layer.qkv(x).reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)
        k = torch.cat([keys.expand(2, -1, -1, -1), k], 2)
        v = torch.cat([values.expand(2, -1, -1, -1), v], 2)
        manual = ((q @ k.transpose(-2, -1)) * 64 ** -0.5).softmax(-1) @ v
        manual = layer.proj(manual.transpose(1, 2).reshape(2, 17, 192))
    assert torch.allclose(out, manual, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        layer.set_prefix(torch.randn(2, 4, 64), torch.randn(2, 4, 64))


def test_unknown_model_is_a_user_error():
    from edgevit.errors import EdgeVitError

    with pytest.raises(EdgeVitError, match="unknown timm model"):
        create_vit("vit_does_not_exist")


def test_split_qkv_matches_the_per_projection_weights():
    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3)
    attn = attention(model, 0)
    x = torch.randn(2, 5, 48)
    q, k, v = split_qkv(attn, attn.qkv(x))
    w, b = attn.qkv.weight, attn.qkv.bias
    for i, got in enumerate((q, k, v)):
        want = (x @ w[48 * i:48 * (i + 1)].T + b[48 * i:48 * (i + 1)]).reshape(2, 5, 3, 16).transpose(1, 2)
        torch.testing.assert_close(got, want)
