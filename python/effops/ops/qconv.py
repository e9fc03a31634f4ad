"""Int8 fused convolutions (``qconv``): ``q_dw_conv_act``, ``q_pw_conv``, ``q_dwsep_conv``,
``q_conv2d`` (a dense conv: a network's stem), and ``q_se_gates`` (a quantized block's float32
squeeze-excite gates from the depthwise output's channel sums).

The ``*_reference`` functions below define the integer arithmetic exactly; the CPU (C++),
CUDA and Triton kernels compute the same integers bit for bit.

Quantized values. An activation tensor is uint8 codes ``q`` with a per-tensor scale ``s`` and
zero point ``zp`` in [0, 255] (real value ``s * (q - zp)``); a weight is int8 codes, one scale per
output channel, symmetric (no zero point); a bias is int32 in units of ``s_in * s_w[c]``.

Accumulation (int32, two's complement wrap-around)::

    acc[c] = wrap32( sum_taps (x - x_zp) * w[c, tap]  +  bias[c] )

Padding (TF 'same' or symmetric) contributes real zeros, i.e. taps that read ``x == x_zp``; the
op bounds the reduction length so the sum of products itself never exceeds 2**30 in magnitude,
only a bias near the int32 limits can wrap.

Requantisation (the epilogue), with ``mult[c]`` a float32 per-channel multiplier
(``s_in * s_w[c] / s_out``)::

    v   = float32(acc) * mult[c]               # int32 -> float32 rounds to nearest even; one
                                               # IEEE float32 product (never fused with an add)
    v   = clamp(v, -2**23, 2**23)              # keeps every backend's float->int conversion in
                                               # range; cannot change the clamped result below;
                                               # NaN (a NaN mult or gate) becomes -2**23
    q   = round_half_even(v) + extra + out_zp  # integers from here on
    q   = clamp(q, qmin, qmax)
    out = lut[q] if lut is given else q        # uint8

* ``extra`` is 0, or the requantised residual of ``q_pw_conv``:
  ``round_half_even(clamp(float32(r - res_zp) * float32(res_mult), -2**23, 2**23))`` (a second,
  separate rounding: the sum of two rounded terms is added in the integer domain).
* ReLU / ReLU6 are the clamp: ``qmin = out_zp`` (real 0), ``qmax = out_zp + round(6 / s_out)``.
* Smooth activations (SiLU = swish, hardswish, sigmoid) go through ``lut``, a uint8 table over
  the 256 codes of the pre-activation (``mult`` and ``out_zp`` then give the pre-activation's
  quantisation, see ``activation_lut``): the kernels only index it.
* SE gates (``q_pw_conv(..., gate=g)``, g float32 [N, C]) rescale the input codes before the
  GEMM, in the input's own quantisation:
  ``a = clamp(round_half_even(clamp(float32(x - x_zp) * g[n, c], -2**23, 2**23)) + x_zp, 0, 255)``.
* ``q_dw_conv_act`` also returns ``sums[n, c]``, the int32 sum of the output codes over (h, w)
  (the SE pool: ``mean = s_out * (sums / (H * W) - out_zp)``).
* ``q_dwsep_conv`` is ``q_pw_conv(q_dw_conv_act(x)[0])``: the depthwise output is requantised
  to uint8 (epilogue zero point ``dw_zp``, clamp ``mid_qmin/mid_qmax``, table ``dw_lut``; the
  pointwise conv reads the codes with zero point ``mid_zp``) inside the kernel and never goes to
  memory.

Layout: inputs are [N, C, H, W] uint8 in any memory format; outputs are channels_last (the
kernels' NHWC layout). Dilation is 1.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ._common import EffopsInputError, EffopsTypeError, check_int, check_real, check_tensor, custom_op, profiled
from .dwsep import ACTIVATIONS, act_name, apply_act, conv_geometry

_OPS = ("q_dw_conv_act", "q_pw_conv", "q_dwsep_conv")
for _name in _OPS:
    _backend.register_op(_name, ("cpu", "cuda", "triton", "reference"))
_backend.register_op("q_se_gates", ("cpu", "reference"))  # elsewhere the torch ops (a few us of work)

CLAMP = float(2 ** 23)
# |sum of products| <= taps * 255 * 128 must stay below 2**30 (headroom for the bias)
MAX_REDUCTION = (2 ** 30) // (255 * 128)
MAX_POOL = (2 ** 31 - 1) // 255  # sums of output codes over H * W fit int32


# =============================================================================== the arithmetic
def wrap32(t: Tensor) -> Tensor:
    """int64 -> the int32 value with the same low 32 bits (two's complement), as int64."""
    return torch.remainder(t + 2 ** 31, 2 ** 32) - 2 ** 31


def round_scaled(v: Tensor, mult: Tensor) -> Tensor:
    """round_half_even(clamp(float32(v) * float32(mult), +-2**23)) as int64 (v integer-valued)."""
    p = v.to(torch.float32) * mult.to(torch.float32)
    # NaN (a NaN multiplier or gate) clamps to -2**23, as the kernels' max(p, -2**23) does
    return torch.round(p.nan_to_num(nan=-CLAMP).clamp(-CLAMP, CLAMP)).to(torch.int64)


def requantize(acc: Tensor, mult: Tensor, out_zp: int, qmin: int, qmax: int, lut: Optional[Tensor] = None,
               extra: Optional[Tensor] = None) -> Tensor:
    """The epilogue (module docstring); acc int64 holding int32 values, channels last."""
    q = round_scaled(acc, mult) + out_zp
    if extra is not None:
        q = q + extra
    q = q.clamp(qmin, qmax)
    if lut is not None:
        q = lut.to(torch.int64)[q]
    return q.to(torch.uint8)


def gate_codes(x_nhwc: Tensor, gate: Tensor, x_zp: int) -> Tensor:
    """SE gates applied to uint8 codes in their own quantisation (int64 [N, H, W, C])."""
    q = round_scaled(x_nhwc.to(torch.int64) - x_zp, gate[:, None, None, :]) + x_zp
    return q.clamp(0, 255)


def activation_lut(act: str, pre_scale: float, pre_zp: int, out_scale: float, out_zp: int) -> Tensor:
    """uint8 [256]: code of the pre-activation (scale, zp) -> code of act(value) at (out_scale,
    out_zp), computed in float64 with round-half-even and clamped to [0, 255]."""
    act = act_name("activation_lut", "act", act)
    q = torch.arange(256, dtype=torch.float64)
    y = apply_act(pre_scale * (q - pre_zp), act)
    return (torch.round(y / out_scale) + out_zp).clamp(0, 255).to(torch.uint8)


def clamp_range(act: str, scale: float, zp: int) -> Tuple[int, int]:
    """(qmin, qmax) implementing none / relu / relu6 in the integer domain."""
    if act == "relu":
        return zp, 255
    if act == "relu6":
        return zp, int(min(255, zp + round(6.0 / scale)))
    return 0, 255


# =============================================================================== references
def q_dw_conv_act_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], mult: Tensor, lut: Optional[Tensor],
                            stride: Sequence[int], pad: Sequence[int], x_zp: int, out_zp: int, qmin: int,
                            qmax: int) -> Tuple[Tensor, Tensor]:
    """Depthwise kxk on uint8 codes: (y uint8 [N, C, Ho, Wo] channels_last, sums int32 [N, C])."""
    N, C, H, W = x.shape
    KH, KW = weight.shape[2:]
    top, bottom, left, right = pad
    sh, sw = stride
    xd = F.pad(x.to(torch.int64) - x_zp, (left, right, top, bottom))  # padding = real zero
    Ho = (H + top + bottom - KH) // sh + 1
    Wo = (W + left + right - KW) // sw + 1
    acc = torch.zeros(N, C, Ho, Wo, dtype=torch.int64, device=x.device)
    w = weight.to(torch.int64)
    for kh in range(KH):
        for kw in range(KW):
            tap = xd[:, :, kh:kh + sh * (Ho - 1) + 1:sh, kw:kw + sw * (Wo - 1) + 1:sw]
            acc += tap * w[:, 0, kh, kw][None, :, None, None]
    if bias is not None:
        acc += bias.to(torch.int64)[None, :, None, None]
    y = requantize(wrap32(acc).permute(0, 2, 3, 1), mult, out_zp, qmin, qmax, lut)  # [N, Ho, Wo, C]
    sums = y.to(torch.int64).sum((1, 2)).to(torch.int32)
    return y.permute(0, 3, 1, 2), sums


