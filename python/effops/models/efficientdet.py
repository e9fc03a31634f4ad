"""EfficientDet D0-D7 on effops's fused modules, with detection end to end.

A variant is data (``VARIANTS``: backbone, image size, BiFPN width and depth, head depth, anchor
scale, fusion, padding, redundant bias - effdet's ``model_config``) plus one builder
(``EfficientDet(config)``). The parts: an EfficientNet features backbone (P3-P5), ``effops.nn.BiFPN``
(extra levels P6/P7 and the BiFPN cells on ``weighted_fuse`` and the fused separable conv), and two
heads whose separable convs are shared across levels while each level has its own BatchNorm: every
head repeat is one fused ``dwsep_conv`` per level (depthwise 3x3 -> pointwise 1x1 -> that level's
folded BN -> swish). Parameter names and counts are effdet's, so ``load_state_dict`` of an effdet
state_dict works with ``strict=True``; ``forward`` returns effdet's (class outputs P3..P7, box
outputs P3..P7). ``detect`` / ``predict`` add effdet's post-processing (see ``detection.py``).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.bifpn import BiFPN
from ..nn.dwsep import DWSeparableConv2d, _WithPadding, _act_module
from ..ops.dwsep import act_name
from ..nn._parts import ConvStage, act_of, sepconv_forward
from ._registry import register_model
from .anchors import DEFAULT_ASPECT_RATIOS, anchors_per_location, generate_anchors
from .detection import Detections, letterbox, postprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EfficientDetConfig:
    """One EfficientDet variant (field names follow effdet's model_config where they can)."""

    name: str
    backbone: str
    image_size: Tuple[int, int]
    fpn_channels: int
    fpn_cell_repeats: int
    box_class_repeats: int
    backbone_channels: Tuple[int, ...]  # channels of the backbone's P3, P4, P5 features
    num_classes: int = 90
    anchor_scale: float = 4.0
    fpn_weight_method: str = "fastattn"  # 'fastattn' or 'sum' (D6/D7: effdet's 'bifpn_sum')
    act_type: str = "silu"
    separable_conv: bool = True
    redundant_bias: bool = True  # TF ports: bias before BN (kept to load their weights)
    pad_type: str = "same"  # 'same': TF padding (tf_ variants), '': PyTorch symmetric padding
    apply_resample_bn: bool = True
    drop_path_rate: float = 0.2  # backbone stochastic depth (training)
    min_level: int = 3
    max_level: int = 7
    num_scales: int = 3
    aspect_ratios: Tuple[Tuple[float, float], ...] = DEFAULT_ASPECT_RATIOS
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # PyTorch convention (TF 0.99)
    max_detection_points: int = 5000
    max_det_per_image: int = 100
    nms_iou_threshold: float = 0.5
    mean: Tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: Tuple[float, float, float] = field(default=IMAGENET_STD)

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    @property
    def num_anchors(self) -> int:
        return anchors_per_location(self.num_scales, self.aspect_ratios)


# EfficientNet features P3, P4, P5 (timm features_only, out_indices (2, 3, 4)): the outputs of
# stages 2, 4 and 6, channels 40, 112, 320 scaled by the width multiplier and rounded to 8.
_BACKBONE_CHANNELS = {
    "b0": (40, 112, 320), "b1": (40, 112, 320), "b2": (48, 120, 352), "b3": (48, 136, 384),
    "b4": (56, 160, 448), "b5": (64, 176, 512), "b6": (72, 200, 576), "b7": (80, 224, 640),
}

# (backbone, image size, fpn channels, fpn cells, head repeats) + overrides; effdet model_config.
_TABLE = {
    "efficientdet_d0": ("efficientnet_b0", 512, 64, 3, 3, dict(pad_type="", redundant_bias=False, drop_path_rate=0.1)),
    "efficientdet_d1": ("efficientnet_b1", 640, 88, 4, 3, dict(pad_type="", redundant_bias=False)),
    "tf_efficientdet_d0": ("tf_efficientnet_b0", 512, 64, 3, 3, {}),
    "tf_efficientdet_d1": ("tf_efficientnet_b1", 640, 88, 4, 3, {}),
    "tf_efficientdet_d2": ("tf_efficientnet_b2", 768, 112, 5, 3, {}),
    "tf_efficientdet_d3": ("tf_efficientnet_b3", 896, 160, 6, 4, {}),
    "tf_efficientdet_d4": ("tf_efficientnet_b4", 1024, 224, 7, 4, {}),
    "tf_efficientdet_d5": ("tf_efficientnet_b5", 1280, 288, 7, 4, {}),
    "tf_efficientdet_d6": ("tf_efficientnet_b6", 1280, 384, 8, 5, dict(fpn_weight_method="sum")),
    "tf_efficientdet_d7": ("tf_efficientnet_b6", 1536, 384, 8, 5, dict(fpn_weight_method="sum", anchor_scale=5.0)),
}

VARIANTS: Dict[str, EfficientDetConfig] = {
    name: EfficientDetConfig(name=name, backbone=bb, image_size=(size, size), fpn_channels=fc, fpn_cell_repeats=cells,
                             box_class_repeats=heads, backbone_channels=_BACKBONE_CHANNELS[bb[-2:]], **extra)
    for name, (bb, size, fc, cells, heads, extra) in _TABLE.items()
}


def get_config(name: str, **overrides) -> EfficientDetConfig:
    """The config of a variant, with fields replaced (e.g. ``num_classes=20``)."""
    if name not in VARIANTS:
        raise ValueError(f"efficientdet: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return replace(VARIANTS[name], **overrides) if overrides else VARIANTS[name]


# ------------------------------------------------------------------------------ heads
class HeadNet(nn.Module):
    """effdet's HeadNet: ``box_class_repeats`` separable convs shared by all levels, each followed by
    a BatchNorm of its own per level and swish, then the prediction separable conv (with bias).

    Parameters: ``conv_rep.{r}.conv_dw/conv_pw``, ``bn_rep.{r}.{level}.bn``, ``predict.conv_dw/
    conv_pw`` (effdet's repeat-first layout). Each (repeat, level) runs as one fused dwsep_conv with
    that level's BN folded in and swish as the pointwise activation.
    """

    def __init__(self, cfg: EfficientDetConfig, num_outputs: int):
        super().__init__()
        c, act = cfg.fpn_channels, cfg.act_type
        self.num_levels = cfg.num_levels
        # weight containers (effdet's names); the BN of each level and swish are applied by forward
        self.conv_rep = nn.ModuleList([
            DWSeparableConv2d(c, c, 3, padding=1, act=None, dw_norm=False, pw_norm=False, bias=cfg.redundant_bias)
            for _ in range(cfg.box_class_repeats)])
        self.bn_rep = nn.ModuleList([
            nn.ModuleList([nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)))
                           for _ in range(cfg.num_levels)])
            for _ in range(cfg.box_class_repeats)])
        self.predict = DWSeparableConv2d(c, num_outputs * cfg.num_anchors, 3, padding=1, act=None, dw_norm=False,
                                         pw_norm=False, bias=True)
        self._act = _act_module(act_name("HeadNet", "act_type", act))
        self._caches = [[{} for _ in range(cfg.num_levels)] for _ in range(cfg.box_class_repeats)]

    def extra_repr(self) -> str:
        return (f"{len(self.conv_rep)} x [dw 3x3 -> pw 1x1 -> BN of the level -> {act_of(self._act)}] per level "
                f"({self.num_levels} levels), then predict")

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        outputs = []
        for level in range(self.num_levels):
            t = x[level]
            for r, conv in enumerate(self.conv_rep):
                dw = ConvStage(_WithPadding(conv.conv_dw, conv.padding), None, None)
                pw = ConvStage(conv.conv_pw, self.bn_rep[r][level].bn, self._act)
                t = sepconv_forward(t, dw, pw, cache=self._caches[r][level])
            outputs.append(self.predict(t))
        return outputs


