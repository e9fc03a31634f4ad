"""Pure-PyTorch references of the detection losses (the specification every backend computes).

Each function computes the value *and* its explicit adjoint with the same formulas the kernels
use, in float32 for float32/float16/bfloat16 inputs and in float64 for float64 inputs (so the
references double as float64 oracles and as the bodies of the custom ops' reference backend).

Focal loss, per element with logit x, target t and weight w (0 for ignored elements)::

    e = exp(-|x|),  p = sigmoid(x),  1 - p = sigmoid(-x)          (both from e, no cancellation)
    q = 1 - p_t = t (1 - p) + (1 - t) p                           (torchvision's 1 - p_t)
    t_s = t (1 - ls) + ls / 2                                     (effdet's label smoothing)
    ce = max(x, 0) - x t_s + log1p(e)                             (BCE-with-logits, softplus form)
    a_t = alpha t + (1 - alpha)(1 - t)   (1 when alpha < 0)
    loss = w a_t q^gamma ce
    dloss/dx = w a_t (gamma q^gamma (1 - 2t) r ce + q^gamma (p - t_s)),  r = p (1 - p) / q

r is in [0, 1] for t in [0, 1] (q >= min(p, 1 - p) >= p (1 - p)) and is 0 where q == 0, so the
gradient stays finite for saturated logits and gamma < 1 (q^(gamma - 1) itself would overflow).

Box losses, per coordinate e = pred - target (``huber``: effdet's huber_loss, ``l1``) or per box
(``giou``: torchvision's generalized_box_iou_loss with eps 1e-7), times the mask, summed.

Anchor matching: effdet's AnchorLabeler (TargetAssigner + IouSimilarity + ArgMaxMatcher with
force_match_for_each_row + FasterRcnnBoxCoder), batched; see ``match_anchors_reference``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._common import EffopsInputError, compute_dtype

REDUCTIONS = ("none", "sum", "mean")
BOX_KINDS = ("huber", "l1", "giou")
GIOU_EPS = 1e-7  # torchvision.ops.generalized_box_iou_loss
CODER_EPS = 1e-7  # effdet's FasterRcnnBoxCoder


# =============================================================================== focal loss
def focal_targets(logits: Tensor, targets: Tensor, ignore: Optional[Tensor], cd: torch.dtype,
                  check_classes: bool = True) -> Tuple[Tensor, Tensor]:
    """Dense targets t and weights w in dtype cd, shaped like logits (the reference only: the
    kernels never materialise them). Class-index targets: c in [0, C) one-hot, -2 ignored, other
    negatives background; c >= C is an error on the CPU (checked here) and NaN elsewhere."""
    C = logits.shape[-1]
    if targets.dtype.is_floating_point:
        t = targets.to(cd)
        w = torch.ones_like(t)
    else:
        tg = targets.to(torch.int64)
        if check_classes and tg.device.type == "cpu" and tg.numel() and int(tg.max()) >= C:
            raise EffopsInputError(f"sigmoid_focal_loss: targets holds class {int(tg.max())}, but logits has "
                                   f"{C} classes (valid: 0..{C - 1}, -1 background, -2 ignore)")
        cls = torch.arange(C, device=logits.device)
        t = (tg[..., None] == cls).to(cd)
        w = (tg != -2).to(cd)[..., None].expand_as(t)
        bad = tg >= C
        w = torch.where(bad[..., None], torch.full_like(w, math.nan), w)
    if ignore is not None:
        keep = (~ignore).to(cd)
        w = w * (keep[..., None] if ignore.dim() == logits.dim() - 1 else keep)
    return t, w


def focal_elementwise(x: Tensor, t: Tensor, w: Tensor, alpha: float, gamma: float,
                      label_smoothing: float) -> Tuple[Tensor, Tensor]:
    """(loss, dloss/dx) per element in x's dtype (float32 or float64), the stable forms above."""
    e = torch.exp(-x.abs())
    s = 1.0 / (1.0 + e)
    pos = x >= 0
    p = torch.where(pos, s, e * s)
    om = torch.where(pos, e * s, s)  # 1 - p
    q = t * om + (1.0 - t) * p
    ts = t * (1.0 - label_smoothing) + 0.5 * label_smoothing if label_smoothing > 0 else t
    ce = x.clamp(min=0) - x * ts + torch.log1p(e)
    at = t * alpha + (1.0 - t) * (1.0 - alpha) if alpha >= 0 else torch.ones_like(x)
    mod = torch.pow(q, gamma)
    wa = w * at
    loss = wa * mod * ce
    grad = mod * (p - ts)
    if gamma != 0:
        r = torch.where(q > 0, p * om / torch.where(q > 0, q, torch.ones_like(q)), torch.zeros_like(q))
        grad = grad + gamma * mod * (1.0 - 2.0 * t) * r * ce
    return loss, wa * grad


