"""Fused depthwise-separable convolution: ``dwsep_conv``, and the MBConv split ``dw_conv_act`` +
``pw_conv`` (squeeze-and-excitation needs the whole depthwise output before the pointwise conv).

What is computed (the ``*_reference`` functions below are the spec; every backend computes the
same function, accumulating in float32 - or float64 for float64 inputs)::

    dwsep_conv:   a = act(x) if preact else x
                  d = depthwise_kxk(a) * dw_scale + dw_bias          # per input channel
                  d = act(d)                      (post-activation order, the default)
                  p = pointwise_1x1(d) * pw_scale + pw_bias           # per output channel
                  out = pw_act(p) + residual

    dw_conv_act:  y = act(depthwise_kxk(x) * scale + bias);  means[n, c] = mean over (h, w) of y
    pw_conv:      out = act(pointwise_1x1(y * channel_scale[n, c]) * scale + bias) + residual

* padding: an int or (ph, pw) pair is symmetric zero padding; ``'same'`` is TensorFlow's SAME
  padding (output size ceil(H / stride), the extra row/column at the bottom/right), resolved to
  explicit (top, bottom, left, right) and applied inside the kernels (no padded copy).
* activations: None, 'relu', 'relu6', 'silu' (= 'swish'), 'hardswish', 'sigmoid'; derivatives
  at the kinks follow PyTorch (relu'(0) = 0, relu6' = 0 at 0 and 6, hardswish' = x/3 + 1/2 on
  [-3, 3]).
* Layouts: channels_last (NHWC) is the fast path and the kernels' native layout; NCHW inputs
  give the same result (converted explicitly) and the output follows the input's layout.
* dtypes: float32, bfloat16 on every backend; float16 on CUDA and Triton; float64 (reference and
  CPU) for gradcheck. Weights, scales and biases may be float32 or the input's dtype; the
  output, residual and channel_scale have the input's dtype.
* Autocast: inside a ``torch.autocast`` region the input, weights and residual are cast to the
  autocast dtype (as ``conv2d`` would be); accumulation stays in float32 in the kernel.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch import Tensor

from .. import _backend
from ._common import MAX_SIZE, EffopsInputError, EffopsTypeError, check_tensor, custom_op, profiled

_backend.register_op("dwsep_conv", ("cpu", "cuda", "triton", "reference"))
_backend.register_op("dw_conv_act", ("cpu", "cuda", "triton", "reference"))
_backend.register_op("pw_conv", ("cpu", "cuda", "triton", "reference"))

ACTIVATIONS = ("none", "relu", "relu6", "silu", "hardswish", "sigmoid")
_ACT_ALIASES = {None: "none", "identity": "none", "none": "none", "swish": "silu"}
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}

Padding = Union[str, int, Tuple[int, int]]


# =============================================================================== helpers
def act_name(op: str, arg: str, act) -> str:
    if act is not None and not isinstance(act, str):
        raise EffopsTypeError(f"{op}: {arg} must be an activation name (one of {list(ACTIVATIONS[1:])}, 'swish') "
                              f"or None, got {type(act).__name__}")
    name = _ACT_ALIASES.get(act, act)
    if name not in ACTIVATIONS:
        raise EffopsInputError(f"{op}: {arg} must be one of {list(ACTIVATIONS[1:])}, 'swish' or None, got {act!r}")
    return name


def apply_act(x: Tensor, name: str, inplace: bool = False) -> Tensor:
    if name == "none":
        return x
    if name == "relu":
        return F.relu(x, inplace=inplace)
    if name == "relu6":
        return F.relu6(x, inplace=inplace)
    if name == "silu":
        return F.silu(x, inplace=inplace)
    if name == "hardswish":
        return F.hardswish(x, inplace=inplace)
    if name == "sigmoid":
        return x.sigmoid_() if inplace else torch.sigmoid(x)
    raise ValueError(name)


def act_grad(x: Tensor, name: str) -> Tensor:
    """d act(x) / dx, with PyTorch's conventions at the kinks."""
    if name == "none":
        return torch.ones_like(x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "relu6":
        return ((x > 0) & (x < 6)).to(x.dtype)
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if name == "hardswish":
        return torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))
    if name == "sigmoid":
        s = torch.sigmoid(x)
        return s * (1 - s)
    raise ValueError(name)


def _pair(op: str, name: str, v, minimum: int) -> Tuple[int, int]:
    if isinstance(v, bool):
        raise EffopsTypeError(f"{op}: {name} must be an int or a pair of ints, got bool")
    if isinstance(v, numbers.Integral):
        v = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in v):
        v = (int(v[0]), int(v[1]))
    else:
        raise EffopsTypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise EffopsInputError(f"{op}: {name} must be >= {minimum}, got {v}")
    if max(v) > MAX_SIZE:  # the kernels' index arithmetic stays far inside int64
        raise EffopsInputError(f"{op}: {name} must be <= {MAX_SIZE}, got {v}")
    return v


def same_padding(size: int, k: int, stride: int, dilation: int) -> Tuple[int, int]:
    """TensorFlow SAME padding (before, after) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@dataclass(frozen=True)
class ConvGeometry:
    stride: Tuple[int, int]
    pad: Tuple[int, int, int, int]  # top, bottom, left, right
    dilation: Tuple[int, int]
    out_hw: Tuple[int, int]


def conv_geometry(op: str, hw: Sequence[int], k: Sequence[int], stride, padding: Padding, dilation) -> ConvGeometry:
    s = _pair(op, "stride", stride, 1)
    d = _pair(op, "dilation", dilation, 1)
    if isinstance(padding, str):
        if padding.lower() == "same":
            ph = same_padding(hw[0], k[0], s[0], d[0])
            pw = same_padding(hw[1], k[1], s[1], d[1])
        elif padding.lower() == "valid":
            ph = pw = (0, 0)
        else:
            raise EffopsInputError(f"{op}: padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        pad = (ph[0], ph[1], pw[0], pw[1])
    else:
        p = _pair(op, "padding", padding, 0)
        pad = (p[0], p[0], p[1], p[1])
    out = []
    for i, (size, kk) in enumerate(zip(hw, k)):
        span = d[i] * (kk - 1) + 1
        n = size + pad[2 * i] + pad[2 * i + 1] - span
        if n < 0:
            raise EffopsInputError(
                f"{op}: input {'height' if i == 0 else 'width'} {size} with padding {pad[2 * i]}+{pad[2 * i + 1]} "
                f"is smaller than the dilated kernel ({span})"
            )
        out.append(n // s[i] + 1)
    return ConvGeometry(s, pad, d, (out[0], out[1]))


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    """Outputs follow the input's memory format (as torch's conv2d)."""
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def _strided_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with the strides of ``torch.empty_like(like)``: what the backward ops' fake
    kernels declare, so torch.compile's stride assertions hold (the depthwise weight gradient is
    computed [KH, KW, C] and viewed as [C, 1, KH, KW]; a channels_last decision on an ambiguous
    shape can differ from empty_like's)."""
    ref = torch.empty_like(like, dtype=t.dtype)
    if t.stride() == ref.stride():
        return t
    return ref.copy_(t)


