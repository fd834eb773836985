"""The ``edgevit`` command line: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import logging

import click

from edgevit.errors import EdgeVitError
from edgevit.methods.defaults import train_defaults


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


def _numbers(value: str | None, kind: type = float) -> list | None:
    """A comma-separated flag value as a list of ``kind`` (None when the flag is not given)."""
    if value is None:
        return None
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise click.BadParameter(f"expected comma-separated {what}, got {value!r}") from None


def classes_option(help: str):
    """``--classes A,B,C``, passed on as a list of class names (None when not given)."""
    return click.option("--classes", help=help, callback=lambda ctx, param, value: value.split(",") if value else None)


def _arch(patch_size: int | None, embed_dim: int | None, depth: int | None, heads: int | None) -> dict | None:
    """timm architecture overrides from the size flags that were given (None: none given)."""
    sizes = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": heads}
    return {k: v for k, v in sizes.items() if v is not None} or None


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


class BackendName(click.ParamType):
    """A backend registered in :data:`edgevit.bench.backends.BACKENDS`. The registry is read only when the option
    is parsed or its help shown (it imports torch), so ``edgevit --help`` stays instant; an unknown name is the
    library's one-line error."""

    name = "backend"

    def convert(self, value, param, ctx):
        from edgevit.bench.backends import backend_class

        backend_class(value)
        return value

    def get_metavar(self, param, ctx=None) -> str:
        from edgevit.bench.backends import BACKENDS

        return "[" + "|".join(BACKENDS) + "]"


backend_option = click.option("--backend", type=BackendName(), default="ort", show_default=True,
                              help="Runtime (a registered profiling backend).")
data_option = click.option("--data", required=True,
                           help="'digits' (embedded, offline) or an image folder of class sub-folders.")
out_option = click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
                          help="Run directory to write (bundle + training checkpoint).")
resume_option = click.option("--resume", is_flag=True, help="Continue a killed run in OUT.")
seed_option = click.option("--seed", default=0, show_default=True, help="Seed for init, data order, augmentation.")


def train_options(method: str):
    """Optimisation flags shared by the train commands, defaulting to the library's for ``method``."""
    defaults = train_defaults(method)

    def decorate(fn):
        for option in reversed([
            click.option("--epochs", default=defaults["epochs"], show_default=True, type=int),
            click.option("--lr", default=defaults["lr"], show_default=True, type=float, help="Peak learning rate."),
            click.option("--batch-size", default=defaults["batch_size"], show_default=True, type=int),
            seed_option,
        ]):
            fn = option(fn)
        return fn

    return decorate


def mix_options(fn):
    """``--mixup/--cutmix ALPHA``: timm's Mixup in the shared loop, for the commands that train with plain
    cross-entropy (baseline, prompts)."""
    for option in reversed([
        click.option("--mixup", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="Mixup alpha (timm Mixup, soft-target cross-entropy; 0: off), e.g. 0.8."),
        click.option("--cutmix", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="CutMix alpha (0: off), e.g. 1.0; with --mixup, each batch picks one."),
    ]):
        fn = option(fn)
    return fn


def _train_config(method: str, epochs: int, lr: float, batch_size: int, seed: int, data: str, **overrides):
    from edgevit.train.run import method_train_config

    return method_train_config(method, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, **overrides)


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
@classes_option("Comma-separated subset of the data's classes (default: all).")
@click.option("--pretrained", is_flag=True,
              help="Start from timm's pretrained weights of --model (a tagged name or hf-hub: id; needs the network "
                   "once, then timm's cache).")
@click.option("--init", type=click.Path(dir_okay=False),
              help="Local checkpoint of --model to start from (.safetensors, or a torch state dict); the bundle "
                   "records --model's pretrained preprocessing.")
@click.option("--mean", callback=lambda ctx, param, value: _numbers(value),
              help="Override the recorded normalisation mean (one value or one per channel).")
@click.option("--std", callback=lambda ctx, param, value: _numbers(value), help="Override the recorded std.")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]),
              help="Override the recorded resize interpolation.")
@click.option("--crop-pct", type=float, help="Override the recorded centre-crop fraction (1: no crop).")
@click.option("--hflip", is_flag=True, help="Augment image folders with horizontal flips (off: parts may be "
                                            "orientation-sensitive).")
@click.option("--vflip", is_flag=True, help="Augment image folders with vertical flips.")
@click.option("--scale", default="0.5,1.0", show_default=True, callback=lambda ctx, param, value: _numbers(value),
              help="RandomResizedCrop area range for image folders (min,max).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes decoding and augmenting image files.")
