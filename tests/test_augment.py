"""Optional RandAugment/TrivialAugment and mixup/cutmix on the shared loop, and one persistent training loader
whose seeded, augmented batches a resumed run replays exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cli, write_photos

from edgevit.cli import main
from edgevit.data import load_split
from edgevit.data.transforms import Augment, default_preprocessing
from edgevit.errors import EdgeVitError
from edgevit.train import TrainConfig, fit
from edgevit.train.loop import EpochBatches, _batches
from edgevit.vit import create_vit, read_meta

TINY = tiny_cli(img_size=16, embed_dim=16)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three classes of six 24x32 RGB JPEGs."""
    return write_photos(tmp_path_factory.mktemp("aug") / "line", {"dent": 6, "good": 6, "scratch": 6},
                        size=(24, 32), noise=30)


def test_rand_augment_and_mixup_cutmix_train_and_are_recorded(photos, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "baseline", "--data", str(photos), *TINY, "--auto-augment",
                                       "rand-m9-mstd0.5", "--mixup", "0.8", "--cutmix", "1.0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    provenance = read_meta(out).provenance
    assert provenance["augment"]["auto_augment"] == "rand-m9-mstd0.5"
    assert (provenance["config"]["mixup"], provenance["config"]["cutmix"]) == (0.8, 1.0)


@pytest.mark.parametrize(("args", "message"), [
    (["--auto-augment", "rand-q9"], "--auto-augment 'rand-q9' is not a timm auto-augment config"),
    (["--mixup", "0.8", "--batch-size", "3"], "the batch per process must be even, got 3"),
])
def test_bad_augmentation_flags_exit_2_with_one_line_and_write_nothing(photos, tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "baseline", "--data", str(photos), *TINY, *args, "-o", str(out)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_mixup_is_refused_for_a_method_with_its_own_loss(photos, tmp_path):
    train_set = load_split(str(photos), "train", default_preprocessing(16, 3), augment=Augment())
    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                       num_classes=3)
    with pytest.raises(EdgeVitError, match="mixup/cutmix need the plain cross-entropy loss; distill"):
        fit(model, train_set, TrainConfig(mixup=0.8, batch_size=4), tmp_path / "run", description="distill",
            loss_fn=lambda m, x, y: (m(x).sum(), m(x)))


def test_epoch_batches_follow_set_epoch_and_seed_every_image():
    sampler = EpochBatches(20, 8, 0, 1, seed=3)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert [[i for i, _ in b] for b in batches] == _batches(20, 8, 0, 1, 3, 2) and len(sampler) == 2
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)
    sampler.set_epoch(3)
    assert {s for b in sampler for _, s in b}.isdisjoint(seeds)


class _Kill(Exception):
    pass


def _train(photos: Path, out: Path, workers: int, inputs: list[torch.Tensor], resume: bool = False,
           kill_at: int | None = None) -> torch.nn.Module:
    """Two epochs of a tiny ViT with RandAugment, flips, mixup and cutmix; appends the training inputs (after
    mixing) of every step it runs to ``inputs``. ``kill_at``: raise at that step, as a kill would."""
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                       num_classes=3)

    def record(module, args):
        if module.training:
            if len(inputs) == kill_at:
                raise _Kill
            inputs.append(args[0].clone())

    model.register_forward_pre_hook(record)
    augment = Augment(hflip=0.5, vflip=0.5, auto_augment="rand-m9-mstd0.5")
    train_set = load_split(str(photos), "train", default_preprocessing(16, 3), augment=augment)
    cfg = TrainConfig(epochs=2, batch_size=4, workers=workers, mixup=0.8, cutmix=1.0, seed=5)
    fit(model, train_set, cfg, out, resume=resume)
    return model


def test_resumed_run_replays_the_batches_of_an_uninterrupted_one(photos, tmp_path):
    """Persistent workers (2) in the uninterrupted run, none in the run that is killed at the start of epoch 2,
    2 again in its resumption: every augmented, mixed batch and the final weights are the same."""
    whole_inputs, killed_inputs, resumed_inputs = [], [], []
    whole = _train(photos, tmp_path / "whole", 2, whole_inputs)
    steps = len(whole_inputs) // 2
    with pytest.raises(_Kill):
        _train(photos, tmp_path / "killed", 0, killed_inputs, kill_at=steps)
    resumed = _train(photos, tmp_path / "killed", 2, resumed_inputs, resume=True)
    assert len(killed_inputs) == len(resumed_inputs) == steps
    assert all(torch.equal(a, b) for a, b in zip(whole_inputs, killed_inputs + resumed_inputs, strict=True))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(whole_inputs[0], whole_inputs[steps])  # the epochs differ


def test_trivial_is_one_randaugment_op_always_applied_with_uniform_magnitude():
    from timm.data.auto_augment import RandAugment

    from edgevit.data.transforms import train_transform

    compose = train_transform(default_preprocessing(16, 3), Augment(auto_augment="trivial")).args[1]
    (rand,) = [t for t in compose.transforms if isinstance(t, RandAugment)]
    assert rand.num_layers == 1 and all(op.prob == 1.0 and op.magnitude_std == float("inf") for op in rand.ops)
