"""Modules that run on the fused depthwise-separable kernels.

``DWSeparableConv2d`` and ``MBConv`` own their parameters (conv weights in ``nn.Conv2d``
containers, ``nn.BatchNorm2d`` layers). In eval mode - or whenever their BatchNorms are in eval
mode ("frozen"), training or not - BatchNorm is folded into the fused op's per-channel affine and
gradients flow through the fused backward. With a BatchNorm in training mode they use the same
effops convolutions with eager BatchNorm in between, so batch statistics and running averages
behave exactly as in PyTorch.
"""

from __future__ import annotations

from typing import Optional, Union

import torch.nn as nn
from torch import Tensor

from ..ops._common import EffopsInputError, EffopsTypeError, check_int, check_real
from ..ops.dwsep import ACTIVATIONS, _pair, act_name, apply_act
from ._parts import ConvStage, mbconv_forward, pooled_conv, sepconv_forward
from ._plan import block_forward

_ACT_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU,
                "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid}


def _act_module(name: str) -> nn.Module:
    return _ACT_MODULES[name]()


def _channels(op: str, **sizes) -> None:
    """Channel counts: ints in [1, 2**31 - 1], named in the error (torch.nn would raise on them
    as RuntimeError or allocate 2**62 floats)."""
    for name, v in sizes.items():
        check_int(op, name, v, minimum=1)


def _geometry(op: str, kernel_size, stride, padding, dilation) -> None:
    _pair(op, "kernel_size", kernel_size, 1)
    _pair(op, "stride", stride, 1)
    _pair(op, "dilation", dilation, 1)
    if not (isinstance(padding, str) and padding.lower() in ("same", "valid")):
        _pair(op, "padding", padding, 0)


def _norm_args(op: str, eps, momentum) -> None:
    if not check_real(op, "eps", eps, allow_nan=False, allow_inf=False) > 0:
        raise EffopsInputError(f"{op}: eps must be > 0, got {eps}")
    if momentum is not None and not 0 <= check_real(op, "momentum", momentum, allow_nan=False) <= 1:
        raise EffopsInputError(f"{op}: momentum must be in [0, 1], got {momentum}")


