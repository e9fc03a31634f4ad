"""EfficientNet B0-B7 (Tan & Le 2019) on effops's fused depthwise-separable kernels.

One builder and the network as data: the B0 stage table, the per-variant (width, depth,
resolution, dropout) multipliers and the two padding/BatchNorm styles. Names, parameter names
and counts are timm's (``efficientnet_b0`` ... ``efficientnet_b7``: symmetric padding, BN eps
1e-5; ``tf_efficientnet_b0`` ... ``tf_efficientnet_b7``: TensorFlow 'same' padding, BN eps 1e-3,
the ports of the official checkpoints), so timm state_dicts load with ``strict=True``.

Blocks: the first stage is a depthwise-separable block (timm's ``DepthwiseSeparableConv``
layout: conv_dw, bn1, se, conv_pw, bn2), the others are ``effops.nn.MBConv`` (timm's
``InvertedResidual`` layout). In eval mode BatchNorm is folded into the fused kernels; in train
mode BatchNorm uses batch statistics and drop-path is applied per sample as in timm.

    from effops.models import create_model
    model = create_model("tf_efficientnet_b0").eval()      # logits [N, 1000]
    backbone = efficientnet_features("tf_efficientnet_b0")  # [P3, P4, P5] for EfficientDet
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn._parts import ConvStage, conv_bn_act_forward, mbconv_forward, se_gate_of
from ..nn._plan import block_forward
from ..nn.dwsep import MBConv, SqueezeExcite, _act_module, _DropPath, _WithPadding
from ..ops.dwsep import act_name
from ._registry import register_model


# ------------------------------------------------------------------------------------ the data
class Stage(NamedTuple):
    kind: str  # "ds": depthwise-separable (no expansion), "ir": inverted residual (MBConv)
    repeats: int
    kernel: int
    stride: int  # of the stage's first block
    expand: float
    channels: int
    se_ratio: float  # of the block's input channels


# EfficientNet-B0 (the paper's Table 1; google/automl efficientnet_builder): stem conv3x3 s2 32,
# these stages, head conv1x1 1280, global average pool, classifier.
B0_STAGES: Tuple[Stage, ...] = (
    Stage("ds", 1, 3, 1, 1, 16, 0.25),
    Stage("ir", 2, 3, 2, 6, 24, 0.25),
    Stage("ir", 2, 5, 2, 6, 40, 0.25),
    Stage("ir", 3, 3, 2, 6, 80, 0.25),
    Stage("ir", 3, 5, 1, 6, 112, 0.25),
    Stage("ir", 4, 5, 2, 6, 192, 0.25),
    Stage("ir", 1, 3, 1, 6, 320, 0.25),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280


class Variant(NamedTuple):
    width: float
    depth: float
    resolution: int
    dropout: float  # the paper's classifier dropout for training (timm's default drop_rate is 0)


VARIANTS: Dict[str, Variant] = {
    "b0": Variant(1.0, 1.0, 224, 0.2), "b1": Variant(1.0, 1.1, 240, 0.2),
    "b2": Variant(1.1, 1.2, 260, 0.3), "b3": Variant(1.2, 1.4, 300, 0.3),
    "b4": Variant(1.4, 1.8, 380, 0.4), "b5": Variant(1.6, 2.2, 456, 0.4),
    "b6": Variant(1.8, 2.6, 528, 0.5), "b7": Variant(2.0, 3.1, 600, 0.5),
}

# name prefix -> (padding, BatchNorm eps). BN momentum is PyTorch's 0.1 for both, as in timm.
STYLES: Dict[str, Tuple[str, float]] = {"efficientnet": ("symmetric", 1e-5), "tf_efficientnet": ("same", 1e-3)}


def round_channels(channels: float, width: float = 1.0, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Channels scaled by ``width``, rounded to the nearest multiple of ``divisor`` (at least
    ``divisor``), plus one more ``divisor`` if rounding lost more than 10%."""
    v = channels * width
    c = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return c + divisor if c < round_limit * v else c


