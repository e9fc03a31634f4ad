"""Triton kernels of the NMS family (see effops/ops/nms.py for the design and the semantics).

Exactness: the IoU is computed with the same operations as the reference, an IEEE division
(``div_rn``; Triton's ``/`` on float32 is approximate) and no fused multiply-add
(``enable_fp_fusion=False``), so the keep decisions are bit-for-bit those of the CPU kernel.
Thresholds arrive in a one-element tensor of the compute dtype (a Python float would be
narrowed to float32 for float64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 64  # boxes per mask word


@triton.jit
def _iou_tile(rx1, ry1, rx2, ry2, cx1, cy1, cx2, cy2):
    """IoU of every row box against every column box: [R, C]."""
    ra = (rx2 - rx1) * (ry2 - ry1)
    ca = (cx2 - cx1) * (cy2 - cy1)
    w = tl.minimum(rx2[:, None], cx2[None, :]) - tl.maximum(rx1[:, None], cx1[None, :])
    h = tl.minimum(ry2[:, None], cy2[None, :]) - tl.maximum(ry1[:, None], cy1[None, :])
    w = tl.where(w > 0, w, 0.0)
    h = tl.where(h > 0, h, 0.0)
    inter = w * h
    union = (ra[:, None] + ca[None, :]) - inter
    if inter.dtype == tl.float64:
        r = inter / union  # float64 division is IEEE-rounded already
    else:
        r = tl.math.div_rn(inter, union)
    return r


@triton.jit
def _nms_mask_kernel(boxes_ptr, seg_end_ptr, counts_ptr, thr_ptr, mask_ptr, K, W):
    """mask[b, i, w] bit k: box j = 64 w + k is in i's segment, j > i, IoU(i, j) > thr."""
    ct = tl.program_id(0)
    rt = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r0 = rt * 64
    c0 = ct * 64
    seg_hi = tl.load(seg_end_ptr + b * K + tl.minimum(r0 + 63, K - 1))
    # Lower-triangle tiles and tiles past every row's segment are never read by the reduction.
    if (ct >= rt) & (c0 < seg_hi):
        count = tl.load(counts_ptr + b)
        thr = tl.load(thr_ptr)
        ar = tl.arange(0, 64)
        rows = r0 + ar
        cols = c0 + ar
        rm = rows < K
        cm = cols < K
        base = boxes_ptr + b * K * 4
        rx1 = tl.load(base + rows * 4 + 0, mask=rm, other=0.0)
        ry1 = tl.load(base + rows * 4 + 1, mask=rm, other=0.0)
        rx2 = tl.load(base + rows * 4 + 2, mask=rm, other=0.0)
        ry2 = tl.load(base + rows * 4 + 3, mask=rm, other=0.0)
        cx1 = tl.load(base + cols * 4 + 0, mask=cm, other=0.0)
        cy1 = tl.load(base + cols * 4 + 1, mask=cm, other=0.0)
        cx2 = tl.load(base + cols * 4 + 2, mask=cm, other=0.0)
        cy2 = tl.load(base + cols * 4 + 3, mask=cm, other=0.0)
        iou = _iou_tile(rx1, ry1, rx2, ry2, cx1, cy1, cx2, cy2)
        seg = tl.load(seg_end_ptr + b * K + rows, mask=rm, other=0)
        hit = (iou > thr) & (cols[None, :] > rows[:, None]) & (cols[None, :] < seg[:, None])
        hit = hit & (cols[None, :] < count)
        bit = tl.full([64], 1, tl.int64) << ar.to(tl.int64)
        word = tl.sum(tl.where(hit, bit[None, :], 0), axis=1)  # distinct bits: sum == or
        tl.store(mask_ptr + (b * K + rows) * W + ct, word, mask=rm)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _nms_reduce_kernel(mask_ptr, seg_end_ptr, counts_ptr, removed_ptr, keep_ptr, K, W, BLOCK_W: tl.constexpr):
    """Exact greedy pass for image b: tiles of 64 rows in order; inside a tile the diagonal
    word decides row by row; kept rows then mark what they suppress in later words."""
    b = tl.program_id(0).to(tl.int64)
    count = tl.load(counts_ptr + b)
    ar = tl.arange(0, 64)
    for t in range(0, tl.cdiv(count, 64)):
        r0 = t * 64
        rows = r0 + ar
        rm = rows < count
        cur = tl.load(removed_ptr + b * W + t)
        diag = tl.load(mask_ptr + (b * K + rows) * W + t, mask=rm, other=0)
        keepbits = cur * 0
        one = keepbits + 1
        for i in range(0, 64):
            d_i = tl.sum(tl.where(ar == i, diag, 0))
            kept = (((cur >> i) & 1) == 0) & (r0 + i < count)
            keepbits = keepbits | tl.where(kept, one << i, 0)
            cur = cur | tl.where(kept, d_i, 0)
        kept_rows = (((keepbits >> ar.to(tl.int64)) & 1) != 0) & rm
        tl.store(keep_ptr + b * K + rows, kept_rows.to(tl.int8), mask=rows < K)
        wend = (tl.load(seg_end_ptr + b * K + tl.minimum(r0 + 63, count - 1)) - 1) // 64
        for w0 in range(t + 1, wend + 1, BLOCK_W):
            cols = w0 + tl.arange(0, BLOCK_W)
            cm = cols <= wend
            words = tl.load(
                mask_ptr + (b * K + rows)[:, None] * W + cols[None, :],
                mask=kept_rows[:, None] & cm[None, :],
                other=0,
            )
            acc = tl.reduce(words, 0, _or)
            old = tl.load(removed_ptr + b * W + cols, mask=cm, other=0)
            tl.store(removed_ptr + b * W + cols, old | acc, mask=cm)
        tl.debug_barrier()  # the next tile reads removed[] written by other threads
    # rows at or past count are never kept
    for r in range(tl.cdiv(count, 64) * 64, K, 64):
        rows = r + ar
        tl.store(keep_ptr + b * K + rows, tl.zeros([64], tl.int8), mask=rows < K)