@click.option("--balance", is_flag=True,
              help="Class-weighted sampling: rare classes (defects) are drawn as often as common ones.")
@click.option("--auto-augment", help="Image folders: timm auto-augment, e.g. rand-m9-mstd0.5 (RandAugment), trivial "
                                     "(TrivialAugment), augmix-m5, original (AutoAugment). Default: none.")
@mix_options
@train_options("baseline")
@resume_option
@json_option
def train_baseline(data, out, model_name, img_size, patch_size, embed_dim, depth, heads, classes, pretrained, init,
                   mean, std, interpolation, crop_pct, hflip, vflip, scale, workers, balance, auto_augment, mixup,
                   cutmix, epochs, lr, batch_size, seed, resume, as_json):
    """Train a ViT on DATA: from scratch, from timm's pretrained weights (--pretrained) or a local
    checkpoint (--init).

    \b
    Example:
      edgevit train baseline --data digits -o runs/base
      edgevit train baseline --data line3/ --model deit_tiny_patch16_224 --init deit_tiny.safetensors -o runs/line3
    """
    from edgevit.data.transforms import Augment
    from edgevit.methods.baseline import train_baseline as run

    if len(scale) != 2:
        raise click.BadParameter(f"expected min,max, got {scale}", param_hint="--scale")
    run(data, out, model_name=model_name, img_size=img_size, arch=_arch(patch_size, embed_dim, depth, heads),
        classes=classes, init=init, pretrained=pretrained,
        preprocessing={"mean": mean, "std": std, "interpolation": interpolation, "crop_pct": crop_pct},
        augment=Augment(scale=tuple(scale), hflip=0.5 if hflip else 0.0, vflip=0.5 if vflip else 0.0,
                        auto_augment=auto_augment),
        cfg=_train_config("baseline", epochs, lr, batch_size, seed, data, workers=workers, balance=balance,
                          mixup=mixup, cutmix=cutmix),
        resume=resume)
    _report_bundle(out, as_json)


# --- method 1: attention-transfer students (attention distillation / attention copy) -----------------------


@train.command("transfer")
@click.option("--teacher", "teacher_run", required=True, type=click.Path(exists=True, file_okay=False),
              help="Teacher bundle (frozen); only its attention maps are used, so its classes may differ.")
@data_option
@out_option
@click.option("--mode", type=click.Choice(["distill", "copy"]), default="distill", show_default=True,
              help="distill: the student learns the maps and runs alone; copy: it attends with the teacher's "
                   "maps (needs the teacher at inference: not deployable).")
@click.option("--model", "model_name", help="Student timm ViT architecture (default: the teacher's).")
@click.option("--img-size", type=int, help="Student input side (default: the teacher's; same patch grid).")
@click.option("--patch-size", type=int, help="Student patch size.")
@click.option("--embed-dim", type=int, help="Student width.")
@click.option("--depth", type=int, help="Student blocks (layer map: i <- round((i+1)*L_T/L_S)-1).")
@click.option("--heads", type=int, help="Student heads (teacher heads are mapped by --head-map).")
@click.option("--layers", type=int, help="Transferred student layers, from the first (default: depth - 3).")
@click.option("--weight", default=3.0, show_default=True, type=float, help="Attention-distillation loss weight.")
@click.option("--head-map", type=click.Choice(["average", "learned"]), default="average", show_default=True,
              help="Fewer student heads: average teacher head groups' probabilities, or learn a 1x1 head mixing "
                   "of logits.")
@click.option("--data-fraction", default=1.0, show_default=True, type=float,
              help="Class-stratified fraction of the training split (low-data regimes).")
