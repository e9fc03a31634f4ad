"""Triton kernels of the int8 convolutions (NHWC uint8; arithmetic in effops/ops/qconv.py).

* ``q_dw_forward``: one program per (image, BLOCK_P output pixels, BLOCK_C channels); int32
  accumulation of (x - x_zp) * w over the taps (out-of-range taps are masked to real zero), the
  requantising epilogue, and per-program int32 channel sums of the output codes (added by torch:
  integer sums, any order gives the same result).
* ``q_pw_forward``: GEMM with ``tl.dot`` on int8 operands into int32 (the int8 tensor cores on a
  GPU): the uint8 codes are shifted by 128 to int8 and the shift is taken out again with the
  weights' column sums, sum (a - zp) w = sum (a - 128) w + (128 - zp) sum w. SE gates rescale the
  codes while loading A; the residual is requantised in the epilogue.

Round half to even without a rounding instruction, from operations every target evaluates
exactly: t = trunc(v) (exact for |v| <= 2**23), f = v - t (exact), then t +- 1 where |f| > 1/2,
or |f| == 1/2 and t is odd. The float32 product is clamped before it is used, so it is never
contracted into an FMA with a following add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CLAMP = 8388608.0  # 2**23


@triton.jit
def _rne(v):
    """round_half_even(clamp(v, +-2**23)) as int32 (v float32)."""
    v = tl.minimum(tl.maximum(v, -CLAMP), CLAMP)
    t = v.to(tl.int32)  # truncates toward zero
    f = v - t.to(tl.float32)
    odd = (t & 1) != 0
    up = (f > 0.5) | ((f == 0.5) & odd)
    down = (f < -0.5) | ((f == -0.5) & odd)
    return t + up.to(tl.int32) - down.to(tl.int32)


@triton.jit
def _finish(acc, mult, extra, lut_ptr, zp, qmin, qmax, mask, HAS_LUT: tl.constexpr):
    q = _rne(acc.to(tl.float32) * mult) + extra + zp
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    if HAS_LUT:
        q = tl.load(lut_ptr + q, mask=mask, other=0).to(tl.int32)
    return q


@triton.jit
def _dw_kernel(x_ptr, w_ptr, b_ptr, m_ptr, lut_ptr, y_ptr, part_ptr, H, W, C, Ho, Wo, PT, PL, x_zp, zp, qmin, qmax,
               SH: tl.constexpr, SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_LUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = p < Ho * Wo
    cmask = cs < C
    oh = p // Wo
    ow = p % Wo
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cs, mask=cmask, other=0)[None, :]
    for kh in tl.static_range(KH):
        ih = oh * SH - PT + kh
        for kw in tl.static_range(KW):
            iw = ow * SW - PL + kw
            ok = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            m = ok[:, None] & cmask[None, :]
            xv = tl.load(x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + cs[None, :], mask=m, other=0).to(tl.int32)
            wv = tl.load(w_ptr + (kh * KW + kw) * C + cs, mask=cmask, other=0).to(tl.int32)
            acc += tl.where(m, xv - x_zp, 0) * wv[None, :]
    mult = tl.load(m_ptr + cs, mask=cmask, other=0.0)
    om = pmask[:, None] & cmask[None, :]
    q = _finish(acc, mult[None, :], 0, lut_ptr, zp, qmin, qmax, om, HAS_LUT)
    tl.store(y_ptr + ((n * Ho * Wo + p) * C)[:, None] + cs[None, :], q.to(tl.uint8), mask=om)
    s = tl.sum(tl.where(om, q, 0), axis=0)
    tl.store(part_ptr + (n * tl.num_programs(1) + pb) * C + cs, s, mask=cmask)


@triton.jit
def _pw_kernel(a_ptr, w_ptr, b_ptr, m_ptr, lut_ptr, g_ptr, r_ptr, o_ptr, M, HW, K, Co, x_zp, zp, qmin, qmax, r_zp,
               r_mult, HAS_BIAS: tl.constexpr, HAS_LUT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    nmask = cols < Co
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    wsum = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        am = rmask[:, None] & kmask[None, :]
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=am, other=128).to(tl.int32)
        if HAS_GATE:
            g = tl.load(g_ptr + (rows // HW)[:, None] * K + ks[None, :], mask=am, other=0.0)
            a = _rne((a - x_zp).to(tl.float32) * g) + x_zp
            a = tl.where(am, tl.minimum(tl.maximum(a, 0), 255), 128)
        b = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=kmask[:, None] & nmask[None, :], other=0)
        acc += tl.dot((a - 128).to(tl.int8), b, out_dtype=tl.int32)
        wsum += tl.sum(b.to(tl.int32), axis=0)
    acc += (128 - x_zp) * wsum[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=nmask, other=0)[None, :]
    om = rmask[:, None] & nmask[None, :]
    extra = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if HAS_RES:
        r = tl.load(r_ptr + rows[:, None] * Co + cols[None, :], mask=om, other=0).to(tl.int32)
        extra = _rne((r - r_zp).to(tl.float32) * r_mult)
    mult = tl.load(m_ptr + cols, mask=nmask, other=0.0)
    q = _finish(acc, mult[None, :], extra, lut_ptr, zp, qmin, qmax, om, HAS_LUT)
    tl.store(o_ptr + rows[:, None] * Co + cols[None, :], q.to(tl.uint8), mask=om)


def _dummy(like: torch.Tensor, dtype) -> torch.Tensor:
    return torch.empty(1, dtype=dtype, device=like.device)


def q_dw_forward(x, taps, bias, mult, lut, stride, pad, x_zp, out_zp, qmin, qmax, y, sums):
    """x [N, H, W, C] uint8 (contiguous), taps [KH, KW, C] int8; writes y [N, Ho, Wo, C], sums [N, C]."""
    N, H, W, C = x.shape
    KH, KW = taps.shape[:2]
    Ho, Wo = y.shape[1:3]
    BLOCK_P, BLOCK_C = 16, 32
    grid = (N, triton.cdiv(Ho * Wo, BLOCK_P), triton.cdiv(C, BLOCK_C))
    part = torch.empty((N, grid[1], C), dtype=torch.int32, device=x.device)
    _dw_kernel[grid](x, taps, bias if bias is not None else _dummy(x, torch.int32), mult,
                     lut if lut is not None else _dummy(x, torch.uint8), y, part, H, W, C, Ho, Wo, pad[0], pad[2],
                     x_zp, out_zp, qmin, qmax, SH=stride[0], SW=stride[1], KH=KH, KW=KW, HAS_BIAS=bias is not None,
                     HAS_LUT=lut is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    sums.copy_(part.sum(1, dtype=torch.int64).to(torch.int32))


def q_pw_forward(x, w, bias, mult, lut, gate, residual, x_zp, out_zp, qmin, qmax, res_zp, res_mult, out):
    """x [N, H, W, C] uint8, w [Co, C] int8; writes out [N, H, W, Co]."""
    N, H, W, C = x.shape
    Co = w.shape[0]
    M = N * H * W
    BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(Co, BLOCK_N))
    _pw_kernel[grid](x, w, bias if bias is not None else _dummy(x, torch.int32), mult,
                     lut if lut is not None else _dummy(x, torch.uint8),
                     gate if gate is not None else _dummy(x, torch.float32),
                     residual if residual is not None else _dummy(x, torch.uint8), out, M, H * W, C, Co, x_zp, out_zp,
                     qmin, qmax, res_zp, float(res_mult), HAS_BIAS=bias is not None, HAS_LUT=lut is not None,
                     HAS_GATE=gate is not None, HAS_RES=residual is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                     BLOCK_K=BLOCK_K)


@triton.jit
def _fuse_src(x_ptr, H, W, C, n, oh, ow, cs, m, PT, PL, MODE: tl.constexpr):
    """Codes of one input at output pixels (oh, ow) (int32): identity / nearest index maps are
    precomputed by the caller into (oh, ow) for modes 0 / 1; modes 2 / 3 pool 3x3 stride 2."""
    if MODE < 2:
        return tl.load(x_ptr + (((n * H + oh) * W + ow) * C)[:, None] + cs[None, :], mask=m, other=0).to(tl.int32)
    v = tl.zeros(m.shape, dtype=tl.int32)
    for dh in tl.static_range(3):
        ih = oh * 2 - PT + dh
        for dw in tl.static_range(3):
            iw = ow * 2 - PL + dw
            ok = m & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
            xv = tl.load(x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + cs[None, :], mask=ok, other=0)
            v = tl.maximum(v, xv.to(tl.int32))
    return v


@triton.jit
def _fuse_kernel(x0, x1, x2, x3, i0, i1, i2, i3, geo_ptr, lut_ptr, o_ptr, C, Ho, Wo, z0, z1, z2, z3, m0, m1, m2, m3,
                 zp, qmin, qmax, K: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                 M3: tl.constexpr, HAS_LUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < Ho * Wo
    m = pm[:, None] & (cs < C)[None, :]
    oh = p // Wo
    ow = p % Wo
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.int64)
    # geo: per input (H, W, PT, PL); i_k: int32 [Ho + Wo] source row / column tables (nearest)
    for k in tl.static_range(K):
        if k == 0:
            x, idx, z, mu, MODE = x0, i0, z0, m0, M0
        elif k == 1:
            x, idx, z, mu, MODE = x1, i1, z1, m1, M1
        elif k == 2:
            x, idx, z, mu, MODE = x2, i2, z2, m2, M2
        else:
            x, idx, z, mu, MODE = x3, i3, z3, m3, M3
        H = tl.load(geo_ptr + 4 * k)
        W = tl.load(geo_ptr + 4 * k + 1)
        sh, sw = oh, ow
        if MODE == 1:
            sh = tl.load(idx + oh, mask=pm, other=0)
            sw = tl.load(idx + Ho + ow, mask=pm, other=0)
        v = _fuse_src(x, H, W, C, n, sh, sw, cs, m, tl.load(geo_ptr + 4 * k + 2), tl.load(geo_ptr + 4 * k + 3), MODE)
        acc += (v - z).to(tl.int64) * mu
    q = ((acc + 32768) >> 16).to(tl.int32) + zp
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    if HAS_LUT:
        q = tl.load(lut_ptr + q, mask=m, other=0).to(tl.int32)
    tl.store(o_ptr + ((n * Ho * Wo + p) * C)[:, None] + cs[None, :], q.to(tl.uint8), mask=m)


def _nearest_table(n_in: int, n_out: int) -> list:
    if n_in == n_out:
        return list(range(n_out))
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = torch.floor(torch.arange(n_out, dtype=torch.float32) * scale).to(torch.int64).clamp(max=n_in - 1)
    return src.tolist()


def q_fuse_forward(inputs, zps, mults, modes, out_zp, qmin, qmax, lut, out):
    """inputs: 2-4 NHWC uint8 tensors; modes: codes (0 identity, 1 nearest, 2 maxpool, 3 maxpool_sym)."""
    N, Ho, Wo, C = out.shape
    dev = out.device
    geo, tables = [], []
    for x, mode in zip(inputs, modes):
        H, W = x.shape[1:3]
        if mode == 2:
            pt, pl = max((Ho - 1) * 2 + 3 - H, 0) // 2, max((Wo - 1) * 2 + 3 - W, 0) // 2
        else:
            pt = pl = 1 if mode == 3 else 0
        geo += [H, W, pt, pl]
        tab = _nearest_table(H, Ho) + _nearest_table(W, Wo) if mode == 1 else [0]
        tables.append(torch.tensor(tab, dtype=torch.int32, device=dev))
    k = len(inputs)
    pad = 4 - k
    xs = list(inputs) + [inputs[0]] * pad
    tables += [tables[0]] * pad
    zs = list(zps) + [0] * pad
    ms = list(mults) + [0] * pad
    md = list(modes) + [0] * pad
    BLOCK_P, BLOCK_C = 16, 32
    grid = (N, triton.cdiv(Ho * Wo, BLOCK_P), triton.cdiv(C, BLOCK_C))
    _fuse_kernel[grid](*xs, *tables, torch.tensor(geo + [0] * 4 * pad, dtype=torch.int32, device=dev),
                       lut if lut is not None else _dummy(out, torch.uint8), out, C, Ho, Wo, *zs, *ms, out_zp, qmin,
                       qmax, K=k, M0=md[0], M1=md[1], M2=md[2], M3=md[3], HAS_LUT=lut is not None, BLOCK_P=BLOCK_P,
                       BLOCK_C=BLOCK_C)