def q_pw_conv_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], mult: Tensor, lut: Optional[Tensor],
                        gate: Optional[Tensor], residual: Optional[Tensor], x_zp: int, out_zp: int, qmin: int,
                        qmax: int, res_zp: int = 0, res_mult: float = 1.0) -> Tensor:
    """Pointwise 1x1 on uint8 codes (optional SE gates on the input, optional residual)."""
    Co, C = weight.shape[:2]
    a = x.permute(0, 2, 3, 1).to(torch.int64)
    if gate is not None:
        a = gate_codes(a, gate, x_zp)
    # products <= 2**15 and |sums| < 2**30: float64 is exact here, whatever the summation order
    acc = ((a - x_zp).to(torch.float64) @ weight.reshape(Co, C).to(torch.float64).t()).to(torch.int64)
    if bias is not None:
        acc += bias.to(torch.int64)
    extra = None
    if residual is not None:
        extra = round_scaled(residual.permute(0, 2, 3, 1).to(torch.int64) - res_zp,
                             torch.tensor(res_mult, dtype=torch.float32))
    return requantize(wrap32(acc), mult, out_zp, qmin, qmax, lut, extra).permute(0, 3, 1, 2)


def q_dwsep_conv_reference(x, dw_weight, dw_bias, dw_mult, dw_lut, pw_weight, pw_bias, pw_mult, lut, residual,
                           stride, pad, x_zp, dw_zp, mid_qmin, mid_qmax, mid_zp, out_zp, qmin, qmax, res_zp=0,
                           res_mult=1.0) -> Tensor:
    """dw_zp: the depthwise epilogue's zero point (the pre-activation's with dw_lut); mid_zp: the
    zero point of the mid codes the pointwise conv reads (dw_zp without a table)."""
    mid, _ = q_dw_conv_act_reference(x, dw_weight, dw_bias, dw_mult, dw_lut, stride, pad, x_zp, dw_zp, mid_qmin,
                                     mid_qmax)
    return q_pw_conv_reference(mid, pw_weight, pw_bias, pw_mult, lut, None, residual, mid_zp, out_zp, qmin, qmax,
                               res_zp, res_mult)


