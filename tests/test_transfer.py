"""Attention transfer: the loss, its minimum, copy mode, head/layer maps, and the CLI end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner

from edgevit.cli import main
from edgevit.data import fraction_subset, load_split
from edgevit.errors import EdgeVitError
from edgevit.methods.transfer import (
    TransferConfig,
    TransferStudent,
    attention_entropy,
    head_groups,
    layer_map,
    load_transfer,
    soft_cross_entropy,
    transfer_loss,
)
from edgevit.vit import capture_attention_logits, create_vit, load_bundle, read_meta

ARCH = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10}


def vit(dim: int = 24, depth: int = 4, heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return create_vit("vit_tiny_patch16_224", embed_dim=dim, depth=depth, num_heads=heads, **ARCH).eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_soft_cross_entropy_matches_hand_computation():
    log = math.log
    teacher = torch.tensor([[[[0.0, log(3.0)], [0.0, 0.0]]]])  # rows: p = (1/4, 3/4), (1/2, 1/2)
    student = torch.tensor([[[[0.0, 0.0], [log(3.0), 0.0]]]])  # rows: q = (1/2, 1/2), (3/4, 1/4)
    row0 = -(0.25 * log(0.5) + 0.75 * log(0.5))
    row1 = -(0.5 * log(0.75) + 0.5 * log(0.25))
    loss = soft_cross_entropy(teacher.softmax(-1), student)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert loss.dtype == torch.float32


def test_attention_loss_sums_layers_and_weights_the_cross_entropy():
    model = TransferStudent(vit(), vit(seed=1), TransferConfig(layers=2))
    x, labels = images(), torch.tensor([0, 1, 2])
    teacher_maps = model.teacher_logits(x)
    with capture_attention_logits(model.student, [0, 1]) as captured:
        logits = model.student(x)
        student_maps = dict(captured)
    by_hand = sum(soft_cross_entropy(t.softmax(-1), student_maps[i]) for i, t in enumerate(teacher_maps))
    assert model.attention_loss(teacher_maps, student_maps).item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss, _ = transfer_loss(3.0, 0.0)(model, x, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(ce.item() + 3.0 * by_hand.item(), rel=1e-5)


def test_identical_weights_give_the_teachers_entropy_the_minimum():
    teacher = vit()
    student = copy.deepcopy(teacher)
    model = TransferStudent(student, teacher, TransferConfig(layers=4))
    x = images()
    _, loss = model(x, attention_loss=True)
    with capture_attention_logits(teacher, range(4)) as captured:
        teacher(x)
        entropy = sum(attention_entropy(captured[b]) for b in range(4))
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    with torch.no_grad():  # any other student attends differently and pays a KL on top of the entropy
        student.blocks[1].attn.qkv.weight.add_(0.3 * torch.randn_like(student.blocks[1].attn.qkv.weight))
    _, perturbed = model(x, attention_loss=True)
    assert perturbed.item() > loss.item() + 1e-4


def test_distillation_trains_student_and_keeps_teacher_frozen():
    model = TransferStudent(vit(heads=2), vit(dim=32, heads=4, seed=1), TransferConfig(layers=2)).train()
    assert not model.teacher.training
    _, loss = model(images(), attention_loss=True)
    loss.backward()
    q_grad = model.student.blocks[0].attn.qkv.weight.grad[:24]
    assert q_grad.abs().sum() > 0  # the attention loss reaches the student's queries
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not a.attn.capture_logits for a in list(model.student.blocks) + list(model.teacher.blocks))


def test_copy_mode_uses_the_teachers_maps():
    teacher = vit(seed=1)
    model = TransferStudent(vit(), teacher, TransferConfig(mode="copy", layers=2))
    x = images()
    with torch.no_grad():
        before = model(x)
        # the student's own queries/keys in copied layers are unused...
        model.student.blocks[0].attn.qkv.weight[:48].mul_(5.0)
        assert torch.allclose(model(x), before, atol=1e-6)
        # ...a teacher layer after the mapped ones, and the teacher's head, never matter...
        teacher.blocks[3].attn.qkv.weight.mul_(5.0)
        teacher.head.weight.mul_(5.0)
        assert torch.allclose(model(x), before, atol=1e-6)
        # ...but changing the teacher's maps changes the student's output.
        teacher.blocks[1].attn.qkv.weight[:48].mul_(3.0)
        assert (model(x) - before).abs().max() > 1e-3
    assert all(b.attn.injected_probs is None for b in model.student.blocks)


def test_copying_a_teachers_own_maps_reproduces_the_teacher():
    teacher = vit()
    model = TransferStudent(copy.deepcopy(teacher), teacher, TransferConfig(mode="copy", layers=4))
    with torch.no_grad():
        assert torch.allclose(model(images()), teacher(images()), atol=1e-5)


def test_layer_map():
    assert layer_map(6, 4, 4) == [1, 2, 4, 5]  # round(1.5)=2 (halves up), 3, round(4.5)=5, 6; minus one
    assert layer_map(12, 12) == list(range(9))  # default: all but the last three layers, one to one
    assert layer_map(4, 3, 3) == [0, 2, 3]
    assert layer_map(2, 4, 4) == [0, 0, 1, 1]  # a deeper student repeats teacher layers
    assert layer_map(6, 2) == [2]  # shallow students transfer at least one layer
    with pytest.raises(EdgeVitError, match="--layers"):
        layer_map(6, 4, 5)


def test_head_groups():
    assert torch.equal(head_groups(4, 2), torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))
    assert torch.equal(head_groups(3, 3), torch.eye(3))
    uneven = head_groups(3, 2)
    assert uneven.shape == (2, 3) and torch.allclose(uneven.sum(1), torch.ones(2))
    assert torch.equal(head_groups(2, 4), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))


@pytest.mark.parametrize("head_map", ["average", "learned"])
def test_smaller_student_maps_shapes(head_map):
    teacher, student = vit(dim=32, depth=6, heads=4, seed=1), vit(dim=24, depth=4, heads=2)
    x = images(2)
    distill = TransferStudent(student, teacher, TransferConfig(layers=3, head_map=head_map))
    assert [t for _, t in distill.pairs] == [1, 2, 4]
    assert [tuple(m.shape) for m in distill.teacher_logits(x)] == [(2, 4, 17, 17)] * 3
    if head_map == "learned":
        assert [tuple(m.weight.shape) for m in distill.mixers] == [(4, 2)] * 3  # student logits -> teacher heads
    _, loss = distill(x, attention_loss=True)
    assert torch.isfinite(loss) and loss.item() > 0

    copier = TransferStudent(vit(dim=24, depth=4, heads=2), teacher, TransferConfig(mode="copy", layers=3,
                                                                                   head_map=head_map))
    probs = copier.copied_probs(x)
    assert sorted(probs) == [0, 1, 2]
    for p in probs.values():
        assert p.shape == (2, 2, 17, 17)
        assert torch.allclose(p.sum(-1), torch.ones(2, 2, 17))
    if head_map == "learned":
        assert [tuple(m.weight.shape) for m in copier.mixers] == [(2, 4)] * 3  # teacher logits -> student heads
        copier(x).sum().backward()
        assert copier.mixers[0].weight.grad.abs().sum() > 0


def test_mismatched_patch_grid_is_a_clear_error():
    student = create_vit("vit_tiny_patch16_224", embed_dim=24, depth=2, num_heads=2,
                         **{**ARCH, "patch_size": 2})
    with pytest.raises(EdgeVitError, match="patch grids"):
        TransferStudent(student, vit(), TransferConfig())


def test_cli_end_to_end(digits_bundle, tmp_path):
    runner = CliRunner()
    common = ["--teacher", str(digits_bundle), "--data", "digits", "--embed-dim", "24", "--depth", "3",
              "--heads", "1", "--layers", "2", "--epochs", "2", "--data-fraction", "0.3", "--json"]
    out = tmp_path / "distill"
    result = runner.invoke(main, ["train", "transfer", *common, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["test_top1"] <= 1.0
    model, meta = load_bundle(out)  # a plain student bundle
    assert meta.surgery == [] and meta.base.kwargs["embed_dim"] == 24 and len(model.blocks) == 3
    assert meta.provenance["method"] == "transfer" and meta.provenance["deployable"] is True
    assert meta.data.classes is None  # all of digits: the same task as its teacher, compared in one report panel
    assert meta.provenance["layer_map"] == [[0, 0], [1, 2]]  # round(4/3)-1, round(8/3)-1: 3 of a 4-layer teacher
    train_split = load_split("digits", "train", meta.preprocessing)
    assert meta.metrics["train_images"] == len(fraction_subset(train_split, 0.3, seed=0)) < len(train_split)

    resumed = runner.invoke(main, ["train", "transfer", *common, "-o", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert read_meta(out).metrics["steps"] == meta.metrics["steps"]

    out = tmp_path / "copy"
    result = runner.invoke(main, ["train", "transfer", *common, "--mode", "copy", "--head-map", "learned",
                                  "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    assert meta.provenance["deployable"] is False and meta.provenance["needs_teacher"] == str(digits_bundle)
    assert "teacher" in meta.metrics["how"] and "student_alone_test_top1" in meta.metrics
    rebuilt = load_transfer(out)  # teacher + student + learned mixers from the run directory
    assert rebuilt.mode == "copy" and rebuilt.mixers is not None
    assert load_bundle(out)[1].surgery == []  # still a loadable plain graph, only marked not deployable

    bad = runner.invoke(main, ["train", "transfer", *common, "--patch-size", "2", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "patch grids" in bad.output and "Traceback" not in bad.output


def test_cli_student_learns_a_class_subset(digits_bundle, tmp_path):
    """The paper's setting: the teacher's classes need not be the student's (only its maps are used)."""
    runner = CliRunner()
    common = ["--teacher", str(digits_bundle), "--data", "digits", "--embed-dim", "24", "--depth", "2",
              "--heads", "1", "--epochs", "1", "--data-fraction", "0.2", "--json"]
    out = tmp_path / "student59"
    result = runner.invoke(main, ["train", "transfer", *common, "--classes", "5,6,7,8,9", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model, meta = load_bundle(out)
    assert meta.classes == meta.data.classes == ["5", "6", "7", "8", "9"] and model.head.out_features == 5
    subset = load_split("digits", "train", meta.preprocessing, meta.classes)
    assert meta.metrics["train_images"] == len(fraction_subset(subset, 0.2, seed=0))

    bad = runner.invoke(main, ["train", "transfer", *common, "--classes", "5,x", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "'x'" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()
