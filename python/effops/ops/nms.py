"""Non-maximum suppression: ``nms``, ``batched_nms``, ``multiclass_nms``, ``soft_nms``, ``matrix_nms``.

Semantics, the same on every backend (the ``*_reference`` functions below are the spec):

* Boxes are ``(x1, y1, x2, y2)``. IoU(i, j) = inter / (area_i + area_j - inter), with
  ``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))`` and ``area = (x2-x1)*(y2-y1)``
  (not clamped), computed in the input precision: float32 for float32/float16/bfloat16 inputs,
  float64 for float64 - exactly as ``torchvision.ops.nms`` computes it on the CPU.
* Greedy order: scores descending, NaN first (torch's sort order), ties by lower index.
* A box is suppressed when its IoU with an earlier kept box is ``> iou_threshold``, compared in
  double precision. So: IoU exactly at the threshold is kept; a threshold >= 1 never suppresses;
  a NaN threshold never suppresses; a negative one suppresses every box whose IoU with a kept box
  is not NaN; NaN IoU (zero-area pairs, NaN coordinates) never suppresses.
* These are torchvision's CPU semantics. torchvision's CUDA kernel narrows the threshold to
  float32 (boxes with IoU float32(t) at threshold t are kept there, suppressed on its CPU);
  effops gives the CPU answer on every device.

None of these ops is differentiable (they select; they do not transform).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ._common import (
    EffopsInputError,
    EffopsTypeError,
    check_choice,
    check_float,
    check_int,
    check_integer,
    check_real,
    check_same_device,
    check_shape,
    check_tensor,
    compute_dtype,
    custom_op,
    float32_at_most,
)

_backend.register_op("nms", ("cpu", "cuda", "triton", "reference"))
_backend.register_op("batched_nms", ("cpu", "cuda", "triton", "reference"))
_backend.register_op("multiclass_nms", ("cpu", "cuda", "triton", "reference"))
_backend.register_op("soft_nms", ("cpu", "cuda", "triton", "reference"))
_backend.register_op("matrix_nms", ("cpu", "cuda", "triton", "reference"))

_SOFT_METHODS = {"linear": 0, "gaussian": 1}
_MATRIX_KERNELS = {"linear": 0, "gaussian": 1}


class MultiClassNMSResult(NamedTuple):
    """Padded detections: row b holds num_detections[b] valid entries, then padding
    (boxes 0, scores 0, classes -1, indices -1)."""

    num_detections: Tensor  # [B] int64
    boxes: Tensor  # [B, M, 4], dtype of the input boxes
    scores: Tensor  # [B, M], dtype of the input scores
    classes: Tensor  # [B, M] int64
    indices: Tensor  # [B, M] int64: the anchor index n of each detection


# =============================================================================== reference
def box_iou_reference(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU [len(a), len(b)] in the dtype of the boxes, computed as torchvision's CPU
    NMS kernel computes it (same operations, same order, areas not clamped)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _score_order(scores: Tensor) -> Tensor:
    return torch.sort(scores, descending=True, stable=True).indices


def _greedy_reference(boxes_sorted: Tensor, thr: float) -> Tensor:
    """Keep mask of greedy NMS over boxes already in greedy order."""
    n = boxes_sorted.shape[0]
    over = box_iou_reference(boxes_sorted, boxes_sorted).double() > thr
    keep = torch.ones(n, dtype=torch.bool, device=boxes_sorted.device)
    for i in range(n):
        if keep[i]:
            keep[i + 1 :] &= ~over[i, i + 1 :]
    return keep


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Pure-PyTorch greedy NMS (O(N^2) memory): the specification of ``nms``."""
    cd = compute_dtype(boxes.dtype)
    order = _score_order(scores)
    keep = _greedy_reference(boxes.to(cd)[order], float(iou_threshold))
    return order[keep]


def _stable_score_sort(indices: Tensor, scores: Tensor) -> Tensor:
    """indices (ascending) reordered by score descending, NaN first, ties by lower index."""
    indices = torch.sort(indices).values
    return indices[_score_order(scores[indices])]