@classes_option("Comma-separated subset of the data's classes for the student (default: all).")
@train_options("transfer")
@resume_option
@json_option
def train_transfer(teacher_run, data, out, mode, model_name, img_size, patch_size, embed_dim, depth, heads, layers,
                   weight, head_map, data_fraction, classes, epochs, lr, batch_size, seed, resume, as_json):
    """Train a student from scratch that inherits a frozen teacher's attention patterns (Li et al. 2024).

    \b
    Example (a student half as wide and two blocks shallower than its teacher):
      edgevit train baseline --data digits -o runs/base
      edgevit train transfer --teacher runs/base --data digits -o runs/student --embed-dim 48 --depth 4
    \b
    The paper's setting (a teacher pre-trained elsewhere, a small downstream task):
      edgevit train baseline --data digits --classes 0,1,2,3,4 -o runs/base04
      edgevit train transfer --teacher runs/base04 --data digits --classes 5,6,7,8,9 --data-fraction 0.03 \\
        -o runs/student59 --embed-dim 32 --depth 4 --heads 2
    """
    from edgevit.methods.transfer import TransferConfig
    from edgevit.methods.transfer import train_transfer as run

    cfg = TransferConfig(mode=mode, layers=layers, weight=weight, head_map=head_map, data_fraction=data_fraction)
    run(teacher_run, data, out, cfg, model_name=model_name, img_size=img_size,
        arch=_arch(patch_size, embed_dim, depth, heads), classes=classes,
        train_cfg=_train_config("transfer", epochs, lr, batch_size, seed, data), resume=resume)
    _report_bundle(out, as_json)
    if mode == "copy" and not as_json:
        click.echo("note: attention copy needs the teacher at inference; the bundle is marked not deployable")


# --- method 2: skip-pruned graphs (attention sub-layers removed) ----------------------------------------------

def _ratio(value: str | None) -> float | None:
    from fractions import Fraction

    if value is None:
        return None
    try:
        return float(Fraction(value))
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"expected a fraction such as 1/3 or 0.33, got {value!r}") from None


HEAL = train_defaults("skip")  # skip's optimisation flags set its healing fine-tune


@train.command("skip")
@click.option("--model", "model_run", required=True, type=click.Path(exists=True, file_okay=False),
              help="The bundle to prune (a run directory).")
@data_option
@out_option
@click.option("--ratio", help="Fraction of attention sub-layers to remove, e.g. 1/3 (default 1/3).")
@click.option("--blocks", help="Remove exactly these blocks' attention, e.g. 3,7 (instead of --ratio/--select).")
@click.option("--select", type=click.Choice(["cosine", "cosine-pooled", "last", "random"]),
              help="cosine: least-change sub-layers on calibration images (mean over all tokens); cosine-pooled: "
                   "the same over the tokens the head pools (class token); last: deepest, final block kept; "
                   "random: seeded control. Default cosine-pooled; with --sweep, limits the sweep to one strategy.")
@click.option("--heal-epochs", default=HEAL["epochs"], show_default=True, type=int,
              help="Healing fine-tune of the remaining weights (0: remove only).")
@click.option("--lr", default=HEAL["lr"], show_default=True, type=float,
              help="Healing peak learning rate.")
@click.option("--batch-size", default=HEAL["batch_size"], show_default=True, type=int)
@click.option("--calib", default=64, show_default=True, type=int,
              help="Class-balanced training images the cosine scores are measured on.")
@click.option("--distill", default=0.5, show_default=True, type=float,
              help="Healing loss: (1 - W) * cross-entropy + W * KL(unpruned model || pruned model).")
@click.option("--sweep", is_flag=True, help="Ratios 0, 1/6, 1/3, 1/2 x every strategy, before/after healing, "
                                            "with ORT CPU latency: result rows in OUT/sweep.jsonl.")
@click.option("--threads", default=2, show_default=True, type=int, help="--sweep: ORT CPU threads for latency.")
@seed_option
@resume_option
@json_option
def train_skip_cmd(model_run, data, out, ratio, blocks, select, heal_epochs, lr, batch_size, calib, distill, sweep,
                   threads, seed, resume, as_json):
    """Remove attention sub-layers (LayerNorm, qkv, proj, LayerScale) from a bundle, then heal it.

    \b
    Examples:
      edgevit train skip --model runs/base --data digits -o runs/skip --ratio 1/3 --select cosine-pooled
      edgevit train skip --model runs/base --data digits -o runs/skip-sweep --sweep --heal-epochs 3
      edgevit report runs/skip-sweep/sweep.jsonl -o report/skip
    """
    from edgevit.methods import skip

    train_cfg = _train_config("skip", heal_epochs, lr, batch_size, seed, data,
                             warmup_epochs=min(0.5, heal_epochs))
    if not sweep:
        cfg = skip.SkipConfig(select=select or "cosine-pooled", ratio=_ratio(ratio), blocks=_numbers(blocks, int),
                              calib=calib, distill=distill)
        skip.train_skip(model_run, data, out, cfg, train_cfg, resume=resume)
        _report_bundle(out, as_json)
        return
    if ratio is not None or blocks is not None:
        raise click.UsageError("--sweep runs its own ratios; drop --ratio/--blocks")
    from edgevit.bench.schema import read_rows
    from edgevit.studies.skip_sweep import sweep_skip

    results = sweep_skip(model_run, data, out, train_cfg, selects=[select] if select else skip.SELECTIONS,
                         calib=calib, distill=distill, threads=threads, resume=resume)
    rows = read_rows(results)
    text = "\n".join(f"{r.label:28s} top-1 {r.top1:.4f}  p50 {r.latency_ms.p50:8.3f} ms  blocks "
                     f"{r.settings['blocks']}" for r in rows) + f"\nwrote {results}"
    _emit({"results": str(results), "rows": [r.model_dump(exclude_none=True) for r in rows]}, as_json, text)