# =============================================================================== backends
def _threads() -> int:
    return max(1, torch.get_num_threads())


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _empty_cl(n, c, h, w, dtype, device) -> Tensor:
    return torch.empty((n, c, h, w), dtype=dtype, device=device, memory_format=torch.channels_last)


def _taps(w: Tensor) -> Tensor:
    return w[:, 0].permute(1, 2, 0).contiguous()  # [KH, KW, C]


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _out_hw(x: Tensor, k, stride, pad) -> Tuple[int, int]:
    H, W = x.shape[2:]
    return ((H + pad[0] + pad[1] - k[0]) // stride[0] + 1, (W + pad[2] + pad[3] - k[1]) // stride[1] + 1)


def _tq():
    from ..triton import qconv as tq
    return tq


def _dw_impl(backend, x, weight, bias, mult, lut, stride, pad, x_zp, out_zp, qmin, qmax, out=None):
    """out: a channels_last uint8 [N, C, Ho, Wo] to write y into (a reused buffer), or None."""
    N, C = x.shape[:2]
    Ho, Wo = _out_hw(x, weight.shape[2:], stride, pad)
    y = _empty_cl(N, C, Ho, Wo, torch.uint8, x.device) if out is None else out
    sums = torch.empty(N, C, dtype=torch.int32, device=x.device)
    taps = weight[:, 0].contiguous() if backend == "cpu" else _taps(weight)  # CPU: [C, KH, KW]; else [KH, KW, C]
    args = (_nhwc(x), taps, _c(bias), mult.contiguous(), _c(lut), list(stride), list(pad),
            x_zp, out_zp, qmin, qmax, y.permute(0, 2, 3, 1), sums)
    if backend == "cpu":
        _backend._C.q_dw_forward(*args, _threads())
    elif backend == "cuda":
        _backend._cuda.q_dw_forward(*args, torch.cuda.current_stream(x.device).cuda_stream, x.device.index)
    else:
        _tq().q_dw_forward(*args)
    return y, sums


def _pw_impl(backend, x, weight, bias, mult, lut, gate, residual, x_zp, out_zp, qmin, qmax, res_zp, res_mult,
             packed=None, out=None):
    N, C, H, W = x.shape
    Co = weight.shape[0]
    if out is None:
        out = _empty_cl(N, Co, H, W, torch.uint8, x.device)
    args = (_nhwc(x), weight.reshape(Co, C).contiguous(), _c(bias), mult.contiguous(), _c(lut), _c(gate),
            None if residual is None else _nhwc(residual), x_zp, out_zp, qmin, qmax, res_zp, float(res_mult),
            out.permute(0, 2, 3, 1))
    if backend == "cpu":
        _backend._C.q_pw_forward(*args, packed, _threads())
    elif backend == "cuda":
        _backend._cuda.q_pw_forward(*args, torch.cuda.current_stream(x.device).cuda_stream, x.device.index)
    else:
        _tq().q_pw_forward(*args)
    return out


def _dwsep_impl(backend, x, dw_weight, dw_bias, dw_mult, dw_lut, pw_weight, pw_bias, pw_mult, lut, residual,
                stride, pad, x_zp, dw_zp, mid_qmin, mid_qmax, mid_zp, out_zp, qmin, qmax, res_zp, res_mult, pw_packed=None):
    if backend != "cpu":  # CUDA / Triton: the two kernels back to back (same integers)
        mid, _ = _dw_impl(backend, x, dw_weight, dw_bias, dw_mult, dw_lut, stride, pad, x_zp, dw_zp, mid_qmin,
                          mid_qmax)
        return _pw_impl(backend, mid, pw_weight, pw_bias, pw_mult, lut, None, residual, mid_zp, out_zp, qmin,
                        qmax, res_zp, res_mult)
    N, C = x.shape[:2]
    Co = pw_weight.shape[0]
    Ho, Wo = _out_hw(x, dw_weight.shape[2:], stride, pad)
    out = _empty_cl(N, Co, Ho, Wo, torch.uint8, x.device)
    _backend._C.q_dwsep_forward(
        _nhwc(x), dw_weight[:, 0].contiguous(), _c(dw_bias), dw_mult.contiguous(), _c(dw_lut), pw_weight.reshape(Co, C).contiguous(),
        _c(pw_bias), pw_mult.contiguous(), _c(lut), None if residual is None else _nhwc(residual), list(stride),
        list(pad), x_zp, dw_zp, mid_qmin, mid_qmax, mid_zp, out_zp, qmin, qmax, res_zp, float(res_mult),
        out.permute(0, 2, 3, 1), pw_packed, _threads())
    return out


def pack_pw(weight: Tensor, bias: Optional[Tensor], x_zp: int) -> Optional[Tensor]:
    """The pointwise weights packed once for the CPU kernels' current ISA level (the ``packed`` /
    ``pw_packed`` argument: the kernels use it when it matches their level, the shapes, x_zp and
    whether there is a bias, and pack per call otherwise), or None off the CPU / without _C."""
    if weight.device.type != "cpu" or _backend._C is None or not hasattr(_backend._C_module, "q_pw_pack"):
        return None
    Co, C = weight.shape[:2]
    blob = torch.empty(_backend._C_module.q_pw_packed_bytes(Co, C), dtype=torch.uint8)
    _backend._C.q_pw_pack(weight.reshape(Co, C).contiguous(), _c(bias), int(x_zp), blob)
    return blob


# =============================================================================== custom ops
@custom_op("effops::q_dw_conv_act", "(Tensor x, Tensor weight, Tensor? bias, Tensor mult, Tensor? lut, SymInt[] stride, "
           "SymInt[] pad, SymInt x_zp, SymInt out_zp, SymInt qmin, SymInt qmax) -> (Tensor, Tensor)")
def _q_dw_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], mult: Tensor, lut: Optional[Tensor],
             stride: List[int], pad: List[int], x_zp: int, out_zp: int, qmin: int, qmax: int) -> Tuple[Tensor, Tensor]:
    backend = _backend.select("q_dw_conv_act", x.device)
    if backend == "reference":
        y, sums = q_dw_conv_act_reference(x, weight, bias, mult, lut, stride, pad, x_zp, out_zp, qmin, qmax)
        return y.contiguous(memory_format=torch.channels_last), sums
    return _dw_impl(backend, x, weight, bias, mult, lut, stride, pad, x_zp, out_zp, qmin, qmax)