def batched_nms_reference(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Exact per-class NMS: a loop over classes of ``nms_reference``."""
    kept = [torch.nonzero(idxs == c).flatten() for c in torch.unique(idxs)]
    kept = [m[nms_reference(boxes[m], scores[m], iou_threshold)] for m in kept]
    if not kept:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return _stable_score_sort(torch.cat(kept), scores)


def multiclass_nms_reference(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_output_boxes: int,
    class_agnostic: bool = False,
    pre_nms_top_k: Optional[int] = None,
) -> MultiClassNMSResult:
    B, N, C = scores.shape
    M = max_output_boxes
    dev = scores.device
    out = MultiClassNMSResult(
        torch.zeros(B, dtype=torch.int64, device=dev),
        torch.zeros(B, M, 4, dtype=boxes.dtype, device=dev),
        torch.zeros(B, M, dtype=scores.dtype, device=dev),
        torch.full((B, M), -1, dtype=torch.int64, device=dev),
        torch.full((B, M), -1, dtype=torch.int64, device=dev),
    )
    for b in range(B):
        flat = scores[b].reshape(-1)
        cand = torch.nonzero(flat.double() > score_threshold).flatten()
        cand = cand[_score_order(flat[cand])]  # score desc, then flat index asc
        if pre_nms_top_k is not None:
            cand = cand[:pre_nms_top_k]
        anchor, cls = cand // C, cand % C
        bx = boxes[b, anchor, cls] if boxes.dim() == 4 else boxes[b, anchor]
        groups = torch.zeros_like(cls) if class_agnostic else cls
        keep = torch.zeros(cand.numel(), dtype=torch.bool, device=dev)
        for g in torch.unique(groups):
            pos = torch.nonzero(groups == g).flatten()  # already in greedy order
            keep[pos] = _greedy_reference(bx[pos].to(compute_dtype(boxes.dtype)), iou_threshold)
        sel = torch.nonzero(keep).flatten()[:M]
        m = sel.numel()
        out.num_detections[b] = m
        out.boxes[b, :m] = bx[sel]
        out.scores[b, :m] = flat[cand[sel]]
        out.classes[b, :m] = cls[sel]
        out.indices[b, :m] = anchor[sel]
    return out


def soft_nms_reference(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    method: str = "gaussian",
    score_threshold: float = 0.001,
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS as in Bodla et al. 2017 (and their reference code): select the highest current
    score (ties: lower index), decay the others - linear ``s *= 1 - IoU`` where IoU > threshold,
    gaussian ``s *= exp(-IoU^2 / sigma)`` for every overlapping box - and stop when the best
    remaining score is below ``score_threshold``. Decay factors in float64, scores rounded back
    to the compute dtype after each update. NaN IoU counts as no overlap."""
    cd = compute_dtype(boxes.dtype)
    thr = torch.tensor(iou_threshold, dtype=torch.float64)
    b = boxes.to(cd)
    cur = scores.to(cd).clone()
    n = cur.numel()
    alive = torch.ones(n, dtype=torch.bool, device=b.device)
    idx = torch.arange(n, device=b.device)
    keep, kept_scores = [], []
    while bool(alive.any()):
        cand = idx[alive]
        best = cand[_score_order(cur[cand])[0]]
        if float(cur[best]) < score_threshold:
            break
        keep.append(int(best))
        kept_scores.append(cur[best].clone())
        alive[best] = False
        rest = idx[alive]
        if rest.numel() == 0:
            break
        v = box_iou_reference(b[best : best + 1], b[rest])[0]
        v = torch.nan_to_num(v, nan=0.0).double()
        if method == "linear":
            w = torch.where(v > thr, 1.0 - v, torch.ones_like(v))
        else:
            w = torch.where(v > 0, torch.exp(-(v * v) / sigma), torch.ones_like(v))
        cur[rest] = (cur[rest].double() * w).to(cd)
        alive[rest] &= ~(cur[rest].double() < score_threshold)
    keep_t = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
    sc = torch.stack(kept_scores) if kept_scores else cur.new_empty(0)
    return keep_t, sc.to(scores.dtype)


def matrix_nms_decay_reference(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor], kernel: str, sigma: float) -> Tensor:
    """Matrix NMS (SOLOv2) decayed scores, in input order (O(N^2) memory)."""
    cd = compute_dtype(boxes.dtype)
    n = scores.numel()
    order = _score_order(scores)
    b = boxes.to(cd)[order]
    v = box_iou_reference(b, b).double()
    v = torch.nan_to_num(v, nan=0.0).clamp(min=0).triu(diagonal=1)  # row i higher-scored than column j
    if idxs is not None:
        c = idxs[order]
        v = v * (c[:, None] == c[None, :])
    cmax = v.max(dim=0).values if n else v.new_zeros(0)  # best IoU of each box with a higher one
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (v * v - (cmax * cmax)[:, None]))
    else:
        den = (1.0 - cmax)[:, None].expand_as(v)
        ratio = torch.where(den > 0, (1.0 - v) / den, torch.full_like(v, math.inf))
    ratio = torch.where(v > 0, ratio, torch.full_like(v, math.inf))
    decay = ratio.min(dim=0).values.clamp(max=1.0) if n else v.new_zeros(0)
    out = torch.empty(n, dtype=cd, device=boxes.device)
    out[order] = (scores.to(cd)[order].double() * decay).to(cd)
    return out.to(scores.dtype)


