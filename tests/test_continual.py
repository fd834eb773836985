"""DATA continual learning: adapters and folding (graph side), tasks, training, bundles, export."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from edgevit.errors import EdgeVitError
from edgevit.train import TrainConfig
from edgevit.vit import apply_surgery, create_vit, load_bundle, read_meta
from edgevit.vit.adapters import (
    ScaledLinear,
    decomposed_scales,
    folded_state_dict,
    mean_scales,
    routers_of,
)

ARCH = {"img_size": 16, "in_chans": 1, "num_classes": 5, "patch_size": 4, "embed_dim": 48, "depth": 4,
        "num_heads": 3}
FAST = TrainConfig(epochs=2, batch_size=64, lr=3e-3, warmup_epochs=0.5, augment=None, label_smoothing=0.0)


def random_adapted(seed: int = 0, ranks=(4, 16), group_size: int = 2, rows: int = 16):
    """A base ViT and the same ViT with random DATA adapters and routers (``adapter_scales``)."""
    torch.manual_seed(seed)
    base = create_vit("vit_tiny_patch16_224", **ARCH).eval()
    exact = apply_surgery(create_vit("vit_tiny_patch16_224", **ARCH),
                          [{"op": "adapter_scales", "ranks": list(ranks), "group_size": group_size, "rows": rows}])
    state = dict(base.state_dict())
    for key, value in exact.state_dict().items():
        state.setdefault(key, torch.randn_like(value) * 0.05)
    exact.load_state_dict(state, strict=True)
    return base, exact.eval()


def test_scaled_linear_is_w0_plus_scaled_paths():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    adapted = ScaledLinear.from_linear(linear, (2, 3))
    torch.nn.init.normal_(adapted.down)
    torch.nn.init.normal_(adapted.up)
    x = torch.randn(4, 7, 6)
    s = torch.rand(4, 2)
    adapted.scales = s
    u1, u2 = adapted.up[:, :2], adapted.up[:, 2:]
    d1, d2 = adapted.down[:2], adapted.down[2:]
    expected = linear(x) + s[:, 0, None, None] * (x @ d1.T @ u1.T) + s[:, 1, None, None] * (x @ d2.T @ u2.T)
    torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5)
    assert adapted.weight is linear.weight  # shared, not copied: the backbone stays the backbone


def test_decomposed_scales_match_the_authors_formula():
    torch.manual_seed(0)
    h = torch.randn(3, 9, 12)
    keys, attn, weights = (torch.randn(2, 5, 12) for _ in range(3))
    got = decomposed_scales(h, keys, attn, weights)
    for p in range(2):  # the authors' order of operations (modeling_llama.get_scale), one path at a time
        a_q = F.normalize(torch.einsum("bld,kd->blk", h, attn[p]), dim=-1)
        sim = torch.einsum("blk,kd->blk", a_q, F.normalize(keys[p], dim=-1)) / 12 ** 0.5
        expected = torch.einsum("blk,kd->bld", sim, weights[p]).sum((1, 2)).sigmoid()
        torch.testing.assert_close(got[:, p], expected, atol=1e-5, rtol=1e-5)


def test_fold_with_fixed_scales_equals_unmerged():
    base, exact = random_adapted()
    scales = torch.tensor([[0.3, 0.8], [0.6, 0.1]])
    for router, row in zip(routers_of(exact), scales, strict=True):
        router.fixed = row
    merged = create_vit("vit_tiny_patch16_224", **ARCH).eval()
    merged.load_state_dict(folded_state_dict(exact, scales), strict=True)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        unmerged, folded, plain = exact(x), merged(x), base(x)
    assert (unmerged - folded).abs().max() < 1e-5
    assert (unmerged - plain).abs().max() > 1e-2  # the adapters do change the output: the test can fail


def test_mean_scales_are_the_routers_average():
    _, exact = random_adapted(seed=1)
    images = torch.randn(10, 1, 16, 16)
    with torch.no_grad():
        per_sample = []
        for image in images:
            exact(image[None])
            per_sample.append(torch.cat([r.last for r in routers_of(exact)]))
    torch.testing.assert_close(mean_scales(exact, images, batch_size=4), torch.stack(per_sample).mean(0),
                               atol=1e-6, rtol=1e-5)


def _histogram(model: torch.nn.Module, path) -> tuple[int, Counter]:
    import onnx

    torch.onnx.export(model, (torch.randn(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17)
    nodes = onnx.load(str(path)).graph.node
    return len(nodes), Counter(n.op_type for n in nodes)


def test_merged_onnx_is_the_base_graph(tmp_path):
    import onnx

    from edgevit.export.checks import check_standard_ops

    base, exact = random_adapted()
    merged = create_vit("vit_tiny_patch16_224", **ARCH).eval()
    merged.load_state_dict(folded_state_dict(exact, mean_scales(exact, torch.randn(4, 1, 16, 16))), strict=True)
    base_count, base_ops = _histogram(base, tmp_path / "base.onnx")
    merged_count, merged_ops = _histogram(merged, tmp_path / "merged.onnx")
    exact_count, exact_ops = _histogram(exact, tmp_path / "exact.onnx")
    assert (merged_count, merged_ops) == (base_count, base_ops)
    assert exact_count > base_count and exact_ops["Sigmoid"] == 2  # one router per group of 2 blocks
    check_standard_ops(onnx.load(str(tmp_path / "exact.onnx")), "exact.onnx")  # TensorRT-parsable
    assert set(exact_ops) - set(base_ops) <= {"Sigmoid", "ReduceSum", "ReduceL2", "Clip", "Expand", "Div", "Unsqueeze"}


def test_orthonormal_rows_extend_the_earlier_span():
    from edgevit.methods.continual import orthonormal_rows

    g = torch.Generator().manual_seed(0)
    earlier = torch.randn(6, 20)  # not orthogonal: trained rows are not
    rows = orthonormal_rows(earlier, 5, g)
    torch.testing.assert_close(rows @ rows.T, torch.eye(5), atol=1e-5, rtol=0)
    assert (rows @ earlier.T).abs().max() < 1e-4
    with pytest.raises(EdgeVitError, match="do not fit"):
        orthonormal_rows(earlier, 15, g)


def test_task_router_freezes_earlier_tasks():
    from edgevit.methods.continual import TaskRouter

    router = TaskRouter(dim=32, paths=2, components=4)
    g = torch.Generator().manual_seed(0)
    router.add_task(g)
    assert router.ortho_loss() < 1e-10  # fresh rows are orthonormal
    router.add_task(g)
    keys, attn, weights = router.components()
    assert keys.shape == attn.shape == weights.shape == (2, 8, 32)
    assert [p.requires_grad for p in router.keys] == [False, True]
    assert (attn[:, :4] @ attn[:, 4:].transpose(-2, -1)).abs().max() < 1e-5


def test_tasks_refuse_a_backbone_that_saw_the_classes(digits_bundle, digits_bundle_04):
    from edgevit.methods.continual import ContinualConfig, make_tasks, task_classes

    with pytest.raises(EdgeVitError, match="every class"):
        task_classes(read_meta(digits_bundle), "digits", None)
    meta = read_meta(digits_bundle_04)
    with pytest.raises(EdgeVitError, match=r"\['4'\]"):
        task_classes(meta, "digits", ["4", "5", "6"])
    classes = task_classes(meta, "digits", None)
    assert classes == list("56789")
    cfg = ContinualConfig().resolved(len(classes), depth=4, dim=48)
    tasks = make_tasks("digits", classes, meta.preprocessing, cfg)
    assert [t.labels for t in tasks] == [(0, 2), (2, 5)]
    assert set(tasks[0].splits["train"].targets) == {0, 1} and set(tasks[1].splits["test"].targets) == {2, 3, 4}
    with pytest.raises(EdgeVitError, match="--tasks"):
        ContinualConfig(tasks=3).resolved(len(classes), depth=4, dim=48)


def test_domain_tasks_transform_the_same_classes(digits_bundle_04):
    from edgevit.methods.continual import ContinualConfig, make_tasks

    meta = read_meta(digits_bundle_04)
    tasks = make_tasks("digits", list("56789"), meta.preprocessing,
                       ContinualConfig(protocol="domain").resolved(5, depth=4, dim=48))
    assert [t.name for t in tasks] == ["identity", "invert", "rot90", "hflip"]
    plain, inverted = tasks[0].splits["val"][3][0], tasks[1].splits["val"][3][0]
    torch.testing.assert_close(inverted, -plain)  # mean = std = 0.5: 1 - p is a sign flip
    torch.testing.assert_close(tasks[2].splits["val"][3][0], torch.rot90(plain, 1, (-2, -1)))


def test_continual_metrics():
    from edgevit.methods.continual import continual_metrics

    m = continual_metrics([[0.9], [0.6, 0.8], [0.3, 0.7, 1.0]])
    assert m["final_average_accuracy"] == pytest.approx((0.3 + 0.7 + 1.0) / 3, abs=1e-5)
    assert m["average_forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2, abs=1e-5)


@pytest.fixture(scope="module")
def data_run(digits_bundle_04, tmp_path_factory):
    from edgevit.methods.continual import ContinualConfig, train_continual

    out = tmp_path_factory.mktemp("continual") / "data"
    return train_continual(digits_bundle_04, "digits", out, ContinualConfig(tasks=2, bounds=True), FAST)


def test_train_continual_writes_both_forms(data_run):
    merged_meta, exact_meta = read_meta(data_run), read_meta(data_run / "exact")
    assert merged_meta.surgery == [] and exact_meta.classes == list("56789")
    assert exact_meta.surgery == [{"op": "adapter_scales", "ranks": [4, 16], "group_size": 2, "rows": 16}]
    c = merged_meta.metrics["continual"]
    assert [len(row) for row in c["accuracy"]] == [1, 2]
    assert c["forms"]["exact"]["final_accuracy"] == c["accuracy"][-1]  # the exact form is the trained model
    assert exact_meta.metrics["exact_max_abs_diff"] < 1e-4  # fp32 rounding on logits of order 10-100
    assert 0.2 < c["final_average_accuracy"] <= 1 and -1 <= c["average_forgetting"] <= 1
    # the frozen backbone's linear probe on every task's classes at once: the reference DATA must beat
    probe = merged_meta.metrics["references"]["linear probe"]
    assert 0 < probe["test_top1"] <= 1 and probe["graph"] == "source"
    assert merged_meta.metrics["against_references"]["linear probe"].endswith("points") or \
        merged_meta.metrics["against_references"]["linear probe"].startswith("level")
    from edgevit.train import evaluate
    from edgevit.vit.bundle import DataRef

    # Reloaded bundles reproduce the recorded per-task accuracy (task 2 = classes 7,8,9).
    for path, form in ((data_run, "merged"), (data_run / "exact", "exact")):
        model, meta = load_bundle(path)
        from edgevit.data import load_ref

        task2 = load_ref(DataRef(source="digits", classes=list("56789")), "test", meta.preprocessing)
        rows = [i for i, y in enumerate(task2.targets) if y >= 2]
        subset = torch.utils.data.Subset(task2, rows)
        assert evaluate(model, subset) == pytest.approx(c["forms"][form]["final_accuracy"][1], abs=1e-4)


def test_references_with_bounds(data_run):
    """The frozen backbone as a continual learner, and with --bounds sequential fine-tuning (lower) and joint training
    (upper), beside the probe (upper): scored like the method (every task's test images at once), with their
    accuracy matrices."""
    metrics = read_meta(data_run).metrics
    refs = metrics["references"]
    frozen, sequential, joint = refs["frozen backbone"], refs["sequential fine-tuning"], refs["joint training"]
    assert [r.get("bound") for r in (frozen, sequential, joint, refs["linear probe"])] == [None, "lower", "upper",
                                                                                          "upper"]
    assert [len(row) for row in frozen["accuracy"]] == [1, 2] == [len(row) for row in sequential["accuracy"]]
    assert [len(row) for row in joint["accuracy"]] == [2]
    # the frozen backbone's heads come from class Gaussians, the probe's from the images: about the same fit
    assert abs(frozen["test_top1"] - refs["linear probe"]["test_top1"]) < 0.1, refs
    assert joint["average_forgetting"] == 0.0  # one step: nothing to forget
    assert all(0 < r["test_top1"] <= 1 and r["graph"] == "source" for r in refs.values())
    assert "(lower bound)" in metrics["against_references"]["sequential fine-tuning"]
    assert (data_run / "sequential" / "task1").is_dir() and (data_run / "joint" / "task0").is_dir()


@pytest.mark.slow
def test_bundles_load_and_export_without_methods(data_run, tmp_path):
    code = ("import sys; from edgevit.vit import load_bundle; import torch\n"
            f"for p in [{str(data_run)!r}, {str(data_run / 'exact')!r}]:\n"
            "    m, meta = load_bundle(p); m(torch.zeros(1, 1, 16, 16))\n"
            "print(any(k.startswith('edgevit.methods') for k in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "False"
    from edgevit.export import export_bundle

    # A TensorRT profile: the export refuses non-standard ops and checks torch vs ORT parity on real images.
    export = export_bundle(data_run / "exact", "jetson-orin-nano-fp16", tmp_path / "exact")
    assert export["parity"]["passed"] and export["parity"]["top1_agreement"] == 1.0
    merged = export_bundle(data_run, "cpu-ort-fp32", tmp_path / "merged")
    assert merged["parity"]["passed"] and merged["method"] == "continual"
    # INT8 for TensorRT: the adapter and router branches read the same tensors as LayerNorm/Add, so no Q/DQ may
    # sit on them (whichever placer runs); the rest of the graph is FP16.
    from edgevit.export import load_profile

    profile = load_profile("jetson-orin-nano-int8")  # a 2-epoch model: the accuracy gate is not what is tested
    profile = profile.model_copy(update={"int8": profile.int8.model_copy(update={"max_top1_drop": 1.0}),
                                         "calibration": profile.calibration.model_copy(update={"samples": 64})})
    int8 = export_bundle(data_run / "exact", profile, tmp_path / "int8")
    assert int8["int8"]["quantized_nodes"] > 0 and "FP32" not in int8["graph"]["precision"]["counts"]


def test_classifier_alignment_makes_heads_of_separate_tasks_comparable(digits_bundle_04, tmp_path):
    """A frozen backbone (the heads-only learner): task-1 heads never saw task 2's classes; re-fitting every head
    on features sampled from the stored class Gaussians keeps task 1 alive after task 2 (without it the newest
    task's logits win), and the deployed head is that aligned one."""
    import copy

    from edgevit.methods.continual import ContinualConfig, ContinualLearner, make_tasks, run_tasks, task_classes
    from edgevit.vit.model import num_blocks

    vit, meta = load_bundle(digits_bundle_04)
    classes = task_classes(meta, "digits", None)
    matrices = {}
    for align in (0, 256):
        cfg = ContinualConfig(tasks=2, align=align).resolved(len(classes), num_blocks(vit), vit.embed_dim)
        tasks = make_tasks("digits", classes, meta.preprocessing, cfg)
        learner = ContinualLearner(copy.deepcopy(vit), cfg, adapt=lambda v, c: None)  # frozen: no drift
        measured, _ = run_tasks(learner, tasks, FAST, tmp_path / str(align))
        matrices[align] = measured["accuracy"]
        assert (learner.aligned is not None) == (align > 0) and len(learner.class_stats) == (5 if align else 0)
    assert matrices[256][-1][0] > matrices[0][-1][0] + 0.2  # task 1 after task 2
    assert torch.equal(learner.head_state()["head.weight"], learner.aligned.weight.detach())


def test_mixup_is_refused_before_anything_is_written(digits_bundle_04, tmp_path):
    """Refused before the first task's directory exists (an empty task0/ would block both a new run and --resume)."""
    from edgevit.methods.continual import ContinualConfig, train_continual

    with pytest.raises(EdgeVitError, match="mixup/cutmix need the plain cross-entropy loss; continual"):
        train_continual(digits_bundle_04, "digits", tmp_path / "run", ContinualConfig(tasks=2), TrainConfig(mixup=0.8))
    assert not (tmp_path / "run").exists()


def test_resume_replays_finished_tasks(data_run, digits_bundle_04):
    from edgevit.methods.continual import ContinualConfig, train_continual

    before = read_meta(data_run).metrics["continual"]
    train_continual(digits_bundle_04, "digits", data_run, ContinualConfig(tasks=2, bounds=True), FAST, resume=True)
    after = read_meta(data_run).metrics["continual"]
    assert after["accuracy"] == before["accuracy"] and after["forms"] == before["forms"]
    assert [h["steps"] for h in read_meta(data_run).metrics["history"]] == \
        [h["steps"] for h in read_meta(data_run / "exact").metrics["history"]]


def test_cli_continual(digits_bundle, digits_bundle_04, tmp_path):
    from edgevit.cli import main

    runner = CliRunner()
    refused = runner.invoke(main, ["train", "continual", "--model", str(digits_bundle), "--data", "digits",
                                   "-o", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "every class" in refused.output
    result = runner.invoke(main, ["train", "continual", "--model", str(digits_bundle_04), "--data", "digits",
                                  "-o", str(tmp_path / "dom"), "--protocol", "domain", "--tasks", "2",
                                  "--epochs", "1", "--form", "exact", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["tasks"] == ["identity", "invert"] and len(report["accuracy"]) == 2
    assert read_meta(tmp_path / "dom").surgery[0]["op"] == "adapter_scales"
    assert read_meta(tmp_path / "dom" / "merged").surgery == []


def test_adapter_paths_train_on_the_first_task_only_by_default(digits_bundle_04):
    """After the first task the adapters stop training (later tasks train their router components and heads), so
    the class Gaussians stored for alignment stay true; ``every-task`` keeps them training, as the paper does."""
    import copy

    from edgevit.methods.continual import ContinualConfig, ContinualLearner, TaskRouter, make_tasks, task_classes
    from edgevit.vit.adapters import ScaledLinear
    from edgevit.vit.model import num_blocks

    vit, meta = load_bundle(digits_bundle_04)
    classes = task_classes(meta, "digits", None)
    for adapters, later in (("first-task", False), ("every-task", True)):
        cfg = ContinualConfig(tasks=2, adapters=adapters).resolved(len(classes), num_blocks(vit), vit.embed_dim)
        tasks = make_tasks("digits", classes, meta.preprocessing, cfg)
        learner = ContinualLearner(copy.deepcopy(vit), cfg)
        paths = [p for m in learner.modules() if isinstance(m, ScaledLinear) for p in (m.down, m.up)]
        learner.begin_task(tasks[0])
        assert paths and all(p.requires_grad for p in paths)
        learner.begin_task(tasks[1])
        assert all(p.requires_grad == later for p in paths)
        routers = [r for r in learner.modules() if isinstance(r, TaskRouter)]
        assert routers and all(r.keys[-1].requires_grad for r in routers)  # the new task's components train


def test_adapter_params_count_the_adapters_and_routers_not_the_heads(data_run, digits_bundle_04):
    """The recorded count is what DATA adds to the backbone (both adapter paths and every task's router rows),
    whether or not a path still trained in the last task; the fitted aligned head is not part of it."""
    from edgevit.methods.continual import ContinualConfig, ContinualLearner, make_tasks, task_classes
    from edgevit.vit.adapters import ScaledLinear, routers_of
    from edgevit.vit.model import num_blocks

    vit, meta = load_bundle(digits_bundle_04)
    classes = task_classes(meta, "digits", None)
    cfg = ContinualConfig(tasks=2).resolved(len(classes), num_blocks(vit), vit.embed_dim)
    learner = ContinualLearner(vit, cfg)
    for task in make_tasks("digits", classes, meta.preprocessing, cfg):
        learner.begin_task(task)
    adapters = sum(m.down.numel() + m.up.numel() for m in learner.modules() if isinstance(m, ScaledLinear))
    routers = sum(p.numel() for r in routers_of(learner.vit) for p in r.parameters())
    assert adapters > 0 and routers > 0
    assert read_meta(data_run).provenance["adapter_params"] == adapters + routers