# --- method 3: MoViT memory and compact summarized memory tables ----------------------------------------

@train.command("memory")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The bundle to start from (a run directory); its head is replaced if DATA has other classes.")
@data_option
@out_option
@click.option("--block", default=-1, show_default=True, type=int,
              help="Block that gets the memory branch (negative counts from the end).")
@click.option("--slots", default=2048, show_default=True, type=int,
              help="Full training memory size S per head (capped at the number of training images).")
@click.option("--topk", default=32, show_default=True, type=int,
              help="Memory rows each query attends to (0: dense attention over all rows).")
@click.option("--momentum", default=0.9, show_default=True, type=float,
              help="ATMA beta: a rewritten slot becomes beta*old + (1-beta)*new.")
@click.option("--prototypes", default=64, show_default=True, type=int,
              help="Rows P of the deployed table (PAL summarization); 0 deploys the full memory.")
@click.option("--summarize", type=click.Choice(["kmeans", "learned"]), default="kmeans", show_default=True,
              help="PAL: k-means on keys (values averaged), or k-means then a brief distillation of the table.")
@click.option("--summarize-epochs", default=5, show_default=True, type=int, help="Epochs of --summarize learned.")
@click.option("--gate-init", default=-1.0, show_default=True, type=float, help="Initial per-head gate logit.")
@click.option("--data-fraction", default=1.0, show_default=True, type=float,
              help="Class-stratified fraction of the training split (low-data regimes).")
@train_options("memory")
@resume_option
@json_option
def train_memory(model_dir, data, out, block, slots, topk, momentum, prototypes, summarize, summarize_epochs,
                 gate_init, data_fraction, epochs, lr, batch_size, seed, resume, as_json):
    """Fine-tune a bundle with a MoViT memory (ATMA updates) and deploy a compact summarized table (PAL).

    \b
    Example:
      edgevit train memory --model runs/base --data digits -o runs/memory --prototypes 64
    """
    from edgevit.methods.memory import MemoryConfig
    from edgevit.methods.memory import train_memory as run

    cfg = MemoryConfig(block=block, slots=slots, topk=topk or None, momentum=momentum, prototypes=prototypes,
                       summarize=summarize, summarize_epochs=summarize_epochs, gate_init=gate_init,
                       data_fraction=data_fraction)
    run(model_dir, data, out, cfg, _train_config("memory", epochs, lr, batch_size, seed, data),
        resume=resume)
    _report_bundle(out, as_json)


# --- method 4: DATA continual learning with reparameterized (folded) adapters ---------------------------------


@train.command("continual")
@click.option("--model", "model_run", required=True, type=click.Path(exists=True, file_okay=False),
              help="Backbone bundle (frozen), trained on classes other than the tasks' ones.")
@data_option
@out_option
@click.option("--tasks", type=int, help="Number of tasks (default: classes // 2 for class, 4 for domain).")
@click.option("--protocol", type=click.Choice(["class", "domain"]), default="class", show_default=True,
              help="class: disjoint classes per task, growing head; domain: same classes, a new image "
                   "transform per task (identity, invert, rot90, hflip, noise).")
@click.option("--ranks", default="4,16", show_default=True, help="Ranks r1,r2 of the task-shared and task-specific "
                                                                 "adapter paths.")
@click.option("--components", default=8, show_default=True, type=int, help="Router components per task (M).")
@click.option("--group-size", type=int, help="Blocks per router group (default 4, fewer for shallow models).")
@click.option("--ortho-weight", default=1.0, show_default=True, type=float, help="Orthogonality loss weight.")
@click.option("--form", type=click.Choice(["merged", "exact"]), default="merged", show_default=True,
              help="Bundle written to OUT: merged (mean scales folded, the base graph) or exact (per-sample "
                   "scale branch); the other form goes to OUT/<form>/.")