# =============================================================================== CPU backend
def _threads() -> int:
    return max(1, torch.get_num_threads())


def _as_compute(t: Tensor) -> Tensor:
    return t.to(compute_dtype(t.dtype)).contiguous()


def _nms_cpu(boxes: Tensor, scores: Tensor, thr: float) -> Tensor:
    out = torch.empty(boxes.shape[0], dtype=torch.int64)
    k = _backend._C.nms(_as_compute(boxes), _as_compute(scores), thr, out, _threads())
    return out[:k]


def _batched_cpu(boxes: Tensor, scores: Tensor, idxs: Tensor, thr: float) -> Tensor:
    out = torch.empty(boxes.shape[0], dtype=torch.int64)
    k = _backend._C.batched_nms(
        _as_compute(boxes), _as_compute(scores), idxs.to(torch.int64).contiguous(), thr, out, _threads()
    )
    return out[:k]


def _multiclass_cpu(boxes, scores, thr, score_thr, M, agnostic, pre_k):
    B = scores.shape[0]
    cd = compute_dtype(boxes.dtype)
    num = torch.empty(B, dtype=torch.int64)
    ob = torch.empty(B, M, 4, dtype=cd)
    os_ = torch.empty(B, M, dtype=cd)
    oc = torch.empty(B, M, dtype=torch.int64)
    oi = torch.empty(B, M, dtype=torch.int64)
    _backend._C.multiclass_nms(
        _as_compute(boxes), _as_compute(scores), thr, score_thr, pre_k, agnostic, num, ob, os_, oc, oi, _threads()
    )
    return num, ob.to(boxes.dtype), os_.to(scores.dtype), oc, oi


def _soft_cpu(boxes, scores, thr, sigma, method, score_thr):
    n = boxes.shape[0]
    cd = compute_dtype(boxes.dtype)
    keep = torch.empty(n, dtype=torch.int64)
    sc = torch.empty(n, dtype=cd)
    k = _backend._C.soft_nms(_as_compute(boxes), _as_compute(scores), thr, sigma, method, score_thr, keep, sc, _threads())
    return keep[:k], sc[:k].to(scores.dtype)


def _matrix_cpu(boxes, scores, idxs, kernel, sigma):
    out = torch.empty(boxes.shape[0], dtype=compute_dtype(boxes.dtype))
    ix = None if idxs is None else idxs.to(torch.int64).contiguous()
    _backend._C.matrix_nms(_as_compute(boxes), _as_compute(scores), ix, kernel, sigma, out, _threads())
    return out.to(scores.dtype)


# =============================================================================== GPU backends
# CUDA and Triton share one design: torch sorts (a stable sort gives the greedy order, a second
# stable sort groups classes), and a kernel pair does the greedy step over the grouped boxes:
#   mask:   for each row i and 64-column word w, bit (j - 64w) set iff j > i, j is in i's class
#           segment (j < seg_end[i]) and IoU(i, j) > threshold  - parallel over all tiles;
#   reduce: one program per image walks the 64-row tiles in order, resolves the diagonal word
#           bit by bit and ORs the kept rows into the "removed" bitset - exact greedy NMS.
# Everything has a fixed shape, so multiclass_nms needs no host synchronisation.
def _cmp_threshold(thr: float, dtype: torch.dtype) -> float:
    return float32_at_most(thr) if dtype == torch.float32 else thr


