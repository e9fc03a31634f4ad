"""The 13 NASNet ops as modules, and the cell-input preprocessing.

Every op maps ``C`` channels to ``C`` channels; with ``stride=2`` (ops on the cell inputs of a
reduction cell) it halves the spatial size (``ceil(H/2)``). Conventions follow NASNet
(tensorflow/models nasnet_utils.py): convolutions are ReLU -> conv -> BN; a separable conv
is that unit with a depthwise k x k + pointwise 1x1 conv, stacked twice (stride on the first);
pools carry no parameters (average pools exclude the padding); identity with stride 2 is a
factorized reduction (two 1x1 convs with stride 2 on offset grids, concatenated).

Each module that has a cost records ``latency_spec``: a tuple from which ``module_from_spec``
rebuilds an identical module (same kind and shapes, fresh weights). The latency table
(effops.nas.evaluate) times each distinct (spec, input shape) once.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .space import OPS, GenotypeError


def _tagged(module: nn.Module, spec: Tuple) -> nn.Module:
    module.latency_spec = spec
    return module


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv (no bias) -> BN. ``kernel``/``stride``/``padding`` may be pairs."""

    def __init__(self, c_in: int, c_out: int, kernel=1, stride=1, padding=0, dilation: int = 1):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out),
        )


class ConvPair(nn.Sequential):
    """ReLU -> 1xk conv -> kx1 conv -> BN (NASNet's "1x3 then 3x1" / "1x7 then 7x1")."""

    def __init__(self, c: int, k: int, stride: int):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c, c, (1, k), stride=(1, stride), padding=(0, k // 2), bias=False),
            nn.Conv2d(c, c, (k, 1), stride=(stride, 1), padding=(k // 2, 0), bias=False),
            nn.BatchNorm2d(c),
        )


class FactorizedReduce(nn.Module):
    """ReLU, then two 1x1 stride-2 convs on the even and the odd pixel grid, concatenated,
    then BN: halves H and W without discarding every other pixel (NASNet's
    factorized_reduction). Output channels split as ``c_out // 2`` + the rest."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        if c_out < 2:
            raise ValueError(f"FactorizedReduce: c_out must be >= 2, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_a = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_b = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        a = self.conv_a(x)
        # The offset path sees the grid shifted by one pixel; pad so odd sizes give equal shapes.
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([a, self.conv_b(shifted)], dim=1))


class _LocalSeparable(nn.Sequential):
    """ReLU -> depthwise k x k -> pointwise 1x1 -> BN, in plain PyTorch."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, dilation: int = 1):
        pad = dilation * (k - 1) // 2
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, k, stride=stride, padding=pad, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )


def _separable(c_in: int, c_out: int, k: int, stride: int, dilation: int = 1) -> nn.Module:
    """The separable convolution unit, ReLU -> depthwise k x k -> pointwise 1x1 -> BN, as one
    fused effops module (pre-activation order; BN folded into the kernel in inference).
    _LocalSeparable is the same function in plain PyTorch (the tests compare the two)."""
    from ..nn import DWSeparableConv2d

    return DWSeparableConv2d(c_in, c_out, k, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation,
                             act="relu", preact=True, dw_norm=False, pw_norm=True, bias=False)


class SepConv(nn.Sequential):
    """NASNet's separable conv: the separable unit twice, the stride on the first."""

    def __init__(self, c: int, k: int, stride: int):
        super().__init__(_separable(c, c, k, stride), _separable(c, c, k, 1))


class Pool(nn.Module):
    def __init__(self, kind: str, k: int, stride: int):
        super().__init__()
        if kind == "avg":
            self.pool = nn.AvgPool2d(k, stride=stride, padding=k // 2, count_include_pad=False)
        else:
            self.pool = nn.MaxPool2d(k, stride=stride, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


def make_op(name: str, c: int, stride: int) -> nn.Module:
    """The op ``name`` on ``c`` channels with ``stride`` 1 or 2."""
    if name not in OPS:
        raise GenotypeError(f"make_op: unknown op {name!r}; choose from {list(OPS)}")
    if stride not in (1, 2):
        raise ValueError(f"make_op: stride must be 1 or 2, got {stride}")
    if name == "identity":
        if stride == 1:
            return nn.Identity()  # free: no latency spec
        m = FactorizedReduce(c, c)
    elif name == "conv_1x3_3x1":
        m = ConvPair(c, 3, stride)
    elif name == "conv_1x7_7x1":
        m = ConvPair(c, 7, stride)
    elif name == "dil_conv_3x3":
        m = ReLUConvBN(c, c, 3, stride, padding=2, dilation=2)
    elif name.startswith(("avg_pool", "max_pool")):
        m = Pool(name[:3], int(name[-1]), stride)
    elif name == "conv_1x1":
        m = ReLUConvBN(c, c, 1, stride, padding=0)
    elif name == "conv_3x3":
        m = ReLUConvBN(c, c, 3, stride, padding=1)
    else:  # sep_conv_kxk
        m = SepConv(c, int(name[-1]), stride)
    return _tagged(m, ("op", name, c, stride))


def make_preprocess(c_in: int, c_out: int, reduce: bool) -> nn.Module:
    """A cell input's preprocessing to ``c_out`` channels: a factorized reduction when the
    input is at twice the cell's resolution, else ReLU -> 1x1 conv -> BN."""
    if reduce:
        return _tagged(FactorizedReduce(c_in, c_out), ("reduce", c_in, c_out))
    return _tagged(ReLUConvBN(c_in, c_out, 1, 1, 0), ("preprocess", c_in, c_out))


def make_stem(kind: str, c_in: int, c_out: int) -> nn.Module:
    """'cifar': 3x3 conv, stride 1; 'imagenet': 3x3 conv, stride 2, no padding (NASNet); + BN."""
    if kind == "cifar":
        m = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
    elif kind == "imagenet":
        m = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=0, bias=False), nn.BatchNorm2d(c_out))
    else:
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {kind!r}")
    return _tagged(m, ("stem", kind, c_in, c_out))


class Head(nn.Module):
    """ReLU -> global average pool -> dropout -> linear classifier."""

    def __init__(self, c_in: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c_in, num_classes)
        self.latency_spec = ("head", c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


def module_from_spec(spec: Tuple) -> nn.Module:
    """A fresh module of the kind and shape ``spec`` describes (see ``latency_spec``)."""
    kind, *args = spec
    if kind == "op":
        return make_op(*args)
    if kind == "preprocess":
        return make_preprocess(args[0], args[1], reduce=False)
    if kind == "reduce":
        return make_preprocess(args[0], args[1], reduce=True)
    if kind == "stem":
        return make_stem(*args)
    if kind == "head":
        return Head(*args)
    raise ValueError(f"module_from_spec: unknown spec kind {kind!r}")
