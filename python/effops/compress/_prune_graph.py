"""Channel groups for structured pruning: which weights must lose the same channels together.

A *space* is the channel dimension of one tensor between two layers (a conv's output, a block's
output, a BiFPN node's output). Each space holds *sites*, the weights indexed by its channels:

* ``out``  - a conv's / linear's output filters (weight rows, bias) that produce the space;
* ``in``   - a conv's / linear's input columns that read it;
* ``dw``   - a depthwise conv over it (weight rows, bias, ``groups``);
* ``bn``   - a BatchNorm over it (affine parameters and running statistics);
* ``gate`` - squeeze-excite's expand conv, whose outputs gate the space (rows, bias).

Spaces that must keep the same channels are joined (union-find): a residual add joins a block's
input and output, BiFPN's weighted fusion joins the (resampled) inputs of a node, a head shared
across levels joins the five levels. A joined set is a *group*; removing channel ``c`` of a group
slices every site of it at ``c`` and leaves a dense network of the same module types.

The walk follows each model's forward order, which is known for the families handled here
(effops EfficientNet / EfficientNetFeatures / EfficientDet, timm EfficientNet / MobileNetV3,
torchvision EfficientNet / MobileNetV2 / MobileNetV3, and ``nn.Sequential`` of known layers,
all with converted or unconverted blocks). A layer it does not understand is *opaque*: the
spaces it reads and writes are fixed (kept), with the reason, so nothing unknown is ever sliced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch.nn as nn


@dataclass(frozen=True)
class Site:
    name: str  # qualified module name in the model
    kind: str  # 'out' | 'in' | 'dw' | 'bn' | 'gate'


@dataclass
class Group:
    """Spaces that must keep the same channels; ``fixed``: why it cannot be pruned (or None)."""

    name: str
    size: int
    sites: List[Site]
    fixed: Optional[str] = None
    labels: List[str] = field(default_factory=list)

    @property
    def has_bn(self) -> bool:
        return any(s.kind == "bn" for s in self.sites)


_PASS_NAMES = {"Identity", "ReLU", "ReLU6", "SiLU", "Swish", "SwishMe", "Hardswish", "HardSwish", "HardSwishMe",
               "GELU", "Mish", "Dropout", "Dropout2d", "Flatten", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d",
               "AvgPool2d", "MaxPool2d", "DropPath", "StochasticDepth"}


class _Builder:
    """Union-find over spaces, with their sites and the reasons some are fixed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.parent: List[int] = []
        self.size: List[Optional[int]] = []
        self.sites: List[List[Site]] = []
        self.fixed: List[List[str]] = []
        self.label: List[str] = []
        self.opaque: List[Tuple[str, str]] = []  # (module name, reason) for the report

    # --------------------------------------------------------------------------- spaces
    def space(self, size: Optional[int], label: str, fixed: Optional[str] = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.sites.append([])
        self.fixed.append([fixed] if fixed else [])
        self.label.append(label)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _set_size(self, r: int, n: Optional[int], what: str) -> None:
        if n is None:
            return
        if self.size[r] is None:
            self.size[r] = n
        elif self.size[r] != n:  # the walk misread the model: never slice such a group
            self.fixed[r].append(f"inconsistent widths ({self.size[r]} and {n} at {what})")

    def tie(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self.parent[rb] = ra
        self._set_size(ra, self.size[rb], self.label[rb])
        self.sites[ra] += self.sites[rb]
        self.fixed[ra] += self.fixed[rb]
        self.label[ra] = self.label[ra] if self.label[ra] else self.label[rb]
        return ra

    def add(self, sp: int, name: str, kind: str, n: int) -> None:
        r = self.find(sp)
        self._set_size(r, n, name)
        self.sites[r].append(Site(name, kind))

    def fix(self, sp: int, reason: str) -> None:
        self.fixed[self.find(sp)].append(reason)

    def opaque_unit(self, name: str, m: nn.Module, sp: int, reason: str) -> int:
        """A layer prune does not understand: what it reads and writes is kept."""
        why = f"read by {name or '<root>'} ({type(m).__name__}): {reason}"
        self.fix(sp, why)
        self.opaque.append((name or "<root>", f"{type(m).__name__}: {reason}"))
        return self.space(None, f"{name} output", fixed=f"written by {name or '<root>'} ({type(m).__name__}): {reason}")

    def groups(self) -> List[Group]:
        out: Dict[int, Group] = {}
        for i in range(len(self.parent)):
            r = self.find(i)
            if r not in out:
                fixed = "; ".join(dict.fromkeys(self.fixed[r])) or None
                if self.size[r] is None and fixed is None:
                    fixed = "unknown width"
                sites = self.sites[r]
                name = next((s.name for s in sites if s.kind in ("out", "dw", "bn")), self.label[r])
                out[r] = Group(name or self.label[r], self.size[r] or 0, list(dict.fromkeys(sites)), fixed,
                               [self.label[r]])
        # a group nothing produces (or nothing reads) is not a channel set of the model
        return [g for g in out.values() if g.sites]

    # --------------------------------------------------------------------------- layers
    def conv(self, name: str, conv: nn.Conv2d, sp: int) -> int:
        if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
            self.add(sp, name, "dw", conv.in_channels)
            return sp
        if conv.groups != 1:
            return self.opaque_unit(name, conv, sp, f"grouped conv (groups={conv.groups})")
        self.add(sp, name, "in", conv.in_channels)
        new = self.space(conv.out_channels, f"{name} output")
        self.add(new, name, "out", conv.out_channels)
        return new

    def linear(self, name: str, lin: nn.Linear, sp: int) -> int:
        self.add(sp, name, "in", lin.in_features)
        new = self.space(lin.out_features, f"{name} output")
        self.add(new, name, "out", lin.out_features)
        return new

    def bn(self, name: str, bn: nn.Module, sp: int) -> int:
        if not _plain_bn(bn):
            return self.opaque_unit(name, bn, sp, "a norm layer other than BatchNorm2d with running statistics")
        self.add(sp, name, "bn", bn.num_features)
        return sp

    def se(self, name: str, se: nn.Module, sp: int) -> int:
        """x * gate(expand(act(reduce(mean(x))))): reduce reads the space, expand gates it."""
        kids = dict(se.named_children())
        if {"conv_reduce", "conv_expand"} <= set(kids) and "bn" not in kids:
            red, exp, rn, en = kids["conv_reduce"], kids["conv_expand"], "conv_reduce", "conv_expand"
        elif {"fc1", "fc2"} <= set(kids):
            red, exp, rn, en = kids["fc1"], kids["fc2"], "fc1", "fc2"
        else:
            self.fix(sp, f"gated by {name} ({type(se).__name__}): squeeze-excite layout not recognised")
            self.opaque.append((name, f"{type(se).__name__}: squeeze-excite layout not recognised"))
            return sp
        if not (type(red) is nn.Conv2d and type(exp) is nn.Conv2d and red.groups == 1 and exp.groups == 1):
            self.fix(sp, f"squeeze-excite {name} with grouped or non-Conv2d layers")
            return sp
        self.add(sp, f"{name}.{rn}", "in", red.in_channels)
        mid = self.space(red.out_channels, f"{name}.{rn} output")
        self.add(mid, f"{name}.{rn}", "out", red.out_channels)
        self.add(mid, f"{name}.{en}", "in", exp.in_channels)
        self.add(sp, f"{name}.{en}", "gate", exp.out_channels)
        return sp

    def block(self, name: str, stages: List[Tuple[str, Optional[str]]], se: Optional[str], skip: bool,
              sp: int) -> int:
        """Convs (each with its BatchNorm) in order, SE after the one before the projection,
        and the residual add (which joins the block's input and output spaces)."""
        first = sp
        m = self.model
        for i, (cname, bname) in enumerate(stages):
            q = f"{name}.{cname}" if name else cname
            sp = self.conv(q, m.get_submodule(q), sp)
            if bname is not None:
                qb = f"{name}.{bname}" if name else bname
                sp = self.bn(qb, m.get_submodule(qb), sp)
            if se is not None and i == len(stages) - 2:
                qs = f"{name}.{se}" if name else se
                sp = self.se(qs, m.get_submodule(qs), sp)
        if skip:
            sp = self.tie(first, sp)
        return sp

    # --------------------------------------------------------------------------- the walk
    def walk(self, name: str, m: nn.Module, sp: int) -> int:
        if (type(m) is nn.Sequential or _qual(m) == "torchvision.ops.misc.Conv2dNormActivation"
                or _qual(m) == "effops.nn._trunk.FusedConvNormAct"):
            for cname, child in m.named_children():
                sp = self.walk(f"{name}.{cname}" if name else cname, child, sp)
            return sp
        plan = _block_plan(m)
        if plan is not None:
            if isinstance(plan, str):
                return self.opaque_unit(name, m, sp, plan)
            stages, se, skip = plan
            return self.block(name, stages, se, skip, sp)
        if _is_conv(m):
            return self.conv(name, m, sp)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self.bn(name, m, sp)
        if type(m) is nn.Linear or _qual(m) == "timm.layers.linear.Linear":
            return self.linear(name, m, sp)
        tn = type(m).__name__
        if tn == "SelectAdaptivePool2d":  # timm's global pool: 'catavgmax' doubles the channels
            if getattr(m, "pool_type", "") in ("avg", "max", "avgmax", "fast"):
                return sp
            return self.opaque_unit(name, m, sp, f"pool_type {getattr(m, 'pool_type', '?')!r}")
        if tn in _PASS_NAMES or tn in ("Hardsigmoid", "Sigmoid", "Tanh"):
            return sp
        return self.opaque_unit(name, m, sp, "a layer prune does not know")


def _qual(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _is_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d or type(m).__name__ in ("Conv2dSame", "Conv2dSameExport")


def _plain_bn(bn: nn.Module) -> bool:
    ok = type(bn) is nn.BatchNorm2d or type(bn).__name__ == "BatchNormAct2d"
    return ok and bn.affine and bn.track_running_stats and bn.running_mean is not None


def _block_plan(m: nn.Module):
    """(stages [(conv, bn)], se child name, skip) of a block, a reason string if it is a block
    that cannot be pruned, or None if ``m`` is not a block."""
    from ..models.efficientnet import DepthwiseSeparableBlock
    from ..nn._parts import Unsupported
    from ..nn.convert import FusedDenseBlock, FusedTimmBlock, FusedTorchvisionBlock, _rules
    from ..nn.dwsep import DWSeparableConv2d, MBConv

    t = type(m)
    if t is MBConv:
        stages = ([("conv_pw", "bn1")] if m.conv_pw is not None else []) + [("conv_dw", "bn2"), ("conv_pwl", "bn3")]
        return stages, ("se" if m.se is not None else None), bool(m.skip)
    if t is DepthwiseSeparableBlock:
        return [("conv_dw", "bn1"), ("conv_pw", "bn2")], ("se" if m.se is not None else None), bool(m.skip)
    if t is DWSeparableConv2d:  # in a Sequential no residual reaches forward
        return [("conv_dw", "bn_dw" if m.bn_dw is not None else None),
                ("conv_pw", "bn_pw" if m.bn_pw is not None else None)], None, False
    if _qual(m) in ("timm.models._efficientnet_blocks.ConvBnAct", "effops.nn._trunk.FusedConvBnAct"):  # conv + BN(+act) [+ x]
        if type(getattr(m, "aa", nn.Identity())) is not nn.Identity:
            return "anti-aliasing layer"
        return [("conv", "bn1")], None, bool(m.has_skip)
    fused = m if t in (FusedTimmBlock, FusedTorchvisionBlock, FusedDenseBlock) else None
    if fused is None:
        for match, make in _rules():
            if match(m):
                try:
                    fused = make(m)  # strict recognition; the children keep their names
                except Unsupported as e:
                    return f"not recognised: {e}"
                break
        if fused is None or not isinstance(fused, (FusedTimmBlock, FusedTorchvisionBlock, FusedDenseBlock)):
            return None
    stages = [(s[0], s[1]) for s in fused.spec if s is not None]
    return stages, fused.se_name, bool(fused.skip)


# ------------------------------------------------------------------------------ model families
def _effops_trunk(b: _Builder, model: nn.Module, sp: int, prefix: str = "") -> Tuple[int, List[int]]:
    """effops _Trunk: stem conv + BN, then the stages; returns (last space, per-stage spaces)."""
    p = f"{prefix}." if prefix else ""
    sp = b.conv(f"{p}conv_stem", model.conv_stem, sp)
    sp = b.bn(f"{p}bn1", model.bn1, sp)
    ends = []
    for i, stage in enumerate(model.blocks):
        sp = b.walk(f"{p}blocks.{i}", stage, sp)
        ends.append(sp)
    return sp, ends


def _features_taps(model: nn.Module) -> List[int]:
    return [int(f["module"].split(".")[1]) for f in model.feature_info]


def _bifpn(b: _Builder, fpn: nn.Module, inputs: List[int], prefix: str) -> List[int]:
    """effops BiFPN: extra levels (1x1 conv + BN where widths differ) then the cells; a node's
    resampled inputs are summed with weights, which joins their spaces."""
    from ..nn.bifpn import BiFPN

    if type(fpn) is not BiFPN:
        for sp in inputs:
            b.fix(sp, f"read by {prefix} ({type(fpn).__name__}), which prune does not know")
        b.opaque.append((prefix, f"{type(fpn).__name__}: not effops's BiFPN"))
        return [b.space(None, prefix, fixed=f"written by {prefix} ({type(fpn).__name__})") for _ in range(5)]

    def resample(r, q: str, sp: int) -> int:
        if r.conv is None:
            return sp
        sp = b.conv(f"{q}.conv.conv", r.conv.conv, sp)
        return b.bn(f"{q}.conv.bn", r.conv.bn, sp) if r.conv.bn is not None else sp

    x = list(inputs)
    for key, r in fpn.resample.items():
        x.append(resample(r, f"{prefix}.resample.{key}", x[-1]))
    for i, layer in enumerate(fpn.cell):
        n = layer.num_levels
        for j, node in enumerate(layer.fnode):
            q = f"{prefix}.cell.{i}.fnode.{j}"
            ins = [resample(r, f"{q}.combine.resample.{o}", x[int(o)]) for o, r in node.combine.resample.items()]
            fused = ins[0]
            for t in ins[1:]:
                fused = b.tie(fused, t)
            c = f"{q}.after_combine.conv"
            fused = b.conv(f"{c}.conv_dw", node.after_combine.conv.conv_dw, fused)
            out = b.conv(f"{c}.conv_pw", node.after_combine.conv.conv_pw, fused)
            x.append(b.bn(f"{c}.bn", node.after_combine.conv.bn, out))
        x = x[-n:]
    return x


def _head(b: _Builder, head: nn.Module, levels: List[int], prefix: str) -> None:
    """effops HeadNet: convs shared by all levels (so the levels share one channel set), each
    level its own BatchNorm; the prediction's outputs are the model's."""
    sp = levels[0]
    for t in levels[1:]:
        sp = b.tie(sp, t)
    for r, conv in enumerate(head.conv_rep):
        q = f"{prefix}.conv_rep.{r}"
        sp = b.conv(f"{q}.conv_dw", conv.conv_dw, sp)
        sp = b.conv(f"{q}.conv_pw", conv.conv_pw, sp)
        for lvl, bn in enumerate(head.bn_rep[r]):
            b.bn(f"{prefix}.bn_rep.{r}.{lvl}.bn", bn.bn, sp)
    sp = b.conv(f"{prefix}.predict.conv_dw", head.predict.conv_dw, sp)
    sp = b.conv(f"{prefix}.predict.conv_pw", head.predict.conv_pw, sp)
    b.fix(sp, f"the model's output ({prefix} predictions)")


def _in_channels(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


def build_groups(model: nn.Module) -> Tuple[List[Group], List[Tuple[str, str]], str]:
    """(groups, opaque layers [(name, reason)], family) of a supported model.

    Raises ``ValueError`` naming the supported families for any other model."""
    from ..models.efficientdet import EfficientDet
    from ..models.efficientnet import EfficientNet, EfficientNetFeatures

    b = _Builder(model)
    inp = b.space(_in_channels(model), "model input", fixed="the model's input")
    t, tn, mod = type(model), type(model).__name__, type(model).__module__
    if t is EfficientNet:
        family = "effops EfficientNet"
        sp, _ = _effops_trunk(b, model, inp)
        for n in ("conv_head", "bn2", "classifier"):
            sp = b.walk(n, getattr(model, n), sp)
        b.fix(sp, "the model's output")
    elif t is EfficientNetFeatures:
        family = "effops EfficientNetFeatures"
        _, ends = _effops_trunk(b, model, inp)
        for i in _features_taps(model):
            b.fix(ends[i], f"the model's output (feature level blocks.{i})")
    elif t is EfficientDet:
        family = "effops EfficientDet"
        bb = model.backbone
        if type(bb) is EfficientNetFeatures:
            _, ends = _effops_trunk(b, bb, inp, "backbone")
            feats = [ends[i] for i in _features_taps(bb)]
        else:
            b.fix(inp, f"backbone {type(bb).__name__} is not effops's EfficientNetFeatures")
            b.opaque.append(("backbone", f"{type(bb).__name__}: not effops's EfficientNetFeatures"))
            feats = [b.space(c, f"backbone level {i}", fixed="written by a backbone prune does not know")
                     for i, c in enumerate(model.config.backbone_channels)]
        levels = _bifpn(b, model.fpn, feats, "fpn")
        _head(b, model.class_net, levels, "class_net")
        _head(b, model.box_net, levels, "box_net")
    elif mod.startswith("timm.") and tn == "EfficientNet":
        family = "timm EfficientNet"
        sp = inp
        for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"):
            sp = b.walk(n, getattr(model, n), sp)
        b.fix(sp, "the model's output")
    elif mod.startswith("timm.") and tn == "MobileNetV3":
        family = "timm MobileNetV3"
        sp = inp
        for n in ("conv_stem", "bn1", "blocks", "global_pool", "conv_head", "norm_head", "act2", "flatten",
                  "classifier"):
            sp = b.walk(n, getattr(model, n), sp)
        b.fix(sp, "the model's output")
    elif mod.startswith("torchvision.") and tn in ("EfficientNet", "MobileNetV2", "MobileNetV3"):
        family = f"torchvision {tn}"
        sp = inp
        for n in ("features", "avgpool", "classifier"):  # MobileNetV2 pools in forward
            if hasattr(model, n):
                sp = b.walk(n, getattr(model, n), sp)
        b.fix(sp, "the model's output")
    elif t is nn.Sequential:
        family = "nn.Sequential"
        sp = b.walk("", model, inp)
        b.fix(sp, "the model's output")
    else:
        raise ValueError(
            f"prune: model of type {mod}.{tn} is not supported; supported: effops EfficientNet, "
            "EfficientNetFeatures and EfficientDet, timm EfficientNet / MobileNetV3, torchvision EfficientNet / "
            "MobileNetV2 / MobileNetV3 (converted by effops.nn.convert or not), and nn.Sequential of "
            "convs, BatchNorms, linears, activations, pools and effops / timm / torchvision blocks")
    return b.groups(), b.opaque, family


__all__ = ["Site", "Group", "build_groups"]
