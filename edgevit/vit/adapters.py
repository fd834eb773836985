"""Reparameterizable adapters with per-sample scales (DATA), and the ``adapter_scales`` surgery op.

Liao et al., *Decomposed Attention-based Task Adaptation for Rehearsal-Free Continual Learning* (arXiv
2502.11482, code github.com/Xnhyacinth/DATA); the port to ViTs is ours. This file is the graph side only:
what a deployed DATA model computes. Training (task components, orthogonalisation, losses) lives in
``edgevit.methods.continual``.

* Every adapted Linear (``qkv``, ``proj``, ``fc1``, ``fc2``) computes ``y = W0 x + b + U diag(s) D x`` where
  ``D`` (``r x in``) and ``U`` (``out x r``) stack the adapter paths (DATA: a low-rank path of rank r1 and
  a high-rank path of rank r2) and ``s`` repeats each path's per-sample scale over its rank. With scales
  ``s1, s2`` this is ``W0 x + s1 U1 D1 x + s2 U2 D2 x``.
* Blocks are grouped (e.g. 4 per group); at the input ``h`` (``B x N x d``) of each group a router computes
  one scale per sample and path from component matrices ``K, A, W`` (``R x d`` per path):
  ``a = normalize_R(h A^T)``, ``c = rowsum(normalize_d(K)) * rowsum(W) / sqrt(d)``,
  ``s = sigmoid(sum_{n,k} a[b,n,k] c_k)``, and hands it to the group's adapted linears.
* Folding: with constant scales ``s_bar`` the adapters collapse into the weights,
  ``W' = W0 + U diag(s_bar) D``, which is the plain base graph (:func:`folded_state_dict`).

Everything exports with standard ONNX ops (MatMul, Mul, ReduceSum, ReduceL2/Div, Sigmoid).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgevit.vit.surgery import register

ROUTERS = "adapter_routers"


class ScaledLinear(nn.Module):
    """``y = x W0^T + b + ((x D^T) * s) U^T``: a Linear plus adapter paths with per-sample path scales.

    ``weight``/``bias`` keep ``nn.Linear``'s names, so a base checkpoint's keys are unchanged and folding
    gives back an ``nn.Linear``.

    Args:
        in_features: input width.
        out_features: output width.
        ranks: rank of each adapter path, e.g. ``(4, 16)``; ``down``/``up`` stack them in this order.
        bias: whether the base Linear has a bias.
    """

    def __init__(self, in_features: int, out_features: int, ranks: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        if not ranks or min(ranks) < 1:
            raise ValueError(f"adapter ranks must be positive, got {list(ranks)}")
        self.in_features, self.out_features, self.ranks = in_features, out_features, tuple(ranks)
        rank = sum(ranks)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.down = nn.Parameter(torch.zeros(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        # path -> rank columns as a constant matrix: the per-rank scale vector is one MatMul in the graph.
        spread = torch.zeros(len(ranks), rank)
        for p, (lo, r) in enumerate(zip(_offsets(ranks), ranks, strict=True)):
            spread[p, lo:lo + r] = 1.0
        self.register_buffer("spread", spread, persistent=False)
        # Set by the group's router before every forward: B x paths. None = every path at scale 1 (LoRA).
        self.scales: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks: Sequence[int]) -> ScaledLinear:
        """Wrap ``linear``: its weight and bias become this module's (shared, not copied); adapters are zero."""
        module = cls(linear.in_features, linear.out_features, ranks, linear.bias is not None)
        module.weight = linear.weight
        module.bias = linear.bias
        return module.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.down)
        if self.scales is not None:
            hidden = hidden * (self.scales.to(x.dtype) @ self.spread.to(x.dtype)).unsqueeze(-2)
        return F.linear(x, self.weight, self.bias) + F.linear(hidden, self.up)

    def delta(self, scales: torch.Tensor) -> torch.Tensor:
        """``U diag(s) D`` (``out x in``) for constant path scales ``scales`` (one per path)."""
        return (self.up * (scales.to(self.up.dtype) @ self.spread)) @ self.down

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={list(self.ranks)}"