def scale_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


class BlockSpec(NamedTuple):
    kind: str
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    mid_ch: int
    se_ch: int
    drop_path: float


def block_specs(width: float, depth: float, drop_path_rate: float = 0.0,
                stages: Sequence[Stage] = B0_STAGES) -> List[List[BlockSpec]]:
    """Per stage, the blocks after compound scaling: channels rounded, repeats ceil(depth * r),
    stride on each stage's first block, drop-path rate * (global block index / block count)."""
    repeats = [scale_repeats(s.repeats, depth) for s in stages]
    total = sum(repeats)
    in_ch = round_channels(STEM_CHANNELS, width)
    out, idx = [], 0
    for s, r in zip(stages, repeats):
        blocks = []
        out_ch = round_channels(s.channels, width)
        for j in range(r):
            mid = in_ch if s.kind == "ds" else round_channels(in_ch * s.expand)
            se = round(mid * s.se_ratio / s.expand) if s.se_ratio else 0  # relative to the input channels
            blocks.append(BlockSpec(s.kind, in_ch, out_ch, s.kernel, s.stride if j == 0 else 1, mid, se,
                                    drop_path_rate * idx / total))
            in_ch, idx = out_ch, idx + 1
        out.append(blocks)
    return out


def feature_stages(specs: List[List[BlockSpec]]) -> List[Tuple[int, int, int]]:
    """(stage index, channels, reduction) of the feature levels: the output of each stage that
    is the last one or is followed by a strided stage (the stem counts as stride 2)."""
    feats, red = [], 2
    for i, blocks in enumerate(specs):
        red *= blocks[0].stride
        if i + 1 == len(specs) or specs[i + 1][0].stride > 1:
            feats.append((i, blocks[-1].out_ch, red))
    return feats


# ------------------------------------------------------------------------------------ modules
def _bn(c: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=eps, momentum=momentum)


class DepthwiseSeparableBlock(nn.Module):
    """Depthwise kxk + BN + act -> [squeeze-excite] -> pointwise 1x1 + BN [+ input], fused
    (timm's DepthwiseSeparableConv layout and names: conv_dw, bn1, se, conv_pw, bn2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 se_channels: int = 0, act: str = "silu", padding="same", drop_path: float = 0.0,
                 eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.padding = padding if padding is not None else kernel_size // 2  # None: symmetric
        self.conv_dw = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding=0, groups=in_channels,
                                 bias=False)
        self.bn1 = _bn(in_channels, eps, momentum)
        self.se = SqueezeExcite(in_channels, se_channels, act) if se_channels else None
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = _bn(out_channels, eps, momentum)
        self.skip = stride == 1 and in_channels == out_channels
        self.drop_path_rate = float(drop_path)
        self._act = _act_module(act_name("DepthwiseSeparableBlock", "act", act))
        self._cache = {}

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:  # eager CPU inference: the whole block in one kernel call
            m = self._modules  # not nn.Module.__getattr__ per submodule (batch 1: every us counts)
            out = block_forward(self._cache, x, None, None, None, m["conv_dw"], m["bn1"], m["_act"], self.padding,
                                m.get("se"), m["conv_pw"], m["bn2"], None, self.skip)
            if out is not None:
                return out
        dw = ConvStage(_WithPadding(self.conv_dw, self.padding), self.bn1, self._act)
        drop = _DropPath(self.drop_path_rate) if self.training and self.drop_path_rate else None
        return mbconv_forward(x, None, dw, se_gate_of(self.se), ConvStage(self.conv_pw, self.bn2, None),
                              skip=self.skip, drop_path=drop, cache=self._cache)

    def extra_repr(self) -> str:
        return (f"{self.conv_dw.in_channels}, {self.conv_pw.out_channels}, kernel_size={self.conv_dw.kernel_size[0]}, "
                f"stride={self.conv_dw.stride[0]}, se={self.se is not None}, skip={self.skip}, "
                f"drop_path={self.drop_path_rate}")


def _make_block(b: BlockSpec, padding, eps: float, momentum: float) -> nn.Module:
    if b.kind == "ds":
        return DepthwiseSeparableBlock(b.in_ch, b.out_ch, b.kernel, b.stride, b.se_ch, "silu", padding,
                                       b.drop_path, eps, momentum)
    blk = MBConv(b.in_ch, b.out_ch, b.kernel, b.stride, expand_ratio=b.mid_ch / b.in_ch, se_ratio=0.25,
                 act="silu", padding=padding, drop_path=b.drop_path, eps=eps, momentum=momentum)
    assert blk.conv_dw.in_channels == b.mid_ch
    if blk.se is None or blk.se.conv_reduce.out_channels != b.se_ch:  # MBConv rounds SE from the input
        blk.se = SqueezeExcite(b.mid_ch, b.se_ch, "silu") if b.se_ch else None
    return blk


def _init_weights(model: nn.Module) -> None:
    """TF EfficientNet initialisation (as timm): conv weights N(0, sqrt(2 / fan_out)) with
    fan_out = k*k*out/groups, zero conv biases, BN weight 1 / bias 0, linear weights
    U(+-1/sqrt(out_features)) and zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            r = 1.0 / math.sqrt(m.weight.shape[0])
            nn.init.uniform_(m.weight, -r, r)
            nn.init.zeros_(m.bias)