@classes_option("Task classes (default: DATA's classes the backbone was not trained on).")
@train_options("continual")
@resume_option
@json_option
def train_continual_cmd(model_run, data, out, tasks, protocol, ranks, components, group_size, ortho_weight, form,
                        classes, epochs, lr, batch_size, seed, resume, as_json):
    """Learn a task sequence with DATA (no rehearsal, no task id) and write exact and merged bundles.

    \b
    Example (backbone on digits 0-4, tasks {5,6}, {7,8,9}):
      edgevit train baseline --data digits --classes 0,1,2,3,4 -o runs/base04
      edgevit train continual --model runs/base04 --data digits -o runs/data --tasks 2
    """
    from edgevit.methods.continual import ContinualConfig
    from edgevit.methods.continual import train_continual as run
    from edgevit.train import is_main_process
    from edgevit.vit import read_meta

    cfg = ContinualConfig(protocol=protocol, tasks=tasks, ranks=tuple(_numbers(ranks, int)), components=components,
                          group_size=group_size, ortho_weight=ortho_weight, form=form)
    run(model_run, data, out, cfg, _train_config("continual", epochs, lr, batch_size, seed, data),
        classes=classes, resume=resume)
    if not is_main_process():
        return
    c = read_meta(out).metrics["continual"]
    rows = "\n".join(f"  after task {i + 1}: " + " ".join(f"{a:.3f}" for a in row)
                     for i, row in enumerate(c["accuracy"]))
    forms = ", ".join(f"{k} {v['final_average_accuracy']:.4f}" for k, v in c["forms"].items())
    _emit({"run": out, **c}, as_json,
          f"wrote {out} ({form}); test top-1 per task ({', '.join(c['tasks'])}):\n{rows}\n"
          f"final average accuracy {c['final_average_accuracy']:.4f}, average forgetting "
          f"{c['average_forgetting']:.4f}; deployed forms: {forms}")


# --- method 5: burstiness-aware bilinear prompt tuning (BPT) + merged prompts ------------------------------


@train.command("prompts")
@click.option("--model", "model_run", required=True, type=click.Path(exists=True, file_okay=False),
              help="Backbone bundle (frozen), trained on classes other than the downstream ones.")
@data_option
@out_option
@click.option("--prompts", type=int, help="Prompt tokens per prompted layer (default 50 deep, 100 shallow).")
@click.option("--deep/--shallow", default=True, show_default=True,
              help="Prompts in every block (merged to prefix K/V) or only at the input (kept as tokens).")
@click.option("--rank", type=int, help="Bilinear rank p of P = A B^T (default min(50, width)).")
@click.option("--whiten/--no-whiten", default=None,
              help="Initialise B from the ZCA whitening matrix (default: on for bilinear/fwhiten/twhiten).")
@click.option("--variant", type=click.Choice(["vpt", "fwhiten", "twhiten", "bilinear"]), default="bilinear",
              show_default=True, help="vpt: plain prompts; fwhiten/twhiten: P = A W^T, W frozen/trained; "
                                      "bilinear: BPT.")
@classes_option("Downstream classes (default: DATA's classes the backbone was not trained on).")
@click.option("--whiten-images", default=100, show_default=True, help="Training images the whitening uses.")
@click.option("--eps", default=0.1, show_default=True, help="Whitening ridge, relative to the mean eigenvalue.")
@click.option("--covariance", type=click.Choice(["tokens", "mean"]), default="tokens", show_default=True,
              help="Whitening statistics over all tokens, or over the image-mean X_bar (the authors').")
@click.option("--trainable-top", type=int, help="Deep: train B only in the top K blocks (default depth/3).")
@mix_options
@train_options("prompts")
@resume_option
@json_option
def train_prompts(model_run, data, out, prompts, deep, rank, whiten, variant, classes, whiten_images, eps,
                  covariance, trainable_top, mixup, cutmix, epochs, lr, batch_size, seed, resume, as_json):
    """Prompt-tune a frozen backbone on a downstream task (BPT) and merge the prompts into the bundle.

    \b
    Example (backbone on digits 0-4, prompts on 5-9):
      edgevit train baseline --data digits --classes 0,1,2,3,4 -o runs/base04
      edgevit train prompts --model runs/base04 --data digits -o runs/bpt --deep
    """
    from edgevit.methods.prompts import PromptConfig
    from edgevit.methods.prompts import train_prompts as run

    cfg = PromptConfig(prompts=prompts, deep=deep, rank=rank, variant=variant, whiten=whiten,
                       whiten_images=whiten_images, eps=eps, covariance=covariance, trainable_top=trainable_top)
    train_cfg = _train_config("prompts", epochs, lr, batch_size, seed, data, mixup=mixup, cutmix=cutmix)
    run(model_run, data, out, cfg=cfg, train_cfg=train_cfg, classes=classes, resume=resume)
    _report_bundle(out, as_json)