@_q_dw_op.register_fake
def _(x, weight, bias, mult, lut, stride, pad, x_zp, out_zp, qmin, qmax):
    N, C = x.shape[:2]
    Ho, Wo = _out_hw(x, weight.shape[2:], stride, pad)
    return _empty_cl(N, C, Ho, Wo, torch.uint8, x.device), x.new_empty((N, C), dtype=torch.int32)


@custom_op("effops::q_pw_conv", "(Tensor x, Tensor weight, Tensor? bias, Tensor mult, Tensor? lut, Tensor? gate, "
           "Tensor? residual, SymInt x_zp, SymInt out_zp, SymInt qmin, SymInt qmax, SymInt res_zp, float res_mult, "
           "Tensor? packed=None) -> Tensor")
def _q_pw_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], mult: Tensor, lut: Optional[Tensor],
             gate: Optional[Tensor], residual: Optional[Tensor], x_zp: int, out_zp: int, qmin: int, qmax: int,
             res_zp: int, res_mult: float, packed: Optional[Tensor] = None) -> Tensor:
    backend = _backend.select("q_pw_conv", x.device)
    if backend == "reference":
        out = q_pw_conv_reference(x, weight, bias, mult, lut, gate, residual, x_zp, out_zp, qmin, qmax, res_zp,
                                  res_mult)
        return out.contiguous(memory_format=torch.channels_last)
    return _pw_impl(backend, x, weight, bias, mult, lut, gate, residual, x_zp, out_zp, qmin, qmax, res_zp, res_mult,
                    packed)


@_q_pw_op.register_fake
def _(x, weight, bias, mult, lut, gate, residual, x_zp, out_zp, qmin, qmax, res_zp, res_mult, packed=None):
    N, _, H, W = x.shape
    return _empty_cl(N, weight.shape[0], H, W, torch.uint8, x.device)


@custom_op("effops::q_dwsep_conv", "(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor dw_mult, Tensor? dw_lut, "
           "Tensor pw_weight, Tensor? pw_bias, Tensor pw_mult, Tensor? lut, Tensor? residual, SymInt[] stride, "
           "SymInt[] pad, SymInt x_zp, SymInt dw_zp, SymInt mid_qmin, SymInt mid_qmax, SymInt mid_zp, SymInt out_zp, "
           "SymInt qmin, SymInt qmax, SymInt res_zp, float res_mult, Tensor? pw_packed=None) -> Tensor")
