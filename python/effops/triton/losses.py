"""Triton kernels of the detection losses (semantics and formulas: effops/ops/_losses_ref.py).

Focal loss: one program per BLOCK logits of the flat [N, C] array; class targets are compared
with each element's class on the fly (no one-hot), a class >= C gives NaN (no host sync); the
per-program sums are reduced by the caller. Box losses: one program per BLOCK boxes. Anchor
matching: pass 1 per (image, BLOCK anchors) computes effdet's float32 IoU with every valid gt
(IEEE division, no FMA fusion: the decisions are effdet's), each anchor's first best gt, and per
gt the block's best anchor (value, then lowest index) into a workspace; pass 2 per image picks
each gt's best anchor over the blocks (earlier blocks win ties); pass 3 applies the force
matches (lowest gt index first), thresholds, labels and the FasterRcnn encoding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _log1p01(e):
    u = 1.0 + e
    d = u - 1.0
    exact = d == 0.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, d)))


@triton.jit
def _focal_kernel(x_ptr, cls_ptr, dense_ptr, ign_ptr, loss_ptr, part_ptr, grad_ptr, n, C,
                  alpha1, alpha0, gamma, ls_scale, ls_add,
                  DENSE: tl.constexpr, IGN: tl.constexpr, GMODE: tl.constexpr, STORE: tl.constexpr,
                  GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < n
    row = idx // C
    c = idx - row * C
    v = tl.load(x_ptr + idx, mask=live, other=0.0).to(tl.float32)
    if DENSE:
        t = tl.load(dense_ptr + idx, mask=live, other=0.0)
        w = tl.full([BLOCK], 1.0, tl.float32)
    else:
        k = tl.load(cls_ptr + row, mask=live, other=-1)
        t = tl.where(k == c, 1.0, 0.0)
        w = tl.where(k == -2, 0.0, tl.where(k >= C, float("nan"), 1.0))
    if IGN == 1:
        w = tl.where(tl.load(ign_ptr + row, mask=live, other=0) != 0, 0.0, w)
    if IGN == 2:
        w = tl.where(tl.load(ign_ptr + idx, mask=live, other=0) != 0, 0.0, w)
    e = tl.exp(-tl.abs(v))
    s = 1.0 / (1.0 + e)
    es = e * s
    pos = v >= 0.0
    p = tl.where(pos, s, es)
    om = tl.where(pos, es, s)
    l1p = _log1p01(e)
    spp = tl.where(pos, v, 0.0) + l1p
    spn = tl.where(pos, 0.0, -v) + l1p
    ts = t * ls_scale + ls_add
    ce = spp - v * ts
    one = t == 1.0
    zero = t == 0.0
    qg = t * om + (1.0 - t) * p
    q = tl.where(one, om, tl.where(zero, p, qg))
    rg = tl.where(qg > 0.0, p * om / tl.where(qg > 0.0, qg, 1.0), 0.0)
    r = tl.where(one, p, tl.where(zero, om, rg))
    if GMODE == 0:
        mod = tl.full([BLOCK], 1.0, tl.float32)
    elif GMODE == 1:
        mod = q
    elif GMODE == 2:
        mod = q * q
    else:
        lq = tl.where(one, -spp, tl.where(zero, -spn, tl.log(tl.maximum(qg, 1.17549435e-38))))
        mod = tl.exp(gamma * lq)
    wa = w * (t * alpha1 + (1.0 - t) * alpha0)
    loss = wa * mod * ce
    g = mod * (p - ts)
    if GMODE != 0:
        g += gamma * mod * (1.0 - 2.0 * t) * r * ce
    if STORE:
        tl.store(loss_ptr + idx, loss, mask=live)
    else:
        tl.store(part_ptr + pid, tl.sum(tl.where(live, loss, 0.0), axis=0))
    if GRAD:
        # via an explicit float32: the interpreter (Triton 3.8) stored zeros for a bfloat16 cast of
        # the exp() path's product otherwise
        tl.store(grad_ptr + idx, (wa * g).to(tl.float32).to(grad_ptr.dtype.element_ty), mask=live)


def focal(x, t, ig, alpha: float, gamma: float, ls: float, reduce: bool, grad, block: int = 1024):
    """(per-element loss float32 or None, float32 sum or None) of rows x [N, C]; grad filled."""
    N, C = x.shape
    n = N * C
    dev = x.device
    dense = t.dtype.is_floating_point
    blocks = max(1, triton.cdiv(n, block))
    loss = None if reduce else torch.empty(N, C, dtype=torch.float32, device=dev)
    part = torch.zeros(blocks, dtype=torch.float32, device=dev) if reduce else None
    if n:
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        a1, a0 = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
        gmode = 0 if gamma == 0 else 1 if gamma == 1 else 2 if gamma == 2 else 3
        _focal_kernel[(blocks,)](
            x, dummy if dense else t, t if dense else dummy, dummy if ig is None else ig,
            dummy if loss is None else loss, dummy if part is None else part, dummy if grad is None else grad,
            n, C, float(a1), float(a0), float(gamma), float(1.0 - ls), float(0.5 * ls),
            DENSE=dense, IGN=0 if ig is None else ig.dim(), GMODE=gmode, STORE=not reduce, GRAD=grad is not None,
            BLOCK=block)
    return loss, (part.double().sum().float() if reduce else None)


@triton.jit
def _dmax(a, b):
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _box_kernel(p_ptr, g_ptr, m_ptr, loss_ptr, part_ptr, grad_ptr, N, delta,
                KIND: tl.constexpr, MASK4: tl.constexpr, STORE: tl.constexpr, GRAD: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < N
    x1 = tl.load(p_ptr + 4 * i + 0, mask=live, other=0.0)
    y1 = tl.load(p_ptr + 4 * i + 1, mask=live, other=0.0)
    x2 = tl.load(p_ptr + 4 * i + 2, mask=live, other=1.0)
    y2 = tl.load(p_ptr + 4 * i + 3, mask=live, other=1.0)
    gx1 = tl.load(g_ptr + 4 * i + 0, mask=live, other=0.0)
    gy1 = tl.load(g_ptr + 4 * i + 1, mask=live, other=0.0)
    gx2 = tl.load(g_ptr + 4 * i + 2, mask=live, other=1.0)
    gy2 = tl.load(g_ptr + 4 * i + 3, mask=live, other=1.0)
    if KIND == 2:
        m = tl.load(m_ptr + i, mask=live, other=0.0)
        eps = 1e-7
        iw = tl.minimum(x2, gx2) - tl.maximum(x1, gx1)
        ih = tl.minimum(y2, gy2) - tl.maximum(y1, gy1)
        over = (iw > 0.0) & (ih > 0.0)
        inter = tl.where(over, iw * ih, 0.0)
        pw = x2 - x1
        ph = y2 - y1
        uni = pw * ph + (gx2 - gx1) * (gy2 - gy1) - inter
        cw = tl.maximum(x2, gx2) - tl.minimum(x1, gx1)
        ch = tl.maximum(y2, gy2) - tl.minimum(y1, gy1)
        area_c = cw * ch
        loss = (1.0 - (inter / (uni + eps) - (area_c - uni) / (area_c + eps))) * m
        if STORE:
            tl.store(loss_ptr + i, loss, mask=live)
        else:
            tl.store(part_ptr + pid, tl.sum(tl.where(live, loss, 0.0), axis=0))
        if GRAD:
            ue = uni + eps
            ce = area_c + eps
            gi = tl.where(over, -1.0 / ue - inter / (ue * ue) + 1.0 / ce, 0.0)
            ga = inter / (ue * ue) - 1.0 / ce
            gc = ue / (ce * ce)
            tl.store(grad_ptr + 4 * i + 0, (-gi * ih * _dmax(x1, gx1) - ga * ph - gc * ch * _dmax(-x1, -gx1)) * m,
                     mask=live)
            tl.store(grad_ptr + 4 * i + 1, (-gi * iw * _dmax(y1, gy1) - ga * pw - gc * cw * _dmax(-y1, -gy1)) * m,
                     mask=live)
            tl.store(grad_ptr + 4 * i + 2, (gi * ih * _dmax(-x2, -gx2) + ga * ph + gc * ch * _dmax(x2, gx2)) * m,
                     mask=live)
            tl.store(grad_ptr + 4 * i + 3, (gi * iw * _dmax(-y2, -gy2) + ga * pw + gc * cw * _dmax(y2, gy2)) * m,
                     mask=live)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for cc in tl.static_range(4):
            pv = tl.load(p_ptr + 4 * i + cc, mask=live, other=0.0)
            gv = tl.load(g_ptr + 4 * i + cc, mask=live, other=0.0)
            if MASK4:
                m = tl.load(m_ptr + 4 * i + cc, mask=live, other=0.0)
            else:
                m = tl.load(m_ptr + i, mask=live, other=0.0)
            e = pv - gv
            ae = tl.abs(e)
            if KIND == 0:
                q = tl.minimum(ae, delta)
                loss = (0.5 * q * q + delta * (ae - q)) * m
                d = tl.minimum(tl.maximum(e, -delta), delta)
            else:
                loss = ae * m
                d = tl.where(e > 0.0, 1.0, tl.where(e < 0.0, -1.0, 0.0))
            if STORE:
                tl.store(loss_ptr + 4 * i + cc, loss, mask=live)
            acc += tl.where(live, loss, 0.0)
            if GRAD:
                tl.store(grad_ptr + 4 * i + cc, d * m, mask=live)
        if not STORE:
            tl.store(part_ptr + pid, tl.sum(acc, axis=0))


def box(p, g, m, kind: int, delta: float, reduce: bool, grad, block: int = 256):
    N = p.shape[0]
    dev = p.device
    blocks = max(1, triton.cdiv(N, block))
    loss = None if reduce else torch.empty((N,) if kind == 2 else (N, 4), dtype=torch.float32, device=dev)
    part = torch.zeros(blocks, dtype=torch.float32, device=dev) if reduce else None
    if N:
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        _box_kernel[(blocks,)](p, g, m, dummy if loss is None else loss, dummy if part is None else part,
                               dummy if grad is None else grad, N, float(delta), KIND=kind, MASK4=m.dim() == 2,
                               STORE=not reduce, GRAD=grad is not None, BLOCK=block)
    return loss, (part.double().sum().float() if reduce else None)


@triton.jit
def _match_pass1(an_ptr, gt_ptr, valid_ptr, best_ptr, arg_ptr, gb_ptr, gi_ptr, A, G, nblk,
                 BLOCK: tl.constexpr):
    b = tl.program_id(1)
    blk = tl.program_id(0)
    a = blk * BLOCK + tl.arange(0, BLOCK)
    live = a < A
    ay1 = tl.load(an_ptr + 4 * a + 0, mask=live, other=0.0)
    ax1 = tl.load(an_ptr + 4 * a + 1, mask=live, other=0.0)
    ay2 = tl.load(an_ptr + 4 * a + 2, mask=live, other=0.0)
    ax2 = tl.load(an_ptr + 4 * a + 3, mask=live, other=0.0)
    aa = (ay2 - ay1) * (ax2 - ax1)
    best = tl.full([BLOCK], -1.0, tl.float32)
    arg = tl.full([BLOCK], -1, tl.int32)
    for j in range(0, G):
        ok = tl.load(valid_ptr + b * G + j) != 0
        gy1 = tl.load(gt_ptr + (b * G + j) * 4 + 0)
        gx1 = tl.load(gt_ptr + (b * G + j) * 4 + 1)
        gy2 = tl.load(gt_ptr + (b * G + j) * 4 + 2)
        gx2 = tl.load(gt_ptr + (b * G + j) * 4 + 3)
        ga = (gy2 - gy1) * (gx2 - gx1)
        ih = tl.minimum(gy2, ay2) - tl.maximum(gy1, ay1)
        iw = tl.minimum(gx2, ax2) - tl.maximum(gx1, ax1)
        ih = tl.where(ih < 0.0, 0.0, ih)
        iw = tl.where(iw < 0.0, 0.0, iw)
        inter = ih * iw
        uni = (ga + aa) - inter
        iou = tl.where(inter == 0.0, 0.0, tl.math.div_rn(inter, tl.where(inter == 0.0, 1.0, uni)))
        iou = tl.where(live & ok, iou, -2.0)
        up = iou > best
        best = tl.where(up, iou, best)
        arg = tl.where(up, j, arg)
        m = tl.max(iou, axis=0)
        mi = tl.min(tl.where(iou == m, a, A), axis=0)
        tl.store(gb_ptr + (b * nblk + blk) * G + j, m)
        tl.store(gi_ptr + (b * nblk + blk) * G + j, mi.to(tl.int64))
    tl.store(best_ptr + b * A + a, best, mask=live)
    tl.store(arg_ptr + b * A + a, arg, mask=live)


@triton.jit
def _match_pass2(gb_ptr, gi_ptr, valid_ptr, fa_ptr, G, nblk, BLOCK: tl.constexpr):
    """Per image: each gt's best anchor over the blocks (earlier blocks win ties), -1 if none."""
    b = tl.program_id(0)
    for j0 in range(0, G, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        lj = j < G
        m = tl.full([BLOCK], -1.0, tl.float32)
        mi = tl.full([BLOCK], -1, tl.int64)
        for blk in range(0, nblk):
            v = tl.load(gb_ptr + (b * nblk + blk) * G + j, mask=lj, other=-1.0)
            vi = tl.load(gi_ptr + (b * nblk + blk) * G + j, mask=lj, other=-1)
            up = v > m
            m = tl.where(up, v, m)
            mi = tl.where(up, vi, mi)
        ok = tl.load(valid_ptr + b * G + j, mask=lj, other=0) != 0
        tl.store(fa_ptr + b * G + j, tl.where(ok & (m >= 0.0), mi, -1), mask=lj)


@triton.jit
def _match_pass3(an_ptr, gt_ptr, lab_ptr, best_ptr, arg_ptr, fa_ptr, cls_ptr, box_ptr, cnt_ptr, A, G, nblk,
                 mt, ut, ignored_class, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    blk = tl.program_id(0)
    a = blk * BLOCK + tl.arange(0, BLOCK)
    live = a < A
    best = tl.load(best_ptr + b * A + a, mask=live, other=-1.0)
    arg = tl.load(arg_ptr + b * A + a, mask=live, other=-1)
    m = tl.where(arg < 0, -1, tl.where(best < ut, -1, tl.where(best < mt, -2, arg)))
    found = tl.zeros([BLOCK], tl.int1)
    for j in range(0, G):
        fa = tl.load(fa_ptr + b * G + j)
        hit = (fa == a) & (~found)
        m = tl.where(hit, j, m)
        found = found | hit
    matched = live & (m >= 0)
    mj = tl.where(matched, m, 0)
    lab = tl.load(lab_ptr + b * G + mj, mask=matched, other=0)
    cls = tl.where(matched, lab, tl.where(m == -2, ignored_class, -1))
    tl.store(cls_ptr + b * A + a, cls.to(tl.int64), mask=live)
    ay1 = tl.load(an_ptr + 4 * a + 0, mask=live, other=0.0)
    ax1 = tl.load(an_ptr + 4 * a + 1, mask=live, other=0.0)
    ay2 = tl.load(an_ptr + 4 * a + 2, mask=live, other=1.0)
    ax2 = tl.load(an_ptr + 4 * a + 3, mask=live, other=1.0)
    gy1 = tl.load(gt_ptr + (b * G + mj) * 4 + 0, mask=matched, other=0.0)
    gx1 = tl.load(gt_ptr + (b * G + mj) * 4 + 1, mask=matched, other=0.0)
    gy2 = tl.load(gt_ptr + (b * G + mj) * 4 + 2, mask=matched, other=1.0)
    gx2 = tl.load(gt_ptr + (b * G + mj) * 4 + 3, mask=matched, other=1.0)
    eps = 1e-7
    wa = ax2 - ax1
    ha = ay2 - ay1
    yca = ay1 + tl.math.div_rn(ha, 2.0)
    xca = ax1 + tl.math.div_rn(wa, 2.0)
    w = gx2 - gx1
    h = gy2 - gy1
    yc = gy1 + tl.math.div_rn(h, 2.0)
    xc = gx1 + tl.math.div_rn(w, 2.0)
    ha += eps
    wa += eps
    h += eps
    w += eps
    ty = tl.math.div_rn(yc - yca, ha)
    tx = tl.math.div_rn(xc - xca, wa)
    th = tl.log(tl.math.div_rn(h, ha))
    tw = tl.log(tl.math.div_rn(w, wa))
    o = (b * A + a) * 4
    tl.store(box_ptr + o + 0, tl.where(matched, ty, 0.0), mask=live)
    tl.store(box_ptr + o + 1, tl.where(matched, tx, 0.0), mask=live)
    tl.store(box_ptr + o + 2, tl.where(matched, th, 0.0), mask=live)
    tl.store(box_ptr + o + 3, tl.where(matched, tw, 0.0), mask=live)
    tl.store(cnt_ptr + b * nblk + blk, tl.sum(matched.to(tl.int32), axis=0))


def match(anchors, gt, labels, valid, mt: float, ut: float, ignored_class: int, cls, box_t, npos, block: int = 256):
    """Fills cls [B, A], box_t [B, A, 4] and npos [B] (effdet's AnchorLabeler, batched)."""
    B, G = labels.shape
    A = anchors.shape[0]
    dev = anchors.device
    if A == 0 or B == 0:
        npos.zero_()
        return
    nblk = triton.cdiv(A, block)
    best = torch.empty(B, A, dtype=torch.float32, device=dev)
    arg = torch.empty(B, A, dtype=torch.int32, device=dev)
    gb = torch.empty(B, nblk, max(G, 1), dtype=torch.float32, device=dev)
    gi = torch.empty(B, nblk, max(G, 1), dtype=torch.int64, device=dev)
    fa = torch.empty(B, max(G, 1), dtype=torch.int64, device=dev)
    cnt = torch.empty(B, nblk, dtype=torch.int32, device=dev)
    mt32 = float(torch.tensor(mt, dtype=torch.float32))  # effdet compares in float32
    ut32 = float(torch.tensor(ut, dtype=torch.float32))
    _match_pass1[(nblk, B)](anchors, gt, valid, best, arg, gb, gi, A, G, nblk, BLOCK=block, enable_fp_fusion=False)
    _match_pass2[(B,)](gb, gi, valid, fa, G, nblk, BLOCK=64)
    _match_pass3[(nblk, B)](anchors, gt, labels, best, arg, fa, cls, box_t, cnt, A, G, nblk, mt32, ut32,
                            int(ignored_class), BLOCK=block, enable_fp_fusion=False)
    npos.copy_(cnt.sum(dim=1).to(torch.float32))
