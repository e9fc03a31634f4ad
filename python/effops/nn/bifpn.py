"""BiFPN on the fused kernels: ``BiFPN`` / ``BiFPNLayer`` (EfficientDet's node graph over P3-P7)
and the adapter that ``effops.nn.convert`` puts in place of effdet's fusion nodes.

A node: [1x1 conv + BN where an input has other channels] -> ``weighted_fuse`` (resampling while
reading, weights, activation) -> fused separable conv (depthwise 3x3 -> pointwise 1x1 + bias ->
BN). Two passes over the node's output size. Parameter names follow effdet's BiFpn
(``resample.{level}.conv.conv``, ``cell.{i}.fnode.{j}.combine.edge_weights``,
``...combine.resample.{offset}.conv.{conv,bn}``, ``...after_combine.conv.{conv_dw,conv_pw,bn}``),
so a state_dict saved from effdet's BiFPN loads into effops's.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..ops.bifpn import weighted_fuse
from ._parts import ConvStage, Unsupported, act_of, check_bn, check_depthwise, check_pointwise, padding_of, sepconv_forward
from ._parts import _inference, _prepared
from ..ops._common import EffopsInputError, EffopsTypeError, check_choice, check_int
from ..ops.bifpn import METHODS
from ..ops.dwsep import PreparedPW, act_name, apply_act, pw_conv
from .dwsep import _norm_args


def bifpn_nodes(min_level: int = 3, max_level: int = 7) -> List[Tuple[int, List[int]]]:
    """EfficientDet's BiFPN graph: (level, input offsets) per node; offsets 0.. are the input
    levels min..max, then the nodes in order. Top-down P6'..P3, then bottom-up P4..P7."""
    ids: Dict[int, List[int]] = {lvl: [lvl - min_level] for lvl in range(min_level, max_level + 1)}
    nodes, nxt = [], max_level - min_level + 1
    for lvl in range(max_level - 1, min_level - 1, -1):
        nodes.append((lvl, [ids[lvl][-1], ids[lvl + 1][-1]]))
        ids[lvl].append(nxt)
        nxt += 1
    for lvl in range(min_level + 1, max_level + 1):
        nodes.append((lvl, ids[lvl] + [ids[lvl - 1][-1]]))
        ids[lvl].append(nxt)
        nxt += 1
    return nodes


def feature_sizes(image_size: Tuple[int, int], max_level: int = 7) -> List[Tuple[int, int]]:
    """P0..P{max_level} sizes as effdet computes them (repeated ceil halving)."""
    sizes = [tuple(image_size)]
    for _ in range(max_level):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


def _check_bifpn_args(op: str, channels, sizes, fpn_channels, min_level, max_level, weight_method, act, pad_type,
                      eps, momentum, num_layers=None, image_size=None) -> Tuple[List[int], Optional[List[Tuple[int, int]]]]:
    """The constructor arguments of BiFPN / BiFPNLayer, checked before torch.nn sees them (which
    would raise an unnamed RuntimeError, or build a graph that fails only at forward)."""
    check_int(op, "min_level", min_level, minimum=0, maximum=16)
    check_int(op, "max_level", max_level, minimum=0, maximum=16)
    if max_level <= min_level:
        raise EffopsInputError(f"{op}: max_level must be > min_level, got min_level={min_level}, max_level={max_level}")
    levels = max_level - min_level + 1
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise EffopsTypeError(f"{op}: in_channels must be a sequence of channel counts, got {type(channels).__name__}")
    chans = [check_int(op, f"in_channels[{i}]", c, minimum=1) for i, c in enumerate(channels)]
    if not 1 <= len(chans) <= levels:
        raise EffopsInputError(f"{op}: in_channels must give 1..{levels} levels (P{min_level}..P{max_level}), "
                               f"got {len(chans)}")
    check_int(op, "fpn_channels", fpn_channels, minimum=1)
    if num_layers is not None:
        check_int(op, "num_layers", num_layers, minimum=1, maximum=64)
    check_choice(op, "weight_method", weight_method, METHODS)
    act_name(op, "act", act)
    check_choice(op, "pad_type", pad_type, ("same", ""))
    _norm_args(op, eps, momentum)
    if image_size is not None:
        if isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) or len(image_size) != 2:
            raise EffopsTypeError(f"{op}: image_size must be an (height, width) pair, got {image_size!r}")
        for i, v in enumerate(image_size):
            check_int(op, f"image_size[{i}]", v, minimum=1, maximum=1 << 20)
    out_sizes = None
    if sizes is not None:
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) != levels:
            raise EffopsInputError(f"{op}: sizes must give one (height, width) per level P{min_level}..P{max_level} "
                                   f"({levels}), got {sizes!r}")
        out_sizes = []
        for i, hw in enumerate(sizes):
            if isinstance(hw, (str, bytes)) or not isinstance(hw, Sequence) or len(hw) != 2:
                raise EffopsTypeError(f"{op}: sizes[{i}] must be a (height, width) pair, got {hw!r}")
            out_sizes.append(tuple(check_int(op, f"sizes[{i}][{j}]", v, minimum=1, maximum=1 << 20) for j, v in enumerate(hw)))
    return chans, out_sizes


