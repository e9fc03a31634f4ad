"""Triton kernels of the norm family: training-mode BatchNorm + activation (semantics in
effops/ops/norm.py), on NHWC rows of N images. Programs are (image, pixel block, channel block);
every reduction is a per-program partial summed by torch in float64 (deterministic, no atomics):

* ``_stats``:  partial sums of x - shift and (x - shift)^2 (shift: the first row, as the CPU kernel)
* ``_apply``:  y = act(x * a + b); with POOL the partial sums of y per image (the pooled means)
* ``_bstats``: partial sums of g and g * (x - mean), g = (dy + dpooled[n] / HW) * act'(x * a + b)
* ``_bapply``: dx = a * g + p * (x - mean) + q
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dwsep import _act, _p2


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    # d act / dz with effops.ops.dwsep.act_grad's conventions at the kinks
    if ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where((z > 0) & (z < 6), 1.0, 0.0)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        d = tl.where(z < -3, 0.0, tl.where(z <= 3, z / 3.0 + 0.5, 1.0))
    elif ACT == 5:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 - s)
    else:
        d = z * 0.0 + 1.0
    return d


@triton.jit
def _tile(n, pb, cb, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    q = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    m = (q < HW)[:, None] & cmask[None, :]
    offs = ((n * HW + q) * C)[:, None] + cs[None, :]
    return cs, cmask, m, offs


@triton.jit
def _stats_kernel(x_ptr, shift_ptr, part_ptr, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cs, cmask, m, offs = _tile(n, pb, cb, HW, C, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.where(m, x - tl.load(shift_ptr + cs, mask=cmask, other=0.0)[None, :], 0.0)
    row = (n * tl.num_programs(1) + pb) * 2 * C
    tl.store(part_ptr + row + cs, tl.sum(d, axis=0), mask=cmask)
    tl.store(part_ptr + row + C + cs, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit
def _apply_kernel(x_ptr, a_ptr, b_ptr, y_ptr, part_ptr, HW, C, ACT: tl.constexpr, POOL: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cs, cmask, m, offs = _tile(n, pb, cb, HW, C, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    z = x * tl.load(a_ptr + cs, mask=cmask, other=0.0)[None, :] + tl.load(b_ptr + cs, mask=cmask, other=0.0)[None, :]
    y = _act(z, ACT).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=m)
    if POOL:  # the stored values' sums (bf16: rounded), as the CPU kernel
        tl.store(part_ptr + (n * tl.num_programs(1) + pb) * C + cs,
                 tl.sum(tl.where(m, y.to(tl.float32), 0.0), axis=0), mask=cmask)


@triton.jit
def _grad_tile(gy_ptr, x_ptr, a_ptr, b_ptr, mean_ptr, gp_ptr, n, cs, cmask, m, offs, C, ACT: tl.constexpr,
               HAS_GP: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_GP:
        gy = gy + tl.load(gp_ptr + n * C + cs, mask=cmask, other=0.0)[None, :]
    a = tl.load(a_ptr + cs, mask=cmask, other=0.0)[None, :]
    g = gy * _act_grad(x * a + tl.load(b_ptr + cs, mask=cmask, other=0.0)[None, :], ACT)
    g = tl.where(m, g, 0.0)
    xc = tl.where(m, x - tl.load(mean_ptr + cs, mask=cmask, other=0.0)[None, :], 0.0)
    return g, xc, a


@triton.jit
def _bstats_kernel(gy_ptr, x_ptr, a_ptr, b_ptr, mean_ptr, gp_ptr, part_ptr, HW, C, ACT: tl.constexpr,
                   HAS_GP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cs, cmask, m, offs = _tile(n, pb, cb, HW, C, BLOCK_P, BLOCK_C)
    g, xc, _ = _grad_tile(gy_ptr, x_ptr, a_ptr, b_ptr, mean_ptr, gp_ptr, n, cs, cmask, m, offs, C, ACT, HAS_GP)
    row = (n * tl.num_programs(1) + pb) * 2 * C
    tl.store(part_ptr + row + cs, tl.sum(g, axis=0), mask=cmask)
    tl.store(part_ptr + row + C + cs, tl.sum(g * xc, axis=0), mask=cmask)


@triton.jit
def _bapply_kernel(gy_ptr, x_ptr, a_ptr, b_ptr, mean_ptr, gp_ptr, p_ptr, q_ptr, gx_ptr, HW, C,
                   ACT: tl.constexpr, HAS_GP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cs, cmask, m, offs = _tile(n, pb, cb, HW, C, BLOCK_P, BLOCK_C)
    g, xc, a = _grad_tile(gy_ptr, x_ptr, a_ptr, b_ptr, mean_ptr, gp_ptr, n, cs, cmask, m, offs, C, ACT, HAS_GP)
    p = tl.load(p_ptr + cs, mask=cmask, other=0.0)[None, :]
    q = tl.load(q_ptr + cs, mask=cmask, other=0.0)[None, :]
    tl.store(gx_ptr + offs, (a * g + p * xc + q).to(gx_ptr.dtype.element_ty), mask=m)


def _grid(x):
    N, H, W, C = x.shape
    BLOCK_P, BLOCK_C = 64, _p2(C, 16, 64)
    return (N, triton.cdiv(H * W, BLOCK_P), triton.cdiv(C, BLOCK_C)), H * W, C, BLOCK_P, BLOCK_C


def _affine(weight, bias, C, device):
    w = torch.ones(C, device=device) if weight is None else weight.float()
    b = torch.zeros(C, device=device) if bias is None else bias.float()
    return w.double(), b.double()


def forward(x, weight, bias, eps: float, act: int, pool: bool):
    """x [N, H, W, C] contiguous NHWC -> (y NHWC, mean, invstd, var, pooled [N, C] or empty), float32 stats."""
    grid, HW, C, BP, BC = _grid(x)
    N = x.shape[0]
    dev = x.device
    shift = x[0, 0, 0].float().contiguous()
    part = torch.empty(grid[0] * grid[1], 2, C, dtype=torch.float32, device=dev)
    _stats_kernel[grid](x, shift, part, HW, C, BLOCK_P=BP, BLOCK_C=BC)
    s = part.double().sum(0)
    M = N * HW
    d = s[0] / M
    var = (s[1] / M - d * d).clamp_min(0.0)
    mean = shift.double() + d
    invstd = torch.rsqrt(var + eps)
    w, b = _affine(weight, bias, C, dev)
    a = (w * invstd).float().contiguous()
    bb = (b - mean * w * invstd).float().contiguous()
    y = torch.empty_like(x)
    pp = torch.empty(grid[0] * grid[1], C, dtype=torch.float32, device=dev) if pool else a
    _apply_kernel[grid](x, a, bb, y, pp, HW, C, ACT=act, POOL=pool, BLOCK_P=BP, BLOCK_C=BC)
    pooled = (pp.double().view(N, grid[1], C).sum(1) / HW).float() if pool else torch.empty(0, device=dev)
    return y, mean.float(), invstd.float(), var.float(), pooled


def backward(gy, x, weight, bias, mean, invstd, grad_pooled, act: int):
    """-> (dx NHWC in x's dtype, d weight, d bias) float32."""
    grid, HW, C, BP, BC = _grid(x)
    N = x.shape[0]
    dev = x.device
    w, b = _affine(weight, bias, C, dev)
    inv = invstd.double()
    a64 = w * inv
    a = a64.float().contiguous()
    bb = (b - mean.double() * a64).float().contiguous()
    mu = mean.float().contiguous()
    gp = (grad_pooled.float() / HW).contiguous() if grad_pooled is not None else a
    part = torch.empty(grid[0] * grid[1], 2, C, dtype=torch.float32, device=dev)
    _bstats_kernel[grid](gy, x, a, bb, mu, gp, part, HW, C, ACT=act, HAS_GP=grad_pooled is not None,
                         BLOCK_P=BP, BLOCK_C=BC)
    s = part.double().sum(0)
    M = N * HW
    p = (-a64 * inv * inv * s[1] / M).float().contiguous()
    q = (-a64 * s[0] / M).float().contiguous()
    gx = torch.empty_like(x)
    _bapply_kernel[grid](gy, x, a, bb, mu, gp, p, q, gx, HW, C, ACT=act, HAS_GP=grad_pooled is not None,
                         BLOCK_P=BP, BLOCK_C=BC)
    return gx, (s[1] * inv).float(), s[0].float()
