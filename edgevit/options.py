"""Command-line options generated from typed settings, and the ``edgevit train <method>`` commands.

Every field of a config dataclass becomes one option (:func:`config_options`): its type picks the click type
(``Literal`` -> a choice, ``bool`` -> a flag, ``int``, ``float`` (also ``1/3``), ``str``, tuples and lists ->
comma-separated values), its default *is* the field's default object, its help is the field's. A nested
config (``TrainConfig.augment``) adds its own fields. :func:`method_command` puts a method's settings, the
shared training settings and the run options together, so a method needs nothing here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any

import click

from edgevit.methods.registry import Method
from edgevit.settings import choices, setting_types, without_none
from edgevit.train.config import TrainConfig

# Options several commands share, as (declarations, settings): the CLI's decorators and the generated train
# commands are made from the same ones.
DATA = (["--data"], {"required": True, "help": "'digits' (embedded, offline) or an image folder of class sub-folders."})
JSON = (["--json", "as_json"], {"is_flag": True, "help": "Print the result as JSON."})
OUT = (["-o", "--out"], {"required": True, "type": click.Path(file_okay=False),
                         "help": "Run directory to write (bundle + training checkpoint)."})
RESUME = (["--resume"], {"is_flag": True, "help": "Continue a killed run in OUT."})
data_option = click.option(*DATA[0], **DATA[1])
json_option = click.option(*JSON[0], **JSON[1])
METHOD, TRAIN = "method.", "train."  # the roots of the option paths: a method's settings, the training ones


class Number(click.ParamType):
    """A float, also written as a fraction: ``0.25``, ``1e-3``, ``1/3``."""

    name = "number"

    def convert(self, value, param, ctx):
        if isinstance(value, float | int):
            return value
        try:
            return float(Fraction(value.strip())) if "/" in value else float(value)
        except (ValueError, ZeroDivisionError):
            self.fail(f"expected a number such as 0.5 or 1/3, got {value!r}", param, ctx)


class Values(click.ParamType):
    """Comma-separated values, e.g. ``4,16``, as a tuple or a list of ``item``; ``length``: exactly that many."""

    name = "values"

    def __init__(self, item: click.ParamType, container: type, length: int | None) -> None:
        self.item, self.container, self.length = item, container, length

    def get_metavar(self, param, ctx=None) -> str:
        item = self.item.name.upper()
        return ",".join([item] * self.length) if self.length else f"{item},..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple | list):
            return value
        items = [self.item.convert(v.strip(), param, ctx) for v in value.split(",") if v.strip()]
        if self.length is not None and len(items) != self.length:
            self.fail(f"expected {self.length} comma-separated values, got {value!r}", param, ctx)
        return self.container(items)


class SettingOption(click.Option):
    """An option that fills the config field at ``path`` (``train.augment.scale``: a nested config's field)."""

    def __init__(self, decls: list[str], path: str, **kwargs: Any) -> None:
        super().__init__(decls, **kwargs)
        self.path = path

    def get_help_extra(self, ctx: click.Context) -> dict:
        extra = super().get_help_extra(ctx)
        if isinstance(self.default, tuple):  # as it is typed: 4,16
            extra["default"] = ",".join(map(str, self.default))
        return extra


def click_type(annotation: Any) -> click.ParamType:
    """The click type of a field's annotation."""
    base, _ = without_none(annotation)
    if allowed := choices(base):
        return click.Choice(allowed)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (tuple, list):
        length = None if origin is list or Ellipsis in args else len(args)
        return Values(click_type(args[0]), origin, length)
    return {int: click.INT, float: Number(), str: click.STRING}[base]


def setting_option(field: dataclasses.Field, annotation: Any, default: Any, path: str,
                   flag: str | None) -> SettingOption:
    """The option of one field, defaulting to ``default`` (the very object the config holds)."""
    decl = flag or field.metadata.get("flag") or "--" + field.name.replace("_", "-")
    kwargs: dict[str, Any] = {"default": default, "show_default": True, "help": field.metadata.get("help")}
    if without_none(annotation)[0] is bool:
        if "/" not in decl:  # an on/off pair (--deep/--shallow) is a flag already
            kwargs["is_flag"] = True
    else:
        kwargs["type"] = click_type(annotation)
        if field.metadata.get("flag_value") is not None:
            kwargs.update(is_flag=True, flag_value=field.metadata["flag_value"], show_default=False)
    return SettingOption([decl], path, **kwargs)


def config_options(config: Any, root: str, flags: dict[str, str] | None = None) -> list[SettingOption]:
    """One option per field of the config instance ``config``, defaulting to its values; ``flags``: spellings of
    some fields' options."""
    annotations = setting_types(type(config))
    options = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            options += config_options(value, f"{root}{field.name}.")
        else:
            options.append(setting_option(field, annotations[field.name], value, root + field.name,
                                          (flags or {}).get(field.name)))
    return options


def build_config(config: type, values: dict[str, Any], root: str) -> Any:
    """The ``config`` that the option ``values`` (keyed by option path) describe."""
    kwargs, annotations = {}, setting_types(config)
    for field in dataclasses.fields(config):
        path = root + field.name
        if path in values:
            kwargs[field.name] = values[path]
        elif dataclasses.is_dataclass(nested := without_none(annotations[field.name])[0]):
            kwargs[field.name] = build_config(nested, values, path + ".")
    return config(**kwargs)


def source_option(method: Method) -> click.Option:
    source = method.source
    if source.default is not None:
        return click.Option([source.flag, "source"], default=source.default, show_default=True, help=source.help)
    return click.Option([source.flag, "source"], required=True, help=source.help,
                        type=click.Path(exists=True, file_okay=False))


@functools.cache
def method_command(method: Method) -> click.Command:
    """``edgevit train <method>``: its source, ``--data``, ``-o``, its settings, the training settings (without
    mixup/cutmix for a method with its own loss), ``--resume`` and ``--json``; help from the config's docstring."""
    train = [o for o in config_options(method.train_config(), TRAIN, method.config.flags)
             if not (method.own_loss and o.path in (f"{TRAIN}mixup", f"{TRAIN}cutmix"))]
    settings = [*config_options(method.config(), METHOD), *train]
    run_options = [click.Option(decls, **kwargs) for decls, kwargs in (DATA, OUT, RESUME, JSON)]
    params = [source_option(method), *run_options[:2], *settings, *run_options[2:]]
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"method {method.name}: options clash: {sorted(n for n in names if names.count(n) > 1)}")

    def run(source: str, data: str, out: str, resume: bool, as_json: bool, **values: Any) -> None:
        paths = {p.path: values[p.name] for p in settings}
        cfg = build_config(method.config, paths, METHOD)
        method.train(source, data, out, cfg, build_config(TrainConfig, paths, TRAIN), resume)
        from edgevit.train import is_main_process

        if is_main_process():  # under torchrun only rank 0 reports
            result, text = method.report(Path(out), cfg)
            click.echo(json.dumps(result, indent=2) if as_json else text)

    return click.Command(method.name, callback=run, params=params, help=inspect.cleandoc(method.config.__doc__))
