"""Triton kernels of the BiFPN weighted fusion (NHWC; semantics in effops/ops/bifpn.py).

Up to 4 inputs are passed as separate pointers with their sizes and resample modes as
compile-time constants, so each node shape compiles to straight-line code. Nearest upsampling
uses ATen's index rule in float32; the pools treat pads as -inf and let NaN win, as torch's
max_pool2d. Backward: a pass computing g * act'(pre) and per-program partial weight gradients,
then per input a gather (identity: scale; nearest: the preimage rows/columns; pools: the windows
whose first-in-scan-order argmax is the pixel).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from .dwsep import _act


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 1:
        g = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where((x > 0) & (x < 6), 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-x))
        g = s * (1.0 + x * (1.0 - s))
    elif ACT == 4:
        g = tl.where(x < -3, 0.0, tl.where(x <= 3, x / 3.0 + 0.5, 1.0))
    elif ACT == 5:
        s = 1.0 / (1.0 + tl.exp(-x))
        g = s * (1.0 - s)
    else:
        g = x * 0.0 + 1.0
    return g


@triton.jit
def _sample(x_ptr, n, oh, ow, pm, cs, cm, C, H, W, sh, sw, pt, pl, MODE: tl.constexpr):
    """Input value at output pixels (n, oh, ow), channels cs, as float32 [P, BC]."""
    m2 = pm[:, None] & cm[None, :]
    if MODE == 0:
        v = tl.load(x_ptr + (((n * H + oh) * W + ow) * C)[:, None] + cs[None, :], mask=m2, other=0.0)
        v = v.to(tl.float32)
    elif MODE == 1:
        ih = tl.minimum(tl.floor(oh.to(tl.float32) * sh).to(tl.int32), H - 1)
        iw = tl.minimum(tl.floor(ow.to(tl.float32) * sw).to(tl.int32), W - 1)
        v = tl.load(x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + cs[None, :], mask=m2, other=0.0)
        v = v.to(tl.float32)
    else:
        v = tl.full([oh.shape[0], cs.shape[0]], float("-inf"), tl.float32)
        for dh in tl.static_range(3):
            ih = 2 * oh - pt + dh
            for dw in tl.static_range(3):
                iw = 2 * ow - pl + dw
                ok = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                t = tl.load(x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + cs[None, :],
                            mask=ok[:, None] & cm[None, :], other=float("-inf")).to(tl.float32)
                v = tl.where((t > v) | (t != t), t, v)
    return v


@triton.jit
def _fused_pre(w_ptr, n, oh, ow, pm, cs, cm, C,
               x0, H0, W0, s0h, s0w, p0t, p0l, x1, H1, W1, s1h, s1w, p1t, p1l,
               x2, H2, W2, s2h, s2w, p2t, p2l, x3, H3, W3, s3h, s3w, p3t, p3l,
               K: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr):
    pre = tl.load(w_ptr + 0) * _sample(x0, n, oh, ow, pm, cs, cm, C, H0, W0, s0h, s0w, p0t, p0l, M0)
    pre += tl.load(w_ptr + 1) * _sample(x1, n, oh, ow, pm, cs, cm, C, H1, W1, s1h, s1w, p1t, p1l, M1)
    if K > 2:
        pre += tl.load(w_ptr + 2) * _sample(x2, n, oh, ow, pm, cs, cm, C, H2, W2, s2h, s2w, p2t, p2l, M2)
    if K > 3:
        pre += tl.load(w_ptr + 3) * _sample(x3, n, oh, ow, pm, cs, cm, C, H3, W3, s3h, s3w, p3t, p3l, M3)
    return pre


@triton.jit
def _fuse_kernel(out_ptr, w_ptr, NP, C, Ho, Wo,
                 x0, H0, W0, s0h, s0w, p0t, p0l, x1, H1, W1, s1h, s1w, p1t, p1l,
                 x2, H2, W2, s2h, s2w, p2t, p2l, x3, H3, W3, s3h, s3w, p3t, p3l,
                 K: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                 ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < NP
    cm = cs < C
    n = p // (Ho * Wo)
    oh = (p % (Ho * Wo)) // Wo
    ow = p % Wo
    pre = _fused_pre(w_ptr, n, oh, ow, pm, cs, cm, C, x0, H0, W0, s0h, s0w, p0t, p0l, x1, H1, W1, s1h, s1w, p1t,
                     p1l, x2, H2, W2, s2h, s2w, p2t, p2l, x3, H3, W3, s3h, s3w, p3t, p3l, K, M0, M1, M2, M3)
    out = _act(pre, ACT)
    tl.store(out_ptr + (p * C)[:, None] + cs[None, :], out.to(out_ptr.dtype.element_ty),
             mask=pm[:, None] & cm[None, :])


@triton.jit
def _fuse_bwd1_kernel(g_ptr, gpre_ptr, part_ptr, w_ptr, NP, C, Ho, Wo,
                      x0, H0, W0, s0h, s0w, p0t, p0l, x1, H1, W1, s1h, s1w, p1t, p1l,
                      x2, H2, W2, s2h, s2w, p2t, p2l, x3, H3, W3, s3h, s3w, p3t, p3l,
                      K: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                      ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """gpre = g * act'(pre); part[program, i] = sum of gpre * R_i(x_i) over the program's tile."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < NP
    cm = cs < C
    m2 = pm[:, None] & cm[None, :]
    n = p // (Ho * Wo)
    oh = (p % (Ho * Wo)) // Wo
    ow = p % Wo
    v0 = _sample(x0, n, oh, ow, pm, cs, cm, C, H0, W0, s0h, s0w, p0t, p0l, M0)
    v1 = _sample(x1, n, oh, ow, pm, cs, cm, C, H1, W1, s1h, s1w, p1t, p1l, M1)
    pre = tl.load(w_ptr + 0) * v0 + tl.load(w_ptr + 1) * v1
    if K > 2:
        v2 = _sample(x2, n, oh, ow, pm, cs, cm, C, H2, W2, s2h, s2w, p2t, p2l, M2)
        pre += tl.load(w_ptr + 2) * v2
    if K > 3:
        v3 = _sample(x3, n, oh, ow, pm, cs, cm, C, H3, W3, s3h, s3w, p3t, p3l, M3)
        pre += tl.load(w_ptr + 3) * v3
    g = tl.load(g_ptr + (p * C)[:, None] + cs[None, :], mask=m2, other=0.0).to(tl.float32)
    gp = tl.where(m2, g * _act_grad(pre, ACT), 0.0)
    tl.store(gpre_ptr + (p * C)[:, None] + cs[None, :], gp, mask=m2)
    prog = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_ptr + prog * 4 + 0, tl.sum(tl.sum(tl.where(m2, gp * v0, 0.0), axis=1), axis=0))
    tl.store(part_ptr + prog * 4 + 1, tl.sum(tl.sum(tl.where(m2, gp * v1, 0.0), axis=1), axis=0))
    if K > 2:
        tl.store(part_ptr + prog * 4 + 2, tl.sum(tl.sum(tl.where(m2, gp * v2, 0.0), axis=1), axis=0))
    if K > 3:
        tl.store(part_ptr + prog * 4 + 3, tl.sum(tl.sum(tl.where(m2, gp * v3, 0.0), axis=1), axis=0))