def _copy_like(t: Tensor, x: Tensor) -> Tensor:
    """A new tensor (a custom op may not return one of its inputs) in x's memory format."""
    out = _like_input(t, x)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


# =============================================================================== references
def _affine(t: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if scale is not None:
        t = t * scale.to(t.dtype)[None, :, None, None]
    if bias is not None:
        t = t + bias.to(t.dtype)[None, :, None, None]
    return t


def _depthwise_reference(x: Tensor, w: Tensor, g: ConvGeometry) -> Tensor:
    top, bottom, left, right = g.pad
    xp = F.pad(x, (left, right, top, bottom))
    return F.conv2d(xp, w.to(x.dtype), stride=g.stride, dilation=g.dilation, groups=x.shape[1])


def dwsep_conv_reference(x, dw_weight, pw_weight, g: ConvGeometry, dw_scale=None, dw_bias=None, act="silu",
                         pw_scale=None, pw_bias=None, pw_act="none", residual=None, preact=False) -> Tensor:
    """The specification of dwsep_conv, in plain PyTorch, computed in x's dtype (differentiable)."""
    a = apply_act(x, act) if preact else x
    d = _affine(_depthwise_reference(a, dw_weight, g), dw_scale, dw_bias)
    if not preact:
        d = apply_act(d, act)
    p = _affine(F.conv2d(d, pw_weight.to(d.dtype)), pw_scale, pw_bias)
    p = apply_act(p, pw_act)
    return p if residual is None else p + residual


def dw_conv_act_reference(x, weight, g: ConvGeometry, scale=None, bias=None, act="silu") -> Tuple[Tensor, Tensor]:
    y = apply_act(_affine(_depthwise_reference(x, weight, g), scale, bias), act)
    return y, y.mean(dim=(2, 3))


def pw_conv_reference(y, weight, channel_scale=None, scale=None, bias=None, act="none", residual=None) -> Tensor:
    if channel_scale is not None:
        y = y * channel_scale.to(y.dtype)[:, :, None, None]
    p = apply_act(_affine(F.conv2d(y, weight.to(y.dtype)), scale, bias), act)
    return p if residual is None else p + residual


# =============================================================================== backends
def _threads() -> int:
    return max(1, torch.get_num_threads())


def _nhwc(t: Tensor) -> Tensor:
    """The kernels' layout: a contiguous NHWC buffer (a view of a channels_last tensor)."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _f32(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Per-channel vectors and weights as the kernels want them (float32, or float64)."""
    if t is None:
        return None
    return t.to(torch.float64 if like.dtype == torch.float64 else torch.float32).contiguous()


def _dw_taps(w: Tensor, like: Tensor) -> Tensor:
    """[C, 1, kh, kw] -> [kh, kw, C]: the channel vector of each tap is contiguous."""
    return _f32(w[:, 0].permute(1, 2, 0), like)


def _empty_nhwc(n, h, w, c, dtype, device) -> Tensor:
    return torch.empty((n, c, h, w), dtype=dtype, device=device, memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _from_nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


def _geom_args(g: ConvGeometry):
    return list(g.stride), list(g.pad), list(g.dilation)


# --------------------------------------------------------------------------------- CPU backend
# The CPU path in two steps: weights to the kernels' layouts (*_weights), then the kernel call
# on an input (*_run). The custom ops do both per call; Prepared* (below) converts once.
def _dwsep_weights(like: Tensor, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias):
    Co, C = pw_weight.shape[:2]
    return (_dw_taps(dw_weight, like), _f32(pw_weight.reshape(Co, C), like), _f32(dw_scale, like),
            _f32(dw_bias, like), _f32(pw_scale, like), _f32(pw_bias, like))


def _dwsep_run(x, wts, residual, g, act, pw_act, preact):
    N = x.shape[0]
    Co = wts[1].shape[0]
    out = _empty_nhwc(N, *g.out_hw, Co, x.dtype, x.device)
    _backend._C.dwsep_forward(_nhwc(x), *wts, None if residual is None else _nhwc(residual), *_geom_args(g),
                              ACT_CODES[act], ACT_CODES[pw_act], preact, out, _threads())
    return _from_nhwc(out)


def _dwsep_cpu(x, dw_weight, pw_weight, g, dw_scale, dw_bias, act, pw_scale, pw_bias, pw_act, residual, preact):
    wts = _dwsep_weights(x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias)
    return _dwsep_run(x, wts, residual, g, act, pw_act, preact)


def _dw_weights(like: Tensor, weight, scale, bias):
    return _dw_taps(weight, like), _f32(scale, like), _f32(bias, like)


def _dw_run(x, wts, g, act, in_act="none"):
    """(y [N, C, Ho, Wo], sums [N, C] in the accumulation dtype)."""
    N, C = x.shape[:2]
    y = _empty_nhwc(N, *g.out_hw, C, x.dtype, x.device)
    sums = torch.empty(N, C, dtype=_acc_dtype(x), device=x.device)
    _backend._C.dw_forward(_nhwc(x), *wts, *_geom_args(g), ACT_CODES[act], ACT_CODES[in_act], y, sums, _threads())
    return _from_nhwc(y), sums


def _dw_cpu(x, weight, g, scale, bias, act, *, in_act="none"):
    return _dw_run(x, _dw_weights(x, weight, scale, bias), g, act, in_act)


def _pw_weights(like: Tensor, weight, scale, bias):
    Co, C = weight.shape[:2]
    return _f32(weight.reshape(Co, C), like), _f32(scale, like), _f32(bias, like)


def _pw_run(y, wts, channel_scale, act, residual):
    N, C, H, W = y.shape
    out = _empty_nhwc(N, H, W, wts[0].shape[0], y.dtype, y.device)
    w, scale, bias = wts
    _backend._C.pw_forward(_nhwc(y), w, _f32(channel_scale, y), scale, bias, ACT_CODES[act],
                           None if residual is None else _nhwc(residual), out, _threads())
    return _from_nhwc(out)


def _pw_cpu(y, weight, channel_scale, scale, bias, act, residual):
    return _pw_run(y, _pw_weights(y, weight, scale, bias), channel_scale, act, residual)


# glibc maps every allocation above 32 MiB afresh (its largest mmap threshold); smaller outputs
# come from reused heap memory.
_FRESH_MAP_BYTES = 32 << 20


def _plain_gemm(y, channel_scale, scale, bias, act, residual) -> bool:
    """A float32 1x1 conv with nothing fused (the conv before a training BatchNorm): a plain GEMM,
    where MKL's sgemm beats effops's register-tiled kernel (whose strength is the fused epilogue):
    8x24x56x56 -> 144 1.16 vs 1.84 ms, 128 -> 128 5.5 vs 7.7 ms, one thread. Outputs over 32 MiB
    stay on effops's kernel, which advises them onto huge pages (16 -> 96 at 8x112x112, a fresh
    38 MB map: 8.6 ms vs torch.mm's 16.4 ms, most of it page faults)."""
    return (y.dtype == torch.float32 and channel_scale is None and scale is None and bias is None
            and act == "none" and residual is None)


def _pw_vendor_gemm(y: Tensor, weight: Tensor) -> Tensor:
    N, C, H, W = y.shape
    Co = weight.shape[0]
    if N * H * W * Co * 4 > _FRESH_MAP_BYTES:
        return _pw_cpu(y, weight, None, None, None, "none", None)
    rows = _nhwc(y).reshape(N * H * W, C)
    out = torch.mm(rows, weight.reshape(Co, C).to(torch.float32).t())
    return out.view(N, H, W, Co).permute(0, 3, 1, 2)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------- GPU backends
def _select(op: str, x: Tensor) -> str:
    """The backend for op on x; the GPU kernels compute in float32 at most, so float64 (used for
    gradcheck) runs on the reference there."""
    b = _backend.select(op, x.device)
    if b in ("triton", "cuda") and x.dtype == torch.float64:
        return "reference"
    return b


def _tk():
    from ..triton import dwsep as tk

    return tk


def _stream(t: Tensor):
    return torch.cuda.current_stream(t.device).cuda_stream, t.device.index


def _dwsep_cuda(x, dw_weight, pw_weight, g, dw_scale, dw_bias, act, pw_scale, pw_bias, pw_act, residual, preact):
    wts = _dwsep_weights(x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias)
    out = _empty_nhwc(x.shape[0], *g.out_hw, pw_weight.shape[0], x.dtype, x.device)
    _backend._cuda.dwsep_forward(_nhwc(x), *wts, None if residual is None else _nhwc(residual), *_geom_args(g),
                                 ACT_CODES[act], ACT_CODES[pw_act], preact, out, *_stream(x))
    return _from_nhwc(out)


def _dw_cuda(x, weight, g, scale, bias, act):
    N, C = x.shape[:2]
    y = _empty_nhwc(N, *g.out_hw, C, x.dtype, x.device)
    pblocks = -(-(g.out_hw[0] * g.out_hw[1]) // _backend._cuda.dw_pixels_per_block)
    part = torch.empty(N, pblocks, C, dtype=torch.float32, device=x.device)
    _backend._cuda.dw_forward(_nhwc(x), *_dw_weights(x, weight, scale, bias), *_geom_args(g), ACT_CODES[act], y, part,
                              *_stream(x))
    return _from_nhwc(y), part.sum(1)


def _pw_cuda(y, weight, channel_scale, scale, bias, act, residual):
    N, C, H, W = y.shape
    w, sc, b = _pw_weights(y, weight, scale, bias)
    out = _empty_nhwc(N, H, W, w.shape[0], y.dtype, y.device)
    _backend._cuda.pw_forward(_nhwc(y), w, None if channel_scale is None else channel_scale.contiguous(), sc, b,
                              ACT_CODES[act], None if residual is None else _nhwc(residual), out, *_stream(y))
    return _from_nhwc(out)


def _dw_backward_cuda(a: Tensor, weight: Tensor, g: ConvGeometry, gd_raw: Tensor):
    N, C, H, W = a.shape
    KH, KW = weight.shape[2:]
    ga = _empty_nhwc(N, H, W, C, torch.float32, a.device)
    pblocks = -(-(N * g.out_hw[0] * g.out_hw[1]) // _backend._cuda.dw_pixels_per_block)
    part = torch.empty(pblocks, KH * KW, C, dtype=torch.float32, device=a.device)
    _backend._cuda.dw_backward(_nhwc(a.float()), _dw_taps(weight, a), _nhwc(gd_raw.float()), *_geom_args(g), ga,
                               part, *_stream(a))
    return _from_nhwc(ga).to(a.dtype), part.sum(0).view(KH, KW, C).permute(2, 0, 1).unsqueeze(1).to(a.dtype)


def _dwsep_triton(x, dw_weight, pw_weight, g, dw_scale, dw_bias, act, pw_scale, pw_bias, pw_act, residual, preact):
    wts = _dwsep_weights(x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias)
    out = _tk().dwsep_forward(_nhwc(x), *wts, None if residual is None else _nhwc(residual), g, ACT_CODES[act],
                              ACT_CODES[pw_act], preact)
    return _from_nhwc(out)


def _dw_triton(x, weight, g, scale, bias, act):
    y, sums = _tk().dw_forward(_nhwc(x), *_dw_weights(x, weight, scale, bias), g, ACT_CODES[act])
    return _from_nhwc(y), sums


def _pw_triton(y, weight, channel_scale, scale, bias, act, residual):
    w, s, b = _pw_weights(y, weight, scale, bias)
    out = _tk().pw_forward(_nhwc(y), w, None if channel_scale is None else channel_scale.contiguous(), s, b,
                           ACT_CODES[act], None if residual is None else _nhwc(residual))
    return _from_nhwc(out)


def _dw_backward_cpu(a: Tensor, weight: Tensor, g: ConvGeometry, gd_raw: Tensor):
    N, C, H, W = a.shape
    acc = gd_raw.dtype
    ga = _empty_nhwc(N, H, W, C, acc, a.device)
    gw = torch.empty(weight.shape[2], weight.shape[3], C, dtype=acc, device=a.device)
    _backend._C.dw_backward(_nhwc(a), _dw_taps(weight, a), _nhwc(gd_raw.to(acc)), *_geom_args(g), ga, gw, _threads())
    return _from_nhwc(ga), gw.permute(2, 0, 1).unsqueeze(1)


class _Prims:
    """The three primitives the backward passes are built from, per backend: the raw depthwise
    conv (no affine/activation), the raw pointwise conv, and the depthwise conv's backward.
    The remaining backward work is elementwise, reductions, and the pointwise convs' two weight/
    input gradient GEMMs, which run on the vendor GEMM (torch.matmul)."""

    def __init__(self, backend: str):
        self.backend = backend

    def dw_raw(self, a: Tensor, w: Tensor, g: ConvGeometry) -> Tensor:
        if self.backend == "cpu":
            return _dw_cpu(a, w, g, None, None, "none")[0]
        if self.backend == "cuda":
            return _dw_cuda(a, w, g, None, None, "none")[0]
        if self.backend == "triton":
            return _dw_triton(a, w, g, None, None, "none")[0]
        return _depthwise_reference(a, w, g)

    def pw_raw(self, d: Tensor, w: Tensor) -> Tensor:
        if self.backend == "cpu":
            return _pw_cpu(d, w, None, None, None, "none", None)
        if self.backend == "cuda":
            return _pw_cuda(d, w, None, None, None, "none", None)
        if self.backend == "triton":
            return _pw_triton(d, w, None, None, None, "none", None)
        return F.conv2d(d, w.to(d.dtype))

    def dw_bwd(self, a: Tensor, w: Tensor, g: ConvGeometry, gd_raw: Tensor) -> Tuple[Tensor, Tensor]:
        if self.backend == "cpu":
            return _dw_backward_cpu(a, w, g, gd_raw)
        if self.backend == "cuda":
            return _dw_backward_cuda(a, w, g, gd_raw)
        if self.backend == "triton":
            ga, gw = _tk().dw_backward(_nhwc(a), _dw_taps(w, a), _nhwc(gd_raw.to(a.dtype)), g)
            return _from_nhwc(ga), gw.permute(2, 0, 1).unsqueeze(1)
        # explicit convolution backward (custom-op bodies run below autograd)
        top, bottom, left, right = g.pad
        ap = F.pad(a, (left, right, top, bottom))
        w = w.to(a.dtype)
        gd = gd_raw.to(a.dtype)
        C = a.shape[1]
        gap = torch.nn.grad.conv2d_input(ap.shape, w, gd, g.stride, 0, g.dilation, C)
        gw = torch.nn.grad.conv2d_weight(ap, w.shape, gd, g.stride, 0, g.dilation, C)
        return gap[:, :, top:top + a.shape[2], left:left + a.shape[3]], gw


# =============================================================================== custom ops
def _geometry_from(x: Tensor, weight: Tensor, stride: List[int], pad: List[int], dilation: List[int]) -> ConvGeometry:
    kh, kw = weight.shape[-2:]
    H, W = x.shape[-2:]
    out = ((H + pad[0] + pad[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
           (W + pad[2] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1)
    return ConvGeometry(tuple(stride), tuple(pad), tuple(dilation), out)


def _opt(t: Tensor) -> Optional[Tensor]:
    """Backward ops return an empty tensor for 'no gradient' (custom ops cannot return None)."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def _nograd(device) -> Tensor:
    """'No gradient' for a backward op's output: a fresh empty tensor (outputs may not alias)."""
    return torch.empty(0, device=device)


@custom_op(
    "effops::dwsep_conv",
    "(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? dw_scale, Tensor? dw_bias, Tensor? pw_scale, "
    "Tensor? pw_bias, Tensor? residual, SymInt[] stride, SymInt[] pad, SymInt[] dilation, str act, str pw_act, "
    "bool preact) -> Tensor",
)
def _dwsep_op(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, dw_scale: Optional[Tensor], dw_bias: Optional[Tensor],
              pw_scale: Optional[Tensor], pw_bias: Optional[Tensor], residual: Optional[Tensor],
              stride: List[int], pad: List[int], dilation: List[int], act: str, pw_act: str, preact: bool) -> Tensor:
    g = _geometry_from(x, dw_weight, stride, pad, dilation)
    backend = _select("dwsep_conv", x)
    args = (x, dw_weight, pw_weight, g, dw_scale, dw_bias, act, pw_scale, pw_bias, pw_act, residual, preact)
    if backend == "cpu":
        out = _dwsep_cpu(*args)
    elif backend == "cuda":
        out = _dwsep_cuda(*args)
    elif backend == "triton":
        out = _dwsep_triton(*args)
    else:
        out = dwsep_conv_reference(*args)
    return _like_input(out, x)


@_dwsep_op.register_fake
def _(x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias, residual, stride, pad, dilation, act, pw_act, preact):
    g = _geometry_from(x, dw_weight, stride, pad, dilation)
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return x.new_empty((x.shape[0], pw_weight.shape[0], *g.out_hw)).contiguous(memory_format=fmt)


@custom_op(
    "effops::dw_conv_act",
    "(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, SymInt[] stride, SymInt[] pad, SymInt[] dilation, "
    "str act) -> (Tensor, Tensor)",
)
def _dw_op(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], stride: List[int],
           pad: List[int], dilation: List[int], act: str) -> Tuple[Tensor, Tensor]:
    g = _geometry_from(x, weight, stride, pad, dilation)
    backend = _select("dw_conv_act", x)
    if backend in ("cpu", "cuda", "triton"):
        y, sums = {"cpu": _dw_cpu, "cuda": _dw_cuda, "triton": _dw_triton}[backend](x, weight, g, scale, bias, act)
        means = (sums / (g.out_hw[0] * g.out_hw[1])).to(x.dtype)
    else:
        y, means = dw_conv_act_reference(x, weight, g, scale, bias, act)
    return _like_input(y, x), means


@_dw_op.register_fake
def _(x, weight, scale, bias, stride, pad, dilation, act):
    g = _geometry_from(x, weight, stride, pad, dilation)
    fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return x.new_empty((x.shape[0], x.shape[1], *g.out_hw)).contiguous(memory_format=fmt), x.new_empty(x.shape[:2])


@custom_op(
    "effops::pw_conv",
    "(Tensor y, Tensor weight, Tensor? channel_scale, Tensor? scale, Tensor? bias, Tensor? residual, "
    "str act) -> Tensor",
)
def _pw_op(y: Tensor, weight: Tensor, channel_scale: Optional[Tensor], scale: Optional[Tensor],
           bias: Optional[Tensor], residual: Optional[Tensor], act: str) -> Tensor:
    backend = _select("pw_conv", y)
    if backend == "cpu" and _plain_gemm(y, channel_scale, scale, bias, act, residual):
        out = _pw_vendor_gemm(y, weight)
    elif backend == "cpu":
        out = _pw_cpu(y, weight, channel_scale, scale, bias, act, residual)
    elif backend == "cuda":
        out = _pw_cuda(y, weight, channel_scale, scale, bias, act, residual)
    elif backend == "triton":
        out = _pw_triton(y, weight, channel_scale, scale, bias, act, residual)
    else:
        out = pw_conv_reference(y, weight, channel_scale, scale, bias, act, residual)
    return _like_input(out, y)


@_pw_op.register_fake
def _(y, weight, channel_scale, scale, bias, residual, act):
    fmt = torch.channels_last if _is_channels_last(y) else torch.contiguous_format
    return y.new_empty((y.shape[0], weight.shape[0], *y.shape[2:])).contiguous(memory_format=fmt)


# ------------------------------------------------------------------------------- backward ops
# Each forward op has a backward custom op (so torch.compile/AOTAutograd see one opaque node).
# Gradients come back for every tensor input; an input without a gradient gets an empty tensor.
# Intermediates are recomputed from the inputs (nothing but the inputs is saved for backward).
def _chan(t: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(acc)[None, :, None, None]


def _grad_for(t: Tensor, like: Optional[Tensor]) -> Tensor:
    return _nograd(t.device) if like is None else t.to(like.dtype)


def _pw_backward_core(gp_aff: Tensor, a: Tensor, weight2d: Tensor, scale: Optional[Tensor], need_bias: bool = True):
    """Gradients of p_aff = (a @ W^T) * scale + bias (NCHW logical tensors, any layout) with
    respect to a, W, scale, bias, given gp_aff = dL/dp_aff. With H = gp_aff^T a:
    dW = scale[:, None] * H, dscale = rowsum(W * H), dbias = colsum(gp_aff). dscale without a
    scale and dbias without need_bias are empty placeholders (not computed)."""
    acc = gp_aff.dtype
    Co, C = weight2d.shape
    g2 = gp_aff.permute(0, 2, 3, 1).reshape(-1, Co)
    a2 = a.permute(0, 2, 3, 1).reshape(-1, C).to(acc)
    H = g2.t() @ a2
    w = weight2d.to(acc)
    s = None if scale is None else scale.to(acc)
    dW = H if s is None else H * s[:, None]
    dscale = (w * H).sum(1) if s is not None else g2.new_empty(0)
    dbias = g2.sum(0) if need_bias else g2.new_empty(0)  # a pass over the gradient: only when asked
    gp_raw = g2 if s is None else g2 * s
    da = (gp_raw @ w).reshape(a.shape[0], a.shape[2], a.shape[3], C).permute(0, 3, 1, 2)
    return da, dW, dscale, dbias


def _affine_backward(gpre: Tensor, raw: Optional[Tensor], scale: Optional[Tensor], need_bias: bool = True):
    """For pre = raw * scale + bias: (d raw, d scale, d bias); d scale without a scale (raw may
    then be None) and d bias without need_bias are empty placeholders (not computed)."""
    dscale = (gpre * raw).sum((0, 2, 3)) if scale is not None else gpre.new_empty(0)
    dbias = gpre.sum((0, 2, 3)) if need_bias else gpre.new_empty(0)
    graw = gpre if scale is None else gpre * _chan(scale, gpre.dtype)
    return graw, dscale, dbias


@custom_op(
    "effops::dwsep_conv_backward",
    "(Tensor grad, Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? dw_scale, Tensor? dw_bias, "
    "Tensor? pw_scale, Tensor? pw_bias, bool has_residual, SymInt[] stride, SymInt[] pad, SymInt[] dilation, "
    "str act, str pw_act, bool preact) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _dwsep_bwd_op(grad: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor, dw_scale: Optional[Tensor],
                  dw_bias: Optional[Tensor], pw_scale: Optional[Tensor], pw_bias: Optional[Tensor],
                  has_residual: bool, stride: List[int], pad: List[int], dilation: List[int], act: str, pw_act: str,
                  preact: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = _geometry_from(x, dw_weight, stride, pad, dilation)
    P = _Prims(_select("dwsep_conv", x))
    acc = _acc_dtype(x)
    Co, C = pw_weight.shape[0], x.shape[1]
    grad_acc = grad.to(acc)
    xa = x.to(acc)
    a = apply_act(xa, act) if preact else xa
    raw = P.dw_raw(a, dw_weight, g)
    dpre = _affine(raw, dw_scale, dw_bias)
    d = dpre if preact else apply_act(dpre, act)
    if pw_act != "none":
        gp_aff = grad_acc * act_grad(_affine(P.pw_raw(d, pw_weight), pw_scale, pw_bias), pw_act)
    else:
        gp_aff = grad_acc
    dd, dW, dps, dpb = _pw_backward_core(gp_aff, d, pw_weight.reshape(Co, C), pw_scale, pw_bias is not None)
    gd_pre = dd if preact else dd * act_grad(dpre, act)
    gd_raw, ddws, ddwb = _affine_backward(gd_pre, raw, dw_scale, dw_bias is not None)
    ga, gw = P.dw_bwd(a, dw_weight, g, gd_raw)
    gx = ga * act_grad(xa, act) if preact else ga
    return (
        _strided_like(_like_input(gx.to(x.dtype), x), x),
        _strided_like(gw.reshape(dw_weight.shape).to(dw_weight.dtype), dw_weight),
        _strided_like(dW.reshape(pw_weight.shape).to(pw_weight.dtype), pw_weight),
        _grad_for(ddws, dw_scale), _grad_for(ddwb, dw_bias), _grad_for(dps, pw_scale), _grad_for(dpb, pw_bias),
        _strided_like(_copy_like(grad, x), grad) if has_residual else _nograd(x.device),
    )


@_dwsep_bwd_op.register_fake
def _(grad, x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias, has_residual, stride, pad, dilation, act,
      pw_act, preact):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return (torch.empty_like(x), torch.empty_like(dw_weight), torch.empty_like(pw_weight), like(dw_scale),
            like(dw_bias), like(pw_scale), like(pw_bias), torch.empty_like(grad) if has_residual else x.new_empty(0))


@custom_op(
    "effops::dw_conv_act_backward",
    "(Tensor grad_y, Tensor? grad_means, Tensor x, Tensor weight, Tensor? scale, Tensor? bias, SymInt[] stride, "
    "SymInt[] pad, SymInt[] dilation, str act) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _dw_bwd_op(grad_y: Tensor, grad_means: Optional[Tensor], x: Tensor, weight: Tensor, scale: Optional[Tensor],
               bias: Optional[Tensor], stride: List[int], pad: List[int], dilation: List[int],
               act: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_means None: the pooled means were not used. The forward's depthwise conv is recomputed
    only where the backward needs it (an activation's gradient, d scale): a conv followed by a
    training BatchNorm (act 'none', no scale) goes straight to the depthwise backward."""
    g = _geometry_from(x, weight, stride, pad, dilation)
    P = _Prims(_select("dw_conv_act", x))
    acc = _acc_dtype(x)
    xa = x.to(acc)
    raw = P.dw_raw(xa, weight, g) if act != "none" or scale is not None else None
    gy = grad_y.to(acc)
    if grad_means is not None:
        hw = g.out_hw[0] * g.out_hw[1]
        gy = gy + (grad_means.to(acc) / hw)[:, :, None, None]
    if act != "none":
        gy = gy * act_grad(_affine(raw, scale, bias), act)
    graw, dscale, dbias = _affine_backward(gy, raw, scale, bias is not None)
    gx, gw = P.dw_bwd(xa, weight, g, graw)
    return (_strided_like(_like_input(gx.to(x.dtype), x), x),
            _strided_like(gw.reshape(weight.shape).to(weight.dtype), weight),
            _grad_for(dscale, scale), _grad_for(dbias, bias))


@_dw_bwd_op.register_fake
def _(grad_y, grad_means, x, weight, scale, bias, stride, pad, dilation, act):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return torch.empty_like(x), torch.empty_like(weight), like(scale), like(bias)


@custom_op(
    "effops::pw_conv_backward",
    "(Tensor grad, Tensor y, Tensor weight, Tensor? channel_scale, Tensor? scale, Tensor? bias, "
    "bool has_residual, str act) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _pw_bwd_op(grad: Tensor, y: Tensor, weight: Tensor, channel_scale: Optional[Tensor], scale: Optional[Tensor],
               bias: Optional[Tensor], has_residual: bool,
               act: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    P = _Prims(_select("pw_conv", y))
    acc = _acc_dtype(y)
    Co, C = weight.shape[0], y.shape[1]
    ya = y.to(acc)
    ys = ya if channel_scale is None else ya * channel_scale.to(acc)[:, :, None, None]
    gp = grad.to(acc)
    if act != "none":
        gp = gp * act_grad(_affine(P.pw_raw(ys, weight), scale, bias), act)
    dys, dW, dscale, dbias = _pw_backward_core(gp, ys, weight.reshape(Co, C), scale, bias is not None)
    if channel_scale is not None:
        dcs = _grad_for((dys * ya).sum((2, 3)), channel_scale)
        dy = dys * channel_scale.to(acc)[:, :, None, None]
    else:
        dcs, dy = _nograd(y.device), dys
    return (_strided_like(_like_input(dy.to(y.dtype), y), y),
            _strided_like(dW.reshape(weight.shape).to(weight.dtype), weight), dcs,
            _grad_for(dscale, scale), _grad_for(dbias, bias),
            _strided_like(_copy_like(grad, y), grad) if has_residual else _nograd(y.device))


@_pw_bwd_op.register_fake
def _(grad, y, weight, channel_scale, scale, bias, has_residual, act):
    def like(t):
        return torch.empty_like(t) if t is not None else y.new_empty(0)

    return (torch.empty_like(y), torch.empty_like(weight), like(channel_scale), like(scale), like(bias),
            torch.empty_like(grad) if has_residual else y.new_empty(0))


# ------------------------------------------------------------------------------- autograd
def _dwsep_setup(ctx, inputs, output):
    (x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias, residual, stride, pad, dilation, act, pw_act,
     preact) = inputs
    ctx.save_for_backward(x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias)
    ctx.cfg = (residual is not None, stride, pad, dilation, act, pw_act, preact)


def _dwsep_backward(ctx, grad):
    x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias = ctx.saved_tensors
    has_res, stride, pad, dilation, act, pw_act, preact = ctx.cfg
    gx, gdw, gpw, gdws, gdwb, gpws, gpwb, gres = torch.ops.effops.dwsep_conv_backward(
        grad, x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias, has_res, stride, pad, dilation, act,
        pw_act, preact)
    opt = [None if t is None else g for t, g in zip((dw_scale, dw_bias, pw_scale, pw_bias), (gdws, gdwb, gpws, gpwb))]
    return (gx, gdw, gpw, *opt, gres if has_res else None, None, None, None, None, None, None)


_dwsep_op.register_autograd(_dwsep_backward, setup_context=_dwsep_setup)


def _dw_setup(ctx, inputs, output):
    x, weight, scale, bias, stride, pad, dilation, act = inputs
    # An unused output's gradient stays None instead of a zero tensor: the means of a block
    # without squeeze-excite cost a full-size broadcast add in the backward otherwise.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, scale, bias)
    ctx.cfg = (stride, pad, dilation, act, tuple(output[0].shape))


def _dw_backward(ctx, grad_y, grad_means):
    x, weight, scale, bias = ctx.saved_tensors
    stride, pad, dilation, act, y_shape = ctx.cfg
    if grad_y is None:
        grad_y = x.new_zeros(y_shape)
    gx, gw, gs, gb = torch.ops.effops.dw_conv_act_backward(
        grad_y, grad_means, x, weight, scale, bias, stride, pad, dilation, act)
    return gx, gw, (gs if scale is not None else None), (gb if bias is not None else None), None, None, None, None


_dw_op.register_autograd(_dw_backward, setup_context=_dw_setup)


def _pw_setup(ctx, inputs, output):
    y, weight, channel_scale, scale, bias, residual, act = inputs
    ctx.save_for_backward(y, weight, channel_scale, scale, bias)
    ctx.cfg = (residual is not None, act)


def _pw_backward(ctx, grad):
    y, weight, channel_scale, scale, bias = ctx.saved_tensors
    has_res, act = ctx.cfg
    gy, gw, gcs, gs, gb, gres = torch.ops.effops.pw_conv_backward(grad, y, weight, channel_scale, scale, bias,
                                                                  has_res, act)
    return (gy, gw, gcs if channel_scale is not None else None, gs if scale is not None else None,
            gb if bias is not None else None, gres if has_res else None, None)


_pw_op.register_autograd(_pw_backward, setup_context=_pw_setup)


# =============================================================================== public API
def _check_x(op: str, x, name: str = "x") -> Tensor:
    x = check_tensor(op, name, x)
    if x.dim() != 4:
        raise EffopsInputError(f"{op}: {name} must be a 4-d tensor [N, C, H, W], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise EffopsTypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dtype == torch.float16 and x.device.type == "cpu":
        raise EffopsTypeError(f"{op}: float16 is supported on CUDA; on the CPU use bfloat16 or float32")
    return x


def _check_param(op: str, name: str, t, shape: Sequence[int], x: Tensor, *, same_dtype: bool = False) -> Optional[Tensor]:
    if t is None:
        return None
    t = check_tensor(op, name, t)
    if tuple(t.shape) != tuple(shape):
        raise EffopsInputError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    allowed = (x.dtype,) if same_dtype else (x.dtype, torch.float32)
    if t.dtype not in allowed:
        raise EffopsTypeError(f"{op}: {name} must be {' or '.join(str(d) for d in dict.fromkeys(allowed))} "
                        f"(the dtype of x{'' if same_dtype else ', or float32'}), got {t.dtype}")
    if t.device != x.device:
        raise EffopsInputError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    return t


def _check_channels(op: str, name: str, C: int, wname: str, Co: Optional[int] = None) -> None:
    """torch's conv2d refuses zero channels (groups=0, a weight with no output channels): so do we."""
    if C == 0:
        raise EffopsInputError(f"{op}: {name} must have at least one channel, got C = 0")
    if Co == 0:
        raise EffopsInputError(f"{op}: {wname} must have at least one output channel, got Co = 0")


def _check_dw_weight(op: str, w, C: int, x: Tensor) -> Tensor:
    w = check_tensor(op, "dw_weight" if op == "dwsep_conv" else "weight", w)
    name = "dw_weight" if op == "dwsep_conv" else "weight"
    if w.dim() != 4 or w.shape[0] != C or w.shape[1] != 1:
        raise EffopsInputError(f"{op}: {name} must have shape [C, 1, kh, kw] = [{C}, 1, kh, kw] for a depthwise conv of "
                         f"{C} channels (groups = C), got {list(w.shape)}")
    if w.shape[2] < 1 or w.shape[3] < 1:
        raise EffopsInputError(f"{op}: {name} must have a kernel of at least 1x1, got {list(w.shape)}")
    return _check_param(op, name, w, w.shape, x)


def _check_pw_weight(op: str, w, C: int, x: Tensor, name: str) -> Tensor:
    w = check_tensor(op, name, w)
    if w.dim() == 2:
        w = w[:, :, None, None]
    if w.dim() != 4 or w.shape[1] != C or w.shape[2:] != (1, 1):
        raise EffopsInputError(f"{op}: {name} must have shape [Co, {C}, 1, 1] (or [Co, {C}]), got {list(w.shape)}")
    return _check_param(op, name, w, w.shape, x)


def _autocast(*ts):
    """Inside torch.autocast, cast floating inputs to the autocast dtype, as conv2d is."""
    dev = "cpu"
    for t in ts:  # not next(generator, default): torch 2.4's dynamo cannot trace that (fullgraph)
        if isinstance(t, torch.Tensor):
            dev = t.device.type
            break
    try:
        if not torch.is_autocast_enabled(dev):
            return ts
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts)


def dwsep_conv(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, *, stride=1, padding: Padding = "same", dilation=1,
               dw_scale: Optional[Tensor] = None, dw_bias: Optional[Tensor] = None, act: Optional[str] = "silu",
               pw_scale: Optional[Tensor] = None, pw_bias: Optional[Tensor] = None, pw_act: Optional[str] = None,
               residual: Optional[Tensor] = None, preact: bool = False) -> Tensor:
    """Depthwise kxk conv -> per-channel affine -> act -> pointwise 1x1 conv -> per-channel affine
    -> pw_act -> + residual, in one pass over memory (see the module docstring for details).

    With ``preact=True`` the activation is applied to the input instead (EfficientDet's BiFPN and
    heads: act -> depthwise -> pointwise -> affine). Folded BatchNorm goes into the scales/biases.
    """
    op = "dwsep_conv"
    x, dw_weight, pw_weight, residual = _autocast(x, dw_weight, pw_weight, residual)
    x = _check_x(op, x)
    N, C, H, W = x.shape
    dw_weight = _check_dw_weight(op, dw_weight, C, x)
    pw_weight = _check_pw_weight(op, pw_weight, C, x, "pw_weight")
    Co = pw_weight.shape[0]
    _check_channels(op, "x", C, "pw_weight", Co)
    dw_scale = _check_param(op, "dw_scale", dw_scale, (C,), x)
    dw_bias = _check_param(op, "dw_bias", dw_bias, (C,), x)
    pw_scale = _check_param(op, "pw_scale", pw_scale, (Co,), x)
    pw_bias = _check_param(op, "pw_bias", pw_bias, (Co,), x)
    a, pa = act_name(op, "act", act), act_name(op, "pw_act", pw_act)
    if not isinstance(preact, bool):
        raise EffopsTypeError(f"{op}: preact must be a bool, got {type(preact).__name__}")
    g = conv_geometry(op, (H, W), dw_weight.shape[2:], stride, padding, dilation)
    residual = _check_param(op, "residual", residual, (N, Co, *g.out_hw), x, same_dtype=True)
    return torch.ops.effops.dwsep_conv(x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias, residual,
                                       list(g.stride), list(g.pad), list(g.dilation), a, pa, preact)


def dw_conv_act(x: Tensor, weight: Tensor, *, stride=1, padding: Padding = "same", dilation=1,
                scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                act: Optional[str] = "silu") -> Tuple[Tensor, Tensor]:
    """Depthwise kxk conv -> per-channel affine -> act, plus the squeeze-and-excitation global
    average pool of the result as a side output of the same pass: returns ``(y, means[N, C])``."""
    op = "dw_conv_act"
    x, weight = _autocast(x, weight)
    x = _check_x(op, x)
    N, C, H, W = x.shape
    weight = _check_dw_weight(op, weight, C, x)
    _check_channels(op, "x", C, "weight")
    scale = _check_param(op, "scale", scale, (C,), x)
    bias = _check_param(op, "bias", bias, (C,), x)
    g = conv_geometry(op, (H, W), weight.shape[2:], stride, padding, dilation)
    return torch.ops.effops.dw_conv_act(x, weight, scale, bias, list(g.stride), list(g.pad), list(g.dilation),
                                        act_name(op, "act", act))


def pw_conv(y: Tensor, weight: Tensor, *, channel_scale: Optional[Tensor] = None, scale: Optional[Tensor] = None,
            bias: Optional[Tensor] = None, act: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
    """Pointwise 1x1 conv with the SE channel scaling applied while loading (``channel_scale``
    [N, C]), then a per-channel affine, activation and residual add, in one pass."""
    op = "pw_conv"
    y, weight, residual, channel_scale = _autocast(y, weight, residual, channel_scale)
    y = _check_x(op, y, "y")
    N, C, H, W = y.shape
    weight = _check_pw_weight(op, weight, C, y, "weight")
    Co = weight.shape[0]
    _check_channels(op, "y", C, "weight", Co)
    channel_scale = _check_param(op, "channel_scale", channel_scale, (N, C), y, same_dtype=True)
    scale = _check_param(op, "scale", scale, (Co,), y)
    bias = _check_param(op, "bias", bias, (Co,), y)
    residual = _check_param(op, "residual", residual, (N, Co, H, W), y, same_dtype=True)
    return torch.ops.effops.pw_conv(y, weight, channel_scale, scale, bias, residual, act_name(op, "act", act))


# =============================================================================== prepared
def _fast_path_ok(x: Tensor, needs_grad: bool) -> bool:
    """True when a call can go straight to the CPU kernel: eager inference (nothing needs a
    gradient, no tracing, no autocast, no dispatch mode such as a FLOP counter or fake tensors
    watching), a plain CPU float32/bfloat16 tensor, the cpu backend selected."""
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor and not x.is_cuda
            and x.dtype in _FAST_DTYPES and x.dim() == 4
            and not (torch.is_grad_enabled() and (needs_grad or x.requires_grad))
            and _get_current_dispatch_mode() is None
            and not torch.is_autocast_enabled("cpu") and x.device.type == "cpu"
            and _backend._C is not None and _backend.forced_backend() in (None, "cpu"))


_FAST_DTYPES = (torch.float32, torch.bfloat16)


class _Prepared:
    """Arguments of repeated calls of one op, converted to the CPU kernels' layouts once.
    Calling it gives exactly what the public op gives; in eager inference on the CPU it skips the
    per-call checks, conversions and dispatch. Other calls go through the public op."""

    def __init__(self, tensors):
        self._needs_grad = any(t is not None and t.requires_grad for t in tensors)
        self._wts = {}
        self._geo = {}

    def in_place(self) -> tuple:
        """The argument tensors the kernels read in place (no converted copy is kept): a cache of
        prepared ops need not watch their contents."""
        return ()

    def _weights(self, x: Tensor):
        w = self._wts.get(x.dtype)
        if w is None:
            w = self._wts[x.dtype] = self._convert(x)
        return w

    def _geometry(self, x: Tensor, k) -> ConvGeometry:
        hw = tuple(x.shape[2:])
        g = self._geo.get(hw)
        if g is None:
            g = self._geo[hw] = conv_geometry(self.op, hw, k, self.stride, self.padding, self.dilation)
        return g


class PreparedDWSep(_Prepared):
    """``dwsep_conv`` with fixed weights and options: ``PreparedDWSep(dw_weight, pw_weight, **kw)(x, residual)``."""

    op = "dwsep_conv"

    def __init__(self, dw_weight, pw_weight, *, stride=1, padding="same", dilation=1, dw_scale=None, dw_bias=None,
                 act="silu", pw_scale=None, pw_bias=None, pw_act=None, preact=False):
        super().__init__((dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias))
        self.args = (dw_weight, pw_weight)
        self.kw = dict(stride=stride, padding=padding, dilation=dilation, dw_scale=dw_scale, dw_bias=dw_bias,
                       act=act, pw_scale=pw_scale, pw_bias=pw_bias, pw_act=pw_act, preact=preact)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.act, self.pw_act = act_name(self.op, "act", act), act_name(self.op, "pw_act", pw_act)
        self.C, self.Co = dw_weight.shape[0], pw_weight.shape[0]

    def _convert(self, x):
        k = self.kw
        return _dwsep_weights(x, *self.args, k["dw_scale"], k["dw_bias"], k["pw_scale"], k["pw_bias"])

    def in_place(self) -> tuple:
        pw = self.args[1]  # _f32(pw.reshape(Co, C)) of a contiguous float32 weight is a view
        return (pw,) if pw.dtype == torch.float32 and pw.is_contiguous() else ()

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if (_fast_path_ok(x, self._needs_grad) and x.shape[1] == self.C
                and (residual is None or (residual.dtype == x.dtype and not residual.requires_grad))):
            g = self._geometry(x, self.args[0].shape[2:])
            if residual is None or tuple(residual.shape) == (x.shape[0], self.Co, *g.out_hw):
                out = profiled("effops::dwsep_conv", _dwsep_run, x, self._weights(x), residual, g, self.act,
                               self.pw_act, self.kw["preact"])
                return _like_input(out, x)
        return dwsep_conv(x, *self.args, residual=residual, **self.kw)


class PreparedDW(_Prepared):
    """``dw_conv_act`` with fixed weights and options: ``PreparedDW(weight, **kw)(x) -> (y, means)``."""

    op = "dw_conv_act"

    def __init__(self, weight, *, stride=1, padding="same", dilation=1, scale=None, bias=None, act="silu"):
        super().__init__((weight, scale, bias))
        self.weight = weight
        self.kw = dict(stride=stride, padding=padding, dilation=dilation, scale=scale, bias=bias, act=act)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.act = act_name(self.op, "act", act)

    def _convert(self, x):
        return _dw_weights(x, self.weight, self.kw["scale"], self.kw["bias"])

    def __call__(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if _fast_path_ok(x, self._needs_grad) and x.shape[1] == self.weight.shape[0]:
            g = self._geometry(x, self.weight.shape[2:])
            y, sums = profiled("effops::dw_conv_act", _dw_run, x, self._weights(x), g, self.act)
            return _like_input(y, x), (sums / (g.out_hw[0] * g.out_hw[1])).to(x.dtype)
        return dw_conv_act(x, self.weight, **self.kw)


class PreparedPW(_Prepared):
    """``pw_conv`` with fixed weights and options: ``PreparedPW(weight, **kw)(y, channel_scale, residual)``."""

    op = "pw_conv"

    def __init__(self, weight, *, scale=None, bias=None, act=None):
        super().__init__((weight, scale, bias))
        self.weight = weight
        self.kw = dict(scale=scale, bias=bias, act=act)
        self.act = act_name(self.op, "act", act)

    def _convert(self, x):
        return _pw_weights(x, self.weight, self.kw["scale"], self.kw["bias"])

    def in_place(self) -> tuple:
        w = self.weight
        return (w,) if w.dtype == torch.float32 and w.is_contiguous() else ()

    def __call__(self, y: Tensor, channel_scale: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> Tensor:
        extra = [t for t in (channel_scale, residual) if t is not None]
        if (_fast_path_ok(y, self._needs_grad) and y.shape[1] == self.weight.shape[1]
                and all(t.dtype == y.dtype and not t.requires_grad for t in extra)
                and (channel_scale is None or tuple(channel_scale.shape) == tuple(y.shape[:2]))
                and (residual is None or tuple(residual.shape) == (y.shape[0], self.weight.shape[0], *y.shape[2:]))):
            out = profiled("effops::pw_conv", _pw_run, y, self._weights(y), channel_scale, self.act, residual)
            return _like_input(out, y)
        return pw_conv(y, self.weight, channel_scale=channel_scale, residual=residual, **self.kw)


# =============================================================================== FLOP counting
# torch.utils.flop_counter cannot look inside custom ops: declare their multiply-adds (x2, the
# counter's convention for convolutions; the backward ops count twice the forward).
def _register_flops():
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # older torch
        return

    def dwsep(x_shape, dw_shape, pw_shape, *args, out_shape=None, **kwargs):
        return 2 * x_shape[0] * out_shape[2] * out_shape[3] * x_shape[1] * (dw_shape[2] * dw_shape[3] + pw_shape[0])

    def dw(x_shape, w_shape, *args, out_shape=None, **kwargs):
        y = out_shape[0]
        return 2 * y[0] * y[1] * y[2] * y[3] * w_shape[2] * w_shape[3]

    def pw(y_shape, w_shape, *args, out_shape=None, **kwargs):
        return 2 * y_shape[0] * y_shape[2] * y_shape[3] * y_shape[1] * w_shape[0]

    register_flop_formula(torch.ops.effops.dwsep_conv)(dwsep)
    register_flop_formula(torch.ops.effops.dw_conv_act)(dw)
    register_flop_formula(torch.ops.effops.pw_conv)(pw)
    register_flop_formula(torch.ops.effops.dwsep_conv_backward)(
        lambda g, x, dw_w, pw_w, *a, out_shape=None, **k: 2 * dwsep(x, dw_w, pw_w, out_shape=g))
    register_flop_formula(torch.ops.effops.dw_conv_act_backward)(
        lambda gy, gm, x, w, *a, out_shape=None, **k: 2 * dw(x, w, out_shape=(gy,)))
    register_flop_formula(torch.ops.effops.pw_conv_backward)(
        lambda g, y, w, *a, out_shape=None, **k: 2 * pw(y, w))


_register_flops()