def segmented_keep(boxes: torch.Tensor, seg_end: torch.Tensor, counts: torch.Tensor, thr: float) -> torch.Tensor:
    """Greedy NMS keep flags [B, K] for grouped boxes [B, K, 4] (see ops/nms.py:_gpu_keep)."""
    B, K = boxes.shape[:2]
    W = triton.cdiv(K, _TILE)
    dev = boxes.device
    thr_t = torch.tensor([thr], dtype=boxes.dtype, device=dev)
    mask = torch.empty(B, K, W, dtype=torch.int64, device=dev)
    removed = torch.zeros(B, W, dtype=torch.int64, device=dev)
    keep = torch.empty(B, K, dtype=torch.int8, device=dev)
    _nms_mask_kernel[(W, W, B)](boxes, seg_end, counts, thr_t, mask, K, W, enable_fp_fusion=False)
    _nms_reduce_kernel[(B,)](mask, seg_end, counts, removed, keep, K, W, BLOCK_W=32)
    return keep.bool()


@triton.jit
def _matrix_kernel(boxes_ptr, seg_start_ptr, cmax_ptr, out_ptr, n, sigma_ptr, KERNEL: tl.constexpr,
                   PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Matrix NMS over boxes in score order, one column block of boxes j per program.
    PASS 0: out[j] = cmax_j = max IoU with a higher-scored box of its segment.
    PASS 1: out[j] = min(1, min_i f(IoU_ij) / f(cmax_i)) over those boxes with IoU > 0."""
    pid = tl.program_id(0)
    sigma = tl.load(sigma_ptr)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    cm = cols < n
    cx1 = tl.load(boxes_ptr + cols * 4 + 0, mask=cm, other=0.0)
    cy1 = tl.load(boxes_ptr + cols * 4 + 1, mask=cm, other=0.0)
    cx2 = tl.load(boxes_ptr + cols * 4 + 2, mask=cm, other=0.0)
    cy2 = tl.load(boxes_ptr + cols * 4 + 3, mask=cm, other=0.0)
    s0 = tl.load(seg_start_ptr + cols, mask=cm, other=n)
    lo = tl.min(s0, axis=0)
    hi = tl.minimum(pid * BLOCK + BLOCK, n)
    if PASS == 0:
        acc = tl.zeros([BLOCK], tl.float64)
    else:
        acc = tl.full([BLOCK], 1.0, tl.float64)
    for i0 in range(lo, hi, BLOCK):
        rows = i0 + tl.arange(0, BLOCK)
        rm = rows < n
        rx1 = tl.load(boxes_ptr + rows * 4 + 0, mask=rm, other=0.0)
        ry1 = tl.load(boxes_ptr + rows * 4 + 1, mask=rm, other=0.0)
        rx2 = tl.load(boxes_ptr + rows * 4 + 2, mask=rm, other=0.0)
        ry2 = tl.load(boxes_ptr + rows * 4 + 3, mask=rm, other=0.0)
        v = _iou_tile(rx1, ry1, rx2, ry2, cx1, cy1, cx2, cy2)
        ok = (rows[:, None] < cols[None, :]) & (rows[:, None] >= s0[None, :]) & rm[:, None] & (v > 0)
        v = v.to(tl.float64)
        if PASS == 0:
            acc = tl.maximum(acc, tl.max(tl.where(ok, v, 0.0), axis=0))
        else:
            cr = tl.load(cmax_ptr + rows, mask=rm, other=0.0)[:, None]
            if KERNEL == 1:
                r = tl.exp(-sigma * (v * v - cr * cr))
            else:
                den = 1.0 - cr
                r = tl.where(den > 0, (1.0 - v) / tl.where(den > 0, den, 1.0), float("inf"))
            acc = tl.minimum(acc, tl.min(tl.where(ok, r, float("inf")), axis=0))
    tl.store(out_ptr + cols, acc, mask=cm)


def matrix_decay(boxes: torch.Tensor, seg_start: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Decay factors (float64) of Matrix NMS for boxes [n, 4] in score order, grouped by class."""
    n = boxes.shape[0]
    block = 32
    cmax = torch.empty(n, dtype=torch.float64, device=boxes.device)
    decay = torch.empty(n, dtype=torch.float64, device=boxes.device)
    grid = (triton.cdiv(n, block),)
    sigma = torch.tensor([sigma], dtype=torch.float64, device=boxes.device)
    _matrix_kernel[grid](boxes, seg_start, cmax, cmax, n, sigma, KERNEL=kernel, PASS=0, BLOCK=block,
                         enable_fp_fusion=False)
    _matrix_kernel[grid](boxes, seg_start, cmax, decay, n, sigma, KERNEL=kernel, PASS=1, BLOCK=block,
                         enable_fp_fusion=False)
    return decay


@triton.jit
def _iou_row(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
    """IoU of one box (scalars) against a vector of boxes; same operations as _iou_tile."""
    aa = (ax2 - ax1) * (ay2 - ay1)
    ba = (bx2 - bx1) * (by2 - by1)
    w = tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1)
    h = tl.minimum(ay2, by2) - tl.maximum(ay1, by1)
    w = tl.where(w > 0, w, 0.0)
    h = tl.where(h > 0, h, 0.0)
    inter = w * h
    union = (aa + ba) - inter
    if inter.dtype == tl.float64:
        r = inter / union  # float64 division is IEEE-rounded already
    else:
        r = tl.math.div_rn(inter, union)
    return r


@triton.jit
def _soft_nms_kernel(boxes_ptr, work_ptr, keep_ptr, out_ptr, count_ptr, n, par_ptr,
                     METHOD: tl.constexpr, BLOCK: tl.constexpr):
    """Soft-NMS in one program: repeat {argmax of the live scores (ties: lower index); stop if
    below the score threshold; decay the others}. Dead boxes hold NaN in work[].
    par = [iou_threshold (compute dtype, as float64), sigma, score_threshold]."""
    thr = tl.load(par_ptr + 0)
    sigma = tl.load(par_ptr + 1)
    score_thr = tl.load(par_ptr + 2)
    k = 0
    go = n > 0
    while go:
        best_s = tl.load(work_ptr) * 0.0 - float("inf")
        best_i = n
        for c0 in range(0, n, BLOCK):
            idx = c0 + tl.arange(0, BLOCK)
            v = tl.load(work_ptr + idx, mask=idx < n, other=float("nan"))
            alive = v == v
            vv = tl.where(alive, v, -float("inf"))
            bm = tl.max(vv, axis=0)
            bi = tl.min(tl.where(alive & (vv == bm), idx, n), axis=0)
            upd = (bi < n) & ((best_i == n) | (bm > best_s))  # earlier chunks win ties
            best_s = tl.where(upd, bm, best_s)
            best_i = tl.where(upd, bi, best_i)
        go = best_i < n
        if go:
            go = best_s.to(tl.float64) >= score_thr
        if go:
            tl.store(keep_ptr + k, best_i.to(tl.int64))
            tl.store(out_ptr + k, best_s)
            tl.store(work_ptr + best_i, best_s * float("nan"))
            k += 1
            ax1 = tl.load(boxes_ptr + best_i * 4 + 0)
            ay1 = tl.load(boxes_ptr + best_i * 4 + 1)
            ax2 = tl.load(boxes_ptr + best_i * 4 + 2)
            ay2 = tl.load(boxes_ptr + best_i * 4 + 3)
            tl.debug_barrier()
            for c0 in range(0, n, BLOCK):
                idx = c0 + tl.arange(0, BLOCK)
                m = idx < n
                cur = tl.load(work_ptr + idx, mask=m, other=float("nan"))
                bx1 = tl.load(boxes_ptr + idx * 4 + 0, mask=m, other=0.0)
                by1 = tl.load(boxes_ptr + idx * 4 + 1, mask=m, other=0.0)
                bx2 = tl.load(boxes_ptr + idx * 4 + 2, mask=m, other=0.0)
                by2 = tl.load(boxes_ptr + idx * 4 + 3, mask=m, other=0.0)
                v = _iou_row(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
                dv = v.to(tl.float64)
                if METHOD == 0:
                    hit = v.to(tl.float64) > thr
                    w = 1.0 - dv
                else:
                    hit = v > 0
                    w = tl.exp(-(dv * dv) / sigma)
                hit = hit & (cur == cur) & m
                nv = (cur.to(tl.float64) * w).to(cur.dtype)
                nv = tl.where(nv.to(tl.float64) < score_thr, nv * float("nan"), nv)
                tl.store(work_ptr + idx, nv, mask=hit)
            tl.debug_barrier()
    tl.store(count_ptr, k)


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float, sigma: float, method: int,
             score_threshold: float):
    """(keep, scores) of Soft-NMS for boxes [n, 4] and scores [n] of one compute dtype."""
    n = boxes.shape[0]
    dev = boxes.device
    work = torch.where(scores.double() < score_threshold, torch.full_like(scores, float("nan")), scores)
    keep = torch.empty(n, dtype=torch.int64, device=dev)
    out = torch.empty(n, dtype=scores.dtype, device=dev)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    par = torch.tensor([thr, sigma, score_threshold], dtype=torch.float64, device=dev)
    _soft_nms_kernel[(1,)](boxes, work, keep, out, count, n, par, METHOD=method, BLOCK=1024,
                           enable_fp_fusion=False)
    k = int(count.item())
    return keep[:k], out[:k]