def _check_features(op: str, x, channels: Sequence[int]) -> None:
    if not isinstance(x, (list, tuple)) or not all(isinstance(t, Tensor) for t in x):
        raise EffopsTypeError(f"{op}: features must be a list of tensors, got {type(x).__name__}")
    if len(x) != len(channels):
        raise EffopsInputError(f"{op}: expected {len(channels)} feature maps with channels {list(channels)}, got {len(x)}")
    for i, (t, c) in enumerate(zip(x, channels)):
        if t.dim() != 4 or t.shape[1] != c:
            raise EffopsInputError(f"{op}: features[{i}] must be [N, {c}, H, W], got {list(t.shape)}")


# ------------------------------------------------------------------------------ node forward
def _resample_stage(conv: Optional[nn.Module], bn: Optional[nn.Module]) -> Optional[ConvStage]:
    return None if conv is None else ConvStage(conv, bn, None)


def _apply_conv1x1(x: Tensor, stage: Optional[ConvStage], cache: Optional[dict], name: str) -> Tensor:
    if stage is None:
        return x
    if stage.bn is not None and stage.bn.training:
        return stage.post(pw_conv(x, stage.conv.weight, bias=stage.conv.bias))
    s, b = stage.affine()
    if cache is not None and _inference(x, (stage,)):
        return _prepared(cache, name, (stage,), lambda: PreparedPW(stage.conv.weight, scale=s, bias=b))(x)
    return pw_conv(x, stage.conv.weight, scale=s, bias=b)


def fnode_forward(xs: Sequence[Tensor], offsets: Sequence[int], resamples: Sequence[Tuple[Optional[ConvStage], str]],
                  edge_weights: Optional[Tensor], method: str, act: str, dw: ConvStage, pw: ConvStage,
                  out_size: Tuple[int, int], cache: Optional[dict]) -> Tensor:
    inputs = [_apply_conv1x1(xs[o], st, cache, f"resample{o}") for o, (st, _) in zip(offsets, resamples)]
    fused = weighted_fuse(inputs, edge_weights, resample=[m for _, m in resamples], method=method, act=act,
                          out_size=out_size)
    return sepconv_forward(fused, dw, pw, cache=cache)


def _mode(in_size: Tuple[int, int], out_size: Tuple[int, int], pad_type: str) -> str:
    if tuple(in_size) == tuple(out_size):
        return "identity"
    # A finer level is >= the coarser one in both dims (ceil halving); where a dim has reached 1
    # only the other shrinks (effdet would pick 'identity' there and fail at the sum).
    if in_size[0] > out_size[0] or in_size[1] > out_size[1]:
        return "maxpool" if pad_type == "same" else "maxpool_sym"
    return "nearest"


# ------------------------------------------------------------------------------ native modules
class _ConvBn(nn.Module):
    """1x1 conv (+ bias) + BatchNorm (effdet's ConvBnAct2d without activation)."""

    def __init__(self, cin: int, cout: int, apply_bn: bool, bias: bool, eps: float, momentum: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=bias)
        self.bn = nn.BatchNorm2d(cout, eps=eps, momentum=momentum) if apply_bn else None


