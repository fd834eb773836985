"""MoViT memory: ATMA, the gated memory read, PAL summarization, bundles and ONNX export of memory tables."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgevit.errors import EdgeVitError
from edgevit.methods.memory import SlotMemory, atma, full_memory_model, summarize_table, with_table
from edgevit.vit import apply_surgery, create_vit, load_bundle
from edgevit.vit.memory import MemoryTable, memory_of


def json_report(output: str) -> dict:
    """The JSON object a ``--json`` command printed (progress lines go to stderr, which the runner mixes in)."""
    return json.loads(output[output.index("{"):output.rindex("}") + 1])


def tiny_vit(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=depth, num_heads=3,
                      in_chans=1, num_classes=10).eval()


def random_table(slots: int = 12, topk: int | None = None, gate: float = 0.5, seed: int = 0) -> MemoryTable:
    generator = torch.Generator().manual_seed(seed)
    table = MemoryTable(3, slots, 16, topk)
    with torch.no_grad():
        table.keys.copy_(torch.randn(3, slots, 16, generator=generator) * 3)
        table.values.copy_(torch.randn(3, slots, 16, generator=generator))
        table.gate_logit.fill_(torch.logit(torch.tensor(gate)).item())
    return table


def test_atma_formula_and_slot_writes():
    old, new = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    assert torch.allclose(atma(old, new, 0.9), 0.9 * old + 0.1 * new)
    assert torch.equal(atma(old, new, 0.0), new)

    memory = SlotMemory([0, 0, 0, 1], slots=3, num_classes=2)  # 3 slots: class 0 gets 2, class 1 gets 1
    assert memory.class_slots.tolist() == [2, 1] and memory.labels.tolist() == [0, 0, 1]
    table = MemoryTable(1, memory.size, 2)
    k1, k2, k3 = torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 4.0]]])
    memory.write(table, torch.cat([k1, k2]), torch.cat([-k1, -k2]), torch.tensor([0, 0]), momentum=0.8)
    assert torch.equal(table.keys[0, :2], torch.cat([k1, k2])[:, 0])  # empty slots are copied into
    memory.write(table, k3, -k3, torch.tensor([0]), momentum=0.8)  # wraps to class 0's first slot: ATMA
    assert torch.allclose(table.keys[0, 0], 0.8 * k1[0, 0] + 0.2 * k3[0, 0])
    assert torch.allclose(table.values[0, 0], -(0.8 * k1[0, 0] + 0.2 * k3[0, 0]))
    assert torch.equal(table.keys[0, 1], k2[0, 0]) and memory.writes.tolist() == [2, 1, 0]


def test_closed_gate_is_exactly_the_plain_block():
    plain = tiny_vit()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = plain(x)
    model = with_table(plain, 1, random_table(topk=4))
    memory_of(model, 1).close_gate()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        memory_of(model, 1).gate_logit.fill_(0.0)
        assert not torch.allclose(model(x), expected, atol=1e-3)
    fresh = apply_surgery(tiny_vit(), [{"op": "memory_table", "block": 0, "slots": 8, "topk": None}])
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)  # a freshly built table starts closed


def test_memory_read_is_gated_softmax_attention_over_the_top_k_rows():
    table = random_table(slots=10, topk=3)
    q, local = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    scores = (q * 16 ** -0.5) @ table.keys.transpose(-2, -1)
    kth = scores.topk(3, dim=-1).values[..., -1:]
    manual = scores.masked_fill(scores < kth, float("-inf")).softmax(-1) @ table.values
    with torch.no_grad():
        assert torch.allclose(table.read(q), manual, atol=1e-5)
        assert torch.allclose(table(q, local), 0.5 * manual + 0.5 * local, atol=1e-5)
    dense = random_table(slots=10, topk=10)
    assert dense.topk is None  # k >= P is dense attention
    with torch.no_grad():
        assert torch.allclose(dense.read(q), scores.softmax(-1) @ dense.values, atol=1e-5)


@pytest.mark.parametrize("topk", [None, 4])
def test_summarization_with_as_many_prototypes_as_slots_reproduces_the_memory(topk):
    model = with_table(tiny_vit(), 1, random_table(slots=12, topk=topk))
    x = torch.randn(3, 1, 16, 16)
    summary = summarize_table(memory_of(model, 1), prototypes=12)
    assert summary.slots == 12
    with torch.no_grad():
        assert torch.allclose(with_table(model, 1, summary)(x), model(x), atol=1e-5)


def test_summary_of_duplicated_slots_keeps_their_attention_mass():
    """Six distinct slots stored 1, 2 or 3 times: six prototypes with log(count) biases give the same outputs."""
    distinct = random_table(slots=6, topk=None)
    counts = torch.tensor([1, 2, 3, 1, 2, 3])
    repeated = MemoryTable(3, int(counts.sum()), 16)
    with torch.no_grad():
        repeated.keys.copy_(distinct.keys.repeat_interleave(counts, dim=1))
        repeated.values.copy_(distinct.values.repeat_interleave(counts, dim=1))
        repeated.gate_logit.copy_(distinct.gate_logit)
    summary = summarize_table(repeated, prototypes=6)
    q, local = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    with torch.no_grad():
        assert sorted(summary.bias[0].exp().round().tolist()) == [1, 1, 2, 2, 3, 3]
        assert torch.allclose(summary(q, local), repeated(q, local), atol=1e-5)
        assert not torch.allclose(distinct(q, local), repeated(q, local), atol=1e-3)  # the mass does matter


@pytest.mark.parametrize("topk", [None, 4])
def test_memory_tables_export_to_onnx(tmp_path, topk):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = with_table(tiny_vit(), 1, random_table(slots=16, topk=topk))
    x = torch.randn(2, 1, 16, 16)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"], opset_version=18,
                      dynamo=False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("TopK" in ops) == (topk is not None)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.allclose(session.run(None, {"images": x.numpy()})[0], expected, atol=1e-4)


def test_bad_memory_settings_are_user_errors():
    model = tiny_vit()
    apply_surgery(model, [{"op": "memory_table", "block": 1, "slots": 4}])
    with pytest.raises(EdgeVitError, match="already has a memory"):
        apply_surgery(model, [{"op": "memory_table", "block": 1, "slots": 4}])
    with pytest.raises(EdgeVitError, match="does not fit"):
        apply_surgery(model, [{"op": "memory_table", "block": 5, "slots": 4}])


def test_train_memory_cli_writes_a_loadable_summarized_bundle(digits_bundle, tmp_path):
    from edgevit.cli import main
    from edgevit.data import load_split
    from edgevit.train import evaluate

    out = tmp_path / "mem"
    args = ["train", "memory", "--model", str(digits_bundle), "--data", "digits", "-o", str(out), "--slots", "128",
            "--topk", "8", "--prototypes", "8", "--summarize", "learned", "--summarize-epochs", "1",
            "--data-fraction", "0.2", "--epochs", "2", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json_report(result.output)
    assert report["full_memory_slots"] == 128 and report["table_bytes"] * 16 <= report["full_memory_bytes"]

    model, meta = load_bundle(out)
    assert meta.surgery[-1] == {"op": "memory_table", "block": 3, "slots": 8, "topk": None}
    assert not (out / "model.safetensors").read_bytes().count(b"writes")  # no training bookkeeping
    test = load_split("digits", "test", meta.preprocessing)
    assert evaluate(model, test) == pytest.approx(meta.metrics["test_top1"], abs=1e-4)
    assert set(meta.metrics["references"]) == {"plain ViT it started from"}  # the model before its memory
    full = full_memory_model(out)
    assert memory_of(full, 3).slots == 128
    assert evaluate(full, test) == pytest.approx(meta.metrics["full_memory_test_top1"], abs=1e-4)

    again = CliRunner().invoke(main, [*args[:-1], "--resume", "--json"])
    assert again.exit_code == 0, again.output
    assert json_report(again.output)["test_top1"] == pytest.approx(report["test_top1"])
    busy = CliRunner().invoke(main, args)
    assert busy.exit_code == 2 and "not empty" in busy.output
    bad = CliRunner().invoke(main, [*args[:6], "-o", str(tmp_path / "bad"), "--block", "9"])
    assert bad.exit_code == 2 and "out of range" in bad.output


def test_a_gate_that_never_left_its_initial_value_is_reported():
    """With few optimizer steps (10% of a small dataset) the gate cannot move: the bundle then says the memory's
    share was set by --gate-init, not learned."""
    from edgevit.methods.memory import MemoryConfig, gate_findings

    table = MemoryTable(3, 8, 16)
    cfg = MemoryConfig(gate_init=-1.0)
    with torch.no_grad():
        table.gate_logit.fill_(-1.0 + 0.01)  # sigmoid moves by ~0.002
    [finding] = gate_findings(table, cfg, 15)
    assert "stayed at its initial 0.27" in finding and "15 optimizer steps" in finding
    with torch.no_grad():
        table.gate_logit[0] = 0.0  # one head learned to read its memory
    assert gate_findings(table, cfg, 15) == []