def _q_dwsep_op(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], dw_mult: Tensor, dw_lut: Optional[Tensor],
                pw_weight: Tensor, pw_bias: Optional[Tensor], pw_mult: Tensor, lut: Optional[Tensor],
                residual: Optional[Tensor], stride: List[int], pad: List[int], x_zp: int, dw_zp: int,
                mid_qmin: int, mid_qmax: int, mid_zp: int, out_zp: int, qmin: int, qmax: int, res_zp: int,
                res_mult: float, pw_packed: Optional[Tensor] = None) -> Tensor:
    args = (x, dw_weight, dw_bias, dw_mult, dw_lut, pw_weight, pw_bias, pw_mult, lut, residual, stride, pad, x_zp,
            dw_zp, mid_qmin, mid_qmax, mid_zp, out_zp, qmin, qmax, res_zp, res_mult)
    backend = _backend.select("q_dwsep_conv", x.device)
    if backend == "reference":
        return q_dwsep_conv_reference(*args).contiguous(memory_format=torch.channels_last)
    return _dwsep_impl(backend, *args, pw_packed)


@_q_dwsep_op.register_fake
def _(x, dw_weight, dw_bias, dw_mult, dw_lut, pw_weight, pw_bias, pw_mult, lut, residual, stride, pad, *rest,
      pw_packed=None):
    Ho, Wo = _out_hw(x, dw_weight.shape[2:], stride, pad)
    return _empty_cl(x.shape[0], pw_weight.shape[0], Ho, Wo, torch.uint8, x.device)


# =============================================================================== SE gates
SE_GATES = {"sigmoid": 5, "hardsigmoid": 6}  # the gate codes of q_se_gates


def q_se_gates_reference(sums: Tensor, hw: int, zp: int, scale: float, w1: Tensor, b1: Optional[Tensor], act: int,
                         w2: Tensor, b2: Optional[Tensor], gate: int) -> Tensor:
    """The squeeze-excite gates [N, C] float32 of a quantized block from its depthwise output's
    channel sums: means = (float32(sums) / hw - zp) * scale (the dequantised channel means), then
    gate(linear(act(linear(means, w1, b1)), w2, b2)), gate sigmoid (5) or hard sigmoid (6). The
    CPU kernel computes the means with the same float32 operations and the two small products in
    its own fixed order, the same on every ISA level (so its gates may differ from these in the
    last bits)."""
    means = (sums.to(torch.float32) / float(hw) - zp) * scale
    h = apply_act(F.linear(means, w1, b1), ACTIVATIONS[act])
    v = F.linear(h, w2, b2)
    return torch.sigmoid(v) if gate == SE_GATES["sigmoid"] else F.relu6(v + 3.0) / 6.0


def _se_impl(backend, sums, hw, zp, scale, w1, b1, act, w2, b2, gate):
    if backend != "cpu":
        return q_se_gates_reference(sums, hw, zp, scale, w1, b1, act, w2, b2, gate)
    out = torch.empty(sums.shape, dtype=torch.float32)
    _backend._C.q_se_gates(sums.contiguous(), int(hw), int(zp), float(scale), w1.contiguous(), _c(b1), int(act),
                           w2.contiguous(), _c(b2), int(gate), out)
    return out


@custom_op("effops::q_se_gates", "(Tensor sums, SymInt hw, SymInt zp, float scale, Tensor w1, Tensor? b1, SymInt act, "
           "Tensor w2, Tensor? b2, SymInt gate) -> Tensor")
def _q_se_op(sums: Tensor, hw: int, zp: int, scale: float, w1: Tensor, b1: Optional[Tensor], act: int, w2: Tensor,
             b2: Optional[Tensor], gate: int) -> Tensor:
    return _se_impl(_backend.select("q_se_gates", sums.device), sums, hw, zp, scale, w1, b1, act, w2, b2, gate)


@_q_se_op.register_fake
def _(sums, hw, zp, scale, w1, b1, act, w2, b2, gate):
    return sums.new_empty(sums.shape, dtype=torch.float32)