@main.group("inspect", cls=Group)
def inspect_group() -> None:
    """Look inside a bundle: statistics that guide a method's settings."""


@inspect_group.command("burstiness")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@data_option
@classes_option("Classes of DATA to measure on (default: all).")
@click.option("--images", default=100, show_default=True, help="Training images to fit the whitening on "
                                                               "(as many validation images are measured).")
@click.option("--eps", default=0.1, show_default=True, help="Whitening ridge, relative to the mean eigenvalue.")
@click.option("--covariance", type=click.Choice(["tokens", "mean"]), default="tokens", show_default=True)
@json_option
def inspect_burstiness(run, data, classes, images, eps, covariance, as_json):
    """Heavy-tail statistics of X~ = W_q W_k^T X^T per block, before and after ZCA whitening.

    \b
    Example:
      edgevit inspect burstiness runs/base04 --data digits --classes 5,6,7,8,9
    """
    from edgevit.methods.prompts import measure_burstiness

    report = measure_burstiness(run, data, classes, images, eps, covariance)
    lines = [f"{'block':>5} {'kurtosis':>17} {'max/median':>17}"]
    lines += [f"{r['block']:>5} {r['kurtosis_before']:>8.2f} -> {r['kurtosis_after']:<6.2f} "
              f"{r['max_median_before']:>8.1f} -> {r['max_median_after']:<6.1f}" for r in report["blocks"]]
    m = report["mean"]
    lines.append(f" mean {m['kurtosis_before']:>8.2f} -> {m['kurtosis_after']:<6.2f} "
                 f"{m['max_median_before']:>8.1f} -> {m['max_median_after']:<6.1f}   (before -> after whitening)")
    _emit(report, as_json, "\n".join(lines))


# --- export / build / profiles (edgevit.export) ---------------------------------------------------------------

@main.command("export")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--profile", "profile_name", required=True,
              help="Export profile name (see `edgevit profiles list`) or a path to a profile YAML.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Export directory to create (must not exist).")
@json_option
def export_cmd(run, profile_name, out, as_json):
    """Export the bundle in RUN for a target: ONNX (+ INT8 Q/DQ), parity check, export.json.

    \b
    Example:
      edgevit export runs/base --profile jetson-orin-nano-int8 -o build/base/orin-int8
    """
    from edgevit.export import export_bundle
    from edgevit.export.gate import describe

    export = export_bundle(run, profile_name, out)
    p = export["parity"]
    text = (f"wrote {out} ({export['deploy_onnx']}): parity on {p['images']} images max abs diff "
            f"{p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.4f}")
    precision = export["profile"]["precision"]
    if precision in export:  # the low-precision graph's accuracy (for TensorRT: the graph it builds, run by ORT)
        q = export[precision]
        text += (f"; {q['graph']} top-1 val {q['fp32_val_top1']:.4f} -> {q[f'{precision}_val_top1']:.4f}, "
                 f"test {q['fp32_test_top1']:.4f} -> {q[f'{precision}_test_top1']:.4f} (fp32 -> {precision})"
                 f"\ngate (fails when the interval is above {100 * q['gate']['max_drop']:.1f} points): "
                 f"{describe(q['gate'])}")
    if "precision" in export["graph"]:
        text += f"\nprecision: {export['graph']['precision']['line']}"
    if export["profile"]["runtime"] == "tensorrt":
        text += f"\nbuild the engine on the target: edgevit build {out}  (or {out}/build_engine.sh)"
    _emit(export, as_json, text)


@main.command("build")
@click.argument("out", type=click.Path(file_okay=False, exists=True))
@json_option
def build_cmd(out, as_json):
    """Build the TensorRT engine of an export directory ON the target GPU (engine.plan + engine.json).

    \b
    Example:
      edgevit build build/base/orin-int8
    """
    from pathlib import Path

    from edgevit.export.artifacts import SCRIPT
    from edgevit.export.tensorrt import build_engine, import_tensorrt

    try:
        import_tensorrt()
    except EdgeVitError:
        raise EdgeVitError(f"tensorrt is not importable here; build on the target with `pip install "
                           f"'edgevit[trt]'` or run {Path(out) / SCRIPT} (the equivalent trtexec command)") from None
    info = build_engine(out)
    _emit(info, as_json, f"wrote {out}/engine.plan: TensorRT {info['trt_version']} on {info['gpu_name']} "
                         f"(sm {info['compute_capability']}) in {info['build_seconds']} s")