def _offsets(ranks: Sequence[int]) -> list[int]:
    return [sum(ranks[:i]) for i in range(len(ranks))]


def decomposed_scales(h: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """DATA's decomposed attention weighting: one sigmoid scale per sample and path.

    Args:
        h: the group's input, ``B x N x d``.
        keys, attn, weights: the components ``K``, ``A``, ``W``, each ``P x R x d`` (P paths, R rows).

    Returns:
        ``B x P`` scales in (0, 1).
    """
    paths, rows, dim = attn.shape
    a = h @ attn.reshape(paths * rows, dim).T.to(h.dtype)
    a = a.reshape(a.shape[0], a.shape[1], paths, rows)                                     # B x N x P x R
    a = F.normalize(a, dim=-1)
    c = F.normalize(keys, dim=-1).sum(-1) * weights.sum(-1) / math.sqrt(dim)               # P x R
    # sum over tokens first: the same number, N times fewer multiplications than the authors' order.
    return (a.sum(1) * c.to(h.dtype)).sum(-1).sigmoid()


class Router(nn.Module):
    """One group's router: computes the scales at the group's input and hands them to its adapted linears.

    Subclasses say where the components come from (:meth:`components`): one tensor each in a bundle
    (:class:`ScaleRouter`), per-task pieces during continual training.
    """

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[ScaledLinear] = []    # plain list: the linears belong to the blocks, not here
        self.fixed: torch.Tensor | None = None   # constant scales (P,) instead of routing (fold tests)
        self.last: torch.Tensor | None = None    # the scales of the latest forward (calibration)

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(K, A, W)``, each ``P x R x d``."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed.to(h.dtype).expand(h.shape[0], -1)
        return decomposed_scales(h, *self.components())

    def route(self, block: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the group's first block."""
        scales = self(args[0])
        self.last = scales.detach()
        for linear in self.targets:
            linear.scales = scales


class ScaleRouter(Router):
    """A deployed router: constant components ``keys``, ``attn``, ``weights`` (``P x R x d`` each).

    Args:
        dim: model width d.
        paths: adapter paths P (2 for DATA).
        rows: component rows R (components per task x tasks seen).
    """

    def __init__(self, dim: int, paths: int, rows: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.zeros(paths, rows, dim))
        self.attn = nn.Parameter(torch.zeros(paths, rows, dim))
        self.weights = nn.Parameter(torch.zeros(paths, rows, dim))

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.keys, self.attn, self.weights


def block_groups(depth: int, group_size: int) -> list[list[int]]:
    """Consecutive groups of ``group_size`` blocks (the last one may be shorter)."""
    if group_size < 1:
        raise ValueError(f"group size must be positive, got {group_size}")
    return [list(range(i, min(depth, i + group_size))) for i in range(0, depth, group_size)]


def default_group_size(depth: int) -> int:
    """4 blocks per group (the authors'), fewer for shallow models so there are at least two groups."""
    return max(1, min(4, depth // 2))


def adapted_linears(block: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """``(parent, name)`` of each adaptable Linear of a block (a skipped attention contributes none)."""
    for parent_name, names in (("attn", ("qkv", "proj")), ("mlp", ("fc1", "fc2"))):
        parent = getattr(block, parent_name, None)
        for name in names:
            if parent is not None and isinstance(getattr(parent, name, None), nn.Linear | ScaledLinear):
                yield parent, name


def inject_adapters(model: VisionTransformer, ranks: Sequence[int], group_size: int,
                    routers: Sequence[Router] | None) -> list[ScaledLinear]:
    """Replace every block's qkv/proj/fc1/fc2 by a :class:`ScaledLinear` and route each group's scales.

    Args:
        model: the ViT to adapt (in place). Its Linears' weights are shared with the adapted modules.
        ranks: rank per adapter path.
        group_size: blocks per router group.
        routers: one per group (``len == ceil(depth / group_size)``), stored as ``model.adapter_routers``;
            ``None``: no routing, every path at scale 1 (plain LoRA).

    Returns:
        The adapted linears, in block order.
    """
    if hasattr(model, ROUTERS) or any(isinstance(m, ScaledLinear) for m in model.modules()):
        raise ValueError("the model already carries adapters")
    groups = block_groups(len(model.blocks), group_size)
    if routers is not None and len(routers) != len(groups):
        raise ValueError(f"{len(groups)} block groups need {len(groups)} routers, got {len(routers)}")
    adapted = []
    for g, group in enumerate(groups):
        for b in group:
            for parent, name in adapted_linears(model.blocks[b]):
                linear = ScaledLinear.from_linear(getattr(parent, name), ranks)
                setattr(parent, name, linear)
                adapted.append(linear)
                if routers is not None:
                    routers[g].targets.append(linear)
        if routers is not None:
            model.blocks[group[0]].register_forward_pre_hook(routers[g].route)
    if routers is not None:
        setattr(model, ROUTERS, nn.ModuleList(routers))
    return adapted


def routers_of(model: nn.Module) -> list[Router]:
    return list(getattr(model, ROUTERS, []))


@register("adapter_scales")
def adapter_scales(model: VisionTransformer, ranks: Sequence[int], group_size: int, rows: int) -> None:
    """DATA adapters on every block's qkv/proj/fc1/fc2 with one scale router per group of blocks."""
    groups = block_groups(len(model.blocks), group_size)
    inject_adapters(model, ranks, group_size, [ScaleRouter(model.embed_dim, len(ranks), rows) for _ in groups])


@torch.no_grad()
def mean_scales(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Calibrated constant scales: each router's mean scale over ``images`` (``groups x paths``)."""
    routers = routers_of(model)
    if not routers:
        raise ValueError("the model has no scale routers to calibrate")
    was_training = model.training
    model.eval()
    total = torch.zeros(len(routers), routers[0].components()[0].shape[0], dtype=torch.float64)
    device = next(model.parameters()).device
    for batch in images.split(batch_size):
        model(batch.to(device))
        total += torch.stack([r.last.double().sum(0).cpu() for r in routers])
    model.train(was_training)
    return (total / len(images)).float()


@torch.no_grad()
def folded_state_dict(model: nn.Module, scales: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The plain graph's weights: every :class:`ScaledLinear` folded with constant scales, routers dropped.

    Args:
        model: a ViT with injected adapters.
        scales: ``groups x paths`` constant scales (e.g. calibrated means), one row per router; linears
            without a router (and all of them when ``scales`` is None) fold at scale 1.

    Returns:
        A state dict that a model without adapters (same architecture) loads strictly.
    """
    routers = routers_of(model)
    if len(routers) != (0 if scales is None else scales.shape[0]):
        raise ValueError(f"{len(routers)} routers need {len(routers)} rows of scales")
    row_of = {id(linear): row for router, row in zip(routers, scales if routers else [], strict=True)
              for linear in router.targets}
    state = {}
    for name, module in model.named_modules():
        if name.split(".")[0] == ROUTERS:
            continue
        adapted = isinstance(module, ScaledLinear)
        for key, value in module.named_parameters(prefix=name, recurse=False):
            leaf = key.rsplit(".", 1)[-1]
            if adapted and leaf in ("down", "up"):
                continue
            if adapted and leaf == "weight":
                row = row_of.get(id(module), torch.ones(len(module.ranks)))
                value = value + module.delta(row)
            state[key] = value.detach().clone()
        for key, value in module.named_buffers(prefix=name, recurse=False):
            if key.rsplit(".", 1)[-1] not in module._non_persistent_buffers_set:
                state[key] = value.detach().clone()
    return state
