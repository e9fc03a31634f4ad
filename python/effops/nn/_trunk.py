"""The stem and head of whole networks, for ``effops.nn.convert``.

A converted network's blocks run fused, but its first conv (3x3 stride 2 + BatchNorm + act) and
its last 1x1 conv (+ BatchNorm + act) ran in eager PyTorch between them: on a converted timm
efficientnet_b0 at batch 8 (1 thread) they took 11 ms of 66 under the profiler - BatchNorm on
channels_last maps 3.9 ms, the 1x1 head conv on torch's slow reference conv 3.6 ms, the
activations 0.8 ms. Here the stem is torch's conv with the BatchNorm folded into its weight and
bias and the activation in place; the head is one ``pw_conv`` with BN and act in its epilogue
(``_parts.conv_bn_act_forward``, the same code effops.models uses).

* torchvision ``Conv2dNormActivation`` (the stem and head of its EfficientNet, MobileNetV2/V3,
  and any such stage outside a converted block) -> ``FusedConvNormAct``: still an
  ``nn.Sequential`` with the same children (indexing, ``len``, state_dict keys unchanged).
* timm ``EfficientNet``, ``EfficientNetFeatures`` and ``MobileNetV3`` call ``conv_stem`` then
  ``bn1`` (and ``conv_head`` then ``bn2``) as siblings from their own forward, so no single child
  can be swapped for a fused one without changing the state_dict keys. Their instance's class is
  set to a subclass of its own class (same name, ``isinstance`` still true, same children and
  parameters) whose forward runs those pairs fused. That forward reproduces timm's, so it is
  used only where timm's method reads exactly the attributes it was written against
  (``_TIMM_FORWARDS``); anything else (another timm version's forward, hooks added later on the
  stem or head, gradient checkpointing, feature hooks) runs timm's own method.
"""

from __future__ import annotations

from typing import Dict

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import _convert_rules as R
from ._parts import ConvStage, Unsupported, _hooked, conv_bn_act_forward, pooled_conv


def _stage(conv: nn.Module, bn: nn.Module) -> ConvStage:
    """conv -> timm BatchNormAct2d / BatchNorm2d (+ its own act) as a ConvStage, or Unsupported."""
    R.conv(conv, "conv")
    act = R.batchnorm(bn, "norm", conv.out_channels)
    for m in (conv, bn, act, getattr(bn, "drop", None)):
        if m is not None and (_hooked(m) or "forward" in m.__dict__):
            raise Unsupported("hooks on the stem or head")
    return ConvStage(conv, bn, act, bn_has_act=act is not None)


# ------------------------------------------------------------------------------ torchvision
def _conv_norm_act(layers) -> ConvStage:
    """conv -> BatchNorm2d? -> activation? of exact known classes as a ConvStage, or Unsupported."""
    if not layers:
        raise Unsupported("an empty Conv2dNormActivation")
    conv = R.conv(layers[0], "conv")
    rest = list(layers[1:])
    bn = act = None
    if rest and isinstance(rest[0], nn.BatchNorm2d):
        bn = rest.pop(0)
        if R.batchnorm(bn, "norm", conv.out_channels) is not None:
            raise Unsupported("a norm layer with its own activation")
    if rest:
        act = rest.pop(0)
        R.act(act, "activation")
    if rest:
        raise Unsupported(f"unrecognised stage(s) after the activation: {[type(m).__name__ for m in rest]}")
    return ConvStage(conv, bn, act)


