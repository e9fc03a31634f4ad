"""Triton kernels of the depthwise-separable family (NHWC; semantics in effops/ops/dwsep.py).

* ``dwsep_forward``: one program per (BLOCK_P output pixels, BLOCK_CO output channels). For each
  block of BLOCK_C input channels it computes the depthwise output of its pixels in registers
  (taps x loads, affine, activation) and feeds it straight to ``tl.dot`` with the pointwise
  weights: the depthwise result never goes to memory. float32 uses IEEE dot precision (no tf32);
  bf16/fp16 round the depthwise tile to the input dtype for the tensor cores, accumulating in
  float32 (the rounding eager PyTorch does between the two convs too).
* ``dw_forward``: depthwise + affine + activation, with the SE channel sums as per-program
  partials (summed by torch: deterministic, no atomics).
* ``pw_forward``: the pointwise conv as a GEMM; the SE channel scale is applied while loading A.
* ``dw_backward_input`` (a gather over the output pixels each input pixel feeds) and
  ``dw_backward_weight`` (per-program partials).
Padding is never materialised: out-of-range taps are masked loads.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _act(x, ACT: tl.constexpr):
    # codes as effops.ops.dwsep.ACTIVATIONS; comparisons keep NaN as torch does
    if ACT == 1:
        x = tl.where(x < 0, 0.0, x)
    elif ACT == 2:
        x = tl.where(x < 0, 0.0, tl.where(x > 6, 6.0, x))
    elif ACT == 3:
        x = x / (1.0 + tl.exp(-x))
    elif ACT == 4:
        t = x + 3.0
        x = x * tl.where(t < 0, 0.0, tl.where(t > 6, 6.0, t)) * (1.0 / 6.0)
    elif ACT == 5:
        x = 1.0 / (1.0 + tl.exp(-x))
    return x


@triton.jit
def _dw_tile(x_ptr, w_ptr, n, oh, ow, pmask, cs, cmask, H, W, C,
             SH: tl.constexpr, SW: tl.constexpr, PT, PL, DH: tl.constexpr, DW: tl.constexpr,
             KH: tl.constexpr, KW: tl.constexpr, IN_ACT: tl.constexpr):
    """Raw depthwise output [P, BC] (float32) of pixels (n, oh, ow), channels cs. IN_ACT: an
    activation applied to the input first (the padding stays zero, as padding act(x))."""
    acc = tl.zeros([oh.shape[0], cs.shape[0]], dtype=tl.float32)
    for kh in tl.static_range(KH):
        ih = oh * SH - PT + kh * DH
        for kw in tl.static_range(KW):
            iw = ow * SW - PL + kw * DW
            ok = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            m = ok[:, None] & cmask[None, :]
            xv = tl.load(x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + cs[None, :], mask=m, other=0.0)
            xv = xv.to(tl.float32)
            if IN_ACT != 0:
                xv = tl.where(m, _act(xv, IN_ACT), 0.0)
            wv = tl.load(w_ptr + (kh * KW + kw) * C + cs, mask=cmask, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _dot_acc(acc, a, b, like_ptr, F32_DOT: tl.constexpr):
    """acc + a @ b: float32 in IEEE precision (no tf32), else on the tensor cores in the
    storage dtype of like_ptr, accumulating in float32."""
    if F32_DOT:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(a.to(like_ptr.dtype.element_ty), b.to(like_ptr.dtype.element_ty))
    return acc


@triton.jit
def _store_epilogue(acc, rows, rmask, cols, cmask, Co, s_ptr, b_ptr, res_ptr, out_ptr, ACT: tl.constexpr,
                    HAS_S: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr):
    """The pointwise GEMM's epilogue for the [rows, cols] tile of a [*, Co] output: per-channel
    affine, activation, residual, store in the output dtype."""
    if HAS_S:
        acc = acc * tl.load(s_ptr + cols, mask=cmask, other=0.0)[None, :]
    if HAS_B:
        acc = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    acc = _act(acc, ACT)
    offs = rows[:, None] * Co + cols[None, :]
    om = rmask[:, None] & cmask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offs, mask=om, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def _dwsep_kernel(x_ptr, taps_ptr, pw_ptr, dws_ptr, dwb_ptr, pws_ptr, pwb_ptr, res_ptr, out_ptr,
                  NP, H, W, C, Ho, Wo, Co, PT, PL,
                  SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, PW_ACT: tl.constexpr,
                  PREACT: tl.constexpr, HAS_DWS: tl.constexpr, HAS_DWB: tl.constexpr,
                  HAS_PWS: tl.constexpr, HAS_PWB: tl.constexpr, HAS_RES: tl.constexpr,
                  F32_DOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_CO: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < NP
    n = p // (Ho * Wo)
    rem = p % (Ho * Wo)
    oh = rem // Wo
    ow = rem % Wo
    co = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Co
    acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        d = _dw_tile(x_ptr, taps_ptr, n, oh, ow, pmask, cs, cmask, H, W, C, SH, SW, PT, PL, DH, DW, KH, KW,
                     ACT if PREACT else 0)
        if HAS_DWS:
            d = d * tl.load(dws_ptr + cs, mask=cmask, other=0.0)[None, :]
        if HAS_DWB:
            d = d + tl.load(dwb_ptr + cs, mask=cmask, other=0.0)[None, :]
        if not PREACT:
            d = _act(d, ACT)
        d = tl.where(cmask[None, :], d, 0.0)
        wt = tl.load(pw_ptr + co[None, :] * C + cs[:, None], mask=cmask[:, None] & comask[None, :], other=0.0)
        acc = _dot_acc(acc, d, wt, x_ptr, F32_DOT)
    _store_epilogue(acc, p, pmask, co, comask, Co, pws_ptr, pwb_ptr, res_ptr, out_ptr, PW_ACT, HAS_PWS, HAS_PWB,
                    HAS_RES)


@triton.jit
def _dw_kernel(x_ptr, taps_ptr, s_ptr, b_ptr, y_ptr, part_ptr, H, W, C, Ho, Wo, PT, PL,
               SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
               KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, HAS_S: tl.constexpr,
               HAS_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Programs (image n, pixel block, channel block); part[n, block, c] = sum of y over the block."""
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    q = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = q < Ho * Wo
    oh = q // Wo
    ow = q % Wo
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    d = _dw_tile(x_ptr, taps_ptr, n, oh, ow, pmask, cs, cmask, H, W, C, SH, SW, PT, PL, DH, DW, KH, KW, 0)
    if HAS_S:
        d = d * tl.load(s_ptr + cs, mask=cmask, other=0.0)[None, :]
    if HAS_B:
        d = d + tl.load(b_ptr + cs, mask=cmask, other=0.0)[None, :]
    d = _act(d, ACT)
    m = pmask[:, None] & cmask[None, :]
    tl.store(y_ptr + ((n * Ho * Wo + q) * C)[:, None] + cs[None, :], d.to(y_ptr.dtype.element_ty), mask=m)
    part = tl.sum(tl.where(m, d, 0.0), axis=0)
    tl.store(part_ptr + (n * tl.num_programs(1) + pb) * C + cs, part, mask=cmask)


