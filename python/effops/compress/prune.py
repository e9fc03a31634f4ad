"""Structured channel pruning that leaves a smaller *dense* network of the same module types.

``prune(model, amount=0.5, example_input=x)`` finds the channel groups of ``model`` (see
``_prune_graph``: MBConv expansion channels with their depthwise channel and SE rows, SE reduced
channels, block outputs joined by residual adds, BiFPN channels shared by every node that fuses
them, head channels shared across levels), ranks each group's channels by a criterion, removes
the lowest ``amount`` of every group and slices every weight that reads or writes them. The
result is a deep copy; its effops modules still run on the fused kernels (their prepared-weight
caches are dropped and rebuilt on the next call), and constructor-visible attributes (conv
``in_channels``/``out_channels``/``groups``, BatchNorm ``num_features``, ``num_features`` /
``feature_channels`` / EfficientDet's config) follow the new widths.

Criteria (per channel of a group, summed over the group's layers):

* ``bn_scale``: ``|gamma|`` of every BatchNorm over the channel (Liu et al. 2017, "Network
  Slimming"); a group without BatchNorm (SE reduced channels) falls back to ``l1``.
* ``l1``: L1 norm of the filters producing the channel (Li et al. 2017, "Pruning Filters for
  Efficient ConvNets"): output rows of convs / linears and depthwise filters.
* ``taylor``: ``|sum_w w * dL/dw|`` over every weight indexed by the channel - the first-order
  change of the loss when the channel is removed (Molchanov et al. 2019). Needs a loss:
  ``loss_fn(output)`` or ``targets`` (cross-entropy) for ``example_input``.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._prune_graph import Group, Site, build_groups
from ._prune_rank import _call, _importance, _keep_count, _plans, _taylor_grads  # noqa: F401 (_keep_count: tests)

CRITERIA = ("bn_scale", "l1", "taylor")


# ----------------------------------------------------------------------------- counting
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _clone(model: nn.Module) -> nn.Module:
    """A deep copy without the prepared-weight caches (copies of the weights in kernel layouts,
    rebuilt on the next inference call anyway)."""
    memo = {}
    for m in model.modules():
        for attr in ("_cache", "_caches"):
            v = m.__dict__.get(attr)
            if isinstance(v, dict):
                memo[id(v)] = {}
            elif isinstance(v, list):
                memo[id(v)] = [[{} for _ in row] for row in v]
        fold = m.__dict__.get("_effops_fold")
        if fold is not None:
            memo[id(fold)] = None
    return copy.deepcopy(model, memo)


def _to_meta(example_input):
    if isinstance(example_input, tuple):
        return tuple(t.to("meta") for t in example_input)
    return example_input.to("meta")


def _count(model: nn.Module, example_input) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            _call(model, example_input)
    finally:
        model.train(was)
    return int(fc.get_total_flops()) // 2


def count_macs(model: nn.Module, example_input, *, meta: bool = True) -> int:
    """Multiply-adds of one forward call on ``example_input`` (eval mode), counted by
    ``torch.utils.flop_counter`` (effops's fused ops declare their formulas; it counts 2 per
    multiply-add of convolutions and matrix products; BatchNorm, activations and adds are not
    counted). With ``meta`` (default) the count runs on a copy on the meta device (shapes
    only, no arithmetic), falling back to a real forward pass if the model cannot run there."""
    if meta:
        try:
            return _count(_clone(model).to("meta"), _to_meta(example_input))
        except Exception:  # noqa: BLE001 - a model with a data-dependent step: count on real data
            pass
    return _count(model, example_input)


# ----------------------------------------------------------------------------- the report
@dataclass
class GroupReport:
    name: str
    before: int
    after: int
    criterion: str
    layers: List[str]


@dataclass
class PruneReport:
    """What ``prune`` did: per group and per layer channels before/after, params, MACs, and the
    groups it kept whole with the reason."""

    family: str
    criterion: str
    amount: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: List[GroupReport] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)  # (group, why it was not pruned)
    layers: List[Tuple[str, str, Tuple[int, int], Tuple[int, int]]] = field(default_factory=list)
    opaque: List[Tuple[str, str]] = field(default_factory=list)  # layers prune does not understand
    global_ranking: bool = False  # amount: of all prunable channels, ranked together

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict:
        return {"family": self.family, "criterion": self.criterion, "amount": self.amount,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "groups": [vars(g) for g in self.groups], "kept": [list(k) for k in self.kept],
                "layers": [[n, t, list(a), list(b)] for n, t, a, b in self.layers],
                "opaque": [list(o) for o in self.opaque], "global_ranking": self.global_ranking}

    def __str__(self) -> str:
        how = "of all channels, ranked globally" if self.global_ranking else "of each group"
        lines = [f"effops.compress.prune ({self.family}, {self.criterion}, amount {self.amount:.3f} {how}): "
                 f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%}), "
                 f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.1%})"]
        lines.append(f"  {len(self.groups)} channel groups pruned:")
        for g in self.groups:
            lines.append(f"    {g.name:<48} {g.before:>5} -> {g.after:<5} ({g.criterion}, {len(g.layers)} layers)")
        if self.kept:
            lines.append(f"  {len(self.kept)} groups kept:")
            for name, why in self.kept:
                lines.append(f"    {name:<48} {why}")
        changed = [ly for ly in self.layers if ly[2] != ly[3]]
        lines.append(f"  {len(changed)} of {len(self.layers)} layers changed (in, out):")
        for n, t, a, b in changed:
            lines.append(f"    {n:<56} {t:<12} {a} -> {b}")
        return "\n".join(lines)


def _layer_shapes(model: nn.Module) -> Dict[str, Tuple[str, Tuple[int, int]]]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[n] = ("Conv2d" if m.groups == 1 else f"Conv2d/g{m.groups}", (m.in_channels, m.out_channels))
        elif isinstance(m, nn.Linear):
            out[n] = ("Linear", (m.in_features, m.out_features))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[n] = ("BatchNorm", (m.num_features, m.num_features))
    return out


# ----------------------------------------------------------------------------- slicing
def _take(t: Tensor, dim: int, keep: Tensor) -> Tensor:
    out = t.detach().index_select(dim, keep.to(t.device))
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out.clone()


def _set_param(m: nn.Module, name: str, dim: int, keep: Tensor) -> None:
    p = getattr(m, name, None)
    if p is None:
        return
    new = _take(p, dim, keep)
    if isinstance(p, nn.Parameter):
        setattr(m, name, nn.Parameter(new, requires_grad=p.requires_grad))
    else:
        setattr(m, name, new)


def _slice_site(model: nn.Module, s: Site, keep: Tensor) -> None:
    m = model.get_submodule(s.name)
    n = len(keep)
    if s.kind == "bn":
        for pn in ("weight", "bias", "running_mean", "running_var"):
            _set_param(m, pn, 0, keep)
        m.num_features = n
    elif s.kind in ("out", "gate"):
        _set_param(m, "weight", 0, keep)
        _set_param(m, "bias", 0, keep)
        if isinstance(m, nn.Linear):
            m.out_features = n
        else:
            m.out_channels = n
    elif s.kind == "dw":
        _set_param(m, "weight", 0, keep)
        _set_param(m, "bias", 0, keep)
        m.in_channels = m.out_channels = m.groups = n
    elif s.kind == "in":
        _set_param(m, "weight", 1, keep)
        if isinstance(m, nn.Linear):
            m.in_features = n
        else:
            m.in_channels = n
    else:  # pragma: no cover - the graph only makes the kinds above
        raise AssertionError(s.kind)


def _last_bn_width(m: nn.Module) -> int:
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    return bns[-1].num_features


def _bifpn_layer_widths(layer: nn.Module) -> None:
    """A BiFPNLayer's input widths, read back from the nodes that consume each input: the
    resample conv's input, or the node's own width where the input is fused as it is."""
    if not hasattr(layer, "in_channels"):
        return
    widths = list(layer.in_channels)
    for node in layer.fnode:
        for o, r in node.combine.resample.items():
            o = int(o)
            if o < len(widths):
                widths[o] = r.conv.conv.in_channels if r.conv is not None else node.after_combine.conv.conv_dw.in_channels
    layer.in_channels = widths


def _finalize(model: nn.Module) -> None:
    """Drop prepared-weight caches and make width attributes follow the sliced layers."""
    from dataclasses import replace

    from ..models.efficientdet import EfficientDet
    from ..models.efficientnet import EfficientNet, EfficientNetFeatures

    for m in model.modules():
        if isinstance(getattr(m, "_cache", None), dict):
            m._cache = {}
        if isinstance(getattr(m, "_caches", None), list):
            m._caches = [[{} for _ in row] for row in m._caches]
        if "_effops_fold" in m.__dict__:
            del m.__dict__["_effops_fold"]
    from ..nn.bifpn import BiFPN, BiFPNLayer

    for m in model.modules():
        if type(m) is BiFPN:  # the widths its forward checks the features against
            for layer in m.cell:
                _bifpn_layer_widths(layer)
            if len(m.cell):
                m.in_channels = list(m.cell[0].in_channels[:len(m.in_channels)])
        elif type(m) is BiFPNLayer and not isinstance(getattr(m, "in_channels", None), list):
            _bifpn_layer_widths(m)
    for m in model.modules():
        if type(m) is EfficientNet:
            m.num_features = m.conv_head.out_channels
        elif type(m) is EfficientNetFeatures:
            taps = [int(f["module"].split(".")[1]) for f in m.feature_info]
            m.feature_channels = [_last_bn_width(m.blocks[i]) for i in taps]
            for f, c in zip(m.feature_info, m.feature_channels):
                f["num_chs"] = c
    if type(model) is EfficientDet:
        bb = model.backbone
        chans = tuple(bb.feature_channels) if hasattr(bb, "feature_channels") else model.config.backbone_channels
        model.config = replace(model.config, backbone_channels=chans,
                               fpn_channels=model.class_net.predict.conv_dw.in_channels)
    tn, mod = type(model).__name__, type(model).__module__
    if mod.startswith("timm.") and tn == "EfficientNet":
        model.num_features = model.head_hidden_size = model.bn2.num_features
    elif mod.startswith("timm.") and tn == "MobileNetV3":
        model.num_features = model.conv_head.in_channels
        model.head_hidden_size = model.conv_head.out_channels
    if mod.startswith("timm.") and isinstance(getattr(model, "feature_info", None), list):
        for f in model.feature_info:
            try:
                f["num_chs"] = _last_bn_width(model.get_submodule(f["module"]))
            except (AttributeError, IndexError, KeyError):
                pass
    if hasattr(model, "last_channel") and mod.startswith("torchvision."):
        lin = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
        if lin:
            model.last_channel = lin[0].in_features if tn == "MobileNetV2" else lin[0].out_features


# ----------------------------------------------------------------------------- checks
def _check_amount(amount) -> float:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"prune: amount must be a float in (0, 1), got {type(amount).__name__}")
    a = float(amount)
    if not (0.0 < a < 1.0):
        raise ValueError(f"prune: amount must be in (0, 1) (the fraction of each group's channels removed), got {amount}")
    return a


def _check_input(model: nn.Module, example_input):
    ok = isinstance(example_input, Tensor) or (
        isinstance(example_input, (tuple, list)) and example_input and all(isinstance(t, Tensor) for t in example_input))
    if not ok:
        raise TypeError(f"prune: example_input must be a tensor (or a tuple of tensors) the model accepts, "
                        f"got {type(example_input).__name__}")
    example_input = tuple(example_input) if isinstance(example_input, (tuple, list)) else example_input
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _call(model, example_input)
    except Exception as e:  # noqa: BLE001 - any failure means the input does not fit the model
        shape = list(example_input.shape) if isinstance(example_input, Tensor) else [list(t.shape) for t in example_input]
        raise ValueError(f"prune: example_input of shape {shape} does not run through the model: "
                         f"{type(e).__name__}: {str(e)[:300]}") from None
    finally:
        model.train(was)
    return example_input, out


def _shapes(out) -> list:
    if isinstance(out, Tensor):
        return [tuple(out.shape)]
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in _shapes(o)]
    if isinstance(out, dict):
        return [s for k in sorted(out) for s in _shapes(out[k])]
    return [type(out).__name__]


def _ignored(groups: List[Group], ignore, model: nn.Module) -> Dict[str, str]:
    names = []
    by_id = {id(m): n for n, m in model.named_modules()}
    for item in (ignore or ()):
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"prune: ignore holds a {type(item).__name__} that is not a module of the model")
            names.append(by_id[id(item)])
        elif isinstance(item, str):
            if item not in dict(model.named_modules()):
                raise ValueError(f"prune: ignore names {item!r}, which is not a module of the model")
            names.append(item)
        else:
            raise TypeError(f"prune: ignore must hold module names or modules, got {type(item).__name__}")
    out = {}
    for g in groups:
        for s in g.sites:
            hit = next((n for n in names if n == "" or s.name == n or s.name.startswith(n + ".")), None)
            if hit is not None:
                out[g.name] = f"ignored (touches {hit!r}, named in ignore)"
                break
    return out


# ----------------------------------------------------------------------------- prune
def _apply(model: nn.Module, plans: List[Tuple[Group, Tensor]]) -> None:
    for g, keep in plans:
        for s in g.sites:
            _slice_site(model, s, keep)
    _finalize(model)


def prune(model: nn.Module, *, amount: Optional[float] = None, target_macs=None, criterion: str = "bn_scale",
          example_input, ignore: Sequence = (), loss_fn: Optional[Callable[[object], Tensor]] = None,
          targets: Optional[Tensor] = None, round_to: int = 1, min_channels: int = 1, global_ranking: bool = False):
    """Remove whole channels; returns ``(pruned_model, PruneReport)``. ``model`` is not changed.

    Args:
        amount: fraction of every prunable group's channels to remove, in (0, 1); with
            ``global_ranking``, the fraction of all prunable channels, ranked together.
        target_macs: instead of ``amount``: the MACs the pruned model may have on
            ``example_input`` (an int), or a fraction of the model's (a float in (0, 1)); the
            largest ``amount`` meeting it is found by bisection.
        criterion: ``'bn_scale'``, ``'l1'`` or ``'taylor'`` (see the module docstring).
        example_input: a tensor (or tuple) the model runs on; MACs are counted on it, the
            pruned model is checked on it.
        ignore: module names (or modules) whose channels must not change.
        loss_fn, targets: for ``'taylor'``: ``loss_fn(model(example_input))`` or
            cross-entropy against ``targets``.
        round_to: kept channels are a multiple of this (at least 1, at most the group).
        min_channels: never keep fewer than this many channels in a group.
        global_ranking: rank the channels of all groups together by the criterion normalised
            per group (``_prune_rank``): less important groups lose more, instead of every
            group losing the same fraction.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune: model must be a torch.nn.Module, got {type(model).__name__}")
    if (amount is None) == (target_macs is None):
        raise ValueError("prune: give exactly one of amount= and target_macs=")
    if criterion not in CRITERIA:
        raise ValueError(f"prune: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    for nm, v in (("round_to", round_to), ("min_channels", min_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"prune: {nm} must be an int >= 1, got {v!r}")
    if not isinstance(global_ranking, bool):
        raise TypeError(f"prune: global_ranking must be True or False, got {type(global_ranking).__name__}")
    if amount is not None:
        amount = _check_amount(amount)
    if criterion == "taylor" and loss_fn is None and targets is None:
        raise ValueError("prune: criterion='taylor' needs gradients: pass loss_fn (output -> scalar loss) or "
                         "targets (class labels for cross-entropy) for example_input")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"prune: loss_fn must be callable, got {type(loss_fn).__name__}")
    example_input, ref_out = _check_input(model, example_input)
    groups, opaque, family = build_groups(model)
    ign = _ignored(groups, ignore, model)
    prunable = [g for g in groups if g.fixed is None and g.name not in ign and g.size > 1]
    kept = [(g.name, g.fixed or ign.get(g.name) or "a single channel") for g in groups if g not in prunable]
    if not prunable:
        why = "; ".join(f"{n}: {r}" for n, r in kept[:6]) or "no channel groups at all"
        raise ValueError(f"prune: the model ({family}) has no prunable layer ({why})")
    grads = _taylor_grads(model, example_input, loss_fn, targets) if criterion == "taylor" else None
    scored = [_importance(model, g, criterion, grads) for g in prunable]
    importances = [s[0] for s in scored]
    macs_before = count_macs(model, example_input)

    def build(a: float, base: nn.Module = model):
        m = _clone(base)
        _apply(m, _plans(prunable, importances, a, round_to, min_channels, global_ranking))
        return m

    if target_macs is not None:
        amount = _search(model, build, example_input, target_macs, macs_before)
    pruned = build(amount)
    macs_after = count_macs(pruned, example_input)
    _, out = _check_input(pruned, example_input)
    if _shapes(out) != _shapes(ref_out):
        raise RuntimeError(f"prune: internal error: the pruned model's outputs have shapes {_shapes(out)}, the "
                           f"model's {_shapes(ref_out)}; please report this model")
    before, after = _layer_shapes(model), _layer_shapes(pruned)
    widths = {id(g): g.size for g in prunable}
    for g, keep in _plans(prunable, importances, amount, round_to, min_channels, global_ranking):
        widths[id(g)] = len(keep)
    rep = PruneReport(family, criterion, amount, count_params(model), count_params(pruned), macs_before, macs_after,
                      groups=[GroupReport(g.name, g.size, widths[id(g)], used, sorted({s.name for s in g.sites}))
                              for g, (_, used) in zip(prunable, scored)],
                      kept=kept, opaque=list(opaque),
                      layers=[(n, t, a, after[n][1]) for n, (t, a) in before.items() if n in after],
                      global_ranking=global_ranking)
    return pruned, rep


