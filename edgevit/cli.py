"""The ``edgevit`` command line: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import logging

import click

from edgevit.errors import EdgeVitError


class Group(click.Group):
    """A click group that turns :class:`EdgeVitError` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeVitError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; finished epochs are checkpointed (re-run with --resume)", err=True)
            ctx.exit(130)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("onnxruntime", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _emit(result: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else text)


def _ints(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
data_option = click.option("--data", required=True,
                           help="'digits' (embedded, offline) or an image folder of class sub-folders.")
out_option = click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
                          help="Run directory to write (bundle + training checkpoint).")
resume_option = click.option("--resume", is_flag=True, help="Continue a killed run in OUT.")
seed_option = click.option("--seed", default=0, show_default=True, help="Seed for init, data order, augmentation.")


def train_options(epochs: int, lr: float, batch_size: int = 64):
    """Optimisation flags shared by the train commands, with per-method defaults."""

    def decorate(fn):
        for option in reversed([
            click.option("--epochs", default=epochs, show_default=True, type=int),
            click.option("--lr", default=lr, show_default=True, type=float, help="Peak learning rate."),
            click.option("--batch-size", default=batch_size, show_default=True, type=int),
            seed_option,
        ]):
            fn = option(fn)
        return fn

    return decorate


def _train_config(epochs: int, lr: float, batch_size: int, seed: int, data: str, **overrides):
    from edgevit.train import TrainConfig

    augment = "shift" if data == "digits" else "shift-flip"
    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, augment=augment, **overrides)


def _report_bundle(out: str, as_json: bool) -> None:
    from edgevit.train import is_main_process
    from edgevit.vit import read_meta

    if not is_main_process():  # under torchrun only rank 0 writes and reports
        return
    meta = read_meta(out)
    m = meta.metrics
    _emit({"run": out, **m}, as_json,
          f"wrote {out}: val top-1 {m.get('val_top1', float('nan')):.4f}, "
          f"test top-1 {m.get('test_top1', float('nan')):.4f}")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgevit")
def main() -> None:
    """edgevit: attention-centred ViT compression, exported to ONNX Runtime and TensorRT.

    \b
    Example:
      edgevit demo -o demo
    """
    _setup_logging()


@main.group(cls=Group)
def train() -> None:
    """Train a baseline or apply one of the five methods; each writes a bundle to -o RUN."""


@train.command("baseline")
@data_option
@out_option
@click.option("--model", "model_name", default="vit_tiny_patch16_224", show_default=True,
              help="timm ViT architecture.")
@click.option("--img-size", type=int, help="Input side (default 32 for digits, 224 for folders).")
@click.option("--patch-size", type=int, help="Override the architecture's patch size.")
@click.option("--embed-dim", type=int, help="Override the width.")
@click.option("--depth", type=int, help="Override the number of blocks.")
@click.option("--heads", type=int, help="Override the number of heads.")
@click.option("--classes", help="Comma-separated subset of the data's classes (default: all).")
@click.option("--init", type=click.Path(dir_okay=False),
              help="Local checkpoint to start from (.safetensors, or a torch state dict).")
@train_options(epochs=40, lr=1e-3)
@resume_option
@json_option
def train_baseline(data, out, model_name, img_size, patch_size, embed_dim, depth, heads, classes, init,
                   epochs, lr, batch_size, seed, resume, as_json):
    """Train a ViT on DATA (from scratch, or from a local checkpoint with --init).

    \b
    Example:
      edgevit train baseline --data digits -o runs/base
    """
    from edgevit.methods.baseline import train_baseline as run

    sizes = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": heads}
    arch = {k: v for k, v in sizes.items() if v is not None} or None
    run(data, out, model_name=model_name, img_size=img_size, arch=arch,
        classes=classes.split(",") if classes else None, init=init,
        cfg=_train_config(epochs, lr, batch_size, seed, data), resume=resume)
    _report_bundle(out, as_json)

