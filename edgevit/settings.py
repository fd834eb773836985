"""Typed settings: a dataclass field that carries its default and its help, the one home of a setting.

The configs of training (:class:`edgevit.train.TrainConfig`) and of every method declare each setting once,
PEFT-style, as ``name: type = setting(default, help)``. The CLI generates one option per field from the type
(``Literal`` choices, flags for ``bool``, comma-separated values for tuples and lists), the default and the
help (:mod:`edgevit.options`); the Python API and the demo construct the same dataclasses, so all three read
the very same default objects. Torch-free, so ``--help`` needs no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from edgevit.errors import EdgeVitError


def setting(default: Any, help: str, *, flag: str | None = None, flag_value: Any = None) -> Any:
    """A dataclass field holding ``default`` (immutable: a tuple, ``None``, a frozen dataclass, so every reader
    shares this one object) and its one-sentence ``help``.

    Args:
        default: the value used when none is given.
        help: what the setting does, shown by ``--help``.
        flag: the CLI spelling when it is not ``--field-name``: ``--deep/--shallow`` for an on/off pair.
        flag_value: the value a bare ``--flag`` sets for a non-boolean field (``--hflip``: probability 0.5).
    """
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "flag_value": flag_value})


@functools.cache
def setting_types(config: type) -> dict[str, Any]:
    """The evaluated type of every field of the dataclass ``config`` (its annotations are strings)."""
    return typing.get_type_hints(config)


def without_none(annotation: Any) -> tuple[Any, bool]:
    """``annotation`` without its ``| None`` (settings are one type or None), and whether it had one."""
    if type(annotation) is types.UnionType or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return next(a for a in args if a is not type(None)), type(None) in args
    return annotation, False


def choices(annotation: Any) -> tuple | None:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) annotation allows; None for other types."""
    base, _ = without_none(annotation)
    return typing.get_args(base) if typing.get_origin(base) is typing.Literal else None


def check_choices(config: Any) -> None:
    """Refuse a value outside its field's ``Literal`` choices (``None`` passes where the type allows it)."""
    annotations = setting_types(type(config))
    for field in dataclasses.fields(config):
        allowed, value = choices(annotations[field.name]), getattr(config, field.name)
        if allowed and value is not None and value not in allowed:
            raise EdgeVitError(f"unknown {field.name.replace('_', ' ')} {value!r} ({', '.join(map(str, allowed))})")