# =============================================================================== public API
def _check_q(op: str, name: str, t, dtype: torch.dtype, shape: Optional[Sequence[Optional[int]]], device=None):
    t = check_tensor(op, name, t)
    if t.dtype != dtype:
        raise EffopsTypeError(f"{op}: {name} must be {str(dtype).replace('torch.', '')}, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise EffopsInputError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise EffopsInputError(f"{op}: {name} is on {t.device} but x is on {device}")
    return t


def _check_code(op: str, name: str, v) -> int:
    return check_int(op, name, v, minimum=0, maximum=255)


def _check_epilogue(op: str, names: Sequence[str], C: int, mult, lut, zp, qmin, qmax, dev):
    """names: the caller's argument names of (mult, lut, zp, qmin, qmax), for the messages."""
    n_mult, n_lut, n_zp, n_qmin, n_qmax = names
    _check_q(op, n_mult, mult, torch.float32, [C], dev)
    if lut is not None:
        _check_q(op, n_lut, lut, torch.uint8, [256], dev)
    zp = _check_code(op, n_zp, zp)
    qmin = _check_code(op, n_qmin, qmin)
    qmax = _check_code(op, n_qmax, qmax)
    if qmin > qmax:
        raise EffopsInputError(f"{op}: {n_qmin} ({qmin}) must be <= {n_qmax} ({qmax})")
    return zp, qmin, qmax


_OUT_NAMES = ("mult", "lut", "out_zp", "qmin", "qmax")


def _check_x(op: str, x) -> Tensor:
    x = _check_q(op, "x", x, torch.uint8, [None, None, None, None])
    if x.shape[1] == 0:
        raise EffopsInputError(f"{op}: x must have at least one channel")
    return x


def _check_dw(op: str, x: Tensor, weight, bias, stride, padding, prefix: str = ""):
    C = x.shape[1]
    w = _check_q(op, f"{prefix}weight", weight, torch.int8, [C, 1, None, None], x.device)
    if w.shape[2] * w.shape[3] == 0 or w.shape[2] * w.shape[3] > MAX_REDUCTION:
        raise EffopsInputError(f"{op}: the depthwise kernel must have 1..{MAX_REDUCTION} taps, got {list(w.shape[2:])}")
    if bias is not None:
        _check_q(op, f"{prefix}bias", bias, torch.int32, [C], x.device)
    g = conv_geometry(op, x.shape[2:], w.shape[2:], stride, padding, 1)
    if g.out_hw[0] * g.out_hw[1] > MAX_POOL:
        raise EffopsInputError(f"{op}: output of {g.out_hw} pixels is too large for int32 channel sums")
    return g


def _check_pw(op: str, C: int, weight, bias, dev, prefix: str = "") -> int:
    w = _check_q(op, f"{prefix}weight", weight, torch.int8, [None, C, 1, 1], dev)
    if w.shape[0] == 0:
        raise EffopsInputError(f"{op}: {prefix}weight must have at least one output channel")
    if C > MAX_REDUCTION:
        raise EffopsInputError(f"{op}: at most {MAX_REDUCTION} input channels (int32 accumulation), got {C}")
    if bias is not None:
        _check_q(op, f"{prefix}bias", bias, torch.int32, [w.shape[0]], dev)
    return w.shape[0]


def _check_residual(op: str, residual, shape, res_zp, res_mult, dev):
    if residual is None:
        return 0, 1.0
    _check_q(op, "residual", residual, torch.uint8, list(shape), dev)
    res_mult = check_real(op, "res_mult", res_mult, allow_nan=False, allow_inf=False)
    return _check_code(op, "res_zp", res_zp), res_mult


def q_dw_conv_act(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, mult: Tensor, x_zp: int, out_zp: int,
                  qmin: int = 0, qmax: int = 255, lut: Optional[Tensor] = None, stride=1,
                  padding="same") -> Tuple[Tensor, Tensor]:
    """Int8 depthwise conv + requantisation + activation; returns (y uint8, sums int32 [N, C])."""
    op = "q_dw_conv_act"
    x = _check_x(op, x)
    g = _check_dw(op, x, weight, bias, stride, padding)
    x_zp = _check_code(op, "x_zp", x_zp)
    out_zp, qmin, qmax = _check_epilogue(op, _OUT_NAMES, x.shape[1], mult, lut, out_zp, qmin, qmax, x.device)
    return torch.ops.effops.q_dw_conv_act(x, weight, bias, mult, lut, list(g.stride), list(g.pad), x_zp, out_zp,
                                          qmin, qmax)


def q_pw_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, mult: Tensor, x_zp: int, out_zp: int,
              qmin: int = 0, qmax: int = 255, lut: Optional[Tensor] = None, gate: Optional[Tensor] = None,
              residual: Optional[Tensor] = None, res_zp: int = 0, res_mult: float = 1.0) -> Tensor:
    """Int8 pointwise conv with optional SE gates (float32 [N, C]) and requantised residual."""
    op = "q_pw_conv"
    x = _check_x(op, x)
    N, C, H, W = x.shape
    Co = _check_pw(op, C, weight, bias, x.device)
    x_zp = _check_code(op, "x_zp", x_zp)
    out_zp, qmin, qmax = _check_epilogue(op, _OUT_NAMES, Co, mult, lut, out_zp, qmin, qmax, x.device)
    if gate is not None:
        _check_q(op, "gate", gate, torch.float32, [N, C], x.device)
    res_zp, res_mult = _check_residual(op, residual, (N, Co, H, W), res_zp, res_mult, x.device)
    if residual is not None and lut is not None:
        raise EffopsInputError(f"{op}: a residual is added after the epilogue's clamp only; lut must be None")
    return torch.ops.effops.q_pw_conv(x, weight, bias, mult, lut, gate, residual, x_zp, out_zp, qmin, qmax, res_zp,
                                      res_mult)


