"""The method registry: a method is one module of this package, and nothing else.

A method module holds a :class:`MethodConfig` subclass, whose fields are typed settings
(:func:`edgevit.settings.setting`) and whose ``training`` holds the method's optimisation defaults, and one
``train_<name>(source, data, out, cfg, train_cfg, resume)`` decorated with :func:`register`. ``edgevit train``
finds every module here (:func:`discover`) and generates ``edgevit train <name>`` from the registration
(:mod:`edgevit.options`); ``train_<name>()`` given no configs uses the same default objects, and so does the demo.
Torch-free: a method module imports torch, this one does not.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgevit.settings import check_choices
from edgevit.train.config import TrainConfig

# What the command prints after training: (JSON result, text) for a run directory and the method's config.
Report = Callable[[Path, Any], tuple[dict, str]]


@dataclass
class MethodConfig:
    """The settings of one method; subclasses declare them as fields with :func:`~edgevit.settings.setting`.

    A config checks itself when it is built (``Literal`` choices, then :meth:`check`), so a run never starts
    with settings that cannot work.

    Class variables:
        training: the method's optimisation defaults, replacing :class:`TrainConfig`'s (e.g. ``{"epochs": 5}``).
        flags: command-line spellings of :class:`TrainConfig` fields for this method (e.g. skip's healing
            ``{"epochs": "--heal-epochs"}``).
    """

    training: ClassVar[dict[str, Any]] = {}
    flags: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        check_choices(self)
        self.check()

    def check(self) -> None:
        """Raise :class:`~edgevit.errors.EdgeVitError` for values that cannot work (beyond the choices)."""


@dataclass(frozen=True)
class Source:
    """What a method starts from, as the command line names it.

    Args:
        flag: the option, e.g. ``--model`` or ``--teacher``.
        help: its help.
        default: its default (the baseline's timm architecture); without one it is a run directory that must exist.
    """

    flag: str
    help: str
    default: str | None = None


@dataclass(frozen=True)
class Method:
    """A registered method.

    Args:
        name: the command, ``edgevit train <name>``.
        config: its settings (a :class:`MethodConfig` subclass).
        train: ``train_<name>(source, data, out, cfg=None, train_cfg=None, resume=False) -> out``.
        source: what it starts from.
        own_loss: it trains with its own loss (mixup/cutmix, which need the plain cross-entropy, are refused).
        report: what the command prints after training.
    """

    name: str
    config: type[MethodConfig]
    train: Callable[..., Path]
    source: Source
    own_loss: bool
    report: Report

    def train_config(self, **changes: Any) -> TrainConfig:
        """The optimisation settings ``train`` uses when given none, with ``changes``."""
        return train_config(self.config, **changes)


METHODS: dict[str, Method] = {}


def train_config(config: type[MethodConfig], **changes: Any) -> TrainConfig:
    """:class:`TrainConfig`'s defaults, replaced by ``config.training`` (the method's own), then by ``changes``."""
    return TrainConfig(**{**config.training, **changes})


def register(name: str, config: type[MethodConfig], *, source: Source, own_loss: bool = False,
             report: Report | None = None) -> Callable[[Callable[..., Path]], Callable[..., Path]]:
    """Register ``train_<name>(source, data, out, cfg, train_cfg, resume)`` as the method ``name``.

    The registered function fills in the defaults (``config()``, :func:`train_config`) for a missing ``cfg`` or
    ``train_cfg`` and refuses mixup for ``own_loss`` before calling it, so every method starts the same way.

    Args:
        name: the method (and command) name.
        config: its settings.
        source: what it starts from, for the command line.
        own_loss: it trains with its own loss rather than the plain cross-entropy.
        report: what the command prints (default :func:`bundle_report`).
    """

    def wrap(train: Callable[..., Path]) -> Callable[..., Path]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")

        @functools.wraps(train)
        def run(source: str | Path, data: str, out: str | Path, cfg: MethodConfig | None = None,
                train_cfg: TrainConfig | None = None, resume: bool = False) -> Path:
            cfg = config() if cfg is None else cfg
            train_cfg = train_config(config) if train_cfg is None else train_cfg
            train_cfg.check_loss(name if own_loss else None)
            return train(source, data, Path(out), cfg, train_cfg, resume)

        METHODS[name] = Method(name, config, run, source, own_loss, report or bundle_report)
        return run

    return wrap


def discover() -> dict[str, Method]:
    """Every method: importing each module of this package registers the methods it defines."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    return METHODS


def bundle_report(out: Path, cfg: Any) -> tuple[dict, str]:
    """The bundle's split top-1s."""
    from edgevit.vit import read_meta

    metrics = read_meta(out).metrics
    return {"run": str(out), **metrics}, (f"wrote {out}: val top-1 {metrics.get('val_top1', float('nan')):.4f}, "
                                          f"test top-1 {metrics.get('test_top1', float('nan')):.4f}"
                                          + references_line(metrics))


def references_line(metrics: dict) -> str:
    """Where the run stands against its references, in words (empty without references)."""
    said = metrics.get("against_references")
    return "\n" + "; ".join(said.values()) if said else ""
