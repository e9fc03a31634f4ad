"""Detection losses and anchor matching: ``sigmoid_focal_loss``, ``box_loss``, ``match_anchors``.

* ``sigmoid_focal_loss`` - torchvision.ops.sigmoid_focal_loss (a drop-in for dense targets) and
  effdet's focal loss (class-index targets, -1 background, -2 ignored, label smoothing) in one
  pass over the logits, in float32 whatever the logits' dtype, in the numerically stable form
  (formulas in ops/_losses_ref.py); the gradient is computed in the same pass when the logits
  require grad and is saved for backward, which only scales it by the incoming gradient.
* ``box_loss`` - effdet's Huber loss on encoded boxes (or L1), or GIoU on decoded boxes, masked
  by the positives and summed in float32, with its gradient from the same pass.
* ``match_anchors`` - effdet's AnchorLabeler for a whole batch at once, without host
  synchronisation: IoU of every anchor with every gt, the per-anchor and per-gt argmaxes in one
  pass, thresholds, force matching, class targets and FasterRcnnBoxCoder box targets.

Backends: cpu (effops._C), cuda (effops._cuda), triton and the reference; float64 inputs run on
the reference (the kernels compute in float32). Autocast: no input is cast (the kernels widen
fp16/bf16 to float32 themselves); inside an autocast region the focal loss is returned in float32,
as torchvision's (whose binary_cross_entropy_with_logits autocast runs in float32).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from ._common import (EffopsInputError, EffopsTypeError, check_choice, check_float, check_int, check_integer,
                      check_real, check_same_device, check_shape, check_tensor, custom_op)
from ._losses_ref import (BOX_KINDS, REDUCTIONS, box_loss_reference, match_anchors_reference,
                          sigmoid_focal_loss_reference, split_levels)
from . import _losses_backends as _kb

for _name in ("sigmoid_focal_loss", "box_loss", "match_anchors"):
    _backend.register_op(_name, _kb.BACKENDS)

_RED = {r: i for i, r in enumerate(REDUCTIONS)}
_KIND = {k: i for i, k in enumerate(BOX_KINDS)}


def _select(op: str, t: Tensor) -> str:
    b = _backend.select(op, t.device)
    return "reference" if t.dtype == torch.float64 else b


# =============================================================================== focal: custom ops
@custom_op(
    "effops::sigmoid_focal_loss",
    "(Tensor logits, Tensor targets, Tensor? ignore, float alpha, float gamma, float label_smoothing, "
    "SymInt reduction, bool float_out, bool need_grad)"
    " -> (Tensor, Tensor)",
)
def _focal_op(logits: Tensor, targets: Tensor, ignore: Optional[Tensor], alpha: float, gamma: float,
              label_smoothing: float, reduction: int, float_out: bool, need_grad: bool) -> Tuple[Tensor, Tensor]:
    red = REDUCTIONS[reduction]
    od = torch.float32 if float_out and logits.dtype != torch.float64 else logits.dtype
    backend = _select("sigmoid_focal_loss", logits)
    if backend == "reference":
        ig = None if ignore is None else ignore.bool()
        loss, grad = sigmoid_focal_loss_reference(logits, targets, ig, alpha, gamma, label_smoothing, red, od)
        grad = grad if need_grad else grad.new_empty(0)
    else:
        loss, grad = _kb.focal(backend, logits, targets, ignore, alpha, gamma, label_smoothing, red, od, need_grad)
    return loss, grad


@_focal_op.register_fake
def _(logits, targets, ignore, alpha, gamma, label_smoothing, reduction, float_out, need_grad):
    od = torch.float32 if float_out and logits.dtype != torch.float64 else logits.dtype
    shape = logits.shape if REDUCTIONS[reduction] == "none" else ()
    grad = logits.new_empty(logits.shape) if need_grad else logits.new_empty(0)
    return logits.new_empty(shape, dtype=od), grad


@custom_op("effops::sigmoid_focal_loss_backward", "(Tensor grad_loss, Tensor saved, SymInt reduction) -> Tensor")
def _focal_bwd_op(grad_loss: Tensor, saved: Tensor, reduction: int) -> Tensor:
    """dL/dlogits = grad_loss (broadcast; / numel for 'mean') * the saved per-element gradient."""
    g = grad_loss.to(torch.float64 if saved.dtype == torch.float64 else torch.float32)
    if REDUCTIONS[reduction] == "mean":
        g = g / max(saved.numel(), 1)
    if REDUCTIONS[reduction] == "none":
        return (saved.to(g.dtype) * g).to(saved.dtype)
    if _kb.scale_on_cpu(saved):
        return _kb.scale(saved, float(g))  # the kernel's fresh output is huge-page advised
    return torch.mul(saved, g)  # a 0-dim factor: computed in float32, rounded once to saved's dtype


@_focal_bwd_op.register_fake
def _(grad_loss, saved, reduction):
    return torch.empty_like(saved)


def _focal_setup(ctx, inputs, output):
    ctx.reduction = inputs[6]
    ctx.need_grad = inputs[8]
    ctx.save_for_backward(output[1])


def _focal_backward(ctx, grad_loss, _grad_grad):
    if not ctx.need_grad:
        raise RuntimeError("effops::sigmoid_focal_loss: backward needs need_grad=True at the forward call "
                           "(effops.ops.sigmoid_focal_loss sets it when the logits require grad)")
    (saved,) = ctx.saved_tensors
    return (torch.ops.effops.sigmoid_focal_loss_backward(grad_loss, saved, ctx.reduction),
            None, None, None, None, None, None, None, None)


_focal_op.register_autograd(_focal_backward, setup_context=_focal_setup)


# =============================================================================== box loss: custom ops
@custom_op(
    "effops::box_loss",
    "(Tensor pred, Tensor target, Tensor mask, SymInt kind, float delta, SymInt reduction, bool need_grad)"
    " -> (Tensor, Tensor)",
)
def _box_op(pred: Tensor, target: Tensor, mask: Tensor, kind: int, delta: float, reduction: int,
            need_grad: bool) -> Tuple[Tensor, Tensor]:
    k, red = BOX_KINDS[kind], REDUCTIONS[reduction]
    backend = _select("box_loss", pred)
    if backend == "reference":
        loss, grad = box_loss_reference(pred, target, mask, k, delta, red)
    else:
        loss, grad = _kb.box(backend, pred, target, mask, k, delta, red, need_grad)
    grad = grad.to(pred.dtype) if need_grad else pred.new_empty(0)
    return loss, grad


@_box_op.register_fake
def _(pred, target, mask, kind, delta, reduction, need_grad):
    cd = torch.float64 if pred.dtype == torch.float64 else torch.float32
    if REDUCTIONS[reduction] == "none":
        shape = pred.shape[:-1] if BOX_KINDS[kind] == "giou" else pred.shape
    else:
        shape = ()
    return pred.new_empty(shape, dtype=cd), (pred.new_empty(pred.shape) if need_grad else pred.new_empty(0))


@custom_op("effops::box_loss_backward", "(Tensor grad_loss, Tensor saved, SymInt kind, SymInt reduction) -> Tensor")
def _box_bwd_op(grad_loss: Tensor, saved: Tensor, kind: int, reduction: int) -> Tensor:
    g = grad_loss.to(torch.float64 if saved.dtype == torch.float64 else torch.float32)
    if REDUCTIONS[reduction] == "none" and BOX_KINDS[kind] == "giou":
        g = g[..., None]
    return (saved.to(g.dtype) * g).to(saved.dtype)


@_box_bwd_op.register_fake
def _(grad_loss, saved, kind, reduction):
    return torch.empty_like(saved)


def _box_setup(ctx, inputs, output):
    ctx.kind, ctx.reduction, ctx.need_grad = inputs[3], inputs[5], inputs[6]
    ctx.save_for_backward(output[1])


def _box_backward(ctx, grad_loss, _grad_grad):
    if not ctx.need_grad:
        raise RuntimeError("effops::box_loss: backward needs need_grad=True at the forward call")
    (saved,) = ctx.saved_tensors
    return torch.ops.effops.box_loss_backward(grad_loss, saved, ctx.kind, ctx.reduction), None, None, None, None, None, None


_box_op.register_autograd(_box_backward, setup_context=_box_setup)


# =============================================================================== matching: custom op
@custom_op(
    "effops::match_anchors",
    "(Tensor anchors, Tensor gt_boxes, Tensor labels, Tensor valid, float match_threshold, "
    "float unmatched_threshold, SymInt ignored_class)"
    " -> (Tensor, Tensor, Tensor)",
)
def _match_op(anchors: Tensor, gt_boxes: Tensor, labels: Tensor, valid: Tensor, match_threshold: float,
              unmatched_threshold: float, ignored_class: int) -> Tuple[Tensor, Tensor, Tensor]:
    backend = _select("match_anchors", anchors)
    if backend == "reference":
        return match_anchors_reference(anchors, gt_boxes, labels, valid.bool(), match_threshold,
                                       unmatched_threshold, ignored_class)
    return _kb.match(backend, anchors, gt_boxes, labels, valid, match_threshold, unmatched_threshold, ignored_class)


@_match_op.register_fake
def _(anchors, gt_boxes, labels, valid, match_threshold, unmatched_threshold, ignored_class):
    B, A = gt_boxes.shape[0], anchors.shape[0]
    return (anchors.new_empty((B, A), dtype=torch.int64), anchors.new_empty((B, A, 4)), anchors.new_empty((B,)))


# =============================================================================== public API
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none", label_smoothing: float = 0.0,
                       ignore: Optional[Tensor] = None) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017) in one pass; a drop-in for
    ``torchvision.ops.sigmoid_focal_loss`` with dense targets.

    Args:
        logits: ``[..., C]`` float16/bfloat16/float32/float64 (computed in float32, float64 for float64).
        targets: dense ``[..., C]`` floats (torchvision's form; any float dtype), or class
            indices ``[...]`` of an integer dtype: ``c`` in ``[0, C)`` is a one-hot row, ``-2``
            an ignored row (loss 0, as effdet's ``cls_targets != -2`` mask), ``-1`` (any other
            negative) background - effdet's convention; the one-hot is never materialised. A
            class ``>= C`` raises on the CPU and gives NaN on GPUs (no host synchronisation).
        alpha: positive-class weight (``alpha t + (1 - alpha)(1 - t)``); ``< 0`` disables it.
        gamma: focusing exponent, ``>= 0``.
        reduction: ``'none'`` (per element, ``logits``' shape), ``'sum'`` or ``'mean'`` (over
            every element, ignored ones included in the count, as torchvision's mean).
        label_smoothing: effdet's: the cross-entropy uses ``t (1 - ls) + ls / 2``, the focal
            and alpha factors the unsmoothed ``t``.
        ignore: optional bool mask, ``[...]`` (rows) or ``[..., C]``; True elements get loss 0.

    Returns the loss in the logits' dtype (float32 inside an autocast region). Backward scales
    the gradient saved by the forward pass (no double backward).
    """
    op = "sigmoid_focal_loss"
    logits = check_tensor(op, "logits", logits)
    targets = check_tensor(op, "targets", targets)
    check_float(op, "logits", logits)
    if logits.dim() < 1:
        raise EffopsInputError(f"{op}: logits must have at least one dimension [..., C], got a 0-dim tensor")
    if targets.dtype.is_floating_point:
        check_shape(op, "targets", targets, list(logits.shape), " (dense targets: logits' shape)")
        if targets.dtype != logits.dtype:  # the kernels read targets in the logits' dtype or float32
            targets = targets.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    else:
        if targets.dtype.is_complex or targets.dtype == torch.bool:
            raise EffopsTypeError(f"{op}: targets must be float (dense) or integer class indices, got {targets.dtype}")
        check_shape(op, "targets", targets, list(logits.shape[:-1]), " (class indices: logits' shape without C)")
        if logits.shape[-1] == 0 and targets.numel() > 0:  # rows without classes: no index can be valid
            raise EffopsInputError(f"{op}: class-index targets need logits with at least one class, got "
                                   f"logits of shape {list(logits.shape)}")
        targets = targets.to(torch.int64)
    if ignore is not None:
        ignore = check_tensor(op, "ignore", ignore)
        if ignore.dtype != torch.bool:
            raise EffopsTypeError(f"{op}: ignore must be a bool tensor, got {ignore.dtype}")
        if tuple(ignore.shape) not in (tuple(logits.shape[:-1]), tuple(logits.shape)):
            raise EffopsInputError(f"{op}: ignore must have shape {list(logits.shape[:-1])} (rows) or "
                                   f"{list(logits.shape)} (elements), got {list(ignore.shape)}")
    check_same_device(op, logits=logits, targets=targets, ignore=ignore)
    a = check_real(op, "alpha", alpha, allow_nan=False, allow_inf=False)
    g = check_real(op, "gamma", gamma, allow_nan=False, allow_inf=False)
    if g < 0:
        raise EffopsInputError(f"{op}: gamma must be >= 0, got {g}")
    ls = check_real(op, "label_smoothing", label_smoothing, allow_nan=False)
    if not 0.0 <= ls <= 1.0:
        raise EffopsInputError(f"{op}: label_smoothing must be in [0, 1], got {ls}")
    red = check_choice(op, "reduction", reduction, REDUCTIONS)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    try:
        float_out = torch.is_autocast_enabled(logits.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        float_out = False
    ig = None if ignore is None else ignore.contiguous()
    loss, _ = torch.ops.effops.sigmoid_focal_loss(logits.contiguous(), targets.contiguous(), ig, a, g, ls,
                                                   _RED[red], float_out, need_grad)
    return loss


def box_loss(pred: Tensor, target: Tensor, mask: Optional[Tensor], *, kind: str = "huber", delta: float = 0.1,
             reduction: str = "sum") -> Tensor:
    """Masked box regression loss, summed in float32 (float64 for float64 inputs).

    Args:
        pred, target: ``[..., 4]`` of one float dtype. ``'huber'`` / ``'l1'``: encoded boxes
            (effdet's ``(ty, tx, th, tw)``), per coordinate; ``'giou'``: decoded corner boxes
            ``(x1, y1, x2, y2)`` or ``(y1, x1, y2, x2)`` (GIoU does not depend on which), per box,
            as ``torchvision.ops.generalized_box_iou_loss`` (eps 1e-7).
        mask: the positives, bool or float weights, ``[...]`` (per box) or ``[..., 4]`` (per
            coordinate; huber/l1 only). ``None``: effdet's ``target != 0`` per coordinate for
            huber/l1, every box for giou.
        kind: ``'huber'`` (effdet's huber_loss: ``0.5 min(|e|, delta)^2 + delta (|e| - min(|e|, delta))``),
            ``'l1'`` or ``'giou'`` (``1 - GIoU``).
        delta: the Huber threshold (effdet: 0.1).
        reduction: ``'sum'`` (a float32 scalar) or ``'none'`` (masked per coordinate / per box).

    effdet's box loss is ``box_loss(box_outputs, box_targets, None) / (4 * (num_positives_sum))``.
    Differentiable in ``pred`` (``target`` and ``mask`` are constants).
    """
    op = "box_loss"
    pred, target = check_tensor(op, "pred", pred), check_tensor(op, "target", target)
    check_float(op, "pred", pred)
    check_float(op, "target", target)
    if pred.dim() < 1 or pred.shape[-1] != 4:
        raise EffopsInputError(f"{op}: pred must have shape [..., 4], got {list(pred.shape)}")
    check_shape(op, "target", target, list(pred.shape), " (pred's shape)")
    k = check_choice(op, "kind", kind, BOX_KINDS)
    red = check_choice(op, "reduction", reduction, ("sum", "none"))
    d = check_real(op, "delta", delta, allow_nan=False, allow_inf=False)
    if k == "huber" and d <= 0:
        raise EffopsInputError(f"{op}: delta must be > 0, got {d}")
    if target.requires_grad:
        raise EffopsInputError(f"{op}: target must not require grad (the loss is differentiated in pred only)")
    cd = torch.float64 if pred.dtype == torch.float64 else torch.float32
    target = target.to(pred.dtype)
    if mask is None:
        mask = (target != 0) if k != "giou" else torch.ones(pred.shape[:-1], dtype=torch.bool, device=pred.device)
    mask = check_tensor(op, "mask", mask)
    if mask.dtype.is_complex or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise EffopsTypeError(f"{op}: mask must be bool or float, got {mask.dtype}")
    shapes = [tuple(pred.shape[:-1])] + ([tuple(pred.shape)] if k != "giou" else [])
    if tuple(mask.shape) not in shapes:
        raise EffopsInputError(f"{op}: mask must have shape {' or '.join(str(list(s)) for s in shapes)}, "
                               f"got {list(mask.shape)}")
    if mask.requires_grad:
        raise EffopsInputError(f"{op}: mask must not require grad")
    check_same_device(op, pred=pred, target=target, mask=mask)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    loss, _ = torch.ops.effops.box_loss(pred.contiguous(), target.contiguous(), mask.to(cd).contiguous(), _KIND[k],
                                        d, _RED[red], need_grad)
    return loss


def match_anchors(anchors: Tensor, gt_boxes: Tensor, gt_classes: Tensor, *, match_threshold: float = 0.5,
                  unmatched_threshold: Optional[float] = None, num_valid: Optional[Tensor] = None,
                  box_format: str = "yxyx", class_offset: int = 1,
                  ignored_class: int = -2) -> Tuple[Tensor, Tensor, Tensor]:
    """effdet's AnchorLabeler for a batch, in one pass per image and without host synchronisation.

    Args:
        anchors: ``[A, 4]`` float anchors (``effops.models.generate_anchors`` / effdet's
            ``Anchors.boxes``: ``(y1, x1, y2, x2)``).
        gt_boxes: ``[B, G, 4]`` ground-truth boxes in the same format; rows may be padding.
        gt_classes: ``[B, G]`` classes (int or float) as effdet's loader gives them (1-based);
            a class ``<= -1`` marks a padded row (effdet's ``filter_valid``).
        match_threshold: IoU ``>=`` this is a positive (effdet: 0.5).
        unmatched_threshold: IoU ``<`` this is background; in between: ``ignored_class``.
            Default: ``match_threshold`` (effdet's labeler: no ignored band).
        num_valid: optional ``[B]`` int counts: rows ``>= num_valid[b]`` are padding too.
        box_format: ``'yxyx'`` (effdet's order, the default) or ``'xyxy'`` (torchvision's);
            applies to ``anchors`` and ``gt_boxes``. The box targets are always effdet's
            ``(ty, tx, th, tw)``.
        class_offset: subtracted from the matched gt's class: effdet's labeler uses 1 (its
            datasets number classes from 1, the loss's one-hot from 0).
        ignored_class: class target of anchors in the ignored band: -2 (effdet's loss ignores
            -2); effdet's labeler itself writes -1 there (pass -1 to reproduce it bit for bit).

    Returns ``(cls_targets [B, A] int64, box_targets [B, A, 4] float32, num_positives [B]
    float32)``: per anchor the best gt by IoU (ties: the lower gt index, torch.max's rule) if
    its IoU ``>= match_threshold``; then each valid gt also claims its best anchor (ties: the
    lower anchor index) - effdet's ``force_match_for_each_row`` - the lower gt index winning an
    anchor claimed twice. ``split_levels`` turns the flat targets into effdet's per-level lists.
    IoU and encoding are computed in float32 with effdet's operation order (float64 inputs:
    float64, on the reference backend).
    """
    op = "match_anchors"
    anchors, gt_boxes = check_tensor(op, "anchors", anchors), check_tensor(op, "gt_boxes", gt_boxes)
    gt_classes = check_tensor(op, "gt_classes", gt_classes)
    check_float(op, "anchors", anchors)
    check_float(op, "gt_boxes", gt_boxes)
    check_shape(op, "anchors", anchors, [None, 4])
    check_shape(op, "gt_boxes", gt_boxes, [None, None, 4])
    B, G = gt_boxes.shape[:2]
    check_shape(op, "gt_classes", gt_classes, [B, G], " (gt_boxes' [B, G])")
    if gt_classes.dtype == torch.bool or gt_classes.dtype.is_complex:
        raise EffopsTypeError(f"{op}: gt_classes must be an integer or float tensor, got {gt_classes.dtype}")
    if num_valid is not None:
        num_valid = check_tensor(op, "num_valid", num_valid)
        check_integer(op, "num_valid", num_valid)
        check_shape(op, "num_valid", num_valid, [B])
    check_same_device(op, anchors=anchors, gt_boxes=gt_boxes, gt_classes=gt_classes, num_valid=num_valid)
    mt = check_real(op, "match_threshold", match_threshold, allow_nan=False)
    ut = mt if unmatched_threshold is None else check_real(op, "unmatched_threshold", unmatched_threshold,
                                                           allow_nan=False)
    if ut > mt:
        raise EffopsInputError(f"{op}: unmatched_threshold ({ut}) must be <= match_threshold ({mt})")
    fmt = check_choice(op, "box_format", box_format, ("yxyx", "xyxy"))
    off = check_int(op, "class_offset", class_offset, minimum=-(2**31), maximum=2**31)
    ign = check_int(op, "ignored_class", ignored_class, minimum=-(2**31), maximum=2**31)
    cd = torch.float64 if anchors.dtype == torch.float64 and gt_boxes.dtype == torch.float64 else torch.float32
    anchors, gt_boxes = anchors.to(cd), gt_boxes.to(cd)
    if fmt == "xyxy":
        perm = torch.tensor([1, 0, 3, 2], device=anchors.device)
        anchors, gt_boxes = anchors.index_select(-1, perm), gt_boxes.index_select(-1, perm)
    valid = gt_classes > -1
    if num_valid is not None:
        valid = valid & (torch.arange(G, device=valid.device) < num_valid.to(torch.int64)[:, None])
    labels = (gt_classes - off).to(torch.int64)  # effdet: (cls_targets - 1).long()
    return torch.ops.effops.match_anchors(anchors.contiguous(), gt_boxes.contiguous(), labels.contiguous(),
                                          valid.to(torch.uint8).contiguous(), mt, ut, ign)


__all__ = ["sigmoid_focal_loss", "box_loss", "match_anchors", "split_levels"]