def q_dwsep_conv(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, *, dw_bias: Optional[Tensor] = None,
                 dw_mult: Tensor, dw_lut: Optional[Tensor] = None, x_zp: int, mid_zp: int, dw_zp: Optional[int] = None,
                 mid_qmin: int = 0,
                 mid_qmax: int = 255, pw_bias: Optional[Tensor] = None, pw_mult: Tensor,
                 lut: Optional[Tensor] = None, out_zp: int, qmin: int = 0, qmax: int = 255,
                 residual: Optional[Tensor] = None, res_zp: int = 0, res_mult: float = 1.0, stride=1,
                 padding="same") -> Tensor:
    """Fused int8 depthwise (requantised to uint8 codes with zero point mid_zp) + pointwise conv.
    dw_zp: the depthwise epilogue's zero point when dw_lut maps pre-activation codes (default mid_zp)."""
    op = "q_dwsep_conv"
    x = _check_x(op, x)
    N, C = x.shape[:2]
    g = _check_dw(op, x, dw_weight, dw_bias, stride, padding, "dw_")
    Co = _check_pw(op, C, pw_weight, pw_bias, x.device, "pw_")
    x_zp = _check_code(op, "x_zp", x_zp)
    mid_zp = _check_code(op, "mid_zp", mid_zp)
    dw_names = ("dw_mult", "dw_lut", "mid_zp" if dw_zp is None else "dw_zp", "mid_qmin", "mid_qmax")
    dw_zp = mid_zp if dw_zp is None else dw_zp
    dw_zp, mid_qmin, mid_qmax = _check_epilogue(op, dw_names, C, dw_mult, dw_lut, dw_zp, mid_qmin, mid_qmax, x.device)
    out_zp, qmin, qmax = _check_epilogue(op, ("pw_mult",) + _OUT_NAMES[1:], Co, pw_mult, lut, out_zp, qmin, qmax,
                                         x.device)
    res_zp, res_mult = _check_residual(op, residual, (N, Co, *g.out_hw), res_zp, res_mult, x.device)
    if residual is not None and lut is not None:
        raise EffopsInputError(f"{op}: a residual is added after the epilogue's clamp only; lut must be None")
    return torch.ops.effops.q_dwsep_conv(x, dw_weight, dw_bias, dw_mult, dw_lut, pw_weight, pw_bias, pw_mult, lut,
                                         residual, list(g.stride), list(g.pad), x_zp, dw_zp, mid_qmin, mid_qmax,
                                         mid_zp, out_zp, qmin, qmax, res_zp, res_mult)


# =============================================================================== dense conv (stem)
def q_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], mult: Tensor, lut: Optional[Tensor],
                       stride: Sequence[int], pad: Sequence[int], x_zp: int, out_zp: int, qmin: int,
                       qmax: int) -> Tensor:
    """Dense int8 conv (groups 1, weight [Co, C, KH, KW]): padding reads x_zp, the accumulation and
    epilogue as above. Returns [N, Co, Ho, Wo] uint8 (channels_last)."""
    t, b, l, r = pad
    xp = F.pad(x.to(torch.float64) - x_zp, (l, r, t, b))  # padding is a real zero: x_zp - x_zp
    # |products| <= 255 * 128 and |sums| < 2**30: float64 is exact here
    acc = F.conv2d(xp, weight.to(torch.float64), stride=tuple(stride)).round().to(torch.int64)
    if bias is not None:
        acc += bias.to(torch.int64)[:, None, None]
    y = requantize(wrap32(acc).permute(0, 2, 3, 1), mult, out_zp, qmin, qmax, lut)  # [N, Ho, Wo, Co]
    return y.permute(0, 3, 1, 2)


def patch_weight(weight: Tensor) -> Tensor:
    """A dense conv's int8 weight [Co, C, KH, KW] as the pointwise weight over patches:
    [Co, Kp, 1, 1], taps in (kh, kw, c) order (the order of ``conv_patches``), then zeros up to
    Kp = KH * KW * C rounded up to a multiple of 4 (the GEMM's K tail is 2x slower: 3x3 RGB has 27)."""
    Co = weight.shape[0]
    w = weight.permute(0, 2, 3, 1).reshape(Co, -1)
    w = F.pad(w, (0, -w.shape[1] % 4))
    return w.reshape(Co, -1, 1, 1).contiguous()