def _gpu_keep(backend: str, boxes: Tensor, seg_end: Tensor, counts: Tensor, thr: float) -> Tensor:
    """boxes [B, K, 4] grouped (segments contiguous, greedy order inside), seg_end [B, K] int32
    (exclusive end of each row's segment), counts [B] int32 (rows >= count are ignored).
    Returns keep [B, K] bool."""
    boxes = boxes.contiguous()
    B, K = boxes.shape[:2]
    if K == 0:
        return torch.zeros(B, 0, dtype=torch.bool, device=boxes.device)
    t = _cmp_threshold(thr, boxes.dtype)
    if backend == "cuda":
        W = (K + 63) // 64
        mask = torch.empty(B, K, W, dtype=torch.int64, device=boxes.device)
        removed = torch.zeros(B, W, dtype=torch.int64, device=boxes.device)
        keep = torch.empty(B, K, dtype=torch.uint8, device=boxes.device)
        _backend._cuda.nms_keep(
            boxes, seg_end.contiguous(), counts.contiguous(), t, mask, removed, keep,
            torch.cuda.current_stream(boxes.device).cuda_stream, boxes.device.index,
        )
        return keep.bool()
    from ..triton import nms as tnms

    return tnms.segmented_keep(boxes, seg_end.contiguous(), counts.contiguous(), t)


def _nms_gpu(backend: str, boxes: Tensor, scores: Tensor, thr: float) -> Tensor:
    n = boxes.shape[0]
    order = _score_order(scores)
    if n == 0:
        return order
    sb = boxes.to(compute_dtype(boxes.dtype))[order].unsqueeze(0)
    seg_end = torch.full((1, n), n, dtype=torch.int32, device=boxes.device)
    counts = torch.full((1,), n, dtype=torch.int32, device=boxes.device)
    return order[_gpu_keep(backend, sb, seg_end, counts, thr)[0]]


def _batched_gpu(backend: str, boxes: Tensor, scores: Tensor, idxs: Tensor, thr: float) -> Tensor:
    n = boxes.shape[0]
    order = _score_order(scores)
    if n == 0:
        return order
    cls_sorted, perm = torch.sort(idxs.to(torch.int64)[order], stable=True)
    pos = order[perm]  # grouped by class, greedy order inside each class
    seg_end = torch.searchsorted(cls_sorted, cls_sorted, right=True).to(torch.int32)
    counts = torch.full((1,), n, dtype=torch.int32, device=boxes.device)
    keep_g = _gpu_keep(backend, boxes.to(compute_dtype(boxes.dtype))[pos].unsqueeze(0), seg_end[None], counts, thr)[0]
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep[pos] = keep_g
    return order[keep[order]]


def _multiclass_gpu(backend, boxes, scores, thr, score_thr, M, agnostic, pre_k):
    B, N, C = scores.shape
    dev = scores.device
    cd = compute_dtype(boxes.dtype)
    flat = scores.to(compute_dtype(scores.dtype)).reshape(B, N * C)
    cand = flat > _cmp_threshold(score_thr, flat.dtype)  # == (double(score) > score_threshold)
    key = torch.where(cand, flat, torch.full_like(flat, -math.inf))  # candidates are > -inf
    skey, sflat = torch.sort(key, dim=1, descending=True, stable=True)
    K = N * C if pre_k < 0 else min(pre_k, N * C)
    skey, sflat = skey[:, :K], sflat[:, :K]
    valid = skey > -math.inf
    counts = valid.sum(dim=1, dtype=torch.int32)
    anchor, cls = sflat // C, sflat % C
    group = torch.where(valid, torch.zeros_like(cls) if agnostic else cls, torch.full_like(cls, C))
    gsorted, perm = torch.sort(group, dim=1, stable=True)
    seg_end = torch.searchsorted(gsorted, gsorted, right=True).to(torch.int32)
    bidx = torch.arange(B, device=dev)[:, None]
    bx = boxes[bidx, anchor, cls] if boxes.dim() == 4 else boxes[bidx, anchor]  # [B, K, 4]
    keep_g = _gpu_keep(backend, bx.to(cd).gather(1, perm[..., None].expand(B, K, 4)), seg_end, counts, thr)
    keep = torch.zeros(B, K, dtype=torch.bool, device=dev).scatter(1, perm, keep_g)
    rank = torch.cumsum(keep, dim=1) - 1
    slot = torch.where(keep & (rank < M), rank, torch.full_like(rank, M))  # slot M = discarded
    num = torch.clamp(keep.sum(dim=1), max=M)

    def place(values: Tensor, fill) -> Tensor:
        shape = (B, M + 1) + tuple(values.shape[2:])
        buf = torch.full(shape, fill, dtype=values.dtype, device=dev)
        idx = slot.view(B, K, *([1] * (values.dim() - 2))).expand_as(values)
        return buf.scatter(1, idx, values)[:, :M]

    return (
        num,
        place(bx.to(boxes.dtype), 0),
        place(flat.gather(1, sflat).to(scores.dtype), 0),
        place(cls, -1),
        place(anchor, -1),
    )