class _Trunk(nn.Module):
    """Stem (conv_stem, bn1 + swish) and the stages (blocks.<stage>.<block>)."""

    def __init__(self, name: str, specs, padding: str, eps: float, momentum: float, in_chans: int,
                 image_size: int, channels_last: bool):
        super().__init__()
        self.model_name = name
        self.image_size = image_size
        self.padding = "same" if padding == "same" else None  # None: symmetric k // 2
        stem = specs[0][0].in_ch
        self.conv_stem = nn.Conv2d(in_chans, stem, 3, 2, padding=0 if self.padding else 1, bias=False)
        self.bn1 = _bn(stem, eps, momentum)
        self.blocks = nn.Sequential(*[nn.Sequential(*[_make_block(b, self.padding, eps, momentum) for b in stage])
                                      for stage in specs])
        self._act = nn.SiLU()
        self._channels_last = bool(channels_last)
        self._cache = {}

    def _input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: x must be a tensor [N, C, H, W], got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.conv_stem.in_channels:
            raise ValueError(f"{type(self).__name__}: x must have shape [N, {self.conv_stem.in_channels}, H, W], "
                             f"got {list(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def forward_stem(self, x: Tensor) -> Tensor:
        conv = self.conv_stem
        if getattr(conv, "includes_bn_act", False):  # quantize(): conv_stem + bn1 + swish in one int8 conv
            return conv(x)
        if self.padding == "same":  # TensorFlow SAME: the extra row/column goes after
            conv = _WithPadding(conv, "same")
        # a pruned stem's [C, 1, 3, 3] weight gets canonical channels_last strides: with NCHW ones
        # torch's conv took its NCHW path, 8x slower, and every block left the fused plan
        return conv_bn_act_forward(x, ConvStage(conv, self.bn1, self._act), self._cache, "stem",
                                   channels_last=self._channels_last)

    def forward_blocks(self, x: Tensor, upto: Optional[int] = None, taps: Sequence[int] = ()) -> Tuple[Tensor, list]:
        if upto is None and not taps:  # one call: quantize() passes int8 codes across the stages then
            return self.blocks(x), []
        feats = []
        for i, stage in enumerate(self.blocks):
            if upto is not None and i > upto:
                break
            x = stage(x)
            if i in taps:
                feats.append(x)
        return x, feats


class EfficientNet(_Trunk):
    """EfficientNet classifier: stem -> stages -> head (conv_head 1x1 + bn2 + swish) -> global
    average pool -> dropout -> classifier. ``forward`` returns logits (as timm's);
    ``forward_features`` the head's feature map; ``forward_head(x, pre_logits=True)`` the pooled
    features. ``num_classes=0`` leaves out the classifier (forward returns pooled features)."""

    classifier_weight_key = "classifier.weight"  # load_weights: names num_classes mismatches
    classifier_outputs_per_class = 1

    def __init__(self, name: str, specs, padding: str, eps: float, momentum: float, *, num_classes: int,
                 in_chans: int, drop_rate: float, num_features: int, image_size: int, channels_last: bool):
        super().__init__(name, specs, padding, eps, momentum, in_chans, image_size, channels_last)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = num_features
        self.conv_head = nn.Conv2d(specs[-1][-1].out_ch, num_features, 1, bias=False)
        self.bn2 = _bn(num_features, eps, momentum)
        self.classifier = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x, _ = self.forward_blocks(self.forward_stem(self._input(x)))
        if getattr(self.conv_head, "includes_bn_act", False):  # quantize(): conv_head + bn2 + swish in one int8 conv
            return self.conv_head(x)
        return conv_bn_act_forward(x, ConvStage(self.conv_head, self.bn2, self._act), self._cache, "head")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: none), e.g. to fine-tune."""
        num_classes = _check_int("reset_classifier", "num_classes", num_classes, 0)
        self.num_classes = num_classes
        w = self.conv_head.weight
        if not w.is_floating_point():  # int8 codes: a quantized head (compress.quantize)
            w = self.bn2.running_mean
        self.classifier = (nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
                           if num_classes else nn.Identity())
        _init_weights(self.classifier)


class EfficientNetFeatures(_Trunk):
    """EfficientNet backbone for detection: stem and stages, no head (timm's
    ``EfficientNetFeatures`` with ``features_only=True``: parameter names conv_stem, bn1,
    blocks.*, so ``timm.create_model(name, features_only=True, out_indices=...).state_dict()``
    loads with ``strict=True``).

    ``forward(x)`` returns the list of feature maps of the levels in ``out_indices`` (level i
    has ``feature_channels[i]`` channels at stride ``reductions[i]``; for B0 the levels are
    16@2, 24@4, 40@8, 112@16, 320@32, and EfficientDet takes (2, 3, 4): P3, P4, P5). Stages after
    the last requested level are built (their parameters are in the checkpoints) but not run.
    """

    # a classifier checkpoint loads into the backbone: its head entries are dropped by load_weights
    checkpoint_ignore_prefixes = ("conv_head.", "bn2.", "classifier.")

    def __init__(self, name: str, specs, padding: str, eps: float, momentum: float, *, out_indices: Sequence[int],
                 in_chans: int, image_size: int, channels_last: bool):
        super().__init__(name, specs, padding, eps, momentum, in_chans, image_size, channels_last)
        levels = feature_stages(specs)
        self.out_indices = tuple(out_indices)
        self._taps = tuple(levels[i][0] for i in self.out_indices)
        self.feature_channels = [levels[i][1] for i in self.out_indices]
        self.reductions = [levels[i][2] for i in self.out_indices]
        self.feature_info = [dict(num_chs=levels[i][1], reduction=levels[i][2], stage=levels[i][0] + 1,
                                  module=f"blocks.{levels[i][0]}") for i in self.out_indices]

    def forward(self, x: Tensor) -> List[Tensor]:
        _, feats = self.forward_blocks(self.forward_stem(self._input(x)), upto=self._taps[-1], taps=self._taps)
        return feats


# ------------------------------------------------------------------------------------ the builder
def _check_int(op: str, name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    return int(v)


def _check_rate(op: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float in [0, 1), got {type(v).__name__}")
    if not 0.0 <= float(v) < 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {v}")
    return float(v)


def _parse_name(name: str) -> Tuple[str, str]:
    for prefix in STYLES:
        variant = name[len(prefix) + 1:] if name.startswith(prefix + "_") else None
        if variant in VARIANTS:
            return prefix, variant
    known = [f"{p}_{v}" for p in STYLES for v in VARIANTS]
    raise ValueError(f"efficientnet: unknown model {name!r}; known: {', '.join(known)}")


def efficientnet(name: str, *, num_classes: int = 1000, image_size: Optional[int] = None, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3, 4), channels_last: bool = True,
                 bn_eps: Optional[float] = None, bn_momentum: float = 0.1) -> nn.Module:
    """Build ``name`` (``efficientnet_b0`` ... ``tf_efficientnet_b7``) with random TF-style
    initialisation. ``drop_rate`` (classifier dropout) and ``drop_path_rate`` (stochastic depth,
    scaled by block index) default to 0 as in timm; the paper trains with ``VARIANTS[v].dropout``
    and 0.2. ``features_only=True`` returns an ``EfficientNetFeatures`` with ``out_indices``.
    ``image_size`` (default: the variant's resolution) is recorded for preprocessing; the network
    itself runs at any size. Modules are channels_last unless ``channels_last=False``."""
    op = name
    style, v = _parse_name(name)
    padding, eps = STYLES[style]
    var = VARIANTS[v]
    eps = eps if bn_eps is None else float(bn_eps)
    if not (isinstance(bn_momentum, numbers.Real) and 0.0 <= float(bn_momentum) <= 1.0):
        raise ValueError(f"{op}: bn_momentum must be a float in [0, 1], got {bn_momentum!r}")
    in_chans = _check_int(op, "in_chans", in_chans, 1)
    image_size = var.resolution if image_size is None else _check_int(op, "image_size", image_size, 32)
    specs = block_specs(var.width, var.depth, _check_rate(op, "drop_path_rate", drop_path_rate))
    common = dict(in_chans=in_chans, image_size=image_size, channels_last=channels_last)
    if features_only:
        n = len(feature_stages(specs))
        idx = tuple(out_indices) if isinstance(out_indices, (tuple, list)) else None
        if (not idx or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n for i in idx)
                or list(idx) != sorted(set(idx))):
            raise ValueError(f"{op}: out_indices must be increasing, distinct levels in 0..{n - 1}, got {out_indices!r}")
        model = EfficientNetFeatures(name, specs, padding, eps, float(bn_momentum), out_indices=idx, **common)
    else:
        model = EfficientNet(name, specs, padding, eps, float(bn_momentum),
                             num_classes=_check_int(op, "num_classes", num_classes, 0),
                             drop_rate=_check_rate(op, "drop_rate", drop_rate),
                             num_features=round_channels(HEAD_CHANNELS, var.width), **common)
    _init_weights(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def efficientnet_features(name: str, out_indices: Sequence[int] = (2, 3, 4), **kw) -> EfficientNetFeatures:
    """The EfficientNet backbone EfficientDet uses: ``EfficientNetFeatures`` of ``name`` returning
    the feature maps of levels ``out_indices`` (default (2, 3, 4): strides 8, 16, 32), with
    ``feature_channels`` and ``reductions`` lists. Parameter names equal timm's
    ``create_model(name, features_only=True, out_indices=...)``. Other keywords as ``efficientnet``
    (``drop_path_rate``, ``channels_last``, ``bn_eps``, ...); ``weights=PATH`` loads a checkpoint
    (a classifier checkpoint's head entries are ignored)."""
    weights = kw.pop("weights", None)
    model = efficientnet(name, features_only=True, out_indices=out_indices, **kw)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model


def _register() -> None:
    for style in STYLES:
        for v in VARIANTS:
            name = f"{style}_{v}"
            register_model(name, lambda _name=name, **kw: efficientnet(_name, **kw))


_register()

__all__ = ["EfficientNet", "EfficientNetFeatures", "DepthwiseSeparableBlock", "efficientnet", "efficientnet_features",
           "B0_STAGES", "VARIANTS", "STYLES", "Stage", "Variant", "round_channels", "scale_repeats", "block_specs",
           "feature_stages"]
