"""``effops.nn.convert(model)``: swap the depthwise-separable and inverted-residual blocks of
models users already have for fused ones.

Recognised blocks: timm ``DepthwiseSeparableConv`` and ``InvertedResidual`` (EfficientNet,
tf_EfficientNet with TF 'same' padding, MobileNetV2/V3, ...), torchvision ``MBConv``
(EfficientNet) and ``InvertedResidual`` (MobileNetV2, MobileNetV3), effdet's BiFPN fusion nodes
(``Fnode``: FpnCombine + after_combine -> weighted_fuse + fused separable conv) and its other
``SeparableConv2d`` layers (the heads). Each replacement keeps the original block's children under their original
names: the parameters and buffers are the same objects (shared, not copied), the state_dict
keys are unchanged (checkpoints load either way), and training works (see effops.nn.dwsep).
A block whose configuration the kernels cannot reproduce exactly (an unknown activation, a
non-BatchNorm norm layer, grouped convs, ...) is left untouched and reported with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from ._parts import (
    ConvStage,
    Unsupported,
    act_of,
    bn_act,
    check_bn,
    check_depthwise,
    check_pointwise,
    mbconv_forward,
    padding_of,
    se_gate_of,
    sepconv_forward,
)


@dataclass
class ConvertReport:
    replaced: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, original, replacement)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, original, reason)

    def __str__(self) -> str:
        lines = [f"effops.nn.convert: {len(self.replaced)} blocks replaced, {len(self.skipped)} left as they were"]
        for name, orig, new in self.replaced:
            lines.append(f"  replaced {name or '<root>'}: {orig} -> {new}")
        for name, orig, why in self.skipped:
            lines.append(f"  kept     {name or '<root>'}: {orig} ({why})")
        return "\n".join(lines)


class _Adopted(nn.Module):
    """A fused replacement that adopts the original block's children (same names, same objects)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self._original_class = f"{type(original).__module__}.{type(original).__qualname__}"
        self._cache = {}  # prepared kernel arguments for inference (see _parts._prepared)

    def _stage(self, conv: str, bn: Optional[str], act: Optional[str] = None, *, pointwise: bool = False,
               bn_has_act: bool = False) -> ConvStage:
        c = self.get_submodule(conv)
        b = self.get_submodule(bn) if bn else None
        a = self.get_submodule(act) if act else (bn_act(b) if bn_has_act else None)
        return ConvStage(c, b, a, bn_has_act=bn_has_act)

    def extra_repr(self) -> str:
        return f"fused replacement of {self._original_class}"


def _check_stages(expand: Optional[ConvStage], dw: ConvStage, proj: ConvStage) -> None:
    """Raise Unsupported unless [expand 1x1] -> depthwise -> project 1x1, each with a BatchNorm
    (or none) and a supported activation, is what the fused kernels compute."""
    if expand is not None:
        check_pointwise(expand.conv)
    check_depthwise(dw.conv)
    check_pointwise(proj.conv)
    for s in (expand, dw, proj):
        if s is not None:
            check_bn(s.bn)
            act_of(s.act)
            if s.bn is not None and type(s.bn).__name__ not in ("BatchNormAct2d", "BatchNorm2d"):
                raise Unsupported(f"norm layer {type(s.bn).__name__}")
    padding_of(dw.conv)


# ------------------------------------------------------------------------------ timm
class FusedTimmBlock(_Adopted):
    """timm DepthwiseSeparableConv / InvertedResidual (children conv_pw?, bn1, conv_dw, bn2, aa, se,
    conv_pw(l), bn3?, drop_path)."""

    def __init__(self, original: nn.Module):
        super().__init__(original)
        self.inverted = hasattr(original, "conv_pwl")
        self.skip = bool(original.has_skip)
        if not isinstance(getattr(original, "aa", nn.Identity()), nn.Identity):
            raise Unsupported("anti-aliasing layer")
        self._validate()

    def _stages(self):
        if self.inverted:
            expand = self._stage("conv_pw", "bn1", bn_has_act=True)
            dw = self._stage("conv_dw", "bn2", bn_has_act=True)
            proj = self._stage("conv_pwl", "bn3", bn_has_act=True)
        else:
            expand = None
            dw = self._stage("conv_dw", "bn1", bn_has_act=True)
            proj = self._stage("conv_pw", "bn2", bn_has_act=True)
        return expand, dw, proj

    def _validate(self):
        _check_stages(*self._stages())
        se_gate_of(getattr(self, "se", None))

    def forward(self, x: Tensor) -> Tensor:
        expand, dw, proj = self._stages()
        return mbconv_forward(x, expand, dw, se_gate_of(getattr(self, "se", None)), proj, skip=self.skip,
                              drop_path=getattr(self, "drop_path", None), cache=self._cache)


