"""The demo's step runner: skips finished steps, resumes a killed one, redoes what an upstream change touches.
(The full demo is run by hand and timed in the README; it takes minutes.)"""

import json
import shutil

from click.testing import CliRunner

from edgevit.cli import main
from edgevit.demo import Step, call_step, run_steps
from edgevit.methods.skip import SkipConfig, train_skip
from edgevit.train import TrainConfig


def _steps(tmp_path, calls, epochs=1):
    up, down = tmp_path / "up.txt", tmp_path / "down.txt"

    def make_up(resume):
        calls.append(("up", resume))
        up.write_text(f"upstream trained for {epochs} epochs")

    def make_down(resume):
        calls.append(("down", resume))
        down.write_text(up.read_text().upper())

    return [Step("up", up, make_up, {"epochs": epochs}), Step("down", down, make_down, reads=[up])]


def test_finished_steps_are_skipped_and_changes_propagate(tmp_path):
    state, calls = tmp_path / "demo.json", []
    run_steps(_steps(tmp_path, calls), state)
    assert calls == [("up", False), ("down", False)]
    run_steps(_steps(tmp_path, calls), state)
    assert len(calls) == 2  # nothing redone
    run_steps(_steps(tmp_path, calls, epochs=2), state)
    assert calls[2:] == [("up", False), ("down", False)]  # new settings upstream redo both
    assert (tmp_path / "down.txt").read_text() == "UPSTREAM TRAINED FOR 2 EPOCHS"
    assert all(record["done"] for record in json.loads(state.read_text()).values())


def test_an_interrupted_step_resumes(tmp_path):
    state, calls = tmp_path / "demo.json", []
    steps = _steps(tmp_path, calls)
    run_steps(steps, state)
    record = json.loads(state.read_text())
    record["down"]["done"] = False  # as if killed mid-step, its output partly written
    state.write_text(json.dumps(record))
    run_steps(_steps(tmp_path, calls), state)
    assert calls[2:] == [("down", True)]


def test_export_refuses_a_bundle_marked_not_deployable(tmp_path, digits_bundle):
    run = tmp_path / "copy-student"
    shutil.copytree(digits_bundle, run)
    meta = json.loads((run / "bundle.json").read_text())
    meta["provenance"].update(deployable=False, not_deployable_reason="attention copy needs its teacher")
    (run / "bundle.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, ["export", str(run), "--profile", "cpu-ort-fp32", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "attention copy needs its teacher" in result.output
    assert not (tmp_path / "x").exists()


def test_a_step_hashes_the_configs_it_calls_with(tmp_path):
    def skip_step(lr, ratio=1 / 3, root=tmp_path):
        return call_step("skip", root / "skip", train_skip, dict(model_dir=root / "base", data="digits",
                         out=root / "skip", cfg=SkipConfig(ratio=ratio), train_cfg=TrainConfig(epochs=5, lr=lr)))

    assert skip_step(3e-4).inputs_hash() == skip_step(3e-4, root=tmp_path / "elsewhere").inputs_hash()
    assert skip_step(3e-4).inputs_hash() != skip_step(1e-4).inputs_hash()
    assert skip_step(3e-4).inputs_hash() != skip_step(3e-4, ratio=0.5).inputs_hash()