def sigmoid_focal_loss_reference(logits: Tensor, targets: Tensor, ignore: Optional[Tensor], alpha: float,
                                 gamma: float, label_smoothing: float, reduction: str,
                                 out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(loss, per-element gradient of the unreduced loss) - the gradient in the logits' dtype,
    the loss in out_dtype (default: the logits' dtype); reductions accumulate in float32/64."""
    cd = compute_dtype(logits.dtype)
    x = logits.to(cd)
    t, w = focal_targets(logits, targets, ignore, cd)
    loss, grad = focal_elementwise(x, t, w, alpha, gamma, label_smoothing)
    od = out_dtype or logits.dtype
    if reduction == "sum":
        out = loss.sum()
    elif reduction == "mean":
        out = loss.sum() / loss.numel() if loss.numel() else loss.sum() * math.nan
    else:
        out = loss
    return out.to(od), grad.to(logits.dtype)


# =============================================================================== box losses
def _tie_max_grad(a: Tensor, b: Tensor) -> Tensor:
    """d max(a, b) / da as torch's autograd defines it (1, 0, and 1/2 on ties)."""
    return torch.where(a > b, 1.0, torch.where(a == b, 0.5, 0.0)).to(a.dtype)


def giou_elementwise(p: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """(1 - GIoU per box [...], d/dp [..., 4]) of boxes (a1, b1, a2, b2) - xyxy or yxyx alike -
    with torchvision's generalized_box_iou_loss formula (eps 1e-7, intersection 0 unless both
    extents are > 0); min/max ties split the gradient as torch's autograd does."""
    eps = GIOU_EPS
    x1, y1, x2, y2 = p.unbind(-1)
    gx1, gy1, gx2, gy2 = g.unbind(-1)
    ix1, iy1 = torch.maximum(x1, gx1), torch.maximum(y1, gy1)
    ix2, iy2 = torch.minimum(x2, gx2), torch.minimum(y2, gy2)
    iw, ih = ix2 - ix1, iy2 - iy1
    over = (iw > 0) & (ih > 0)
    inter = torch.where(over, iw * ih, torch.zeros_like(iw))
    pw, ph = x2 - x1, y2 - y1
    union = pw * ph + (gx2 - gx1) * (gy2 - gy1) - inter
    iou = inter / (union + eps)
    cw = torch.maximum(x2, gx2) - torch.minimum(x1, gx1)
    ch = torch.maximum(y2, gy2) - torch.minimum(y1, gy1)
    area_c = cw * ch
    loss = 1.0 - (iou - (area_c - union) / (area_c + eps))
    ue, ce = union + eps, area_c + eps
    g_inter = -1.0 / ue - inter / (ue * ue) + 1.0 / ce
    g_area = inter / (ue * ue) - 1.0 / ce
    g_c = ue / (ce * ce)
    gi = torch.where(over, g_inter, torch.zeros_like(g_inter))
    # d inter: iw * ih with iw = min(x2, gx2) - max(x1, gx1)
    d_x1 = -gi * ih * _tie_max_grad(x1, gx1) - g_area * ph - g_c * ch * _tie_max_grad(-x1, -gx1)
    d_x2 = gi * ih * _tie_max_grad(-x2, -gx2) + g_area * ph + g_c * ch * _tie_max_grad(x2, gx2)
    d_y1 = -gi * iw * _tie_max_grad(y1, gy1) - g_area * pw - g_c * cw * _tie_max_grad(-y1, -gy1)
    d_y2 = gi * iw * _tie_max_grad(-y2, -gy2) + g_area * pw + g_c * cw * _tie_max_grad(y2, gy2)
    return loss, torch.stack([d_x1, d_y1, d_x2, d_y2], dim=-1)


def box_loss_reference(pred: Tensor, target: Tensor, mask: Tensor, kind: str, delta: float,
                       reduction: str = "sum") -> Tuple[Tensor, Tensor]:
    """(masked loss summed in float32/64 - or per element/box for reduction 'none' -, d/dpred in
    the accumulation dtype). mask: weights [...] (per box) or [..., 4] (per coordinate, not for
    giou), already in the accumulation dtype."""
    cd = compute_dtype(pred.dtype)
    p, g, m = pred.to(cd), target.to(cd), mask.to(cd)
    if kind == "giou":
        loss, grad = giou_elementwise(p, g)
        loss = loss * m
        grad = grad * m[..., None]
    else:
        e = p - g
        if kind == "huber":
            a = e.abs()
            qd = a.clamp(max=delta)
            loss = 0.5 * qd * qd + delta * (a - qd)
            grad = e.clamp(-delta, delta)
        else:
            loss = e.abs()
            grad = torch.sign(e)
        mm = m if m.dim() == p.dim() else m[..., None]
        loss, grad = loss * mm, grad * mm
    return (loss if reduction == "none" else loss.sum()), grad


# =============================================================================== anchor matching
def box_iou_effdet(gt: Tensor, anchors: Tensor) -> Tensor:
    """IoU [B, G, A] of yxyx boxes exactly as effdet's IouSimilarity computes it (heights times
    widths, union (area_g + area_a) - inter, 0 where the intersection is 0)."""
    y1, x1, y2, x2 = gt.unbind(-1)
    ay1, ax1, ay2, ax2 = anchors.unbind(-1)
    ih = (torch.minimum(y2[..., None], ay2) - torch.maximum(y1[..., None], ay1)).clamp(min=0)
    iw = (torch.minimum(x2[..., None], ax2) - torch.maximum(x1[..., None], ax1)).clamp(min=0)
    inter = ih * iw
    area_g = (y2 - y1) * (x2 - x1)
    area_a = (ay2 - ay1) * (ax2 - ax1)
    union = area_g[..., None] + area_a - inter
    return torch.where(inter == 0, torch.zeros_like(inter), inter / union)


def encode_boxes_effdet(boxes: Tensor, anchors: Tensor) -> Tensor:
    """FasterRcnnBoxCoder.encode (no scale factors, eps 1e-7) of yxyx boxes against yxyx anchors
    (broadcasting), in effdet's operation order: (ty, tx, th, tw)."""
    eps = CODER_EPS

    def centre_size(b):
        ymin, xmin, ymax, xmax = b.unbind(-1)
        w, h = xmax - xmin, ymax - ymin
        return ymin + h / 2.0, xmin + w / 2.0, h, w

    yca, xca, ha, wa = centre_size(anchors)
    yc, xc, h, w = centre_size(boxes)
    ha, wa, h, w = ha + eps, wa + eps, h + eps, w + eps
    tx = (xc - xca) / wa
    ty = (yc - yca) / ha
    tw = torch.log(w / wa)
    th = torch.log(h / ha)
    return torch.stack([ty, tx, th, tw], dim=-1)


def match_anchors_reference(anchors: Tensor, gt_boxes: Tensor, labels: Tensor, valid: Tensor,
                            match_threshold: float, unmatched_threshold: float,
                            ignored_class: int = -2) -> Tuple[Tensor, Tensor, Tensor]:
    """Batched effdet AnchorLabeler on yxyx boxes (anchors [A, 4], gt [B, G, 4], labels [B, G]
    int64 = the class target of each gt (effdet: gt class - 1), valid [B, G] bool).

    Per anchor: the best valid gt (first on IoU ties, torch.max's rule); IoU below
    unmatched_threshold -> background (-1), in [unmatched, matched) -> ignored_class, else the
    gt's label. Then every valid gt claims its best anchor (first on ties, argmax's rule); an
    anchor claimed by several gts goes to the lowest gt index (effdet's one-hot max). Matched
    anchors get the FasterRcnn encoding of their gt, the others zeros; num_positives counts the
    matched anchors (float). Thresholds compare in the boxes' dtype as effdet's tensors do."""
    cd = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    anchors, gt = anchors.to(cd), gt_boxes.to(cd)
    B, G = labels.shape
    A = anchors.shape[0]
    dev = anchors.device
    if G == 0 or A == 0:
        return (torch.full((B, A), -1, dtype=torch.int64, device=dev), torch.zeros(B, A, 4, dtype=cd, device=dev),
                torch.zeros(B, dtype=cd, device=dev))
    iou = box_iou_effdet(gt, anchors)  # [B, G, A]
    iou_v = torch.where(valid[..., None], iou, torch.full_like(iou, -1.0))
    best, arg = iou_v.max(dim=1)  # first maximal gt per anchor
    mt = torch.tensor(match_threshold, dtype=cd)
    ut = torch.tensor(unmatched_threshold, dtype=cd)
    match = torch.where(best < ut, torch.full_like(arg, -1), torch.where(best < mt, torch.full_like(arg, -2), arg))
    # force match: each valid gt's first best anchor; the lowest gt index wins an anchor
    per_gt = iou_v.argmax(dim=2)  # [B, G] first maximal anchor
    target_col = torch.where(valid, per_gt, torch.full_like(per_gt, A))
    forced = torch.full((B, A + 1), G, dtype=torch.int64, device=dev)
    gidx = torch.arange(G, device=dev).expand(B, G)
    forced.scatter_reduce_(1, target_col, gidx, reduce="amin")
    forced = forced[:, :A]
    match = torch.where(forced < G, forced, match)
    any_valid = valid.any(dim=1, keepdim=True)
    match = torch.where(any_valid, match, torch.full_like(match, -1))
    matched = match >= 0
    gi = match.clamp(min=0)
    cls = torch.gather(labels, 1, gi)
    cls = torch.where(matched, cls, torch.where(match == -2, torch.full_like(cls, ignored_class), torch.full_like(cls, -1)))
    gtb = torch.gather(gt, 1, gi[..., None].expand(B, A, 4))
    enc = encode_boxes_effdet(gtb, anchors[None])
    box = torch.where(matched[..., None], enc, torch.zeros_like(enc))
    return cls, box, matched.sum(dim=1).to(cd)


# =============================================================================== per-level split
def split_levels(cls_targets: Tensor, box_targets: Tensor, feat_sizes: Sequence[Tuple[int, int]],
                 anchors_per_location: int = 9) -> Tuple[List[Tensor], List[Tensor]]:
    """match_anchors' flat targets ([B, A], [B, A, 4]) as effdet's AnchorLabeler returns them:
    per level l with feature size (H_l, W_l), cls [B, H_l, W_l, k] and box [B, H_l, W_l, 4k]
    (k = anchors_per_location), anchors ordered level, position, (octave, aspect) as effdet's
    Anchors (and effops.models.generate_anchors). Views, no copies."""
    B, A = cls_targets.shape
    k = int(anchors_per_location)
    counts = [int(h) * int(w) * k for h, w in feat_sizes]
    if sum(counts) != A:
        raise EffopsInputError(f"split_levels: the levels {list(feat_sizes)} x {k} anchors per location hold "
                               f"{sum(counts)} anchors, but the targets have {A}")
    cls_out, box_out, start = [], [], 0
    for (h, w), n in zip(feat_sizes, counts):
        cls_out.append(cls_targets[:, start:start + n].reshape(B, int(h), int(w), k))
        box_out.append(box_targets[:, start:start + n].reshape(B, int(h), int(w), 4 * k))
        start += n
    return cls_out, box_out