# ------------------------------------------------------------------------------ init (effdet's)
def _glorot_uniform_(w: Tensor, groups: int = 1) -> None:
    fan_in = w.shape[1] * w[0][0].numel()
    fan_out = w.shape[0] * w[0][0].numel() // groups
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    nn.init.uniform_(w, -limit, limit)


def _variance_scaling_(w: Tensor) -> None:
    fan_in = w.shape[1] * w[0][0].numel()
    nn.init.normal_(w, std=math.sqrt(1.0 / max(1.0, fan_in)))


@torch.no_grad()
def _init_weights(model: "EfficientDet") -> None:
    """TF EfficientDet's initialisation as effdet applies it: glorot-uniform BiFPN convs, variance
    scaling (normal, fan-in) head convs, zero biases, the class prediction bias -log((1-p)/p) with
    prior p = 0.01, BatchNorm weight 1 and bias 0."""
    for name, m in list(model.fpn.named_modules()) + list(model.class_net.named_modules(prefix="class_net")) + \
            list(model.box_net.named_modules(prefix="box_net")):
        if isinstance(m, nn.Conv2d):
            if name.startswith(("class_net", "box_net")):
                _variance_scaling_(m.weight)
            else:
                _glorot_uniform_(m.weight, groups=m.groups)
            if m.bias is not None:
                if name.startswith("class_net.predict"):
                    m.bias.fill_(-math.log((1 - 0.01) / 0.01))
                else:
                    m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1.0)
            m.bias.zero_()


