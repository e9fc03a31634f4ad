"""Int8 BiFPN fusion: ``q_weighted_fuse`` (the qconv family's fourth op).

Inputs are uint8 codes, each with its own zero point; the resampling (``weighted_fuse``'s modes:
'identity', 'nearest', 'maxpool' (TF same), 'maxpool_sym') selects codes (nearest / max commute
with the monotone dequantisation, so they act on the codes directly; the max pools' padding is
never selected). The weighted sum is exact integer arithmetic with fixed-point multipliers::

    acc = sum_i (R_i(x_i) - zp_i) * mults[i]                    # int64; mults[i] int, Q16
    q   = ((acc + 2**15) >> 16) + out_zp                         # round half up (floor shift)
    out = lut[clamp(q, qmin, qmax)] if lut else clamp(q, qmin, qmax)

``fuse_multipliers(wn, in_scales, out_scale)`` gives mults[i] = round_half_even(wn_i * s_i /
s_out * 2**16) for normalised fusion weights wn (``ops.bifpn.normalize_weights``); every backend
computes the same integers (no float arithmetic in the kernels).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from ._common import EffopsInputError, EffopsTypeError, check_int, check_tensor, custom_op
from .bifpn import MODES, resample_reference, resampled_size

_backend.register_op("q_weighted_fuse", ("cpu", "triton", "reference"))

FRAC_BITS = 16
MAX_MULT = 2 ** 31 - 1  # |acc| <= 4 * 255 * MAX_MULT fits int64 easily
MODE_CODES = {m: i for i, m in enumerate(MODES)}


def fuse_multipliers(weights: Sequence[float], in_scales: Sequence[float], out_scale: float) -> List[int]:
    """Q16 fixed-point multipliers round_half_even(w_i * s_i / s_out * 2**16), clamped to int32."""
    t = torch.tensor([float(w) * float(s) / float(out_scale) for w, s in zip(weights, in_scales)],
                     dtype=torch.float64)
    return [int(v) for v in torch.round(t * 2 ** FRAC_BITS).clamp(-MAX_MULT, MAX_MULT).tolist()]


def q_weighted_fuse_reference(inputs: Sequence[Tensor], zps: Sequence[int], mults: Sequence[int],
                              modes: Sequence[str], out_hw: Sequence[int], out_zp: int, qmin: int, qmax: int,
                              lut: Optional[Tensor]) -> Tensor:
    acc = None
    for x, zp, m, mode in zip(inputs, zps, mults, modes):
        # float32 holds the codes exactly; nearest / max only select them
        r = resample_reference(x.to(torch.float32), mode, tuple(out_hw)).to(torch.int64)
        t = (r - zp) * m
        acc = t if acc is None else acc + t
    q = ((acc + 2 ** (FRAC_BITS - 1)) >> FRAC_BITS) + out_zp
    q = q.clamp(qmin, qmax)
    if lut is not None:
        q = lut.to(torch.int64)[q]
    return q.to(torch.uint8).contiguous(memory_format=torch.channels_last)


def _empty_out(x: Tensor, out_hw) -> Tensor:
    return torch.empty((x.shape[0], x.shape[1], *out_hw), dtype=torch.uint8, device=x.device,
                       memory_format=torch.channels_last)


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


@custom_op("effops::q_weighted_fuse", "(Tensor[] inputs, SymInt[] zps, SymInt[] mults, SymInt[] modes, "
           "SymInt[] out_hw, SymInt out_zp, SymInt qmin, SymInt qmax, Tensor? lut) -> Tensor")
def _q_fuse_op(inputs: List[Tensor], zps: List[int], mults: List[int], modes: List[int], out_hw: List[int],
               out_zp: int, qmin: int, qmax: int, lut: Optional[Tensor]) -> Tensor:
    """modes: resample mode codes (MODE_CODES: the index in ops.bifpn.MODES)."""
    backend = _backend.select("q_weighted_fuse", inputs[0].device)
    if backend == "reference" or (backend == "cpu" and not hasattr(_backend._C_module, "q_fuse_forward")):
        return q_weighted_fuse_reference(inputs, zps, mults, [MODES[m] for m in modes], out_hw, out_zp, qmin, qmax,
                                         lut)
    out = _empty_out(inputs[0], out_hw)
    args = ([_nhwc(x) for x in inputs], list(zps), list(mults), list(modes), out_zp, qmin, qmax,
            None if lut is None else lut.contiguous(), out.permute(0, 2, 3, 1))
    if backend == "cpu":
        _backend._C.q_fuse_forward(*args, max(1, torch.get_num_threads()))
    else:
        from ..triton import qconv as tq
        tq.q_fuse_forward(*args)
    return out


@_q_fuse_op.register_fake
def _(inputs, zps, mults, modes, out_hw, out_zp, qmin, qmax, lut):
    return _empty_out(inputs[0], out_hw)


def q_weighted_fuse(inputs: Sequence[Tensor], *, zps: Sequence[int], mults: Sequence[int], resample: Sequence[str],
                    out_zp: int, qmin: int = 0, qmax: int = 255, lut: Optional[Tensor] = None,
                    out_size: Optional[Tuple[int, int]] = None) -> Tensor:
    """Int8 BiFPN node fusion of 2-4 uint8 inputs (module docstring)."""
    op = "q_weighted_fuse"
    if not isinstance(inputs, (list, tuple)) or not 2 <= len(inputs) <= 4:
        raise EffopsTypeError(f"{op}: inputs must be a list of 2 to 4 tensors")
    k = len(inputs)
    for name, seq in (("zps", zps), ("mults", mults), ("resample", resample)):
        if not isinstance(seq, (list, tuple)) or len(seq) != k:
            raise EffopsInputError(f"{op}: {name} must be a list with one entry per input ({k})")
    xs = [check_tensor(op, f"inputs[{i}]", x) for i, x in enumerate(inputs)]
    N, C = xs[0].shape[:2] if xs[0].dim() == 4 else (None, None)
    for i, x in enumerate(xs):
        if x.dtype != torch.uint8:
            raise EffopsTypeError(f"{op}: inputs[{i}] must be uint8 codes, got {x.dtype}")
        if x.dim() != 4 or x.shape[:2] != (N, C) or x.device != xs[0].device:
            raise EffopsInputError(f"{op}: inputs[{i}] must be [N, C, H, W] with the N, C and device of inputs[0]")
    if C == 0:
        raise EffopsInputError(f"{op}: inputs must have at least one channel")
    zps = [check_int(op, f"zps[{i}]", z, minimum=0, maximum=255) for i, z in enumerate(zps)]
    mults = [check_int(op, f"mults[{i}]", m, minimum=-MAX_MULT, maximum=MAX_MULT) for i, m in enumerate(mults)]
    for i, m in enumerate(resample):
        if m not in MODES:
            raise EffopsInputError(f"{op}: resample[{i}] must be one of {list(MODES)}, got {m!r}")
    if out_size is None:
        if "identity" not in resample:
            raise EffopsInputError(f"{op}: out_size is needed when no input is 'identity'")
        out_size = tuple(xs[list(resample).index("identity")].shape[2:])
    out_size = (check_int(op, "out_size[0]", out_size[0], minimum=1), check_int(op, "out_size[1]", out_size[1], minimum=1))
    for i, (x, m) in enumerate(zip(xs, resample)):
        size = resampled_size(m, x.shape[2], x.shape[3], out_size)
        if size is None or tuple(size) != out_size or (m == "nearest" and (out_size[0] < x.shape[2]
                                                                           or out_size[1] < x.shape[3])):
            raise EffopsInputError(f"{op}: inputs[{i}] of size {tuple(x.shape[2:])} with '{m}' does not give "
                                   f"{out_size}")
    out_zp = check_int(op, "out_zp", out_zp, minimum=0, maximum=255)
    qmin = check_int(op, "qmin", qmin, minimum=0, maximum=255)
    qmax = check_int(op, "qmax", qmax, minimum=0, maximum=255)
    if qmin > qmax:
        raise EffopsInputError(f"{op}: qmin ({qmin}) must be <= qmax ({qmax})")
    if lut is not None:
        lut = check_tensor(op, "lut", lut)
        if lut.dtype != torch.uint8 or tuple(lut.shape) != (256,):
            raise EffopsInputError(f"{op}: lut must be uint8 of shape [256]")
        if lut.device != xs[0].device:
            raise EffopsInputError(f"{op}: lut is on {lut.device} but inputs[0] is on {xs[0].device}")
    return torch.ops.effops.q_weighted_fuse(xs, zps, mults, [MODE_CODES[m] for m in resample], list(out_size), out_zp,
                                            qmin, qmax, lut)


__all__ = ["q_weighted_fuse", "q_weighted_fuse_reference", "fuse_multipliers", "FRAC_BITS"]