# ------------------------------------------------------------------------------ torchvision
class FusedTorchvisionBlock(_Adopted):
    """torchvision MBConv / InvertedResidual: a Sequential ``block`` (or ``conv`` in MobileNetV2)
    of Conv2dNormActivation stages, optional SqueezeExcitation, a projection."""

    def __init__(self, original: nn.Module):
        super().__init__(original)
        self.seq = "block" if hasattr(original, "block") else "conv"
        self.skip = bool(original.use_res_connect)
        self.spec = self._parse(getattr(original, self.seq))
        self._validate()

    def _parse(self, seq: nn.Sequential) -> Dict[str, Optional[str]]:
        names = [n for n, _ in seq.named_children()]
        mods = [m for _, m in seq.named_children()]
        spec: Dict[str, Optional[str]] = {"expand": None, "se": None}
        i = 0
        p = self.seq

        def cna(j):  # Conv2dNormActivation: (conv, bn, [act])
            sub = [n for n, _ in mods[j].named_children()]
            if len(sub) not in (2, 3):
                raise Unsupported("Conv2dNormActivation without a norm layer")
            return (f"{p}.{names[j]}.{sub[0]}", f"{p}.{names[j]}.{sub[1]}", f"{p}.{names[j]}.{sub[2]}" if len(sub) == 3 else None)

        def is_dw(j):
            return isinstance(mods[j][0], nn.Conv2d) and mods[j][0].groups > 1

        if not is_dw(0):
            spec["expand"] = cna(0)
            i = 1
        spec["dw"] = cna(i)
        i += 1
        if i < len(mods) and se_gate_like(mods[i]):
            spec["se"] = f"{p}.{names[i]}"
            i += 1
        if isinstance(mods[i], nn.Conv2d):  # MobileNetV2: Conv2d then BatchNorm2d
            spec["project"] = (f"{p}.{names[i]}", f"{p}.{names[i + 1]}", None)
            i += 2
        else:
            spec["project"] = cna(i)
            i += 1
        if i != len(mods):
            raise Unsupported("unexpected layers after the projection")
        return spec

    def _stages(self):
        expand = self._stage(*self.spec["expand"]) if self.spec["expand"] else None
        return expand, self._stage(*self.spec["dw"]), self._stage(*self.spec["project"])

    def _validate(self):
        _check_stages(*self._stages())
        se_gate_of(self.get_submodule(self.spec["se"]) if self.spec["se"] else None)

    def forward(self, x: Tensor) -> Tensor:
        expand, dw, proj = self._stages()
        se = se_gate_of(self.get_submodule(self.spec["se"])) if self.spec["se"] else None
        return mbconv_forward(x, expand, dw, se, proj, skip=self.skip,
                              drop_path=getattr(self, "stochastic_depth", None), cache=self._cache)


def se_gate_like(m: nn.Module) -> bool:
    return type(m).__name__ in ("SqueezeExcitation", "SqueezeExcite")


# ------------------------------------------------------------------------------ effdet
class FusedSeparableConv2d(_Adopted):
    """effdet SeparableConv2d: conv_dw -> conv_pw (+bias) -> bn? -> act?."""

    def __init__(self, original: nn.Module):
        super().__init__(original)
        check_depthwise(self.conv_dw)
        check_pointwise(self.conv_pw)
        bn = check_bn(getattr(self, "bn", None))
        act_of(self._pw_act())
        padding_of(self.conv_dw)
        if bn is not None and type(bn).__name__ not in ("BatchNormAct2d", "BatchNorm2d"):
            raise Unsupported(f"norm layer {type(bn).__name__}")

    def _pw_act(self):
        if getattr(self, "act", None) is not None:
            bact = bn_act(getattr(self, "bn", None))
            if bact is not None and not isinstance(bact, nn.Identity):
                raise Unsupported("two activations after the pointwise conv")
            return self.act
        return bn_act(getattr(self, "bn", None))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, preact: Optional[str] = None) -> Tensor:
        bn = getattr(self, "bn", None)
        pw = ConvStage(self.conv_pw, bn, self._pw_act(), bn_has_act=bn_act(bn) is not None)
        if pw.bn_has_act and getattr(self, "act", None) is not None:
            pw.bn_has_act = False
        return sepconv_forward(x, ConvStage(self.conv_dw, None, None), pw, preact=preact, residual=residual,
                               cache=self._cache)


# ------------------------------------------------------------------------------ the converter
def _rules() -> List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]]:
    rules = []
    try:
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

        rules.append((lambda m: type(m) in (DepthwiseSeparableConv, InvertedResidual), FusedTimmBlock))
    except ImportError:
        pass
    try:
        from torchvision.models.efficientnet import MBConv
        from torchvision.models.mobilenetv2 import InvertedResidual as TV2
        from torchvision.models.mobilenetv3 import InvertedResidual as TV3

        rules.append((lambda m: type(m) in (MBConv, TV2, TV3), FusedTorchvisionBlock))
    except ImportError:
        pass
    try:
        from effdet.efficientdet import SeparableConv2d

        rules.append((lambda m: type(m) is SeparableConv2d, FusedSeparableConv2d))
    except ImportError:
        pass
    return rules


def convert(model: nn.Module, *, copy_model: bool = False, report: bool = False, verbose: bool = False):
    """Replace the recognised blocks of ``model`` by fused ones.

    In place by default (the returned model is ``model``; parameters are shared with the
    replaced blocks); ``copy_model=True`` converts a deep copy instead. With ``report=True``
    returns ``(model, ConvertReport)``; ``verbose=True`` prints the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if copy_model:
        model = copy.deepcopy(model)
    rep = ConvertReport()
    rules = _rules()
    from .bifpn import FusedFnode, convert_effdet_fnodes

    convert_effdet_fnodes(model, rep)  # BiFPN nodes first: they contain separable convs

    def visit(parent: Optional[nn.Module], name: str, module: nn.Module, qual: str):
        if isinstance(module, FusedFnode):
            return module
        for match, make in rules:
            if match(module):
                try:
                    new = make(module)
                except Unsupported as e:
                    rep.skipped.append((qual, type(module).__name__, str(e)))
                    break
                new.train(module.training)
                if parent is None:
                    rep.replaced.append((qual, type(module).__name__, type(new).__name__))
                    return new
                setattr(parent, name, new)
                rep.replaced.append((qual, type(module).__name__, type(new).__name__))
                return new
        for cname, child in list(module.named_children()):
            visit(module, cname, child, f"{qual}.{cname}" if qual else cname)
        return module

    model = visit(None, "", model, "")
    if verbose:
        print(rep)
    return (model, rep) if report else model
