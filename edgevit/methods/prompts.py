"""Method 5: burstiness-aware bilinear prompt tuning (BPT) and merged prompts.

Wang, Duan, Kong, *Attention to the Burstiness in Visual Prompt Tuning!* (ICCV 2025; code
github.com/WangYZ1608/BPT). A frozen backbone is adapted to a downstream task by learned prompt tokens and a
new head. The paper's observation: the products ``X~ = W_q W_k^T X^T`` of block inputs with the query/key
projections are heavy-tailed ("bursty"), which slows prompt learning. Whitening them (ZCA, estimated from
~100 downstream training images) and generating prompts through it, ``P = A B^T`` with ``B`` taken from the
whitening matrix, trains faster.

Variants (all are ``P = A B^T`` per prompted layer; A is ``m x p``, B is ``d x p``):

* ``vpt``: plain prompts (``B = I``), VPT's uniform initialisation.
* ``fwhiten``: ``P = A W^T`` with the ZCA matrix ``W`` frozen (``p = d``).
* ``twhiten``: as ``fwhiten`` but ``W`` is trained.
* ``bilinear``: BPT. ``A ~ N(0, 0.02^2)``, ``B`` = ``p`` columns of ``W`` (``--no-whiten``: Xavier-random).

Deep prompts (VPT-deep): every attention block gets its own ``m`` prompt tokens; the previous block's prompt
outputs are *replaced*, so prompts only ever act as extra keys/values for the image tokens, and the head
never sees them. Shallow prompts are inserted once, after the class token, and carried through every block.

Merging (exact, [ours]): ``P`` is computed offline. A deep prompt's LayerNorm and K/V projection do not depend
on the image, so block ``l``'s prompts become constant prefix keys/values ``K_p = k_norm(LN1(P_l) W_k + b_k)``,
``V_p = LN1(P_l) W_v + b_v`` (surgery op ``prefix_kv``): the deployed graph keeps N queries, its keys grow to
N + m, and the prompts' own queries and MLP work vanish. Shallow prompts cannot be collapsed past the first
block and stay as extra tokens (surgery op ``prompt_tokens``). Whitening matrices and the factors A, B stay
in the run's ``checkpoint.pt``; the bundle is a plain graph.

Downstream split: the backbone must not have been trained on the downstream classes. With the backbone's own
data source, the default downstream classes are the source's classes the backbone never saw (digits backbone
on 0-4 -> prompts on 5-9); overlapping classes are refused. A different source is taken whole.

Deviations from the authors' code, on purpose: B takes one random column subset of ``W`` (their code draws a
different subset for every row); by default the covariance pools every token of every whitening image
(``covariance="tokens"``) instead of the image-mean ``X_bar`` (``"mean"``, theirs), whose rank is <= N (< d for
small inputs) and which, measured on the digits backbones, did not reliably lower the per-image burstiness; a
relative ridge ``eps * mean eigenvalue`` regularises ``Sigma`` (theirs has none); ``W_q``/``W_k`` are the
right-multiplied projections (``q = x W_q``), so ``X X~`` are the attention logits.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import Dataset

from edgevit.data import calibration_batch, data_ref, load_split
from edgevit.errors import EdgeVitError
from edgevit.methods.registry import MethodConfig, Source, register
from edgevit.settings import setting
from edgevit.train import TrainConfig, fit
from edgevit.train.probe import linear_probe
from edgevit.train.run import check_run_dir, finish_run, unseen_classes
from edgevit.vit import BundleMeta, apply_surgery, attention_blocks, block_inputs, load_bundle
from edgevit.vit.bundle import BaseArch
from edgevit.vit.model import num_blocks, num_tokens, patch_area, pooled_features, pooled_tokens, query_key_product
from edgevit.vit.prompts import prompted_forward, set_prefix_prompts, set_prompt_tokens

PROMPT_OPS = ("prefix_kv", "prompt_tokens")
Covariance = Literal["tokens", "mean"]


@dataclass
class PromptConfig(MethodConfig):
    """Prompt-tune a frozen backbone on a downstream task (BPT) and merge the prompts into the bundle.

    \b
    Example (backbone on digits 0-4, prompts on 5-9):
      edgevit train baseline --data digits --classes 0,1,2,3,4 -o runs/base04
      edgevit train prompts --model runs/base04 --data digits -o runs/bpt --deep
    """

    # From the probe head (LP-FT), which is the unsmoothed maximum-likelihood fit: lr 1e-2 disturbs it, and so does
    # label smoothing (photographs, 3 seeds: 0.889 with 0.1, 0.967 without; the probe 0.950; docs/references.md).
    training: ClassVar[dict] = {"epochs": 20, "lr": 3e-3, "label_smoothing": 0.0}

    # The paper's 50 (deep) and 100 (shallow) are for ViT-B at 224 px: 197 tokens. On 17 tokens, 50 prompts swamp
    # the image's keys: digits 5-9, 3 seeds, 0.864 with 50 and 0.892 with 17 (probe 0.868; docs/references.md).
    prompts: int | None = setting(None, "Prompt tokens per prompted layer (default the paper's 50 deep, 100 "
                                        "shallow, but never more than the image's tokens).")
    deep: bool = setting(True, "Prompts in every block (merged to prefix K/V) or only at the input (kept as "
                               "tokens).", flag="--deep/--shallow")
    rank: int | None = setting(None, "Bilinear rank p of P = A B^T (default min(50, width)).")
    variant: Literal["vpt", "fwhiten", "twhiten", "bilinear"] = setting(
        "bilinear", "vpt: plain prompts; fwhiten/twhiten: P = A W^T, W frozen/trained; bilinear: BPT.")
    whiten: bool | None = setting(None, "Initialise B from the ZCA whitening matrix (default: on for "
                                        "bilinear/fwhiten/twhiten; vpt never whitens).", flag="--whiten/--no-whiten")
    classes: list[str] | None = setting(None, "Downstream classes (default: DATA's classes the backbone was not "
                                              "trained on).")
    whiten_images: int = setting(100, "Training images the whitening uses.")
    eps: float = setting(0.1, "Whitening ridge, relative to the mean eigenvalue (must be > 0).")
    covariance: Covariance = setting("tokens", "Whitening statistics over all tokens, or over the image-mean X_bar "
                                               "(the authors', rank <= N).")
    trainable_top: int | None = setting(None, "Deep: train B (or W) only in the top K blocks, as the authors do (4 "
                                              "of 12); default ceil(depth/3). A is trained everywhere.")

    def check(self) -> None:
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise EdgeVitError(f"whitening eps must be a positive number, got {self.eps}")
        if self.whiten_images < 2:
            raise EdgeVitError(f"whitening needs at least 2 images, got {self.whiten_images}")

    def resolved(self, dim: int, layers: int, tokens: int) -> PromptConfig:
        """Defaults filled in for a ViT of width ``dim`` with ``layers`` prompted blocks reading ``tokens`` tokens
        (patches and prefix); validated."""
        whiten = self.whiten
        if self.variant == "vpt" and whiten:
            raise EdgeVitError("vpt prompts are plain prompts; --whiten needs fwhiten, twhiten or bilinear")
        if self.variant in ("fwhiten", "twhiten") and whiten is False:
            raise EdgeVitError(f"{self.variant} prompts are whitened by definition; drop --no-whiten")
        whiten = self.variant != "vpt" if whiten is None else whiten
        prompts = min(50 if self.deep else 100, tokens) if self.prompts is None else self.prompts
        rank = min(50, dim) if self.rank is None else self.rank
        if self.variant != "bilinear" and self.rank is not None:
            raise EdgeVitError("--rank applies to the bilinear variant only")
        if self.variant != "bilinear":
            rank = dim
        if not 1 <= rank <= dim:
            raise EdgeVitError(f"--rank must be in 1..{dim} (the width), got {rank}")
        if prompts < 1:
            raise EdgeVitError(f"--prompts must be >= 1, got {prompts}")
        top = self.trainable_top if self.trainable_top is not None else math.ceil(layers / 3)
        if self.deep and not 0 <= top <= layers:
            raise EdgeVitError(f"trainable_top must be in 0..{layers}, got {top}")
        return replace(self, prompts=prompts, rank=rank, whiten=whiten, trainable_top=top if self.deep else layers)


# --------------------------------------------------------------------------------------------- burstiness


def zca(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, dict[str, float]]:
    """ZCA whitening matrix ``W = U (S + eps * mean(S))^-1/2 U^T`` of ``Sigma = X X^T / columns``.

    Args:
        x: ``d x columns`` (features x samples).
        eps: ridge relative to the mean eigenvalue; ``Sigma`` may be rank-deficient (rank <= columns), and
            without it the null directions blow up.

    Returns:
        ``W`` (d x d, float32) and checks: effective rank of ``Sigma``, condition number after the ridge,
        and how far ``W Sigma W^T`` is from the identity on ``Sigma``'s well-determined range.
    """
    x = x.double()
    sigma = x @ x.T / x.shape[1]
    if not torch.isfinite(sigma).all() or sigma.trace() <= 0:
        raise EdgeVitError("whitening statistics are not finite or all zero: the backbone's activations are broken")
    s, u = torch.linalg.eigh(sigma)
    s = s.clamp_min(0)
    ridge = eps * s.mean()
    w = u @ torch.diag((s + ridge).rsqrt()) @ u.T
    kept = s > ridge
    whitened = (u.T @ w @ sigma @ w.T @ u).diagonal()[kept]
    checks = {"effective_rank": int(kept.sum()), "dim": int(s.numel()),
              "condition": float((s.max() + ridge) / (s.min() + ridge)),
              "range_identity_error": float((whitened - 1).abs().max()) if kept.any() else 0.0}
    if not torch.isfinite(w).all():
        raise EdgeVitError(f"whitening matrix is not finite (eps {eps}); raise eps")
    return w.float(), checks


def heavy_tail(x: torch.Tensor) -> dict[str, float]:
    """Burstiness of a tensor's entries: excess kurtosis and max|x| / median|x| (both 0-ish / small for a
    Gaussian: kurtosis 0, max/median ~ 5 for 10^4 samples)."""
    x = x.double().flatten()
    centred = x - x.mean()
    var = centred.pow(2).mean()
    kurtosis = float(centred.pow(4).mean() / var.pow(2) - 3) if var > 0 else 0.0
    magnitude = x.abs()
    return {"kurtosis": kurtosis, "max_median": float(magnitude.max() / magnitude.median().clamp_min(1e-12))}


@dataclass
class Whitening:
    """Per prompted block: the ZCA matrix and the burstiness of ``X~`` before/after it."""

    blocks: list[int]
    matrices: list[torch.Tensor]
    report: dict[str, Any]


def bursty_products(model: VisionTransformer, images: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
    """``X~ = W_q W_k^T X^T`` (``n x d x N``) of each of ``blocks`` for ``images``."""
    inputs = block_inputs(model, images, blocks)
    return [torch.einsum("ij,nkj->nik", query_key_product(model, b), inputs[b]) for b in blocks]


@torch.no_grad()
def measure_whitening(model: VisionTransformer, images: torch.Tensor, eps: float, covariance: str = "tokens",
                      probe: torch.Tensor | None = None) -> Whitening:
    """Whitening matrices of every attention block of ``model`` from ``images``, and the burstiness report.

    Args:
        model: the frozen backbone.
        images: the ~100 downstream training images the whitening is estimated from.
        eps: relative ridge of :func:`zca`.
        covariance: ``tokens``: ``Sigma`` over every token of every image (rank up to ``n*N``);
            ``mean``: the authors' recipe, ``Sigma`` of the image-mean ``X_bar`` (rank <= N).
        probe: held-out images the statistic is measured on (default ``images``): ``X~`` before and
            ``W X~`` after whitening, all entries pooled.
    """
    if covariance not in get_args(Covariance):
        raise EdgeVitError(f"unknown whitening covariance {covariance!r} ({', '.join(get_args(Covariance))})")
    blocks = attention_blocks(model)
    if not blocks:
        raise EdgeVitError("the backbone has no attention blocks left to prompt")
    fitted = bursty_products(model, images, blocks)
    probed = fitted if probe is None else bursty_products(model, probe, blocks)
    matrices, rows = [], []
    for b, x_fit, x_probe in zip(blocks, fitted, probed, strict=True):
        columns = x_fit.mean(0) if covariance == "mean" else x_fit.transpose(0, 1).flatten(1)
        w, checks = zca(columns, eps)
        matrices.append(w)
        before, after = heavy_tail(x_probe), heavy_tail(w @ x_probe)
        rows.append({"block": b, "kurtosis_before": round(before["kurtosis"], 3),
                     "kurtosis_after": round(after["kurtosis"], 3),
                     "max_median_before": round(before["max_median"], 2),
                     "max_median_after": round(after["max_median"], 2),
                     **{k: round(v, 4) if isinstance(v, float) else v for k, v in checks.items()}})
    mean = {key: round(sum(r[key] for r in rows) / len(rows), 3)
            for key in ("kurtosis_before", "kurtosis_after", "max_median_before", "max_median_after")}
    report = {"statistic": "excess kurtosis and max|x|/median|x| of the entries of X~ = W_q W_k^T X^T "
                           "(X: block inputs), before and after ZCA whitening (W X~)",
              "fit_images": int(images.shape[0]), "probe_images": int((images if probe is None else probe).shape[0]),
              "covariance": covariance, "eps": eps, "mean": mean, "blocks": rows}
    return Whitening(blocks=blocks, matrices=matrices, report=report)


# ------------------------------------------------------------------------------------------------ prompts


class PromptFactors(nn.Module):
    """The prompts of every prompted layer as ``P_l = A_l B_l^T`` (``vpt``: ``P_l = A_l``).

    Args:
        cfg: a resolved :class:`PromptConfig`.
        dim: the ViT width d.
        layers: number of prompted layers (1 for shallow prompts).
        whitening: ZCA matrices, one per prompted layer (needed unless ``vpt`` or ``--no-whiten``).
        patch_area: ``in_chans * patch_h * patch_w``, for VPT's uniform init range.
    """

    def __init__(self, cfg: PromptConfig, dim: int, layers: int, whitening: Sequence[torch.Tensor] | None,
                 patch_area: int) -> None:
        super().__init__()
        m, p = cfg.prompts, cfg.rank
        self.variant = cfg.variant
        if cfg.variant == "vpt":
            # VPT's init: uniform with the range Xavier would give a patch -> d projection.
            bound = math.sqrt(6.0 / (patch_area + dim))
            self.A = nn.Parameter(torch.empty(layers, m, dim).uniform_(-bound, bound))
            self.B = nn.ParameterList()
            return
        self.A = nn.Parameter(torch.randn(layers, m, p) * 0.02)
        factors = []
        for layer in range(layers):
            if cfg.whiten:
                w = whitening[layer]
                # bilinear: p random columns of W; f/tWhiten: all of W (P = A W^T).
                b = w[:, torch.randperm(dim)[:p]] if cfg.variant == "bilinear" else w
            else:
                b = nn.init.xavier_uniform_(torch.empty(dim, p))
            trainable = cfg.variant != "fwhiten" and layer >= layers - cfg.trainable_top
            factors.append(nn.Parameter(b.clone(), requires_grad=trainable))
        self.B = nn.ParameterList(factors)

    @property
    def tokens(self) -> int:
        return self.A.shape[1]

    def forward(self) -> torch.Tensor:
        """All layers' prompts, ``layers x m x d``."""
        if self.variant == "vpt":
            return self.A
        return torch.stack([a @ b.T for a, b in zip(self.A, self.B, strict=True)])


