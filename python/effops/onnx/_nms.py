"""ONNX lowerings of ``effops::nms``, ``effops::batched_nms`` and ``effops::multiclass_nms`` on
the standard ``NonMaxSuppression`` operator.

ONNX NonMaxSuppression(boxes [B, N, 4], scores [B, C, N], max_output_boxes_per_class,
iou_threshold, score_threshold) returns the selected (batch, class, box) triples, ordered by
batch, class, then selection order. Where its semantics meet effops's (``ops/nms.py``), as ONNX
Runtime implements them (CPU provider, float32):

* IoU: the same float32 arithmetic as torchvision's CPU kernel (intersection of the clamped
  overlaps, ``inter / (area_i + area_j - inter)``); corner order (x1, y1, x2, y2) vs ONNX's
  (y1, x1, y2, x2) does not matter, IoU is symmetric in the axes.
* Threshold: both suppress when IoU ``>`` the threshold (IoU equal to it is kept). effops
  compares the float32 IoU with the threshold in double precision, ORT in float32 with the
  threshold rounded to float32; the lowering passes ``float32_at_most(t)``, the largest float32
  <= t, for which ``v > t`` and ``v > float32_at_most(t)`` agree for every float32 v - so a
  threshold like 0.7 (not a float32) decides exactly as effops does. The same for
  ``multiclass_nms``'s score threshold (effops: ``score > t`` in double).
* Order and ties: score descending, ties by lower box index (ORT's priority order), as effops.
  ``multiclass_nms`` ranks detections by (score desc, flat index n * C + c asc) with TopK,
  whose ties go to the lower index: the same order.
* Differences, by design of ONNX Runtime (documented, not emulated):
  - boxes with x2 < x1 or y2 < y1: ORT reorders the corners (min/max), effops uses them as
    given (negative widths); identical results need well-formed boxes;
  - zero-area boxes never suppress nor get suppressed in ORT; in effops their IoU is 0 (or
    NaN), which gives the same result for every threshold >= 0 (differs for thr < 0);
  - NaN scores: effops ranks them first; ORT's order among them is unspecified. In
    ``batched_nms`` (classes as masked score rows) boxes with NaN or -inf scores are dropped.
* ``batched_nms``: one NonMaxSuppression with one score row per distinct class id (Unique),
  the other entries masked out, so classes never suppress each other whatever the
  coordinates (no coordinate-offset trick); kept indices re-sorted by (score desc, index asc).
* ``multiclass_nms``: one box per anchor -> NonMaxSuppression over [B, C, N] scores; per-class
  boxes [B, N, C, 4] -> one NMS "batch" per (image, class); class-agnostic -> one class over
  the N * C candidates. ``max_output_boxes_per_class`` = M (a class never has more than M of
  an image's M best), then the M best per image by TopK over a dense [B, N * C] table of the
  kept scores, padded like effops (boxes 0, scores 0, classes -1, indices -1).
  ``pre_nms_top_k``: the k best (NaN counted last) per image by TopK; the others are masked.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op

from ..ops._common import float32_at_most

_I64 = ir.DataType.INT64


def _i(values) -> "ir.Value":
    return op.Constant(value_ints=[int(v) for v in values])


def _scalar_i(v: int) -> "ir.Value":
    return op.Constant(value_int=int(v))


def _f32(v: float) -> "ir.Value":
    return op.Constant(value=ir.tensor(np.array([v], dtype=np.float32)))


def _thr(t: float) -> "ir.Value":
    """A float32 threshold deciding ``v > t`` for float32 v exactly as effops (in double) does."""
    return _f32(float32_at_most(float(t)))


def _float(t):
    return op.Cast(t, to=ir.DataType.FLOAT)


def _column(sel, k: int):
    return op.Gather(sel, _scalar_i(k), axis=1)


def _all_boxes(boxes):
    """Enough per class to never cap the selection: the number of boxes, int64 [1]."""
    return op.Shape(boxes, start=1, end=2)


def nms(boxes, scores, iou_threshold: float):
    b = op.Unsqueeze(_float(boxes), _i([0]))
    s = op.Unsqueeze(_float(scores), _i([0, 1]))
    sel = op.NonMaxSuppression(b, s, op.Shape(boxes, start=0, end=1), _thr(iou_threshold))
    return _column(sel, 2)


def batched_nms(boxes, scores, idxs, iou_threshold: float):
    ids = op.Unique(idxs, sorted=1)[0]  # the distinct class ids [K]
    member = op.Equal(op.Unsqueeze(idxs, _i([0])), op.Unsqueeze(ids, _i([1])))  # [K, N]
    s = _float(scores)
    table = op.Where(member, op.Unsqueeze(s, _i([0])), op.CastLike(_f32(math.nan), s))
    sel = op.NonMaxSuppression(op.Unsqueeze(_float(boxes), _i([0])), op.Unsqueeze(table, _i([0])),
                               op.Shape(boxes, start=0, end=1), _thr(iou_threshold), _f32(-math.inf))
    kept = _column(sel, 2)
    count = op.Shape(kept, start=0, end=1)
    asc, _ = op.TopK(kept, count, largest=0, sorted=1)  # index ascending: the tie order
    _, perm = op.TopK(op.Gather(s, asc), count, largest=1, sorted=1)  # stable: ties keep index order
    return op.Gather(asc, perm)


def multiclass_nms(boxes, scores, iou_threshold: float, score_threshold: float, max_output_boxes: int,
                   class_agnostic: bool, pre_nms_top_k: int):
    N, C = scores.shape[1], scores.shape[2]
    M = int(max_output_boxes)
    if not (isinstance(N, int) and isinstance(C, int)):
        raise ValueError(f"effops.onnx: multiclass_nms needs static anchor and class counts, got scores "
                         f"[B, {N}, {C}]; export with a dynamic batch only")
    per_class_boxes = len(boxes.shape) == 4
    s = _float(scores)
    bx = _float(boxes)
    batch = op.Shape(s, start=0, end=1)
    flat_scores = op.Reshape(s, op.Concat(batch, _i([N * C]), axis=0))  # [B, N*C], index n*C + c
    if pre_nms_top_k >= 0:
        k = int(pre_nms_top_k)
        nan = op.CastLike(_f32(math.nan), s)
        if k == 0:
            flat_scores = op.Expand(nan, op.Shape(flat_scores))
        else:  # the k best per image, NaN counted last (effops: NaN is never a candidate)
            ranked = op.Where(op.IsNaN(flat_scores), op.CastLike(_f32(-math.inf), s), flat_scores)
            _, top = op.TopK(ranked, _i([k]), axis=1, largest=1, sorted=1)
            marks = op.ScatterElements(op.Expand(_f32(0.0), op.Shape(ranked)), top,
                                       op.Expand(_f32(1.0), op.Shape(top)), axis=1)
            chosen = op.Greater(marks, _f32(0.0))
            flat_scores = op.Where(chosen, flat_scores, nan)
    thr, sthr, m_per_class = _thr(iou_threshold), _thr(score_threshold), _i([M])
    if class_agnostic:
        if per_class_boxes:
            cand_boxes = op.Reshape(bx, op.Concat(batch, _i([N * C, 4]), axis=0))
        else:
            cand_boxes = op.Reshape(op.Expand(op.Unsqueeze(bx, _i([2])), op.Concat(batch, _i([N, C, 4]), axis=0)),
                                    op.Concat(batch, _i([N * C, 4]), axis=0))
        sel = op.NonMaxSuppression(cand_boxes, op.Unsqueeze(flat_scores, _i([1])), m_per_class, thr, sthr)
        b_idx, flat = _column(sel, 0), _column(sel, 2)
    elif per_class_boxes:
        # one NMS "batch" per (image, class): boxes [B*C, N, 4], scores [B*C, 1, N]
        nb = op.Mul(batch, _i([C]))
        cb = op.Reshape(op.Transpose(bx, perm=[0, 2, 1, 3]), op.Concat(nb, _i([N, 4]), axis=0))
        cs = op.Reshape(op.Transpose(op.Reshape(flat_scores, op.Concat(batch, _i([N, C]), axis=0)), perm=[0, 2, 1]),
                        op.Concat(nb, _i([1, N]), axis=0))
        sel = op.NonMaxSuppression(cb, cs, m_per_class, thr, sthr)
        bc, n = _column(sel, 0), _column(sel, 2)
        b_idx = op.Div(bc, _scalar_i(C))
        flat = op.Add(op.Mul(n, _scalar_i(C)), op.Mod(bc, _scalar_i(C)))
    else:
        cs = op.Transpose(op.Reshape(flat_scores, op.Concat(batch, _i([N, C]), axis=0)), perm=[0, 2, 1])  # [B, C, N]
        sel = op.NonMaxSuppression(bx, cs, m_per_class, thr, sthr)
        b_idx = _column(sel, 0)
        flat = op.Add(op.Mul(_column(sel, 2), _scalar_i(C)), _column(sel, 1))
    # the kept candidates' scores in a dense table; -inf elsewhere (a kept score is > a threshold)
    pos = op.Concat(op.Unsqueeze(b_idx, _i([1])), op.Unsqueeze(flat, _i([1])), axis=1)
    kept_scores = op.GatherND(flat_scores, pos)
    table = op.ScatterND(op.Expand(op.CastLike(_f32(-math.inf), s), op.Shape(flat_scores)), pos, kept_scores)
    K = min(M, N * C)
    vals, top = op.TopK(table, _i([K]), axis=1, largest=1, sorted=1)  # ties: lower flat index first
    valid = op.Not(op.IsInf(vals, detect_negative=1, detect_positive=0))
    anchor, cls = op.Div(top, _scalar_i(C)), op.Mod(top, _scalar_i(C))
    if per_class_boxes:
        out_boxes = op.GatherND(op.Reshape(bx, op.Concat(batch, _i([N * C, 4]), axis=0)),
                                op.Unsqueeze(top, _i([2])), batch_dims=1)
    else:
        out_boxes = op.GatherND(bx, op.Unsqueeze(anchor, _i([2])), batch_dims=1)
    zero = op.Constant(value_float=0.0)  # 0-d: Pad's constant_value is a scalar
    minus1 = op.Constant(value_int=-1)
    out_boxes = op.Where(op.Unsqueeze(valid, _i([2])), out_boxes, zero)
    out_scores = op.Where(valid, vals, zero)
    out_cls = op.Where(valid, cls, minus1)
    out_idx = op.Where(valid, anchor, minus1)
    num = op.ReduceSum(op.Cast(valid, to=_I64), _i([1]), keepdims=0)
    if M > K:  # fewer candidates than M: pad to the fixed size
        extra = M - K
        out_boxes = op.Pad(out_boxes, _i([0, 0, 0, 0, extra, 0]), zero)
        out_scores = op.Pad(out_scores, _i([0, 0, 0, extra]), zero)
        out_cls = op.Pad(out_cls, _i([0, 0, 0, extra]), minus1)
        out_idx = op.Pad(out_idx, _i([0, 0, 0, extra]), minus1)
    return (num, op.CastLike(out_boxes, boxes), op.CastLike(out_scores, scores), out_cls, out_idx)


def translations() -> dict:
    e = torch.ops.effops
    return {e.nms.default: nms, e.batched_nms.default: batched_nms, e.multiclass_nms.default: multiclass_nms}


__all__ = ["translations"]