def _soft_cuda(boxes, scores, thr, sigma, method, score_thr):
    n = boxes.shape[0]
    cd = compute_dtype(boxes.dtype)
    keep = torch.empty(n, dtype=torch.int64, device=boxes.device)
    sc = torch.empty(n, dtype=cd, device=boxes.device)
    work = torch.empty(n, dtype=cd, device=boxes.device)
    count = torch.zeros(1, dtype=torch.int64, device=boxes.device)
    _backend._cuda.soft_nms(
        _as_compute(boxes), _as_compute(scores), _cmp_threshold(thr, cd), sigma, method, score_thr,
        keep, sc, work, count, torch.cuda.current_stream(boxes.device).cuda_stream, boxes.device.index,
    )
    k = int(count.item())
    return keep[:k], sc[:k].to(scores.dtype)


def _matrix_gpu(backend, boxes, scores, idxs, kernel, sigma):
    n = boxes.shape[0]
    cd = compute_dtype(boxes.dtype)
    order = _score_order(scores)
    if idxs is None:
        pos = order
        seg_start = torch.zeros(n, dtype=torch.int32, device=boxes.device)
    else:
        cls_sorted, perm = torch.sort(idxs.to(torch.int64)[order], stable=True)
        pos = order[perm]
        seg_start = torch.searchsorted(cls_sorted, cls_sorted, right=False).to(torch.int32)
    sb = boxes.to(cd)[pos].contiguous()
    decay = torch.empty(n, dtype=torch.float64, device=boxes.device)
    if n:
        if backend == "cuda":
            cmax = torch.empty(n, dtype=torch.float64, device=boxes.device)
            _backend._cuda.matrix_nms_decay(
                sb, seg_start, kernel, sigma, cmax, decay,
                torch.cuda.current_stream(boxes.device).cuda_stream, boxes.device.index,
            )
        else:
            from ..triton import nms as tnms

            decay = tnms.matrix_decay(sb, seg_start, kernel, sigma)
    out = torch.empty(n, dtype=cd, device=boxes.device)
    out[pos] = (scores.to(cd)[pos].double() * decay).to(cd)
    return out.to(scores.dtype)


# =============================================================================== custom ops
def _dispatch(op: str, device: torch.device) -> str:
    return _backend.select(op, device)