def _search(model, build, example_input, target_macs, macs_before) -> float:
    """The largest amount (to 1/2**10) whose pruned model has at most the target MACs; the
    candidates are built and counted on the meta device (shapes only)."""
    if isinstance(target_macs, bool) or not isinstance(target_macs, numbers.Real):
        raise TypeError(f"prune: target_macs must be an int (MACs) or a float in (0, 1) (a fraction), "
                        f"got {type(target_macs).__name__}")
    if isinstance(target_macs, numbers.Integral):
        target = int(target_macs)
    elif 0.0 < float(target_macs) < 1.0:
        target = int(float(target_macs) * macs_before)
    else:
        raise ValueError(f"prune: target_macs as a float must be a fraction in (0, 1), got {target_macs}")
    if not 0 < target < macs_before:
        raise ValueError(f"prune: target_macs must be below the model's {macs_before:,} MACs and > 0, got {target:,}")
    try:
        base, x = _clone(model).to("meta"), _to_meta(example_input)
        _count(build(0.5, base), x)
    except Exception:  # noqa: BLE001 - cannot run on meta: real copies
        base, x = model, example_input
    hi = 0.99
    least = _count(build(hi, base), x)
    if least > target:
        raise ValueError(f"prune: target_macs {target:,} is below what pruning can reach "
                         f"({least:,} MACs with 99% of every group removed)")
    lo = 0.0
    for _ in range(10):
        mid = (lo + hi) / 2
        if _count(build(mid, base), x) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------- reloading
def shrink_to(model: nn.Module, state_dict: Dict[str, Tensor]) -> nn.Module:
    """Slice a freshly built ``model`` (in place) to the widths of a pruned model's state_dict
    (keeping the first channels of each group) so that ``model.load_state_dict(state_dict)``
    loads it: pruned checkpoints are saved as plain state_dicts and reloaded this way."""
    groups, _, _ = build_groups(model)
    plans = []
    for g in groups:
        width = None
        for s in g.sites:
            key = f"{s.name}.weight" if s.name else "weight"
            t = state_dict.get(key)
            if t is None:
                continue
            width = t.shape[1] if s.kind == "in" else t.shape[0]
            break
        if width is not None and width != g.size:
            if g.fixed is not None or not 0 < width < g.size:
                raise ValueError(f"shrink_to: the state_dict gives {s.name} width {width}, the model has "
                                 f"{g.size} ({g.fixed or 'not a pruned width'})")
            plans.append((g, torch.arange(width)))
    _apply(model, plans)
    return model


__all__ = ["prune", "PruneReport", "GroupReport", "count_macs", "count_params", "shrink_to", "CRITERIA"]
