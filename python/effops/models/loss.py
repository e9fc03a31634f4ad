"""EfficientDet's detection loss on effops's fused loss ops.

``DetectionLoss(...)(cls_outputs, box_outputs, cls_targets, box_targets, num_positives)`` is
called as effdet's ``effdet.loss.DetectionLoss`` is and computes the same value (effdet's
``loss_fn`` with its default "new" focal loss):

    N = sum(num_positives) + 1
    class_loss = sum_levels focal(logits, one_hot(cls_targets)) / N       (-2 targets ignored)
    box_loss   = sum_levels huber(box_out, box_targets, delta) [box_targets != 0] / (4 N)
    total      = class_loss + box_loss_weight * box_loss

with the focal loss ``alpha_t (1 - p_t)^gamma BCE(x, t_smoothed)`` (label smoothing only inside
the cross entropy, as effdet), computed by ``effops.ops.sigmoid_focal_loss`` from the class
indices directly (no one-hot tensor) in fp32 whatever the logits' dtype, and the box term by
``effops.ops.box_loss``. Layouts are effdet's: per level, ``cls_outputs[l]`` [B, A*C, H, W],
``box_outputs[l]`` [B, A*4, H, W] (the model's outputs), ``cls_targets[l]`` [B, H, W, A] (class
index, 0-based; -1 background, -2 ignored), ``box_targets[l]`` [B, H, W, A*4] (encoded ty, tx,
th, tw), ``num_positives`` [B] - what effdet's ``AnchorLabeler.batch_label_anchors`` returns.

``DetectionLoss.from_gt(cls_outputs, box_outputs, anchors, gt_boxes, gt_classes)`` labels the
anchors on the device first (``effops.ops.match_anchors``: effdet's AnchorLabeler semantics,
batched, padded gt rows allowed), so a training step never goes back to the host.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

BOX_LOSS_TYPES = ("huber", "l1", "giou")


def _check_real(name: str, v, lo: float = float("-inf"), hi: float = float("inf"), lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"DetectionLoss: {name} must be a number, got {type(v).__name__}")
    f = float(v)
    if not (lo < f if lo_open else lo <= f) or not f <= hi or f != f:
        raise ValueError(f"DetectionLoss: {name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
    return f


def _levels(name: str, xs) -> List[Tensor]:
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"DetectionLoss: {name} must be a non-empty list of tensors (one per level), got "
                        f"{type(xs).__name__}")
    for i, t in enumerate(xs):
        if not isinstance(t, Tensor):
            raise TypeError(f"DetectionLoss: {name}[{i}] must be a tensor, got {type(t).__name__}")
    return list(xs)


class DetectionLoss(nn.Module):
    """EfficientDet's focal + Huber detection loss (effdet's DetectionLoss; module docstring).

    Args:
        num_classes: C, the classes of the class head (effdet's ``num_classes``).
        alpha, gamma: focal loss parameters (EfficientDet: 0.25, 1.5).
        delta: the Huber threshold on the encoded box offsets (0.1).
        box_loss_weight: weight of the box term in the total (50).
        label_smoothing: effdet's label smoothing of the cross entropy (0: none).
        box_loss_type: 'huber' (effdet), 'l1', or 'giou' (1 - GIoU of the decoded boxes, per
            positive anchor, normalised by N; needs ``anchors``, as ``from_gt`` has them).
        match_threshold, unmatched_threshold: for ``from_gt``'s anchor matching (effdet: 0.5 and
            the same value).
    """

    def __init__(self, num_classes: int = 90, alpha: float = 0.25, gamma: float = 1.5, delta: float = 0.1,
                 box_loss_weight: float = 50.0, label_smoothing: float = 0.0, *, box_loss_type: str = "huber",
                 match_threshold: float = 0.5, unmatched_threshold: Optional[float] = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"DetectionLoss: num_classes must be a positive int, got {num_classes!r}")
        if box_loss_type not in BOX_LOSS_TYPES:
            raise ValueError(f"DetectionLoss: box_loss_type must be one of {BOX_LOSS_TYPES}, got {box_loss_type!r}")
        self.num_classes = int(num_classes)
        self.alpha = _check_real("alpha", alpha, hi=1.0)  # < 0: no alpha weighting (torchvision's rule)
        self.gamma = _check_real("gamma", gamma, lo=0.0)
        self.delta = _check_real("delta", delta, lo=0.0, lo_open=True)
        self.box_loss_weight = _check_real("box_loss_weight", box_loss_weight, lo=0.0)
        self.label_smoothing = _check_real("label_smoothing", label_smoothing, lo=0.0, hi=1.0)
        self.box_loss_type = box_loss_type
        self.match_threshold = _check_real("match_threshold", match_threshold, lo=0.0, hi=1.0)
        self.unmatched_threshold = (self.match_threshold if unmatched_threshold is None else
                                    _check_real("unmatched_threshold", unmatched_threshold, lo=0.0,
                                                hi=self.match_threshold))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, alpha={self.alpha}, gamma={self.gamma}, delta={self.delta}, "
                f"box_loss_weight={self.box_loss_weight}, label_smoothing={self.label_smoothing}, "
                f"box_loss_type={self.box_loss_type!r}")

    # ------------------------------------------------------------------ effdet's interface
    def forward(self, cls_outputs: Sequence[Tensor], box_outputs: Sequence[Tensor], cls_targets: Sequence[Tensor],
                box_targets: Sequence[Tensor], num_positives: Tensor, *, anchors: Optional[Tensor] = None,
                normalizer: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(total, class_loss, box_loss) as effdet's DetectionLoss (module docstring for layouts).

        ``normalizer``: N to divide by instead of ``num_positives.sum() + 1`` (data-parallel
        training passes the positives of the global batch + 1). ``anchors`` [A_total, 4] yxyx:
        needed only by ``box_loss_type='giou'``."""
        cls_outputs, box_outputs = _levels("cls_outputs", cls_outputs), _levels("box_outputs", box_outputs)
        cls_targets, box_targets = _levels("cls_targets", cls_targets), _levels("box_targets", box_targets)
        n = len(cls_outputs)
        if not len(box_outputs) == len(cls_targets) == len(box_targets) == n:
            raise ValueError(f"DetectionLoss: cls_outputs, box_outputs, cls_targets and box_targets must have one "
                             f"entry per level each, got {len(cls_outputs)}, {len(box_outputs)}, {len(cls_targets)}, "
                             f"{len(box_targets)}")
        shapes = [self._level_shape(l, c, b) for l, (c, b) in enumerate(zip(cls_outputs, box_outputs))]
        batch = shapes[0][0]
        for l, ((B, H, W, A), ct, bt) in enumerate(zip(shapes, cls_targets, box_targets)):
            if tuple(ct.shape) != (B, H, W, A):
                raise ValueError(f"DetectionLoss: cls_targets[{l}] must be [B, H, W, A] = {[B, H, W, A]} (effdet's "
                                 f"layout, matching cls_outputs[{l}]), got {list(ct.shape)}")
            if ct.dtype.is_floating_point or ct.dtype == torch.bool:
                raise TypeError(f"DetectionLoss: cls_targets[{l}] must hold integer class indices, got {ct.dtype}")
            if tuple(bt.shape) != (B, H, W, 4 * A):
                raise ValueError(f"DetectionLoss: box_targets[{l}] must be [B, H, W, 4A] = {[B, H, W, 4 * A]}, got "
                                 f"{list(bt.shape)}")
        cls_flat = [ct.reshape(batch, -1) for ct in cls_targets]
        box_flat = [bt.reshape(batch, -1, 4) for bt in box_targets]
        return self._loss(cls_outputs, box_outputs, shapes, cls_flat, box_flat, num_positives, anchors, normalizer)

    # ------------------------------------------------------------------ from padded ground truth
    def label(self, anchors: Tensor, gt_boxes: Tensor, gt_classes: Tensor, *,
              num_valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Anchor targets from padded ground truth, on the boxes' device (``effops.ops.match_anchors``,
        effdet's AnchorLabeler): ``anchors`` [A, 4] yxyx (the model's ``anchor_boxes``),
        ``gt_boxes`` [B, G, 4] yxyx in input pixels, ``gt_classes`` [B, G] (1..C; rows of -1 are
        padding). Returns flat (cls_targets [B, A], box_targets [B, A, 4], num_positives [B])."""
        from ..ops.losses import match_anchors

        if not isinstance(anchors, Tensor) or anchors.dim() != 2 or anchors.shape[1] != 4:
            raise ValueError(f"DetectionLoss.label: anchors must be a [A, 4] tensor, got "
                             f"{list(anchors.shape) if isinstance(anchors, Tensor) else type(anchors).__name__}")
        return match_anchors(anchors, gt_boxes, gt_classes, match_threshold=self.match_threshold,
                             unmatched_threshold=self.unmatched_threshold, num_valid=num_valid)

    def flat(self, cls_outputs: Sequence[Tensor], box_outputs: Sequence[Tensor], cls_targets: Tensor,
             box_targets: Tensor, num_positives: Tensor, *, anchors: Optional[Tensor] = None,
             normalizer: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """The loss of per-level outputs against flat targets (``label``'s: [B, A_total] and
        [B, A_total, 4], anchors ordered level, position, anchor as the model's ``anchor_boxes``)."""
        cls_outputs, box_outputs = _levels("cls_outputs", cls_outputs), _levels("box_outputs", box_outputs)
        if len(box_outputs) != len(cls_outputs):
            raise ValueError(f"DetectionLoss: cls_outputs and box_outputs have {len(cls_outputs)} and "
                             f"{len(box_outputs)} levels")
        shapes = [self._level_shape(l, c, b) for l, (c, b) in enumerate(zip(cls_outputs, box_outputs))]
        B = shapes[0][0]
        total = sum(H * W * A for _, H, W, A in shapes)
        for name, t, want in (("cls_targets", cls_targets, (B, total)), ("box_targets", box_targets, (B, total, 4))):
            if not isinstance(t, Tensor) or tuple(t.shape) != want:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"DetectionLoss: {name} must be {list(want)} (batch, the outputs' anchors"
                                 f"{', 4' if len(want) == 3 else ''}), got {got}")
        if anchors is not None and (anchors.dim() != 2 or anchors.shape[0] != total):
            raise ValueError(f"DetectionLoss: the outputs have {total} anchors over their levels, anchors has "
                             f"{list(anchors.shape)} (another image size or anchor configuration?)")
        cls_flat, box_flat, start = [], [], 0
        for _, H, W, A in shapes:
            cls_flat.append(cls_targets[:, start:start + H * W * A])
            box_flat.append(box_targets[:, start:start + H * W * A])
            start += H * W * A
        return self._loss(cls_outputs, box_outputs, shapes, cls_flat, box_flat, num_positives, anchors, normalizer)

    def from_gt(self, cls_outputs: Sequence[Tensor], box_outputs: Sequence[Tensor], anchors: Tensor,
                gt_boxes: Tensor, gt_classes: Tensor, *, num_valid: Optional[Tensor] = None,
                normalizer: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """``flat(outputs, *label(anchors, gt_boxes, gt_classes))``: the loss from padded ground
        truth without leaving the device. Returns (total, class_loss, box_loss)."""
        cls_t, box_t, npos = self.label(anchors, gt_boxes, gt_classes, num_valid=num_valid)
        return self.flat(cls_outputs, box_outputs, cls_t, box_t, npos, anchors=anchors, normalizer=normalizer)

    # ------------------------------------------------------------------ shared
    def _level_shape(self, l: int, c: Tensor, b: Tensor) -> Tuple[int, int, int, int]:
        if c.dim() != 4 or not c.is_floating_point():
            raise ValueError(f"DetectionLoss: cls_outputs[{l}] must be a float [B, A*C, H, W] tensor, got "
                             f"{c.dtype} {list(c.shape)}")
        B, AC, H, W = c.shape
        if AC % self.num_classes:
            raise ValueError(f"DetectionLoss: cls_outputs[{l}] has {AC} channels, not a multiple of num_classes="
                             f"{self.num_classes} (A*C); was the loss built for another class count?")
        A = AC // self.num_classes
        if b.dim() != 4 or not b.is_floating_point() or tuple(b.shape) != (B, 4 * A, H, W):
            raise ValueError(f"DetectionLoss: box_outputs[{l}] must be a float [B, 4A, H, W] = {[B, 4 * A, H, W]} "
                             f"tensor, got {b.dtype} {list(b.shape)}")
        return int(B), int(H), int(W), int(A)

    def _loss(self, cls_outputs, box_outputs, shapes, cls_flat, box_flat, num_positives, anchors, normalizer):
        from ..ops.losses import box_loss, sigmoid_focal_loss

        dev = cls_outputs[0].device
        if normalizer is None:
            if not isinstance(num_positives, Tensor):
                raise TypeError(f"DetectionLoss: num_positives must be a tensor [B], got "
                                f"{type(num_positives).__name__}")
            normalizer = num_positives.to(device=dev, dtype=torch.float32).sum() + 1.0
        else:
            normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=dev)
        if self.box_loss_type == "giou":
            if anchors is None:
                raise ValueError("DetectionLoss: box_loss_type='giou' needs anchors (decoded boxes); pass "
                                 "anchors=model.anchor_boxes or use from_gt")
            from .anchors import decode_boxes

            anchor_levels = torch.split(anchors.to(dev), [H * W * A for _, H, W, A in shapes])
        cls_sum = torch.zeros((), dtype=torch.float32, device=dev)
        box_sum = torch.zeros((), dtype=torch.float32, device=dev)
        C = self.num_classes
        for l, ((B, H, W, A), co, bo, ct, bt) in enumerate(zip(shapes, cls_outputs, box_outputs, cls_flat, box_flat)):
            # [B, A*C, H, W] -> [B, H*W*A, C]: a view when the model's outputs are channels_last
            logits = co.permute(0, 2, 3, 1).reshape(B, H * W * A, C)
            cls_sum = cls_sum + sigmoid_focal_loss(logits, ct, alpha=self.alpha, gamma=self.gamma, reduction="sum",
                                                   label_smoothing=self.label_smoothing).float()
            pred = bo.permute(0, 2, 3, 1).reshape(B, H * W * A, 4)
            bt = bt.to(device=dev)
            if self.box_loss_type == "giou":
                pos = (ct >= 0).to(torch.float32)
                a = anchor_levels[l][None]
                box_sum = box_sum + box_loss(decode_boxes(pred, a), decode_boxes(bt, a), pos, kind="giou").float()
            else:  # effdet's mask: every non-zero target coordinate (targets of non-positives are zeros)
                box_sum = box_sum + box_loss(pred, bt, bt != 0, kind=self.box_loss_type, delta=self.delta).float()
        class_loss = cls_sum / normalizer
        box_term = box_sum / normalizer if self.box_loss_type == "giou" else box_sum / (4.0 * normalizer)
        total = class_loss + self.box_loss_weight * box_term
        return total, class_loss, box_term


__all__ = ["DetectionLoss", "BOX_LOSS_TYPES"]