@custom_op("effops::nms", "(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    backend = _dispatch("nms", boxes.device)
    if backend == "cpu":
        return _nms_cpu(boxes, scores, iou_threshold)
    if backend == "reference":
        return nms_reference(boxes, scores, iou_threshold)
    return _nms_gpu(backend, boxes, scores, iou_threshold)


@_nms_op.register_fake
def _(boxes, scores, iou_threshold):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


@custom_op("effops::batched_nms", "(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor")
def _batched_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    backend = _dispatch("batched_nms", boxes.device)
    if backend == "cpu":
        return _batched_cpu(boxes, scores, idxs, iou_threshold)
    if backend == "reference":
        return batched_nms_reference(boxes, scores, idxs, iou_threshold)
    return _batched_gpu(backend, boxes, scores, idxs, iou_threshold)


@_batched_op.register_fake
def _(boxes, scores, idxs, iou_threshold):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


@custom_op(
    "effops::multiclass_nms",
    "(Tensor boxes, Tensor scores, float iou_threshold, float score_threshold, SymInt max_output_boxes, "
    "bool class_agnostic, SymInt pre_nms_top_k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _multiclass_op(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_output_boxes: int,
    class_agnostic: bool,
    pre_nms_top_k: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (iou_threshold, score_threshold, max_output_boxes, class_agnostic, pre_nms_top_k)
    backend = _dispatch("multiclass_nms", boxes.device)
    if backend == "cpu":
        return _multiclass_cpu(boxes, scores, *args)
    if backend == "reference":
        top_k = None if pre_nms_top_k < 0 else pre_nms_top_k
        return tuple(multiclass_nms_reference(boxes, scores, *args[:4], pre_nms_top_k=top_k))
    return _multiclass_gpu(backend, boxes, scores, *args)


@_multiclass_op.register_fake
def _(boxes, scores, iou_threshold, score_threshold, max_output_boxes, class_agnostic, pre_nms_top_k):
    B, M = scores.shape[0], max_output_boxes
    return (
        scores.new_empty((B,), dtype=torch.int64),
        boxes.new_empty((B, M, 4)),
        scores.new_empty((B, M)),
        scores.new_empty((B, M), dtype=torch.int64),
        scores.new_empty((B, M), dtype=torch.int64),
    )


@custom_op(
    "effops::soft_nms",
    "(Tensor boxes, Tensor scores, float iou_threshold, float sigma, SymInt method, "
    "float score_threshold) -> (Tensor, Tensor)",
)
def _soft_op(
    boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, method: int, score_threshold: float
) -> Tuple[Tensor, Tensor]:
    backend = _dispatch("soft_nms", boxes.device)
    if backend == "cpu":
        return _soft_cpu(boxes, scores, iou_threshold, sigma, method, score_threshold)
    if backend == "cuda":
        return _soft_cuda(boxes, scores, iou_threshold, sigma, method, score_threshold)
    if backend == "triton":
        from ..triton import nms as tnms

        keep, sc = tnms.soft_nms(_as_compute(boxes), _as_compute(scores), iou_threshold, sigma, method, score_threshold)
        return keep, sc.to(scores.dtype)
    name = {v: k for k, v in _SOFT_METHODS.items()}[method]
    return soft_nms_reference(boxes, scores, iou_threshold, sigma, name, score_threshold)


@_soft_op.register_fake
def _(boxes, scores, iou_threshold, sigma, method, score_threshold):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64), scores.new_empty((k,))


@custom_op(
    "effops::matrix_nms_decay",
    "(Tensor boxes, Tensor scores, Tensor? idxs, SymInt kernel, float sigma) -> Tensor",
)
def _matrix_op(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor], kernel: int, sigma: float) -> Tensor:
    backend = _dispatch("matrix_nms", boxes.device)
    if backend == "cpu":
        return _matrix_cpu(boxes, scores, idxs, kernel, sigma)
    if backend == "reference":
        name = {v: k for k, v in _MATRIX_KERNELS.items()}[kernel]
        return matrix_nms_decay_reference(boxes, scores, idxs, name, sigma)
    return _matrix_gpu(backend, boxes, scores, idxs, kernel, sigma)


@_matrix_op.register_fake
def _(boxes, scores, idxs, kernel, sigma):
    return torch.empty_like(scores)


# =============================================================================== public API
def _check_boxes_scores(op: str, boxes: object, scores: object) -> Tuple[Tensor, Tensor]:
    boxes = check_tensor(op, "boxes", boxes)
    scores = check_tensor(op, "scores", scores)
    check_float(op, "boxes", boxes)
    check_float(op, "scores", scores)
    check_shape(op, "boxes", boxes, (None, 4), " (x1, y1, x2, y2 per box)")
    check_shape(op, "scores", scores, (boxes.shape[0],), " (one score per box)")
    if boxes.dtype != scores.dtype:
        raise EffopsTypeError(f"{op}: boxes and scores must have the same dtype, got {boxes.dtype} and {scores.dtype}")
    check_same_device(op, boxes=boxes, scores=scores)
    if boxes.device.type == "meta":  # the output's length depends on the values, which meta has not
        raise EffopsInputError(f"{op}: boxes are meta tensors; the number of boxes kept depends on their values "
                               "(under torch.compile / export, fake tensors work)")
    return boxes, scores


def _check_idxs(op: str, idxs: object, n: int, boxes: Tensor) -> Tensor:
    idxs = check_tensor(op, "idxs", idxs)
    check_integer(op, "idxs", idxs)
    check_shape(op, "idxs", idxs, (n,), " (one class id per box)")
    check_same_device(op, boxes=boxes, idxs=idxs)
    return idxs


_QUANTIZED = (torch.quint8, torch.qint8, torch.qint32)