class FusedConvNormAct(nn.Sequential):
    """torchvision Conv2dNormActivation (conv -> BatchNorm2d? -> activation?) as one fused
    stage; the same children under the same names. Its layers are read at each call: one
    replaced or hooked since (e.g. by pruning) runs the layers as they are."""

    def __init__(self, original: nn.Module):
        R.no_hooks(original)
        _conv_norm_act(list(original))
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self._original_class = f"{type(original).__module__}.{type(original).__qualname__}"
        if hasattr(original, "out_channels"):  # torchvision's attribute
            self.out_channels = original.out_channels
        self._cache: Dict[str, object] = {}

    def forward(self, x: Tensor) -> Tensor:
        layers = list(self._modules.values())
        try:
            if _hooked(*layers):
                raise Unsupported("hooks")
            stage = _conv_norm_act(layers)
        except Unsupported:
            return super().forward(x)
        return conv_bn_act_forward(x, stage, self._cache, "conv")

    def extra_repr(self) -> str:
        return f"fused replacement of {self._original_class}"


class FusedConvBnAct(nn.Module):
    """timm ConvBnAct (conv -> BatchNormAct2d [+ x]: MobileNetV3's last stage, a 1x1 conv to 960
    channels at 7x7, ran in eager with torch's slow 1x1 conv) as one fused stage; the same
    children under the same names."""

    def __init__(self, original: nn.Module):
        R.no_hooks(original)
        R.children(original, {"conv", "bn1"}, {"aa", "drop_path"})
        R.identity(getattr(original, "aa", None), "anti-aliasing layer")
        R.drop_path(getattr(original, "drop_path", None))
        _stage(original.conv, original.bn1)
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.has_skip = bool(original.has_skip)
        self._original_class = f"{type(original).__module__}.{type(original).__qualname__}"
        self._cache: Dict[str, object] = {}

    def forward(self, x: Tensor) -> Tensor:
        try:
            stage = _stage(self.conv, self.bn1)
        except Unsupported:  # replaced or hooked since the conversion: the modules as they are
            out = self.bn1(self.conv(x))
        else:
            out = conv_bn_act_forward(x, stage, self._cache, "conv")
        aa = getattr(self, "aa", None)
        if aa is not None and type(aa) is not nn.Identity:
            out = aa(out)
        if self.has_skip:
            drop = getattr(self, "drop_path", None)
            out = (drop(out) if drop is not None else out) + x
        return out

    def extra_repr(self) -> str:
        return f"fused replacement of {self._original_class}"


# ------------------------------------------------------------------------------ timm
class _FusedTrunk:
    """What the fused subclasses of timm's network classes share (first in their bases)."""

    def _effops_conv_bn(self, name: str, conv: nn.Module, bn: nn.Module, x: Tensor) -> Tensor:
        try:
            stage = _stage(conv, bn)
        except Unsupported:  # replaced or hooked since the conversion: the modules as they are
            return bn(conv(x))
        cache = self.__dict__.get("_effops_cache")
        if cache is None:
            cache = self.__dict__["_effops_cache"] = {}
        return conv_bn_act_forward(x, stage, cache, name)

    def __reduce_ex__(self, protocol):  # pickle / deepcopy: rebuilt from timm's class
        state = {k: v for k, v in self.__dict__.items() if k != "_effops_cache"}
        return (_rebuild, (type(self)._effops_base,), state)


class _EfficientNet(_FusedTrunk):
    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:
            return super().forward_features(x)
        x = self._effops_conv_bn("stem", self.conv_stem, self.bn1, x)
        x = self.blocks(x)
        return self._effops_conv_bn("head", self.conv_head, self.bn2, x)


class _MobileNetV3(_FusedTrunk):
    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:
            return super().forward_features(x)
        x = self._effops_conv_bn("stem", self.conv_stem, self.bn1, x)
        return self.blocks(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        # the head conv runs on the pooled 1x1 map: one GEMM (torch's slow reference conv took
        # ~1 ms for 960 -> 1280 at batch 8)
        x = self.global_pool(x)
        x = pooled_conv(self.conv_head, x)
        x = self.act2(self.norm_head(x))
        x = self.flatten(x)
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)