@triton.jit
def _pw_kernel(a_ptr, w_ptr, cs_ptr, s_ptr, b_ptr, res_ptr, out_ptr, M, HW, C, Co,
               ACT: tl.constexpr, HAS_CS: tl.constexpr, HAS_S: tl.constexpr, HAS_B: tl.constexpr,
               HAS_RES: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < Co
    img = rm // HW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < C
        a = tl.load(a_ptr + rm[:, None] * C + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        if HAS_CS:
            a = a.to(tl.float32) * tl.load(cs_ptr + img[:, None] * C + rk[None, :],
                                           mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + rn[None, :] * C + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _dot_acc(acc, a, wt, a_ptr, F32_DOT)
    _store_epilogue(acc, rm, mmask, rn, nmask, Co, s_ptr, b_ptr, res_ptr, out_ptr, ACT, HAS_S, HAS_B, HAS_RES)


@triton.jit
def _dw_bwd_input_kernel(gd_ptr, taps_ptr, ga_ptr, H, W, C, Ho, Wo, PT, PL,
                         SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                         KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    q = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = q < H * W
    cmask = cs < C
    ih = q // W
    iw = q % W
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in tl.static_range(KH):
        th = ih + PT - kh * DH
        oh = th // SH
        okh = (th >= 0) & (th % SH == 0) & (oh < Ho)
        for kw in tl.static_range(KW):
            tw = iw + PL - kw * DW
            ow = tw // SW
            ok = pmask & okh & (tw >= 0) & (tw % SW == 0) & (ow < Wo)
            m = ok[:, None] & cmask[None, :]
            g = tl.load(gd_ptr + (((n * Ho + oh) * Wo + ow) * C)[:, None] + cs[None, :], mask=m, other=0.0)
            wv = tl.load(taps_ptr + (kh * KW + kw) * C + cs, mask=cmask, other=0.0)
            acc += g.to(tl.float32) * wv.to(tl.float32)[None, :]
    tl.store(ga_ptr + ((n * H * W + q) * C)[:, None] + cs[None, :], acc.to(ga_ptr.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _dw_bwd_weight_kernel(a_ptr, gd_ptr, part_ptr, NP, H, W, C, Ho, Wo, PT, PL,
                          SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                          KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[block, tap, c] = sum over the block's output pixels of gd * a(at the tap)."""
    pb = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < NP
    cmask = cs < C
    n = p // (Ho * Wo)
    rem = p % (Ho * Wo)
    oh = rem // Wo
    ow = rem % Wo
    g = tl.load(gd_ptr + (p * C)[:, None] + cs[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)
    g = g.to(tl.float32)
    for kh in tl.static_range(KH):
        ih = oh * SH - PT + kh * DH
        for kw in tl.static_range(KW):
            iw = ow * SW - PL + kw * DW
            ok = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            m = ok[:, None] & cmask[None, :]
            av = tl.load(a_ptr + (((n * H + ih) * W + iw) * C)[:, None] + cs[None, :], mask=m, other=0.0)
            part = tl.sum(g * av.to(tl.float32), axis=0)
            tl.store(part_ptr + (pb * (KH * KW) + kh * KW + kw) * C + cs, part, mask=cmask)


# ----------------------------------------------------------------------------- launchers
def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _geo(g):
    (sh, sw), (pt, _, pl, _), (dh, dw) = g.stride, g.pad, g.dilation
    return sh, sw, pt, pl, dh, dw


def _f32_dot(dtype: torch.dtype) -> bool:
    """Dot operands in float32 (IEEE) for float32 inputs. Also for bfloat16 under the Triton
    interpreter, whose tl.dot on bfloat16 operands returns garbage (Triton 3.8: a 16x16 product
    off by 1e10); compiled kernels use the bfloat16 tensor-core path (see test_triton_compile)."""
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dtype in (torch.float32, torch.float64) or (interp and dtype == torch.bfloat16)


def dwsep_forward(x, taps, pw, dws, dwb, pws, pwb, res, g, act: int, pw_act: int, preact: bool):
    """x [N, H, W, C] (contiguous NHWC), taps [KH, KW, C] f32, pw [Co, C] f32; -> out NHWC."""
    N, H, W, C = x.shape
    Co = pw.shape[0]
    Ho, Wo = g.out_hw
    out = torch.empty(N, Ho, Wo, Co, dtype=x.dtype, device=x.device)
    sh, sw, pt, pl, dh, dw = _geo(g)
    NP = N * Ho * Wo
    BLOCK_P, BLOCK_C, BLOCK_CO = 64, _p2(C, 16, 64), _p2(Co, 16, 128)
    dummy = pw
    grid = (triton.cdiv(NP, BLOCK_P), triton.cdiv(Co, BLOCK_CO))
    _dwsep_kernel[grid](
        x, taps, pw, dws if dws is not None else dummy, dwb if dwb is not None else dummy,
        pws if pws is not None else dummy, pwb if pwb is not None else dummy, res if res is not None else x, out,
        NP, H, W, C, Ho, Wo, Co, pt, pl, SH=sh, SW=sw, DH=dh, DW=dw, KH=taps.shape[0], KW=taps.shape[1],
        ACT=act, PW_ACT=pw_act, PREACT=preact, HAS_DWS=dws is not None, HAS_DWB=dwb is not None,
        HAS_PWS=pws is not None, HAS_PWB=pwb is not None, HAS_RES=res is not None, F32_DOT=_f32_dot(x.dtype),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, BLOCK_CO=BLOCK_CO)
    return out


def dw_forward(x, taps, scale, bias, g, act: int):
    """-> (y NHWC, sums [N, C] float32)."""
    N, H, W, C = x.shape
    Ho, Wo = g.out_hw
    y = torch.empty(N, Ho, Wo, C, dtype=x.dtype, device=x.device)
    sh, sw, pt, pl, dh, dw = _geo(g)
    BLOCK_P, BLOCK_C = 64, _p2(C, 16, 64)
    pblocks = triton.cdiv(Ho * Wo, BLOCK_P)
    part = torch.empty(N, pblocks, C, dtype=torch.float32, device=x.device)
    _dw_kernel[(N, pblocks, triton.cdiv(C, BLOCK_C))](
        x, taps, scale if scale is not None else taps, bias if bias is not None else taps, y, part,
        H, W, C, Ho, Wo, pt, pl, SH=sh, SW=sw, DH=dh, DW=dw, KH=taps.shape[0], KW=taps.shape[1], ACT=act,
        HAS_S=scale is not None, HAS_B=bias is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return y, part.sum(1)


def pw_forward(a, w, cs, scale, bias, act: int, res):
    """a [N, H, W, C] NHWC, w [Co, C] f32, cs [N, C] -> out [N, H, W, Co]."""
    N, H, W, C = a.shape
    Co = w.shape[0]
    M = N * H * W
    out = torch.empty(N, H, W, Co, dtype=a.dtype, device=a.device)
    BLOCK_M, BLOCK_K, BLOCK_N = 64, _p2(C, 16, 64), _p2(Co, 16, 128)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(Co, BLOCK_N))
    _pw_kernel[grid](
        a, w, cs if cs is not None else w, scale if scale is not None else w, bias if bias is not None else w,
        res if res is not None else a, out, M, H * W, C, Co, ACT=act, HAS_CS=cs is not None,
        HAS_S=scale is not None, HAS_B=bias is not None, HAS_RES=res is not None, F32_DOT=_f32_dot(a.dtype),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    return out


def dw_backward(a, taps, gd, g):
    """a [N, H, W, C], taps [KH, KW, C], gd [N, Ho, Wo, C] (float32) -> (ga NHWC, gw [KH, KW, C])."""
    N, H, W, C = a.shape
    Ho, Wo = g.out_hw
    KH, KW = taps.shape[:2]
    sh, sw, pt, pl, dh, dw = _geo(g)
    BLOCK_P, BLOCK_C = 64, _p2(C, 16, 64)
    ga = torch.empty_like(a)
    _dw_bwd_input_kernel[(N, triton.cdiv(H * W, BLOCK_P), triton.cdiv(C, BLOCK_C))](
        gd, taps, ga, H, W, C, Ho, Wo, pt, pl, SH=sh, SW=sw, DH=dh, DW=dw, KH=KH, KW=KW,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    NP = N * Ho * Wo
    pblocks = triton.cdiv(NP, BLOCK_P)
    part = torch.empty(pblocks, KH * KW, C, dtype=torch.float32, device=a.device)
    _dw_bwd_weight_kernel[(pblocks, triton.cdiv(C, BLOCK_C))](
        a, gd, part, NP, H, W, C, Ho, Wo, pt, pl, SH=sh, SW=sw, DH=dh, DW=dw, KH=KH, KW=KW,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return ga, part.sum(0).view(KH, KW, C).to(a.dtype)
