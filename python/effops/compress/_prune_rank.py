"""Ranking channels for ``prune``: the criteria (importance of each channel of a group) and the
plans (which channels of each group stay).

Per group (the default): every prunable group loses the same fraction ``amount`` of its channels,
its least important ones.

Global (``prune(..., global_ranking=True)``): the channels of all prunable groups are ranked
together and the ``amount`` fraction of all of them with the lowest *normalised* importance is
removed, so groups whose channels matter less lose more. A criterion's raw values are not
comparable across groups (a group's ``bn_scale`` sums |gamma| over 1-3 BatchNorms, ``l1`` grows
with the fan-in, ``taylor`` with the loss's sensitivity there), so each group's importances are
divided by their mean over the group (as Torch-Pruning's global pruning normalises by the mean):
a channel's score says how much it matters relative to its layer's typical channel. A group whose
importances are all zero (dead) scores zero everywhere and is cut to ``min_channels``; per-group
``round_to`` and ``min_channels`` apply after the global cut.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._prune_graph import Group


def _call(model: nn.Module, example_input):
    return model(*example_input) if isinstance(example_input, tuple) else model(example_input)


# ----------------------------------------------------------------------------- importance
def _rows(w: Tensor) -> Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).sum(1).double()


def _importance(model: nn.Module, g: Group, criterion: str, grads: Optional[Dict[int, Tensor]]) -> Tuple[Tensor, str]:
    imp = torch.zeros(g.size, dtype=torch.float64)
    if criterion == "bn_scale" and g.has_bn:
        for s in g.sites:
            if s.kind == "bn":
                imp += model.get_submodule(s.name).weight.detach().abs().double().cpu()
        return imp, "bn_scale"
    if criterion in ("bn_scale", "l1"):
        producers = [s for s in g.sites if s.kind in ("out", "dw")] or [s for s in g.sites if s.kind == "in"]
        for s in producers:
            w = model.get_submodule(s.name).weight
            imp += (_rows(w) if s.kind != "in" else _rows(w.transpose(0, 1))).cpu()
        return imp, "l1"
    for s in g.sites:  # taylor
        m = model.get_submodule(s.name)
        names = ("weight", "bias") if s.kind != "in" else ("weight",)
        for pn in names:
            p = getattr(m, pn, None)
            if p is None or grads.get(id(p)) is None:
                continue
            t = (p.detach() * grads[id(p)]).double()
            if s.kind == "in":
                t = t.transpose(0, 1)
            imp += t.reshape(t.shape[0], -1).sum(1).cpu()
    return imp.abs(), "taylor"


def _taylor_grads(model: nn.Module, example_input, loss_fn, targets) -> Dict[int, Tensor]:
    was = model.training
    model.eval()  # running statistics stay as they are; BN folds, gradients flow through the fused ops
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with torch.enable_grad():
            out = _call(model, example_input)
            loss = loss_fn(out) if loss_fn is not None else F.cross_entropy(out, targets)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"prune: loss_fn must return a scalar tensor, got "
                                 f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else list(loss.shape)}")
            gs = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was)
    return {id(p): g for p, g in zip(params, gs)}


# ----------------------------------------------------------------------------- plans
def _round_keep(n: int, k: int, round_to: int, min_channels: int) -> int:
    if round_to > 1:
        k = int(math.floor(k / round_to + 0.5)) * round_to
    return max(1, min(n, max(k, min(min_channels, n))))


def _keep_count(n: int, amount: float, round_to: int, min_channels: int) -> int:
    return _round_keep(n, n - int(math.floor(n * amount + 0.5)), round_to, min_channels)


def normalised(imp: Tensor) -> Tensor:
    """A group's importances divided by their mean (zeros for a group that is all zero)."""
    m = float(imp.mean()) if imp.numel() else 0.0
    return imp / m if m > 0 and math.isfinite(m) else torch.zeros_like(imp)


def _keep_counts(groups: List[Group], importances: List[Tensor], amount: float, round_to: int, min_channels: int,
                 global_ranking: bool) -> List[int]:
    if not global_ranking:
        return [_keep_count(g.size, amount, round_to, min_channels) for g in groups]
    scores = torch.cat([normalised(i) for i in importances])
    owner = torch.cat([torch.full((g.size,), j, dtype=torch.long) for j, g in enumerate(groups)])
    cut = torch.argsort(scores, stable=True)[:int(math.floor(scores.numel() * amount + 0.5))]
    removed = torch.bincount(owner[cut], minlength=len(groups)).tolist()
    return [_round_keep(g.size, g.size - r, round_to, min_channels) for g, r in zip(groups, removed)]


def _plans(groups, importances, amount, round_to, min_channels, global_ranking: bool = False
           ) -> List[Tuple[Group, Tensor]]:
    """(group, sorted indices of the channels kept) for every group that loses channels: each
    keeps its most important ones."""
    plans = []
    for g, imp, k in zip(groups, importances, _keep_counts(groups, importances, amount, round_to, min_channels,
                                                         global_ranking)):
        if k < g.size:
            order = torch.argsort(-imp, stable=True)[:k]
            plans.append((g, torch.sort(order).values))
    return plans
