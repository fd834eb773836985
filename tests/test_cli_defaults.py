"""The CLI trains what the Python API trains, and so does the demo: every default has one value, one object."""

from __future__ import annotations

import dataclasses
import json
from operator import attrgetter
from typing import ClassVar, Literal

import pytest
from click.testing import CliRunner

from edgevit import demo
from edgevit.cli import main, train
from edgevit.methods import continual, memory, prompts, registry, skip, transfer
from edgevit.methods.registry import METHODS, MethodConfig, Source, discover, register, train_config
from edgevit.settings import setting
from edgevit.train import TrainConfig

CONFIGS = {"transfer": transfer.TransferConfig, "skip": skip.SkipConfig, "memory": memory.MemoryConfig,
           "continual": continual.ContinualConfig, "prompts": prompts.PromptConfig}
COMMANDS = {name: train.get_command(None, name) for name in train.list_commands(None)}
TRAIN = dataclasses.asdict(TrainConfig())


def cli_default(command: str, name: str):
    value = next(p for p in COMMANDS[command].params if p.name == name).default
    return None if value is None or type(value).__name__ == "Sentinel" else value


@pytest.mark.parametrize("method", ["baseline", *CONFIGS])
def test_optimisation_defaults_are_the_librarys(method):
    library = METHODS[method].train_config()
    epochs = "heal_epochs" if method == "skip" else "epochs"
    assert (cli_default(method, epochs), cli_default(method, "lr"), cli_default(method, "batch_size")) == (
        library.epochs, library.lr, library.batch_size)


def test_a_method_without_its_own_defaults_gets_the_shared_ones():
    """A new method need not state optimisation defaults (CONTRIBUTING: its module is the whole change)."""

    @dataclasses.dataclass
    class NewConfig(MethodConfig):
        pass

    config = train_config(NewConfig)
    assert (config.epochs, config.lr) == (TRAIN["epochs"], TRAIN["lr"])


@pytest.mark.parametrize("method", list(CONFIGS))
def test_method_option_defaults_are_the_configs(method):
    """An option named like a config field defaults to that field (None on the CLI: the library resolves it)."""
    for field in dataclasses.fields(CONFIGS[method]):
        if not any(p.name == field.name for p in COMMANDS[method].params) or field.default is dataclasses.MISSING:
            continue
        cli, library = cli_default(method, field.name), field.default
        if cli is None:
            continue
        assert cli == library, f"train {method} --{field.name.replace('_', '-')}: CLI {cli!r}, library {library!r}"


@pytest.mark.parametrize("method", sorted(discover()))
def test_every_option_defaults_to_the_object_the_api_uses(method):
    """No copies: each setting's option, None-valued ones included, defaults to the very object that
    ``train_<method>()`` uses when given no configs, and every setting is an option."""
    api = {"method": METHODS[method].config(), "train": METHODS[method].train_config()}
    options = {p.path: p for p in COMMANDS[method].params if hasattr(p, "path")}
    assert {path.split(".")[0] for path in options} == {"method", "train"}
    assert len([o for o in options if o.startswith("method.")]) == len(dataclasses.fields(api["method"]))
    for path, option in options.items():
        root, name = path.split(".", 1)
        assert option.default is attrgetter(name)(api[root]), path


def test_the_demo_changes_only_the_settings_it_names(tmp_path):
    """The demo trains with the methods' default objects (so the CLI's) except where its table says otherwise."""
    steps = {step.name: step for step in demo.plan(tmp_path)[0]}
    for run in demo.TRAINING:
        method, used = METHODS[run.method], steps[run.label].settings
        for config, default, changed in ((used["cfg"], method.config(), run.settings),
                                         (used["train_cfg"], method.train_config(), run.training)):
            for field in dataclasses.fields(default):
                if field.name not in changed:
                    assert getattr(config, field.name) is getattr(default, field.name), f"{run.label}: {field.name}"


def test_a_registered_config_and_train_function_are_all_the_cli_needs(tmp_path, monkeypatch):
    """CONTRIBUTING's recipe: a method registered elsewhere is a command with its help, its options and the
    training options, and the command calls it with the configs its flags describe."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))  # the probe leaves the registry as it was
    calls = []

    @dataclasses.dataclass
    class ProbeConfig(MethodConfig):
        """Train a linear probe on a frozen bundle."""

        training: ClassVar[dict] = {"epochs": 3}
        init: Literal["zeros", "random"] = setting("zeros", "How the new head starts.")

    @register("probe", ProbeConfig, source=Source("--model", "The frozen bundle."),
              report=lambda out, cfg: ({"init": cfg.init}, "done"))
    def train_probe(source, data, out, cfg, train_cfg, resume):
        calls.append((source, data, out, cfg, train_cfg, resume))
        return out

    runner = CliRunner()
    listing = runner.invoke(main, ["train", "--help"]).output
    assert "probe" in listing and "Train a linear probe on a frozen bundle." in listing
    assert "--init [zeros|random]" in runner.invoke(main, ["train", "probe", "--help"]).output
    result = runner.invoke(main, ["train", "probe", "--model", str(tmp_path), "--data", "digits", "-o",
                                  str(tmp_path / "run"), "--init", "random", "--lr", "1/100", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"init": "random"}
    assert calls == [(str(tmp_path), "digits", tmp_path / "run", ProbeConfig(init="random"),
                      train_config(ProbeConfig, lr=0.01), False)]