def conv_patches(x: Tensor, k: Sequence[int], stride: Sequence[int], pad: Sequence[int], x_zp: int,
                 kp: Optional[int] = None) -> Tensor:
    """The patches of a dense conv as codes [N, kp, Ho, Wo] (channels_last; kp >= KH * KW * C,
    the codes past the taps x_zp), padding = x_zp: the conv is ``q_pw_conv`` of these with
    ``patch_weight`` (the backends other than the eager CPU kernel, and under torch.compile)."""
    N, C = x.shape[:2]
    t, b, l, r = pad
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, l, r, t, b), value=x_zp)  # [N, Hp, Wp, C]
    Ho, Wo = _out_hw(x, k, stride, pad)
    s = xp.stride()
    p = xp.as_strided((N, Ho, Wo, k[0], k[1], C), (s[0], stride[0] * s[1], stride[1] * s[2], s[1], s[2], s[3]))
    p = p.reshape(N, Ho, Wo, k[0] * k[1] * C)
    if kp is not None and kp > p.shape[3]:
        p = F.pad(p, (0, kp - p.shape[3]), value=x_zp)
    return p.permute(0, 3, 1, 2)


def _conv_cpu(x, wp, k, bias, mult, lut, stride, pad, x_zp, out_zp, qmin, qmax, packed):
    N = x.shape[0]
    Co = wp.shape[0]
    Ho, Wo = _out_hw(x, k, stride, pad)
    out = _empty_cl(N, Co, Ho, Wo, torch.uint8, x.device)
    _backend._C.q_conv_forward(_nhwc(x), wp.reshape(Co, -1), int(k[0]), int(k[1]), _c(bias), mult.contiguous(), _c(lut),
                               list(stride), list(pad), x_zp, out_zp, qmin, qmax, out.permute(0, 2, 3, 1), packed,
                               _threads())
    return out


def conv2d_patched(x: Tensor, wp: Tensor, k: Sequence[int], bias: Optional[Tensor], mult: Tensor,
                   lut: Optional[Tensor], stride: Sequence[int], pad: Sequence[int], x_zp: int, out_zp: int,
                   qmin: int, qmax: int, packed: Optional[Tensor] = None) -> Tensor:
    """The dense int8 conv on checked arguments, wp = ``patch_weight(weight)``: in eager on the CPU
    backend one C++ kernel that builds the patches of a block of output pixels in cache and runs the
    pointwise GEMM on them (``packed``: ``pack_pw(wp, bias, x_zp)``); elsewhere ``conv_patches`` +
    ``q_pw_conv`` (the same integers)."""
    if (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and _backend.select("q_pw_conv", x.device) == "cpu"):
        return profiled("effops::q_conv2d", _conv_cpu, x, wp, k, bias, mult, lut, stride, pad, x_zp, out_zp, qmin,
                        qmax, packed)
    patches = conv_patches(x, k, stride, pad, x_zp, wp.shape[1])
    return torch.ops.effops.q_pw_conv(patches, wp, bias, mult, lut, None, None, x_zp, out_zp, qmin, qmax, 0, 1.0)


def q_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, mult: Tensor, x_zp: int, out_zp: int,
             qmin: int = 0, qmax: int = 255, lut: Optional[Tensor] = None, stride=1, padding=0) -> Tensor:
    """Dense int8 conv (groups 1; a network's stem): x [N, C, H, W] uint8, weight [Co, C, KH, KW]
    int8, the epilogue of ``q_pw_conv``; padding an int, a pair or 'same' (TensorFlow's)."""
    op = "q_conv2d"
    x = _check_x(op, x)
    N, C, H, W = x.shape
    _check_q(op, "weight", weight, torch.int8, [None, C, None, None], x.device)
    Co, _, KH, KW = weight.shape
    if KH * KW * C > MAX_REDUCTION or Co < 1:
        raise EffopsInputError(f"{op}: weight must have >= 1 output channel and KH * KW * C <= {MAX_REDUCTION}, got "
                               f"{list(weight.shape)}")
    if bias is not None:
        _check_q(op, "bias", bias, torch.int32, [Co], x.device)
    g = conv_geometry(op, (H, W), (KH, KW), stride, padding, 1)
    x_zp = _check_code(op, "x_zp", x_zp)
    out_zp, qmin, qmax = _check_epilogue(op, _OUT_NAMES, Co, mult, lut, out_zp, qmin, qmax, x.device)
    return conv2d_patched(x, patch_weight(weight), (KH, KW), bias, mult, lut, list(g.stride), list(g.pad), x_zp,
                          out_zp, qmin, qmax)


__all__ = ["q_dw_conv_act", "q_pw_conv", "q_dwsep_conv", "q_conv2d", "pack_pw", "activation_lut", "clamp_range",
           "requantize", "q_dw_conv_act_reference", "q_pw_conv_reference", "q_dwsep_conv_reference",
           "q_conv2d_reference", "patch_weight", "conv_patches", "q_se_gates_reference", "SE_GATES", "ACTIVATIONS"]