@main.group("profiles", cls=Group)
def profiles_group() -> None:
    """List and show export profiles ($EDGEVIT_PROFILES, ./export_profiles, the package's export_profiles/)."""


@profiles_group.command("list")
@json_option
def profiles_list(as_json):
    """List every export profile.

    \b
    Example:
      edgevit profiles list
    """
    from edgevit.export.profiles import list_profiles

    found = list_profiles()
    rows = [{"name": p.name, "target": p.target, "runtime": p.runtime, "precision": p.precision,
             "path": str(path), "description": p.description} for p, path in found]
    _emit({"profiles": rows}, as_json, "\n".join(
        f"{r['name']:26s} {r['target']:18s} {r['runtime']:12s} {r['precision']:5s} {r['description']}" for r in rows))


@profiles_group.command("show")
@click.argument("name")
@json_option
def profiles_show(name, as_json):
    """Show one profile with every default filled in.

    \b
    Example:
      edgevit profiles show jetson-orin-nano-int8
    """
    import yaml

    from edgevit.export.profiles import load_profile

    profile = load_profile(name)
    _emit(profile.model_dump(mode="json"), as_json,
          yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False).rstrip())


# --- profile / report (edgevit.bench) -------------------------------------------------------------------------

@main.command("profile")
@click.argument("artifacts", nargs=-1, required=True)
@backend_option
@click.option("--batch", "batches", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", default=2, show_default=True, type=int, help="CPU threads for every backend.")
@click.option("--warmup", default=10, show_default=True, type=int, help="Untimed iterations first.")
@click.option("--iterations", type=int, help="Exact timed iterations (default: run for --seconds).")
@click.option("--seconds", default=3.0, show_default=True, type=float,
              help="Time budget per row when --iterations is not given (at least 20 iterations).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="torch backend device (default: cuda if any).")
@click.option("--label", "labels", multiple=True, help="Plot label per artifact, in order (default: dir name).")
@click.option("--no-accuracy", is_flag=True, help="Skip top-1 on the test split (latency-only studies).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="results.jsonl to append to.")
@json_option
def profile_cmd(artifacts, backend, batches, threads, warmup, iterations, seconds, device, labels, no_accuracy,
                out, as_json):
    """Measure export directories: one row per (artifact, backend, precision, batch) appended to -o.

    Each row holds p50/p90/p99/mean latency (ms per batch), throughput, peak memory, top-1 on the bundle's
    test split through the same backend and precision, size, parameters, GFLOPs, method and machine.
    Rows measured on a Jetson (trtexec --exportTimes + tegrastats): see `edgevit profile-device`.

    \b
    Example:
      edgevit profile build/base/cpu-fp32 build/skip/cpu-fp32 --backend ort --batch 1,8 -o results.jsonl
    """
    from edgevit.bench.latency import TimingConfig
    from edgevit.bench.profile import ProfileConfig, profile_artifacts
    from edgevit.bench.schema import append_rows

    cfg = ProfileConfig(backend=backend, batches=_numbers(batches, int), threads=threads, device=device,
                        timing=TimingConfig(warmup=warmup, iterations=iterations, seconds=seconds),
                        accuracy=not no_accuracy)
    rows = profile_artifacts(artifacts, cfg, labels=list(labels) or None)
    append_rows(out, rows)
    text = "\n".join(
        f"{r.label:24s} {r.backend:5s} {r.precision:5s} b{r.batch:<3d} p50 {r.latency_ms.p50:9.3f} ms  "
        f"p99 {r.latency_ms.p99:9.3f} ms  {r.throughput_ips:9.1f} img/s  top-1 "
        + (f"{r.top1:.4f}" if r.top1 is not None else "  -   ") for r in rows) + f"\nappended {len(rows)} rows to {out}"
    _emit({"results": out, "rows": [r.model_dump(exclude_none=True) for r in rows]}, as_json, text)


@main.command("profile-device")
@click.option("--trtexec-times", "times", required=True, type=click.Path(dir_okay=False),
              help="trtexec --exportTimes JSON from the device.")
@click.option("--tegrastats", type=click.Path(dir_okay=False), help="tegrastats log recorded during the run.")
@click.option("--artifact", help="The export directory the engine was built from (method, precision, GFLOPs).")
@click.option("--batch", default=1, show_default=True, type=int, help="Images per inference.")
@click.option("--metric", default="latencyMs", show_default=True, type=click.Choice(["latencyMs", "computeMs"]),
              help="latencyMs includes host<->device copies; computeMs is GPU compute only.")
@click.option("--machine", default="jetson", show_default=True, help="Device name, e.g. 'Jetson Orin Nano 8GB'.")
@click.option("--label", help="Plot label (default: the artifact's directory name).")
@click.option("--rail", help="tegrastats rail to average (default: board input VDD_IN / POM_5V_IN).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="results.jsonl to append to.")
@json_option
def profile_device_cmd(times, tegrastats, artifact, batch, metric, machine, label, rail, out, as_json):
    """Turn an on-device trtexec trace (+ tegrastats power log) into a result row appended to -o.

    Latency percentiles come from the per-inference trace, average power from the board input rail, energy
    per image = power / throughput.

    \b
    Example:
      edgevit profile-device --trtexec-times times.json --tegrastats power.log \\
          --artifact build/skip/orin-fp16 --machine "Jetson Orin Nano" -o results.jsonl
    """
    from edgevit.bench.device import profile_device
    from edgevit.bench.schema import append_rows

    row = profile_device(times, artifact, tegrastats, batch, metric, machine, label, rail)
    append_rows(out, [row])
    power = f", {row.power_w:.2f} W, {row.energy_mj_per_image:.2f} mJ/img" if row.power_w is not None else ""
    _emit(row.model_dump(exclude_none=True), as_json,
          f"{row.label}: p50 {row.latency_ms.p50:.3f} ms, {row.throughput_ips:.1f} img/s{power}; appended to {out}")


@main.command("report")
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--baseline-label", help="Reference row label in each setting (default: the baseline method).")
@json_option
def report_cmd(results, out, baseline_label, as_json):
    """Write report.md, pareto.png, throughput.png (several --batch sizes) and report.json from a results.jsonl.

    \b
    Example:
      edgevit report results.jsonl -o report/
    """
    from edgevit.bench.report import build_report

    report = build_report(results, out, baseline_label)
    n = sum(len(s["rows"]) for s in report["settings"])
    _emit(report, as_json, f"wrote {out}/report.md, report.json" + (", pareto.png" if report["pareto_png"] else "")
          + (", throughput.png" if report["throughput_png"] else "")
          + f" ({n} rows in {len(report['settings'])} settings)")


# --- demo ----------------------------------------------------------------------------------------------------

@main.command("demo")
@click.option("-o", "--out", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Directory for runs, exports, results and the report.")
def demo_cmd(out):
    """The whole pipeline on the embedded digits, offline: train the baseline and the five methods, export
    each for the CPU (fp32, int8) and the Jetson Orin Nano (int8), profile, report. Re-running skips
    finished steps and resumes an interrupted one.

    \b
    Example:
      edgevit demo -o demo
    """
    from edgevit.demo import run_demo

    report = run_demo(out)
    click.echo(f"report: {report / 'report.md'} and {report / 'pareto.png'}")


# --- doctor --------------------------------------------------------------------------------------------------

@main.command("doctor")
@json_option
def doctor_cmd(as_json):
    """What this machine has (torch + CUDA, ONNX Runtime providers, TensorRT, ModelOpt, a Jetson?) and, for
    every profile, whether it can export here and whether its engine can be built here (and why not).

    \b
    Example:
      edgevit doctor --json
    """
    from edgevit.doctor import diagnose, format_report

    report = diagnose()
    _emit(report, as_json, format_report(report))


# --- predict -------------------------------------------------------------------------------------------------

@main.command("predict")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True)
@backend_option
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="Classes shown per image.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write one row per image here.")
@click.option("--threads", default=1, show_default=True, type=int, help="CPU threads of the runtime.")
@json_option
def predict_cmd(out, images, backend, top_k, csv_path, threads, as_json):
    """Classify IMAGES (files, folders, globs) with the export in OUT, preprocessed as its export.json says.

    Folders of class sub-folders (named like the export's classes) are also scored: top-1, per-class
    accuracy and a confusion matrix.

    \b
    Example:
      edgevit predict build/base/orin-int8 /data/line3/test --backend trt --csv predictions.csv
    """
    from edgevit.predict import format_result, predict_files, write_csv

    result = predict_files(out, images, backend, top_k, threads)
    if csv_path:
        write_csv(result, csv_path)
    _emit(result, as_json, format_result(result) + (f"\nwrote {csv_path}" if csv_path else ""))
