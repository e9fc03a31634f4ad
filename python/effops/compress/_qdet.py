"""Int8 EfficientDet heads for ``quantize``: ``HeadNet`` -> ``QHeadNet``.

A head runs, per level, ``box_class_repeats`` separable convs (depthwise 3x3 without BN or
activation -> pointwise 1x1 -> that level's BN -> swish) and the prediction separable conv
(depthwise -> pointwise with bias). In int8 each (repeat, level) pair and each level's
prediction is one ``QDWSeparableConv2d`` (one ``q_dwsep_conv`` call: the depthwise output is
requantised in the kernel at its own calibrated scale, the level's BN is folded into the
pointwise weights, swish is the activation table), and a level is an ``nn.Sequential`` of them
that passes uint8 codes from one to the next; the prediction's output is dequantised, so the
head returns float class / box maps exactly where the float head did. The depthwise weights
are shared across levels in the float head and quantised once per level here (per output
channel: the same codes; the multipliers differ with each level's scales).

Calibration: a hook on the head runs the float stages one by one on the head's input (the
BiFPN outputs) and feeds each stage's observers (``quantize._observe``): inputs, depthwise
outputs, pre-activations and outputs, per level.
"""

from __future__ import annotations

from typing import List

import torch.nn as nn
from torch import Tensor

from ..nn._parts import ConvStage, sepconv_forward
from ..nn.dwsep import _WithPadding


class QHeadNet(nn.Module):
    """Int8 EfficientDet class / box head: ``levels[l]`` is level l's chain of int8 separable
    convs (repeats, then the prediction)."""

    def __init__(self, levels: List[nn.Sequential]):
        super().__init__()
        self.levels = nn.ModuleList(levels)

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if len(x) != len(self.levels):
            raise ValueError(f"QHeadNet: expected {len(self.levels)} feature levels, got {len(x)}")
        return [seq(t) for seq, t in zip(self.levels, x)]


class HeadPlan:
    """The plans of a HeadNet's stages and how to observe and build them (used by quantize)."""

    kind = "QHeadNet"

    def __init__(self, head: nn.Module):
        from .quantize import _Plan

        self.head = head
        self.residual_used = False
        self.obs = {}  # "in" once a calibration batch has run (quantize's "was it run" test)
        self.stages: List[List[tuple]] = []  # per level: (plan, float forward of that stage)
        for level in range(head.num_levels):
            row = []
            for r, conv in enumerate(head.conv_rep):
                dw = ConvStage(_WithPadding(conv.conv_dw, conv.padding), None, None)
                pw = ConvStage(conv.conv_pw, head.bn_rep[r][level].bn, head._act)
                row.append((_Plan(None, dw, None, pw, False, "QDWSeparableConv2d"),
                            lambda t, dw=dw, pw=pw: sepconv_forward(t, dw, pw)))
            p = head.predict
            if p.preact or p.bn_dw is not None or p.bn_pw is not None:
                from ..nn._parts import Unsupported

                raise Unsupported("a prediction conv with BatchNorm or preact (not EfficientDet's)")
            dw = ConvStage(_WithPadding(p.conv_dw, p.padding), None, p._act)
            pw = ConvStage(p.conv_pw, None, p._pw_act)
            row.append((_Plan(None, dw, None, pw, False, "QDWSeparableConv2d"), p))
            self.stages.append(row)

    def observe(self, x, kind: str, percentile: float) -> None:
        from .quantize import _observe

        for level, row in enumerate(self.stages):
            t = x[level]
            for plan, fn in row:
                out = fn(t)
                _observe(plan, t, out, kind, percentile)
                t = out
        self.obs["in"] = True

    def build(self) -> nn.Module:
        from .quantize import _build

        return QHeadNet([nn.Sequential(*[_build(plan) for plan, _ in row]) for row in self.stages])


__all__ = ["QHeadNet", "HeadPlan"]