class _Resample(nn.Module):
    def __init__(self, cin: int, cout: int, mode: str, apply_bn: bool, bias: bool, eps: float, momentum: float):
        super().__init__()
        self.mode = mode
        if cin != cout:
            self.conv = _ConvBn(cin, cout, apply_bn, bias, eps, momentum)
        else:
            self.conv = None

    def stage(self) -> Optional[ConvStage]:
        return None if self.conv is None else ConvStage(self.conv.conv, self.conv.bn, None)


class _Combine(nn.Module):
    def __init__(self, resample: Dict[str, _Resample], method: str):
        super().__init__()
        self.resample = nn.ModuleDict(resample)
        self.weight_method = method
        self.edge_weights = nn.Parameter(torch.ones(len(resample))) if method != "sum" else None


class _SepConvBn(nn.Module):
    """depthwise 3x3 -> pointwise 1x1 (+ bias) -> BN (effdet's SeparableConv2d, no activation)."""

    def __init__(self, c: int, bias: bool, eps: float, momentum: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.conv_pw = nn.Conv2d(c, c, 1, bias=bias)
        self.bn = nn.BatchNorm2d(c, eps=eps, momentum=momentum)


class _AfterCombine(nn.Module):
    def __init__(self, c: int, bias: bool, eps: float, momentum: float):
        super().__init__()
        self.conv = _SepConvBn(c, bias, eps, momentum)


class _Node(nn.Module):
    def __init__(self, offsets: List[int], sizes: List[Tuple[int, int]], channels: List[int], fpn_channels: int,
                 out_size: Tuple[int, int], method: str, act: str, pad_type: str, apply_resample_bn: bool,
                 redundant_bias: bool, eps: float, momentum: float):
        super().__init__()
        self.offsets = list(offsets)
        self.out_size = tuple(out_size)
        self.act = act
        res = {str(o): _Resample(channels[o], fpn_channels, _mode(sizes[o], out_size, pad_type), apply_resample_bn,
                                 not apply_resample_bn or redundant_bias, eps, momentum) for o in offsets}
        self.combine = _Combine(res, method)
        self.after_combine = _AfterCombine(fpn_channels, redundant_bias, eps, momentum)
        self._cache = {}

    def forward(self, xs: List[Tensor]) -> Tensor:
        c = self.after_combine.conv
        resamples = [(r.stage(), r.mode) for r in self.combine.resample.values()]
        return fnode_forward(xs, self.offsets, resamples, self.combine.edge_weights, self.combine.weight_method,
                             self.act, ConvStage(c.conv_dw, None, None), ConvStage(c.conv_pw, c.bn, None),
                             self.out_size, self._cache)


class BiFPNLayer(nn.Module):
    """One BiFPN repetition: 8 nodes (top-down then bottom-up over P3-P7); takes and returns the
    list of 5 feature maps."""

    def __init__(self, channels: Sequence[int], sizes: Sequence[Tuple[int, int]], fpn_channels: int, *,
                 min_level: int = 3, max_level: int = 7, weight_method: str = "fastattn", act: str = "silu",
                 pad_type: str = "same", apply_resample_bn: bool = True, redundant_bias: bool = True,
                 eps: float = 1e-3, momentum: float = 0.01):
        super().__init__()
        chans, szs = _check_bifpn_args("BiFPNLayer", channels, sizes, fpn_channels, min_level, max_level, weight_method,
                                       act, pad_type, eps, momentum)
        if len(chans) != max_level - min_level + 1:
            raise EffopsInputError(f"BiFPNLayer: channels must give one count per level P{min_level}..P{max_level}, "
                                   f"got {len(chans)}")
        self.num_levels = max_level - min_level + 1
        self.in_channels = list(chans)
        self.fnode = nn.ModuleList()
        for level, offsets in bifpn_nodes(min_level, max_level):
            out_size = szs[level - min_level]
            self.fnode.append(_Node(offsets, szs, chans, fpn_channels, out_size, weight_method, act, pad_type,
                                    apply_resample_bn, redundant_bias, eps, momentum))
            chans.append(fpn_channels)
            szs.append(out_size)

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        _check_features("BiFPNLayer", x, self.in_channels)
        x = list(x)
        for node in self.fnode:
            x.append(node(x))
        return x[-self.num_levels:]


class BiFPN(nn.Module):
    """EfficientDet's BiFPN: extra levels (1x1 conv + BN where channels differ, then 3x3/2 max
    pool) up to P7, then ``num_layers`` BiFPNLayers.

    Args:
        in_channels: channels of the backbone features given to forward (P3, P4, P5, ...).
        fpn_channels: BiFPN width (D0: 64).
        num_layers: repetitions (D0: 3).
        image_size: the input image size; feature sizes follow (P_l = ceil halving l times).
        pad_type: 'same' (TensorFlow, tf_efficientdet_*: 'maxpool') or '' (efficientdet_*:
            'maxpool_sym').
    """

    def __init__(self, in_channels: Sequence[int], fpn_channels: int, num_layers: int,
                 image_size: Tuple[int, int] = (512, 512), *, min_level: int = 3, max_level: int = 7,
                 weight_method: str = "fastattn", act: str = "silu", pad_type: str = "same",
                 apply_resample_bn: bool = True, redundant_bias: bool = True, eps: float = 1e-3,
                 momentum: float = 0.01):
        super().__init__()
        chans, _ = _check_bifpn_args("BiFPN", in_channels, None, fpn_channels, min_level, max_level, weight_method, act,
                                     pad_type, eps, momentum, num_layers=num_layers, image_size=image_size)
        sizes = feature_sizes(image_size, max_level)[min_level:]
        self.in_channels = list(chans)
        self.resample = nn.ModuleDict()
        self._extra = []
        for level in range(len(chans), max_level - min_level + 1):
            mode = "maxpool" if pad_type == "same" else "maxpool_sym"
            self.resample[str(level)] = _Resample(chans[-1], fpn_channels, mode, apply_resample_bn,
                                                  not apply_resample_bn or redundant_bias, eps, momentum)
            chans.append(fpn_channels)
        self.cell = nn.Sequential(*[
            BiFPNLayer(chans if i == 0 else [fpn_channels] * len(sizes), sizes, fpn_channels, min_level=min_level,
                       max_level=max_level, weight_method=weight_method, act=act, pad_type=pad_type,
                       apply_resample_bn=apply_resample_bn, redundant_bias=redundant_bias, eps=eps, momentum=momentum)
            for i in range(num_layers)])
        self.sizes = sizes
        self._cache = {}

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        _check_features("BiFPN", features, self.in_channels)
        x = list(features)
        for key, r in self.resample.items():
            t = _apply_conv1x1(x[-1], r.stage(), self._cache, f"extra{key}")
            x.append(_pool(t, r.mode))
        for layer in self.cell:
            x = layer(x)
        return x


def _pool(x: Tensor, mode: str) -> Tensor:
    """3x3/2 max pool of an extra level (TF 'same' with -inf pads, or padding 1)."""
    from ..ops.bifpn import resample_reference

    return resample_reference(x, mode, None)


# ------------------------------------------------------------------------------ effdet adapter
def _effdet_resample(r: nn.Module, pad_default: str) -> Tuple[Optional[ConvStage], str]:
    """(1x1 conv stage, mode) of an effdet ResampleFeatureMap."""
    names = dict(r.named_children())
    stage = None
    if "conv" in names:
        cba = names["conv"]
        conv = check_pointwise(cba.conv)
        bn = check_bn(getattr(cba, "bn", None))
        if not isinstance(getattr(cba, "act", None) or nn.Identity(), nn.Identity):
            raise Unsupported("activation in a resample conv")
        stage = ConvStage(conv, bn, None)
    if "downsample" in names:
        d = names["downsample"]
        k, s = d.kernel_size, d.stride
        k = k if isinstance(k, tuple) else (k, k)
        s = s if isinstance(s, tuple) else (s, s)
        if tuple(k) != (3, 3) or tuple(s) != (2, 2):
            raise Unsupported(f"downsample {type(d).__name__} {k}/{s}")
        if type(d).__name__ == "MaxPool2dSame":
            return stage, "maxpool"
        if isinstance(d, nn.MaxPool2d) and d.padding in (1, (1, 1)) and not d.ceil_mode and d.dilation in (1, (1, 1)):
            return stage, "maxpool_sym"
        raise Unsupported(f"downsample {type(d).__name__}")
    if "upsample" in names:
        u = names["upsample"]
        if getattr(u, "mode", None) != "nearest":
            raise Unsupported(f"upsample mode {getattr(u, 'mode', None)!r}")
        return stage, "nearest"
    return stage, "identity"


class FusedFnode(nn.Module):
    """effdet ``Fnode`` (FpnCombine + after_combine = [act] + SeparableConv2d) on weighted_fuse and
    the fused separable conv. Adopts ``combine`` and ``after_combine`` (same parameters and keys)."""

    def __init__(self, original: nn.Module, out_size: Tuple[int, int]):
        super().__init__()
        self.combine = original.combine
        self.after_combine = original.after_combine
        self.out_size = tuple(out_size)
        self._cache = {}
        comb = self.combine
        if comb.weight_method not in ("fastattn", "attn", "sum"):
            raise Unsupported(f"weight method {comb.weight_method!r}")
        self.offsets = list(comb.inputs_offsets)
        if not 2 <= len(self.offsets) <= 4:
            raise Unsupported(f"{len(self.offsets)} inputs")
        for r in comb.resample.values():
            _effdet_resample(r, "")
        ac = dict(self.after_combine.named_children())
        if set(ac) - {"act", "conv"} or "conv" not in ac:
            raise Unsupported("after_combine is not [act] + conv")
        self.act = act_of(ac.get("act"))
        sep = ac["conv"]
        if type(sep).__name__ != "SeparableConv2d":
            raise Unsupported(f"after_combine conv {type(sep).__name__}")
        check_depthwise(sep.conv_dw)
        check_pointwise(sep.conv_pw)
        check_bn(getattr(sep, "bn", None))
        if getattr(sep, "act", None) is not None and not isinstance(sep.act, nn.Identity):
            raise Unsupported("activation after the separable conv")
        if getattr(sep, "bn", None) is not None and not isinstance(getattr(sep.bn, "act", None) or nn.Identity(),
                                                                   nn.Identity):
            raise Unsupported("activation in the separable conv's BatchNorm")
        padding_of(sep.conv_dw)

    def forward(self, x: List[Tensor]) -> Tensor:
        comb, sep = self.combine, self.after_combine.conv
        resamples = [_effdet_resample(r, "") for r in comb.resample.values()]
        return fnode_forward(x, self.offsets, resamples, comb.edge_weights, comb.weight_method, self.act,
                             ConvStage(sep.conv_dw, None, None), ConvStage(sep.conv_pw, getattr(sep, "bn", None), None),
                             self.out_size, self._cache)

    def extra_repr(self) -> str:
        return f"fused effdet Fnode: inputs {self.offsets} -> {self.out_size[0]}x{self.out_size[1]}, act={self.act!r}"


def convert_effdet_fnodes(model: nn.Module, report) -> int:
    """Replace every effdet Fnode inside model's BiFpn layers; returns how many were replaced."""
    try:
        from effdet.efficientdet import BiFpnLayer, Fnode
    except ImportError:
        return 0
    count = 0
    for lname, layer in model.named_modules():
        if not isinstance(layer, BiFpnLayer):
            continue
        # node output sizes: the FpnCombine knows them through its resample maps
        for j, node in enumerate(layer.fnode):
            if not isinstance(node, Fnode):
                continue
            qual = f"{lname}.fnode.{j}"
            try:
                size = _node_size(node)
                layer.fnode[j] = FusedFnode(node, size)
                report.replaced.append((qual, "Fnode", "FusedFnode"))
                count += 1
            except Unsupported as e:
                report.skipped.append((qual, "Fnode", str(e)))
    return count


def _node_size(node: nn.Module) -> Tuple[int, int]:
    sizes = {tuple(r.output_size) for r in node.combine.resample.values()}
    if len(sizes) != 1:
        raise Unsupported("inconsistent node output sizes")
    return sizes.pop()