class _EfficientNetFeatures(_FusedTrunk):
    def forward(self, x: Tensor):
        if self.grad_checkpointing or self.feature_hooks is not None:
            return super().forward(x)
        x = self._effops_conv_bn("stem", self.conv_stem, self.bn1, x)
        features = [x] if 0 in self._stage_out_idx else []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i + 1 in self._stage_out_idx:
                features.append(x)
        return features


# (timm module, class) -> (the mixin, {each method it overrides: the names timm's method reads},
# the (conv, norm) pairs it fuses)
_TIMM_FORWARDS = {
    ("timm.models.efficientnet", "EfficientNet"): (
        _EfficientNet,
        {"forward_features": ("conv_stem", "bn1", "grad_checkpointing", "torch", "jit", "is_scripting",
                              "checkpoint_seq", "blocks", "conv_head", "bn2")},
        (("conv_stem", "bn1"), ("conv_head", "bn2"))),
    ("timm.models.efficientnet", "EfficientNetFeatures"): (
        _EfficientNetFeatures,
        {"forward": ("conv_stem", "bn1", "feature_hooks", "_stage_out_idx", "append", "enumerate", "blocks",
                     "grad_checkpointing", "torch", "jit", "is_scripting", "checkpoint", "get_output", "device",
                     "list", "values")},
        (("conv_stem", "bn1"),)),
    ("timm.models.mobilenetv3", "MobileNetV3"): (
        _MobileNetV3,
        {"forward_features": ("conv_stem", "bn1", "grad_checkpointing", "torch", "jit", "is_scripting",
                              "checkpoint_seq", "blocks"),
         "forward_head": ("global_pool", "conv_head", "norm_head", "act2", "flatten", "drop_rate", "F", "dropout",
                          "training", "classifier")},
        (("conv_stem", "bn1"),)),
}

_SUBCLASSES: Dict[type, type] = {}


def _timm_entry(cls: type):
    for (mod, name), entry in _TIMM_FORWARDS.items():
        if cls.__module__ == mod and cls.__name__ == name and R._cls(mod, name) is cls:
            return entry
    return None


def _fused_class(base: type) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is None:
        mixin = _timm_entry(base)[0]
        # timm's module and names: code that recognises timm's networks by name (prune) still does
        cls = type(base.__name__, (mixin, base), {"__module__": base.__module__, "__qualname__": base.__qualname__,
                                                  "__doc__": base.__doc__, "_effops_base": base})
        _SUBCLASSES[base] = cls
    return cls


def _rebuild(base: type):
    return object.__new__(_fused_class(base))


def is_timm_trunk(m: nn.Module) -> bool:
    return _timm_entry(type(m)) is not None


def fuse_timm_trunk(m: nn.Module) -> str:
    """Set ``m``'s class to the fused subclass of its timm class (in place); returns what was fused,
    or raises Unsupported with the reason."""
    mixin, methods, pairs = _timm_entry(type(m))
    for method, names in methods.items():
        code = getattr(getattr(type(m), method), "__code__", None)
        if code is None or tuple(code.co_names) != names:
            raise Unsupported(f"timm's {type(m).__name__}.{method} is not the one effops reproduces "
                              "(another timm version): stem and head left in eager")
        if method in m.__dict__:
            raise Unsupported(f"the network has its own {method}")
    if "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks:
        raise Unsupported("the network has hooks or its own forward")
    fused = []
    for conv, bn in pairs:
        if not (isinstance(getattr(m, conv, None), nn.Module) and isinstance(getattr(m, bn, None), nn.Module)):
            raise Unsupported(f"no {conv} / {bn}")
        try:
            _stage(getattr(m, conv), getattr(m, bn))
            fused.append(f"{conv}+{bn}")
        except Unsupported as e:
            fused.append(f"{conv}+{bn} kept ({e})")
    if not any("kept" not in f for f in fused):
        raise Unsupported("; ".join(fused))
    m.__class__ = _fused_class(type(m))
    return ", ".join(fused)