class PromptedViT(nn.Module):
    """A frozen ViT read with prompt tokens (the training-time graph, :func:`~edgevit.vit.prompts.prompted_forward`).

    Args:
        vit: the frozen backbone with its new head.
        factors: the prompts.
        deep: one prompt set per block in ``prompted`` (deep) or one at the input (shallow).
        prompted: the blocks that get deep prompts (those with attention).
    """

    def __init__(self, vit: VisionTransformer, factors: PromptFactors, deep: bool, prompted: Sequence[int]) -> None:
        super().__init__()
        self.vit = vit
        self.factors = factors
        self.deep = deep
        self.prompted = list(prompted)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return prompted_forward(self.vit, images, self.factors(), self.prompted if self.deep else None)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the head reads: the pooled features of the prompted backbone."""
        return prompted_forward(self.vit, images, self.factors(), self.prompted if self.deep else None, True)


@torch.no_grad()
def merge_prompts(tuner: PromptedViT) -> tuple[VisionTransformer, list[dict[str, Any]]]:
    """The deployable plain graph of ``tuner`` and the surgery ops that rebuild it.

    Deep prompts become prefix keys/values (``prefix_kv``); shallow ones stay tokens (``prompt_tokens``).
    """
    vit = copy.deepcopy(tuner.vit).eval()
    prompts = tuner.factors().detach().float()
    op: dict[str, Any] = {"op": "prefix_kv" if tuner.deep else "prompt_tokens", "tokens": prompts.shape[1]}
    if tuner.deep and tuner.prompted != list(range(num_blocks(vit))):
        op["blocks"] = tuner.prompted
    apply_surgery(vit, [op])
    if tuner.deep:
        for layer, b in enumerate(tuner.prompted):
            set_prefix_prompts(vit, b, prompts[layer])
    else:
        set_prompt_tokens(vit, prompts[0])
    for p in vit.parameters():
        p.requires_grad_(False)
    return vit, [op]


# ----------------------------------------------------------------------------------------------- training


def downstream_classes(meta: BundleMeta, data: str, classes: list[str] | None) -> list[str]:
    """The classes to learn: given, or DATA's classes the backbone was not trained on (see ``unseen_classes``)."""
    return unseen_classes(meta, data, classes, "prompts")