class DWSeparableConv2d(nn.Module):
    """Depthwise kxk conv -> [BN] -> act -> pointwise 1x1 conv [+bias] -> [BN] -> pw_act, fused.

    With ``preact=True`` the activation is applied to the input instead, and nothing sits
    between the two convs (EfficientDet's BiFPN/head order: act -> dw -> pw -> BN).
    ``padding='same'`` is TensorFlow SAME padding; an int is symmetric padding.
    ``forward(x, residual=None)`` adds ``residual`` to the output in the same pass.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Union[str, int] = "same", dilation: int = 1, *, act: Optional[str] = "silu",
                 pw_act: Optional[str] = None, dw_norm: bool = True, pw_norm: bool = True, bias: bool = False,
                 preact: bool = False, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        op = "DWSeparableConv2d"
        _channels(op, in_channels=in_channels, out_channels=out_channels)
        _geometry(op, kernel_size, stride, padding, dilation)
        _norm_args(op, eps, momentum)
        self.act_name = act_name("DWSeparableConv2d", "act", act)
        self.pw_act_name = act_name("DWSeparableConv2d", "pw_act", pw_act)
        self.preact = bool(preact)
        self.padding = padding
        self.conv_dw = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding=0, dilation=dilation,
                                 groups=in_channels, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum) if dw_norm else None
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.bn_pw = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum) if pw_norm else None
        self._act = _act_module(self.act_name)
        self._pw_act = _act_module(self.pw_act_name)
        self._cache = {}  # prepared kernel arguments for inference

    def _stages(self):
        dw = ConvStage(self.conv_dw, self.bn_dw, None if self.preact else self._act)
        pw = ConvStage(self.conv_pw, self.bn_pw, self._pw_act)
        return dw, pw

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        dw, pw = self._stages()
        # conv_dw holds the weights only; the padding is the module's (the op applies it)
        dw.conv = _WithPadding(self.conv_dw, self.padding)
        return sepconv_forward(x, dw, pw, preact=self.act_name if self.preact else None, residual=residual,
                               cache=self._cache)

    def extra_repr(self) -> str:
        k = self.conv_dw.kernel_size
        s = (f"{self.conv_dw.in_channels}, {self.conv_pw.out_channels}, kernel_size={k[0] if k[0] == k[1] else k}, "
             f"stride={self.conv_dw.stride[0]}, padding={self.padding!r}")
        if self.conv_dw.dilation != (1, 1):
            s += f", dilation={self.conv_dw.dilation[0]}"
        s += f", act={self.act_name!r}" + (", preact=True" if self.preact else "")
        if self.pw_act_name != "none":
            s += f", pw_act={self.pw_act_name!r}"
        return s


class _WithPadding:
    """A view of a Conv2d (a weight container) with the padding the fused op applies."""

    def __init__(self, conv: nn.Conv2d, padding):
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation = conv.stride, conv.dilation
        self.effops_padding = padding if isinstance(padding, str) else (
            (padding, padding) if isinstance(padding, int) else tuple(padding))


class SqueezeExcite(nn.Module):
    """SE: gates = sigmoid(expand(act(reduce(mean(x))))); used by MBConv on the pooled means."""

    def __init__(self, channels: int, reduced: int, act: str = "silu"):
        super().__init__()
        _channels("SqueezeExcite", channels=channels, reduced=reduced)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = _act_module(act_name("SqueezeExcite", "act", act))
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gates(x.mean((2, 3), keepdim=True))

    def gates(self, m: Tensor) -> Tensor:
        """The gates [N, C, 1, 1] of the pooled means m [N, C, 1, 1]."""
        return self.gate(pooled_conv(self.conv_expand, self.act1(pooled_conv(self.conv_reduce, m))))


class MBConv(nn.Module):
    """EfficientNet's inverted residual: [expand 1x1 + BN + act] -> depthwise kxk + BN + act ->
    [squeeze-excite] -> project 1x1 + BN [+ input]. ``se_ratio`` is relative to the block's input
    channels (as in EfficientNet); ``drop_path`` is the stochastic-depth rate."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 expand_ratio: float = 6.0, se_ratio: float = 0.25, act: str = "silu",
                 padding: Union[str, int, None] = None, drop_path: float = 0.0, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        op = "MBConv"
        _channels(op, in_channels=in_channels, out_channels=out_channels)
        _geometry(op, kernel_size, stride, padding if padding is not None else 0, 1)
        _norm_args(op, eps, momentum)
        if not check_real(op, "expand_ratio", expand_ratio, allow_nan=False, allow_inf=False) > 0:
            raise EffopsInputError(f"{op}: expand_ratio must be > 0, got {expand_ratio}")
        if not 0 <= check_real(op, "se_ratio", se_ratio or 0.0, allow_nan=False, allow_inf=False) <= 1:
            raise EffopsInputError(f"{op}: se_ratio must be in [0, 1], got {se_ratio}")
        if not 0 <= check_real(op, "drop_path", drop_path, allow_nan=False) < 1:
            raise EffopsInputError(f"{op}: drop_path must be in [0, 1), got {drop_path}")
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool):
            raise EffopsTypeError(f"{op}: kernel_size must be an int, got {type(kernel_size).__name__}")
        self.act_name = act_name("MBConv", "act", act)
        mid = int(round(in_channels * expand_ratio))
        _channels(op, expanded_channels=mid)
        self.padding = padding if padding is not None else kernel_size // 2
        bn = lambda c: nn.BatchNorm2d(c, eps=eps, momentum=momentum)  # noqa: E731
        if mid != in_channels:
            self.conv_pw = nn.Conv2d(in_channels, mid, 1, bias=False)
            self.bn1 = bn(mid)
        else:
            self.conv_pw = self.bn1 = None
        self.conv_dw = nn.Conv2d(mid, mid, kernel_size, stride, padding=0, groups=mid, bias=False)
        self.bn2 = bn(mid)
        reduced = max(1, int(in_channels * se_ratio)) if se_ratio else 0
        self.se = SqueezeExcite(mid, reduced, act) if reduced else None
        self.conv_pwl = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = bn(out_channels)
        self.skip = stride == 1 and in_channels == out_channels
        self.drop_path_rate = float(drop_path)
        self._act = _act_module(self.act_name)
        self._cache = {}  # prepared kernel arguments for inference

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:  # eager CPU inference: the whole block in one kernel call
            m = self._modules  # not nn.Module.__getattr__ per submodule (batch 1: every us counts)
            act = m["_act"]
            out = block_forward(self._cache, x, m.get("conv_pw"), m.get("bn1"), act, m["conv_dw"], m["bn2"], act, self.padding,
                                m.get("se"), m["conv_pwl"], m["bn3"], None, self.skip)
            if out is not None:
                return out
        expand = ConvStage(self.conv_pw, self.bn1, self._act) if self.conv_pw is not None else None
        dw = ConvStage(_WithPadding(self.conv_dw, self.padding), self.bn2, self._act)
        proj = ConvStage(self.conv_pwl, self.bn3, None)
        se = None
        if self.se is not None:
            se = self.se.gates
        drop = _DropPath(self.drop_path_rate) if self.training and self.drop_path_rate else None
        return mbconv_forward(x, expand, dw, se, proj, skip=self.skip, drop_path=drop, cache=self._cache)

    def extra_repr(self) -> str:
        return (f"{self.conv_dw.in_channels if self.conv_pw is None else self.conv_pw.in_channels}, "
                f"{self.conv_pwl.out_channels}, kernel_size={self.conv_dw.kernel_size[0]}, "
                f"stride={self.conv_dw.stride[0]}, expand_to={self.conv_dw.in_channels}, se={self.se is not None}, "
                f"act={self.act_name!r}, skip={self.skip}, drop_path={self.drop_path_rate}")


class _DropPath(nn.Module):
    """Stochastic depth per sample (drops the residual branch with probability p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


__all__ = ["DWSeparableConv2d", "MBConv", "SqueezeExcite", "ACTIVATIONS", "apply_act"]