@triton.jit
def _gather_kernel(gpre_ptr, x_ptr, gx_ptr, w_ptr, IDX, NPI, C, H, W, Ho, Wo, sh, sw, pt, pl, RH, RW,
                   MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gradient of one input: pixels (n, h, x) gather from the output pixels that read them."""
    w = tl.load(w_ptr + IDX)
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = q < NPI
    cm = cs < C
    m2 = pm[:, None] & cm[None, :]
    n = q // (H * W)
    h = (q % (H * W)) // W
    x = q % W
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if MODE == 1:
        # output rows oh with min(floor(oh * sh), H - 1) == h: from floor(h / sh) - 1, at most RH of them
        oh0 = tl.maximum(tl.floor(h.to(tl.float32) / sh).to(tl.int32) - 1, 0)
        ow0 = tl.maximum(tl.floor(x.to(tl.float32) / sw).to(tl.int32) - 1, 0)
        for i in range(0, RH):
            oh = oh0 + i
            okh = (oh < Ho) & (tl.minimum(tl.floor(oh.to(tl.float32) * sh).to(tl.int32), H - 1) == h)
            for j in range(0, RW):
                ow = ow0 + j
                ok = pm & okh & (ow < Wo) & (tl.minimum(tl.floor(ow.to(tl.float32) * sw).to(tl.int32), W - 1) == x)
                acc += tl.load(gpre_ptr + (((n * Ho + oh) * Wo + ow) * C)[:, None] + cs[None, :],
                               mask=ok[:, None] & cm[None, :], other=0.0)
    else:
        # windows containing (h, x): 2 oh - pt <= h <= 2 oh - pt + 2
        for i in tl.static_range(2):
            oh = (h + pt) // 2 - i
            for j in tl.static_range(2):
                ow = (x + pl) // 2 - j
                wh0 = 2 * oh - pt
                ww0 = 2 * ow - pl
                ok = pm & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo) & (h >= wh0) & (h <= wh0 + 2)
                ok = ok & (x >= ww0) & (x <= ww0 + 2)
                okm = ok[:, None] & cm[None, :]
                best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
                hit = tl.full([BLOCK_P, BLOCK_C], 0, tl.int1) | ((h == wh0) & (x == ww0))[:, None]
                for dh in tl.static_range(3):
                    for dw in tl.static_range(3):
                        hh = wh0 + dh
                        xx = ww0 + dw
                        valid = ok & (hh >= 0) & (hh < H) & (xx >= 0) & (xx < W)
                        t = tl.load(x_ptr + (((n * H + hh) * W + xx) * C)[:, None] + cs[None, :],
                                    mask=valid[:, None] & cm[None, :], other=float("-inf")).to(tl.float32)
                        upd = (t > best) | (t != t)
                        best = tl.where(upd, t, best)
                        hit = tl.where(upd, ((hh == h) & (xx == x))[:, None], hit)
                acc += tl.where(okm & hit, tl.load(gpre_ptr + (((n * Ho + oh) * Wo + ow) * C)[:, None] + cs[None, :],
                                                    mask=okm, other=0.0), 0.0)
    tl.store(gx_ptr + (q * C)[:, None] + cs[None, :], (acc * w).to(gx_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- launchers
_MODE = {"identity": 0, "nearest": 1, "maxpool": 2, "maxpool_sym": 3}


def _f32(v: float) -> float:
    return float(np.float32(v))


def _input_args(xs, modes, out_hw):
    """Per input: (pointer, H, W, scale_h, scale_w, pad_t, pad_l), padded to 4 inputs."""
    from ..ops.bifpn import maxpool_pads

    args, codes = [], []
    for x, m in zip(xs, modes):
        H, W = x.shape[1:3]
        sh = float(np.float32(H) / np.float32(out_hw[0]))
        sw = float(np.float32(W) / np.float32(out_hw[1]))
        pt, pl = maxpool_pads(m, H, W) if m.startswith("maxpool") else (0, 0)
        args += [x, H, W, sh, sw, pt, pl]
        codes.append(_MODE[m] if m != "maxpool_sym" else 2)
    while len(codes) < 4:
        args += [xs[0], 1, 1, 1.0, 1.0, 0, 0]
        codes.append(0)
    return args, codes


def fuse_forward(xs, wn, modes, act: int, out_hw):
    """xs: NHWC contiguous inputs; wn float32 [k] -> out NHWC."""
    N, C = xs[0].shape[0], xs[0].shape[3]
    Ho, Wo = out_hw
    out = torch.empty(N, Ho, Wo, C, dtype=xs[0].dtype, device=xs[0].device)
    NP = N * Ho * Wo
    args, codes = _input_args(xs, modes, out_hw)
    BLOCK_P, BLOCK_C = 64, max(16, min(64, triton.next_power_of_2(C)))
    _fuse_kernel[(triton.cdiv(NP, BLOCK_P), triton.cdiv(C, BLOCK_C))](
        out, wn, NP, C, Ho, Wo, *args, K=len(xs), M0=codes[0], M1=codes[1], M2=codes[2], M3=codes[3], ACT=act,
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return out


def fuse_backward(g, xs, wn, modes, act: int, out_hw):
    """g: float32 NHWC gradient of the output -> ([float32 NHWC grads], grad wn float64 [k])."""
    N, C = xs[0].shape[0], xs[0].shape[3]
    Ho, Wo = out_hw
    NP = N * Ho * Wo
    args, codes = _input_args(xs, modes, out_hw)
    BLOCK_P, BLOCK_C = 64, max(16, min(64, triton.next_power_of_2(C)))
    grid = (triton.cdiv(NP, BLOCK_P), triton.cdiv(C, BLOCK_C))
    gpre = torch.empty(N, Ho, Wo, C, dtype=torch.float32, device=g.device)
    part = torch.zeros(grid[0] * grid[1], 4, dtype=torch.float32, device=g.device)
    _fuse_bwd1_kernel[grid](g, gpre, part, wn, NP, C, Ho, Wo, *args, K=len(xs), M0=codes[0], M1=codes[1],
                            M2=codes[2], M3=codes[3], ACT=act, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    gwn = part.double().sum(0)[: len(xs)]
    grads = []
    for i, (x, m) in enumerate(zip(xs, modes)):
        if m == "identity":
            grads.append(gpre * wn[i])
            continue
        H, W = x.shape[1:3]
        gx = torch.empty(N, H, W, C, dtype=torch.float32, device=g.device)
        sh, sw = args[7 * i + 3], args[7 * i + 4]
        pt, pl = args[7 * i + 5], args[7 * i + 6]
        RH, RW = math.ceil(Ho / H) + 3, math.ceil(Wo / W) + 3
        _gather_kernel[(triton.cdiv(N * H * W, BLOCK_P), triton.cdiv(C, BLOCK_C))](
            gpre, x, gx, wn, i, N * H * W, C, H, W, Ho, Wo, sh, sw, pt, pl, RH, RW, MODE=1 if m == "nearest" else 2,
            BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        grads.append(gx)
    return grads, gwn