def _from_quantized(op: str, boxes: object, scores: object) -> Tuple[object, object]:
    """torchvision's quantized NMS (its QuantizedCPU kernel) compares the raw integer values: with
    one scale and zero point per tensor, the zero point cancels in every coordinate difference
    and the scale in the IoU ratio, and the score order is the order of the integers. So: the
    integer representation, as float32 (exact for 8-bit values; the IoU is then computed in
    float32 as torchvision computes it) or float64 for qint32 (exact)."""
    qb = isinstance(boxes, Tensor) and boxes.is_quantized
    qs = isinstance(scores, Tensor) and scores.is_quantized
    if not (qb or qs):
        return boxes, scores
    if not (qb and qs) or boxes.dtype != scores.dtype:
        got = [getattr(t, "dtype", type(t).__name__) for t in (boxes, scores)]
        raise EffopsTypeError(f"{op}: boxes and scores must have the same dtype, got {got[0]} and {got[1]}")
    if boxes.dtype not in _QUANTIZED:
        raise EffopsTypeError(f"{op}: quantized boxes must be quint8, qint8 or qint32, got {boxes.dtype}")
    for name, t in (("boxes", boxes), ("scores", scores)):
        if t.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise EffopsInputError(f"{op}: quantized {name} must use one scale and zero point per tensor "
                                   f"(per_tensor_affine), got {t.qscheme()}")
    cd = torch.float64 if boxes.dtype == torch.qint32 else torch.float32
    return boxes.int_repr().to(cd), scores.int_repr().to(cd)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; a drop-in for ``torchvision.ops.nms``.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, float16/bfloat16/float32/float64.
        Or both quantized per tensor (quint8/qint8/qint32, CPU), as torchvision's quantized NMS.
        scores: ``[N]`` scores, same dtype and device as ``boxes``.
        iou_threshold: boxes with IoU ``>`` this with a higher-scored kept box are discarded
            (a bool counts as 0.0 / 1.0, as torch's schema parser reads it for torchvision).

    Returns:
        int64 tensor of the kept indices, in decreasing score order (ties: lower index first).
        Identical to ``torchvision.ops.nms`` on the CPU for float32/float64 (see module docs for
        NaN, threshold and degenerate-box semantics); fp16/bf16 are computed in float32.
    """
    boxes, scores = _from_quantized("nms", boxes, scores)
    boxes, scores = _check_boxes_scores("nms", boxes, scores)
    thr = check_real("nms", "iou_threshold", iou_threshold, allow_bool=True)
    return torch.ops.effops.nms(boxes, scores, thr)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS: boxes with different ``idxs`` never suppress each other, whatever their
    coordinates (unlike the coordinate-offset trick, which fails for negative or very large
    coordinates). Returns kept indices sorted by score descending, ties by lower index."""
    if isinstance(boxes, Tensor) and boxes.numel() == 0 and scores is None and idxs is None and iou_threshold is None:
        # torchvision returns an empty result for empty boxes before looking at anything else
        # (its test suite calls batched_nms(empty, None, None, None)); other empty calls are checked.
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    boxes, scores = _check_boxes_scores("batched_nms", boxes, scores)
    idxs = _check_idxs("batched_nms", idxs, boxes.shape[0], boxes)
    thr = check_real("batched_nms", "iou_threshold", iou_threshold, allow_bool=True)
    return torch.ops.effops.batched_nms(boxes, scores, idxs, thr)


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_output_boxes: int,
    class_agnostic: bool = False,
    pre_nms_top_k: Optional[int] = None,
) -> MultiClassNMSResult:
    """A detector's post-processing in one call, with fixed-size outputs.

    Args:
        boxes: ``[B, N, 4]`` (one box per anchor) or ``[B, N, C, 4]`` (one box per anchor and class).
        scores: ``[B, N, C]``.
        iou_threshold: NMS threshold (strict ``>``, as ``nms``).
        score_threshold: candidates are the (anchor, class) pairs with ``score > score_threshold``.
        max_output_boxes: M, the detections kept per image (padded).
        class_agnostic: run one NMS across all classes instead of one per class.
        pre_nms_top_k: keep only the k best candidates per image before NMS (as effdet's 5000).

    Candidates are ranked by score descending, ties by flat index ``n * C + c``. Detections are
    ordered the same way. On CUDA nothing synchronises with the host, so the call can be captured
    in a CUDA graph or compiled with ``torch.compile(fullgraph=True)``.

    Returns:
        ``MultiClassNMSResult(num_detections [B], boxes [B, M, 4], scores [B, M], classes [B, M],
        indices [B, M])``; padding is boxes 0, scores 0, classes -1, indices -1.
    """
    op = "multiclass_nms"
    boxes = check_tensor(op, "boxes", boxes)
    scores = check_tensor(op, "scores", scores)
    check_float(op, "boxes", boxes)
    check_float(op, "scores", scores)
    if scores.dim() != 3:
        raise EffopsInputError(f"{op}: scores must have shape [B, N, C], got {list(scores.shape)}")
    B, N, C = scores.shape
    if boxes.dim() == 4:
        check_shape(op, "boxes", boxes, (B, N, C, 4), " (per-class boxes matching scores [B, N, C])")
    else:
        check_shape(op, "boxes", boxes, (B, N, 4), " (or [B, N, C, 4]) matching scores [B, N, C]")
    if boxes.dtype != scores.dtype:
        raise EffopsTypeError(f"{op}: boxes and scores must have the same dtype, got {boxes.dtype} and {scores.dtype}")
    check_same_device(op, boxes=boxes, scores=scores)
    if C == 0:
        raise EffopsInputError(f"{op}: scores must have at least one class (C > 0)")
    thr = check_real(op, "iou_threshold", iou_threshold)
    sthr = check_real(op, "score_threshold", score_threshold)
    M = check_int(op, "max_output_boxes", max_output_boxes, minimum=0)
    if not isinstance(class_agnostic, bool):
        raise EffopsTypeError(f"{op}: class_agnostic must be a bool, got {type(class_agnostic).__name__}")
    k = -1
    if pre_nms_top_k is not None:  # any k >= N * C keeps every candidate: the same as N * C
        k = min(check_int(op, "pre_nms_top_k", pre_nms_top_k, minimum=0, maximum=None), N * C)
    return MultiClassNMSResult(*torch.ops.effops.multiclass_nms(boxes, scores, thr, sthr, M, class_agnostic, k))


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    method: str = "gaussian",
    score_threshold: float = 0.001,
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017). Returns ``(keep, scores)``: the selected indices in
    selection order and their decayed scores at selection. ``method='linear'`` decays boxes with
    IoU > ``iou_threshold`` by ``1 - IoU``; ``'gaussian'`` decays every overlapping box by
    ``exp(-IoU^2 / sigma)`` (``iou_threshold`` unused). Boxes whose score falls below
    ``score_threshold`` are dropped. NaN scores raise ValueError."""
    op = "soft_nms"
    boxes, scores = _check_boxes_scores(op, boxes, scores)
    thr = check_real(op, "iou_threshold", iou_threshold, allow_nan=False)
    sig = check_real(op, "sigma", sigma, allow_nan=False, allow_inf=False)
    m = _SOFT_METHODS[check_choice(op, "method", method, tuple(_SOFT_METHODS))]
    if m == 1 and not sig > 0:
        raise EffopsInputError(f"{op}: sigma must be > 0 for the gaussian method, got {sig}")
    sthr = check_real(op, "score_threshold", score_threshold, allow_nan=False)
    if bool(torch.isnan(scores).any()):
        raise EffopsInputError(f"{op}: scores contains NaN")
    return torch.ops.effops.soft_nms(boxes, scores, thr, sig, m, sthr)


def matrix_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Optional[Tensor] = None,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    score_threshold: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """Matrix NMS (SOLOv2): every box's score is decayed in parallel by its overlaps with
    higher-scored boxes (of the same class when ``idxs`` is given):
    ``decay_j = min(1, min_i f(IoU_ij) / f(cmax_i))``, ``cmax_i`` the highest IoU of box i with a
    higher-scored box, ``f(x) = exp(-sigma x^2)`` (gaussian) or ``1 - x`` (linear).
    Returns ``(keep, scores)``: indices with decayed score ``>= score_threshold``, sorted by
    decayed score descending (ties: lower index), and those scores. NaN scores raise ValueError."""
    op = "matrix_nms"
    boxes, scores = _check_boxes_scores(op, boxes, scores)
    if idxs is not None:
        idxs = _check_idxs(op, idxs, boxes.shape[0], boxes)
    k = _MATRIX_KERNELS[check_choice(op, "kernel", kernel, tuple(_MATRIX_KERNELS))]
    sig = check_real(op, "sigma", sigma, allow_nan=False, allow_inf=False)
    if k == 1 and not sig > 0:
        raise EffopsInputError(f"{op}: sigma must be > 0 for the gaussian kernel, got {sig}")
    sthr = check_real(op, "score_threshold", score_threshold, allow_nan=False)
    if bool(torch.isnan(scores).any()):
        raise EffopsInputError(f"{op}: scores contains NaN")
    decayed = torch.ops.effops.matrix_nms_decay(boxes, scores, idxs, k, sig)
    keep = torch.nonzero(decayed.double() >= sthr).flatten()
    keep = keep[torch.sort(decayed[keep], descending=True, stable=True).indices]
    return keep, decayed[keep]