# ------------------------------------------------------------------------------ the model
def _make_backbone(cfg: EfficientDetConfig) -> nn.Module:
    from .efficientnet import efficientnet_features

    return efficientnet_features(cfg.backbone, out_indices=(2, 3, 4), drop_path_rate=cfg.drop_path_rate)


def _backbone_channels(backbone: nn.Module) -> Optional[Tuple[int, ...]]:
    """The channels a features backbone declares: effops's ``feature_channels`` or timm's
    ``feature_info.channels()``; None when it declares none."""
    own = getattr(backbone, "feature_channels", None)
    if own is not None:
        return tuple(int(c) for c in own)
    info = getattr(backbone, "feature_info", None)
    ch = getattr(info, "channels", None)
    if callable(ch):
        return tuple(int(c) for c in ch())
    return None


class EfficientDet(nn.Module):
    """EfficientDet (backbone -> BiFPN -> class and box heads) on the fused kernels.

    Args:
        config: an ``EfficientDetConfig`` (``get_config(name, ...)``).
        backbone: the features backbone (a module returning the P3, P4, P5 maps); by default
            effops's EfficientNet features for ``config.backbone``.
    """

    # for load_weights: a class head of another size is reported as a num_classes mismatch
    classifier_weight_key = "class_net.predict.conv_pw.weight"

    def __init__(self, config: EfficientDetConfig, backbone: Optional[nn.Module] = None):
        super().__init__()
        cfg = config
        if not isinstance(cfg, EfficientDetConfig):
            raise TypeError(f"EfficientDet: config must be an EfficientDetConfig, got {type(cfg).__name__}")
        if not cfg.separable_conv:
            raise ValueError("EfficientDet: only separable_conv=True (every EfficientDet variant) is implemented")
        if cfg.fpn_weight_method not in ("fastattn", "sum", "attn"):
            raise ValueError(f"EfficientDet: fpn_weight_method must be 'fastattn', 'attn' or 'sum', "
                             f"got {cfg.fpn_weight_method!r}")
        stride = 2 ** cfg.max_level
        if any(int(s) <= 0 or int(s) % stride for s in cfg.image_size):
            raise ValueError(f"EfficientDet: image_size must be positive multiples of 2**max_level = {stride}, "
                             f"got {tuple(cfg.image_size)}")
        self.config = cfg
        self.model_name = cfg.name
        self.classifier_outputs_per_class = cfg.num_anchors
        self.backbone = backbone if backbone is not None else _make_backbone(cfg)
        got = _backbone_channels(self.backbone)
        if got is not None and tuple(got) != tuple(cfg.backbone_channels):
            raise ValueError(f"EfficientDet: the backbone gives channels {got}, the config expects "
                             f"{tuple(cfg.backbone_channels)}")
        self.fpn = BiFPN(cfg.backbone_channels, cfg.fpn_channels, cfg.fpn_cell_repeats, tuple(cfg.image_size),
                         min_level=cfg.min_level, max_level=cfg.max_level, weight_method=cfg.fpn_weight_method,
                         act=cfg.act_type, pad_type="same" if cfg.pad_type == "same" else "",
                         apply_resample_bn=cfg.apply_resample_bn, redundant_bias=cfg.redundant_bias,
                         eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.class_net = HeadNet(cfg, cfg.num_classes)
        self.box_net = HeadNet(cfg, 4)
        _init_weights(self)
        anchors = generate_anchors(cfg.image_size, min_level=cfg.min_level, max_level=cfg.max_level,
                                   num_scales=cfg.num_scales, aspect_ratios=cfg.aspect_ratios,
                                   anchor_scale=cfg.anchor_scale, device="cpu")
        # not in the state_dict (effdet keeps anchors outside the model); moves with .to(device)
        self.register_buffer("anchor_boxes", anchors.clone(), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.config.image_size)

    def forward(self, x: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        """x [B, 3, S, S] (normalised) -> (class logits per level [B, A*C, H, W], box regressions
        per level [B, A*4, H, W]), P3..P7, as effdet's EfficientDet.forward. S: the model's image
        size (its BiFPN nodes are built for that size's feature maps; ``create_model(name,
        image_size=...)`` builds one for another size)."""
        if isinstance(x, Tensor) and x.dim() == 4 and tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"EfficientDet.forward: x must be [B, 3, {self.image_size[0]}, {self.image_size[1]}] "
                             f"(the model's image size; create_model(..., image_size=...) builds one for another "
                             f"size), got {list(x.shape)}")
        feats = self.backbone(x.contiguous(memory_format=torch.channels_last))
        feats = self.fpn(list(feats))
        return self.class_net(feats), self.box_net(feats)

    def _check_batch(self, op: str, x) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"EfficientDet.{op}: x must be a tensor [B, 3, H, W], got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"EfficientDet.{op}: x must be a float tensor (normalised images), got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.image_size or x.shape[0] == 0:
            raise ValueError(f"EfficientDet.{op}: x must be [B>0, 3, {self.image_size[0]}, {self.image_size[1]}] "
                             f"(the model's image size), got {list(x.shape)}")
        return x

    def _postprocess(self, outputs, clip_size=None, box_scale=None) -> Detections:
        cfg = self.config
        cls_out, box_out = outputs
        return postprocess(cls_out, box_out, self.anchor_boxes, num_classes=cfg.num_classes,
                           max_detection_points=cfg.max_detection_points, iou_threshold=cfg.nms_iou_threshold,
                           max_det_per_image=cfg.max_det_per_image, clip_size=clip_size, box_scale=box_scale)

    def detect(self, x: Tensor) -> Detections:
        """Detections for a preprocessed batch [B, 3, S, S] at the model's image size: effdet's
        ``DetBenchPredict(model)(x)`` (its rows x1, y1, x2, y2, score, class) as ``Detections``
        (boxes in the S x S input's pixels, not clipped; classes 1-based)."""
        x = self._check_batch("detect", x)
        return self._postprocess(self(x))

    def predict(self, images) -> Detections:
        """Detections in each input image's pixels, for a uint8 [B, 3, H, W] tensor (0..255), a
        float one (0..1), or a list of HWC uint8 arrays of any sizes: effdet's eval preprocessing
        (resize keeping the aspect ratio, pad at the bottom/right with the mean colour, ImageNet
        normalisation), ``detect``, boxes clipped to the image and scaled back."""
        p = next(self.parameters())
        batch, scales, sizes = letterbox(images, self.image_size, self.config.mean, self.config.std,
                                         device=p.device, dtype=p.dtype if p.is_floating_point() else torch.float32)
        return self._postprocess(self(batch), clip_size=sizes / scales[:, None], box_scale=scales)


# ------------------------------------------------------------------------------ registry
_BUILD_KEYS = ("num_classes", "image_size", "drop_path_rate", "backbone")


def create_efficientdet(name: str, *, num_classes: Optional[int] = None, image_size=None,
                        drop_path_rate: Optional[float] = None, backbone: Optional[nn.Module] = None,
                        **kw) -> EfficientDet:
    """Build an EfficientDet variant. ``image_size``: an int or (H, W), multiples of 128;
    ``backbone``: a features module to use instead of effops's EfficientNet (P3-P5 maps)."""
    if kw:
        raise TypeError(f"create_model({name!r}): unexpected keyword argument(s) {', '.join(sorted(kw))}; "
                        f"EfficientDet takes {', '.join(_BUILD_KEYS)}")
    over = {}
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"create_model({name!r}): num_classes must be a positive int, got {num_classes!r}")
        over["num_classes"] = num_classes
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
            raise ValueError(f"create_model({name!r}): image_size must be an int or (H, W), got {image_size!r}")
        over["image_size"] = size
    if drop_path_rate is not None:
        over["drop_path_rate"] = float(drop_path_rate)
    return EfficientDet(get_config(name, **over), backbone=backbone)


for _name in VARIANTS:
    register_model(_name, functools.partial(create_efficientdet, _name))

__all__ = ["EfficientDet", "EfficientDetConfig", "HeadNet", "VARIANTS", "get_config", "create_efficientdet",
           "Detections"]