def check_backbone(vit: VisionTransformer, meta: BundleMeta) -> None:
    """A backbone we can prompt and merge exactly."""
    prompted = [s["op"] for s in meta.surgery if s.get("op") in PROMPT_OPS]
    if prompted:
        raise EdgeVitError(f"the backbone already carries prompts ({', '.join(prompted)}); start from a plain one")
    if pooled_tokens(vit) == slice(None):
        raise EdgeVitError("the backbone's head pools over prefix tokens; prompts would leak into it")


def build_tuner(vit: VisionTransformer, num_classes: int, cfg: PromptConfig, whitening: Whitening | None,
                seed: int) -> PromptedViT:
    """Freeze ``vit``, give it a fresh ``num_classes`` head, and wrap it with prompts (``cfg`` resolved)."""
    torch.manual_seed(seed)
    for p in vit.parameters():
        p.requires_grad_(False)
    vit.reset_classifier(num_classes)
    nn.init.trunc_normal_(vit.head.weight, std=0.02)
    nn.init.zeros_(vit.head.bias)
    blocks = attention_blocks(vit)
    layers = len(blocks) if cfg.deep else 1
    matrices = None
    if whitening is not None:
        matrices = whitening.matrices if cfg.deep else whitening.matrices[:1]
    factors = PromptFactors(cfg, vit.embed_dim, layers, matrices, patch_area(vit))
    return PromptedViT(vit, factors, cfg.deep, blocks)


