"""The CLI trains what the Python API trains: every default the two share has one value."""

from __future__ import annotations

import dataclasses

import pytest

from edgevit.cli import main
from edgevit.methods import continual, memory, prompts, skip, transfer
from edgevit.methods.defaults import TRAIN
from edgevit.train.run import method_train_config

CONFIGS = {"transfer": transfer.TransferConfig, "skip": skip.SkipConfig, "memory": memory.MemoryConfig,
           "continual": continual.ContinualConfig, "prompts": prompts.PromptConfig}
COMMANDS = main.commands["train"].commands


def cli_default(command: str, name: str):
    value = next(p for p in COMMANDS[command].params if p.name == name).default
    return None if value is None or type(value).__name__ == "Sentinel" else value


@pytest.mark.parametrize("method", ["baseline", *CONFIGS])
def test_optimisation_defaults_are_the_librarys(method):
    library = method_train_config(method, "digits")
    epochs = "heal_epochs" if method == "skip" else "epochs"
    assert (cli_default(method, epochs), cli_default(method, "lr"), cli_default(method, "batch_size")) == (
        library.epochs, library.lr, library.batch_size)


def test_a_method_without_its_own_defaults_gets_the_shared_ones():
    """A new method needs no entry in defaults.METHOD_TRAIN (CONTRIBUTING: its module and a CLI command)."""
    config = method_train_config("a-new-method", "digits")
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
        if isinstance(library, tuple):  # comma-separated on the command line
            library = ",".join(map(str, library))
        assert cli == library, f"train {method} --{field.name.replace('_', '-')}: CLI {cli!r}, library {library!r}"
