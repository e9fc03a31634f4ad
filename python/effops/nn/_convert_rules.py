"""Strict recognition for ``effops.nn.convert``.

A block is replaced only when every part of it that affects what it computes is understood:
the block and each part it runs are of an exact known class (a subclass may override
``forward``: timm's ``CondConvResidual`` subclasses ``InvertedResidual``, ``StdConv2d``
subclasses ``nn.Conv2d``), the block has exactly the children its class's ``forward`` uses
and no others (timm's space-to-depth ``conv_s2d`` stage in efficientnet_x / efficientnet_h
is a child the old name-based check never looked at: it was silently dropped), nothing is
hooked or has a per-instance ``forward``, and each conv / norm / activation / squeeze-excite
is of a configuration the fused kernels reproduce. Every check raises ``Unsupported`` with
the reason the converter reports.
"""

from __future__ import annotations

import importlib
from typing import Dict, Iterable, Optional, Tuple

import torch.nn as nn

from ._parts import Unsupported, padding_of


def _cls(module: str, name: str) -> Optional[type]:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _classes(*specs: Tuple[str, str]) -> Tuple[type, ...]:
    return tuple(c for c in (_cls(m, n) for m, n in specs) if c is not None)


_CACHE: Dict[str, object] = {}


def _memo(key: str, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def conv_types() -> Tuple[type, ...]:
    """Convolutions whose forward is conv2d with the module's own geometry (timm's Conv2dSame*
    pad like TensorFlow SAME first)."""
    return _memo("conv", lambda: (nn.Conv2d,) + _classes(("timm.layers.conv2d_same", "Conv2dSame"),
                                                          ("timm.layers.conv2d_same", "Conv2dSameExport")))


def bn_types() -> Tuple[type, ...]:
    return _memo("bn", lambda: (nn.BatchNorm2d,) + _classes(("timm.layers.norm_act", "BatchNormAct2d")))


def _act_table() -> Dict[type, str]:
    def make():
        table = {nn.Identity: "none", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu",
                 nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid"}
        for mod, name, act in (("timm.layers.activations", "Swish", "silu"),
                               ("timm.layers.activations_me", "SwishMe", "silu"),
                               ("timm.layers.activations", "HardSwish", "hardswish"),
                               ("timm.layers.activations_me", "HardSwishMe", "hardswish"),
                               ("timm.layers.activations", "Sigmoid", "sigmoid")):
            c = _cls(mod, name)
            if c is not None:
                table[c] = act
        return table
    return _memo("act", make)


# ----------------------------------------------------------------------------- generic checks
def no_hooks(block: nn.Module) -> None:
    """Hooks and per-instance forwards change what a module computes (old-style weight_norm is
    a forward pre-hook): a block carrying any is not converted."""
    for name, m in block.named_modules():
        where = name or "the block"
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            raise Unsupported(f"{where} has hooks")
        if "forward" in m.__dict__:
            raise Unsupported(f"{where} has its own forward")


def exact(m: nn.Module, classes: Iterable[type], what: str) -> None:
    if type(m) not in tuple(classes):
        raise Unsupported(f"{what} is {type(m).__name__}, not one of {sorted(c.__name__ for c in classes)}")


def children(block: nn.Module, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """The block has the children its forward uses, and nothing else (an extra child is a stage
    the fused replacement would silently drop)."""
    have = {n for n, _ in block.named_children()}
    required, optional = set(required), set(optional)
    missing, extra = required - have, have - required - optional
    if extra:
        raise Unsupported(f"unrecognised stage(s) {', '.join(sorted(extra))}")
    if missing:
        raise Unsupported(f"missing stage(s) {', '.join(sorted(missing))}")


def is_act(m: nn.Module) -> bool:
    return type(m) in _act_table()


def act(m: Optional[nn.Module], what: str) -> str:
    """The effops name of an activation module of an exact known class."""
    if m is None:
        return "none"
    name = _act_table().get(type(m))
    if name is None:
        raise Unsupported(f"{what}: activation {type(m).__name__} has no fused equivalent")
    if type(m) is nn.ReLU6 and (m.min_val, m.max_val) != (0.0, 6.0):
        raise Unsupported(f"{what}: ReLU6 with bounds {m.min_val}, {m.max_val}")
    return name


def identity(m: Optional[nn.Module], what: str) -> None:
    if m is not None and type(m) is not nn.Identity:
        raise Unsupported(f"{what} {type(m).__name__}")


def drop_path(m: Optional[nn.Module], what: str = "drop path") -> None:
    """Stochastic depth: identity in eval; in training the replacement calls the same module."""
    ok = (nn.Identity,) + _classes(("timm.layers.drop", "DropPath"), ("torchvision.ops.stochastic_depth", "StochasticDepth"))
    if m is not None:
        exact(m, ok, what)
        if type(m).__name__ == "StochasticDepth" and m.mode != "row":
            raise Unsupported(f"{what}: StochasticDepth mode {m.mode!r}")


# ----------------------------------------------------------------------------- convolutions
def conv(m: nn.Module, what: str) -> nn.Conv2d:
    exact(m, conv_types(), what)
    if m.padding_mode != "zeros":
        raise Unsupported(f"{what}: padding_mode={m.padding_mode!r}")
    padding_of(m)  # a string padding torch and the kernels read differently raises here
    return m


def pointwise(m: nn.Module, what: str) -> nn.Conv2d:
    conv(m, what)
    if tuple(m.kernel_size) != (1, 1) or tuple(m.stride) != (1, 1) or m.groups != 1:
        raise Unsupported(f"{what}: not a 1x1, stride 1, groups 1 conv")
    if padding_of(m) not in ((0, 0), "same"):
        raise Unsupported(f"{what}: a padded 1x1 conv")
    return m


def depthwise(m: nn.Module, what: str, channels: Optional[int] = None) -> nn.Conv2d:
    conv(m, what)
    if not (m.groups == m.in_channels == m.out_channels):
        raise Unsupported(f"{what}: not a depthwise conv (groups != channels, or a channel multiplier)")
    if channels is not None and m.in_channels != channels:
        raise Unsupported(f"{what}: {m.in_channels} channels where {channels} arrive")
    return m


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def is_pointwise(m: nn.Module) -> bool:
    try:
        pointwise(m, "")
    except Unsupported:
        return False
    return True


def is_squeeze_excite(m: nn.Module) -> bool:
    return type(m) in _classes(("timm.models._efficientnet_blocks", "SqueezeExcite"),
                               ("torchvision.ops.misc", "SqueezeExcitation"))


def chain(*convs: Tuple[nn.Conv2d, str]) -> None:
    """Each conv takes the channels the previous one produces."""
    for (a, _), (b, nb) in zip(convs, convs[1:]):
        if b.in_channels != a.out_channels:
            raise Unsupported(f"{nb}: {b.in_channels} input channels after {a.out_channels}")


# ----------------------------------------------------------------------------- norm layers
def batchnorm(m: nn.Module, what: str, channels: int) -> Optional[nn.Module]:
    """Check a BatchNorm2d / timm BatchNormAct2d over ``channels``; returns the activation module
    a BatchNormAct2d applies itself (None for a plain BatchNorm2d)."""
    exact(m, bn_types(), what)
    if not m.track_running_stats or m.running_mean is None or m.running_var is None:
        raise Unsupported(f"{what}: BatchNorm2d without running statistics")
    if m.num_features != channels:
        raise Unsupported(f"{what}: {m.num_features} features after a conv of {channels} channels")
    if type(m) is nn.BatchNorm2d:
        if set(n for n, _ in m.named_children()):
            raise Unsupported(f"{what}: BatchNorm2d with children")
        return None
    children(m, {"drop", "act"})
    identity(m.drop, f"{what}: dropout")
    act(m.act, what)
    return m.act


# ----------------------------------------------------------------------------- squeeze-excite
def squeeze_excite(m: Optional[nn.Module], what: str, channels: int) -> Optional[nn.Module]:
    """timm's efficientnet SqueezeExcite or torchvision's SqueezeExcitation over ``channels``
    (their forward: x * gate(expand(act(reduce(mean(x)))))); None for no SE."""
    if m is None or type(m) is nn.Identity:
        return None
    timm_se = _cls("timm.models._efficientnet_blocks", "SqueezeExcite")
    tv_se = _cls("torchvision.ops.misc", "SqueezeExcitation")
    if timm_se is not None and type(m) is timm_se:
        children(m, {"conv_reduce", "act1", "conv_expand", "gate"})
        first, last = m.conv_reduce, m.conv_expand
    elif tv_se is not None and type(m) is tv_se:
        children(m, {"avgpool", "fc1", "activation", "fc2", "scale_activation"})
        if type(m.avgpool) is not nn.AdaptiveAvgPool2d or m.avgpool.output_size not in (1, (1, 1)):
            raise Unsupported(f"{what}: pooling {m.avgpool!r} is not a global average")
        first, last = m.fc1, m.fc2
    else:
        raise Unsupported(f"{what}: squeeze-excite module {type(m).__name__}")
    for c, n in ((first, "reduce"), (last, "expand")):
        exact(c, (nn.Conv2d,), f"{what} {n} conv")
        if tuple(c.kernel_size) != (1, 1) or c.groups != 1:
            raise Unsupported(f"{what}: {n} conv is not 1x1")
    if first.in_channels != channels or last.out_channels != channels or last.in_channels != first.out_channels:
        raise Unsupported(f"{what}: gates {first.in_channels}->{last.out_channels} channels on {channels}")
    return m