def whitening_images(train_set: Dataset, val_set: Dataset, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` class-balanced training images to estimate the whitening from, and as many validation
    images to measure burstiness on (held out, so "after" is not just the fit)."""
    return (calibration_batch(train_set, min(count, len(train_set)), seed),
            calibration_batch(val_set, min(count, len(val_set)), seed))


def measure_burstiness(model_run: str | Path, data: str, classes: list[str] | None = None, images: int = 100,
                       eps: float = 0.1, covariance: str = "tokens", seed: int = 0) -> dict[str, Any]:
    """Burstiness report of a bundle's attention blocks on ``data`` (all its classes unless ``classes``):
    whitening fitted on ``images`` training images, statistics on as many validation images. The same
    report ``train prompts`` records in its provenance."""
    vit, meta = load_bundle(model_run)
    if not (math.isfinite(eps) and eps > 0):
        raise EdgeVitError(f"whitening eps must be a positive number, got {eps}")
    if images < 2:
        raise EdgeVitError(f"whitening needs at least 2 images, got {images}")
    splits = (load_split(data, split, meta.preprocessing, classes) for split in ("train", "val"))
    fit_images, probe = whitening_images(*splits, images, seed)
    report = measure_whitening(vit, fit_images, eps, covariance, probe).report
    return {"run": str(model_run), "data": data, **report}


@register("prompts", PromptConfig, source=Source(
    "--model", "Backbone bundle (frozen), trained on classes other than the downstream ones."))
def train_prompts(source: str | Path, data: str, out: Path, cfg: PromptConfig, train_cfg: TrainConfig,
                  resume: bool) -> Path:
    """Prompt-tune the frozen bundle ``source`` on a downstream task and write the merged bundle to ``out``.

    Args:
        source: the backbone bundle (e.g. a baseline trained on digits 0-4).
        data: ``digits`` or an image folder.
        out: the run directory (bundle + checkpoint with factors and whitening).
        cfg: prompt settings, with the downstream classes (default: those of DATA the backbone was not trained on).
        train_cfg: optimisation settings.
        resume: continue a killed run in ``out``.
    """
    vit, meta = load_bundle(source)
    check_backbone(vit, meta)
    classes = downstream_classes(meta, data, cfg.classes)
    cfg = cfg.resolved(vit.embed_dim, len(attention_blocks(vit)) if cfg.deep else 1, num_tokens(vit))
    check_run_dir(out, resume)
    pre = meta.preprocessing
    train_set, val_set = (load_split(data, split, pre, classes) for split in ("train", "val"))
    # Whitening is deterministic given the images, so a resumed run recomputes the same matrices (and the
    # checkpoint restores the factors anyway); the report goes into the provenance either way.
    fit_images, probe = whitening_images(train_set, val_set, cfg.whiten_images, train_cfg.seed)
    whitening = measure_whitening(vit, fit_images, cfg.eps, cfg.covariance, probe)
    test_set = load_split(data, "test", pre, classes)
    reference = linear_probe(functools.partial(pooled_features, vit.eval()), train_set, val_set, test_set)
    tuner = build_tuner(vit, len(classes), cfg, whitening if cfg.whiten else None, train_cfg.seed)
    if not resume:  # LP-FT: the head starts as the probe of the prompted features (the checkpoint restores it)
        start = linear_probe(tuner.eval().features, train_set, val_set, classes=len(classes))
        tuner.vit.head.weight.data.copy_(start.weight)
        tuner.vit.head.bias.data.copy_(start.bias)
    description = f"prompts {cfg.variant}-{'deep' if cfg.deep else 'shallow'}"
    result = fit(tuner, load_split(data, "train", pre, classes, augment=train_cfg.augment), train_cfg, out,
                 val_set=val_set, resume=resume, description=description)
    tuner.cpu().eval()
    merged, ops = merge_prompts(tuner)
    kwargs = {**meta.base.kwargs, "num_classes": len(classes)}
    out_meta = BundleMeta(base=BaseArch(name=meta.base.name, kwargs=kwargs), surgery=[*meta.surgery, *ops],
                          preprocessing=pre, classes=classes, data=data_ref(data, classes))
    with torch.no_grad():
        probe = calibration_batch(val_set, min(64, len(val_set)))
        merge_error = float((tuner(probe) - merged(probe)).abs().max())
    trainable = sum(p.numel() for n, p in tuner.named_parameters() if p.requires_grad and ".head." not in n)
    metrics = {"val_top1_per_epoch": [round(h["val_top1"], 5) for h in result.history],
               "merge_max_abs_diff": merge_error}
    metrics["references"] = {"linear probe": {**reference.record(), "graph": "source"}}
    return finish_run(out, merged, out_meta, "prompts", cfg, train_cfg, result, metrics, backbone=str(source),
                      backbone_classes=meta.classes, prompt_params=trainable, burstiness=whitening.report)
