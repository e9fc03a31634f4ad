"""Knowledge distillation losses: a student learns from a teacher's outputs.

Classification (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network")::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

with ``s``/``t`` the student's/teacher's logits, the KL averaged over the batch, and ``T^2``
keeping the soft term's gradient scale independent of ``T``.

Detection (EfficientDet outputs: per level class logits ``[B, A*C, H, W]`` and box regressions
``[B, A*4, H, W]``). Class scores are independent sigmoids (focal loss), so the soft term is the
Bernoulli KL per anchor and class at temperature ``T``; the box term is a Huber loss of the
student's regression toward the teacher's. Background anchors far outnumber objects, so both
are weighted per anchor by the teacher's confidence ``w_a = max_c sigmoid(t_ac)`` and divided by
``max(1, sum_a w_a)`` (as focal loss divides by the number of positives)::

    L_kd = T^2 * sum_a w_a * sum_c KL(sigmoid(t_ac / T) || sigmoid(s_ac / T)) / N
         + box_weight * sum_a w_a * sum_k huber(s_box_ak - t_box_ak) / N
    L    = alpha * L_kd + (1 - alpha) * hard_loss(student_outputs, targets)   (hard_loss given)
    L    = L_kd                                                              (no hard_loss)

Training loops (``effops train --teacher MODEL --teacher-weights CKPT``, the prune fine-tune)
build ``kd = DistillationLoss(teacher, temperature=T, alpha=a)`` once and use
``loss = kd(model(x), y, inputs=x)`` in place of ``cross_entropy(model(x), y)``; the teacher runs
in eval mode under ``no_grad`` and is never updated.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _check_T_alpha(op: str, temperature, alpha) -> Tuple[float, float]:
    for name, v in (("temperature", temperature), ("alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise TypeError(f"{op}: {name} must be a finite float, got {v!r}")
    if not float(temperature) > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{op}: alpha must be in [0, 1], got {alpha}")
    return float(temperature), float(alpha)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Optional[Tensor] = None, *,
            temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0) -> Tensor:
    """Hinton's distillation loss for logits ``[N, C]`` (see the module docstring). Without
    ``targets`` it is the soft term alone (``alpha`` ignored)."""
    T, alpha = _check_T_alpha("kd_loss", temperature, alpha)
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"kd_loss: {name} must be a float tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student_logits and teacher_logits must both be [N, C] of the same shape, "
                         f"got {list(student_logits.shape)} and {list(teacher_logits.shape)}")
    t = teacher_logits.detach().to(student_logits.dtype)
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean",
                    log_target=True) * (T * T)
    if targets is None:
        return soft
    if not isinstance(targets, Tensor) or targets.dtype != torch.long or targets.shape != student_logits.shape[:1]:
        raise ValueError(f"kd_loss: targets must be an int64 tensor [N] = [{student_logits.shape[0]}] of class indices, "
                         f"got {targets.dtype if isinstance(targets, Tensor) else type(targets).__name__} "
                         f"{list(targets.shape) if isinstance(targets, Tensor) else ''}")
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * soft + (1.0 - alpha) * hard


def _teacher_forward(teacher: nn.Module, inputs):
    was = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            return teacher(inputs)
    finally:
        teacher.train(was)


class DistillationLoss(nn.Module):
    """Classification distillation: ``DistillationLoss(teacher)(student_logits, targets,
    inputs=x)`` (the teacher runs on ``inputs``) or ``(..., teacher_logits=t)`` (precomputed)."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, alpha: float = 0.9,
                 label_smoothing: float = 0.0):
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"DistillationLoss: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        self.temperature, self.alpha = _check_T_alpha("DistillationLoss", temperature, alpha)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"DistillationLoss: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.teacher = teacher  # runs in eval mode under no_grad: never updated

    def forward(self, student_logits: Tensor, targets: Optional[Tensor] = None, *, inputs=None,
                teacher_logits: Optional[Tensor] = None) -> Tensor:
        if (inputs is None) == (teacher_logits is None):
            raise ValueError("DistillationLoss: give exactly one of inputs= (the teacher runs on them) and "
                             "teacher_logits=")
        if teacher_logits is None:
            teacher_logits = _teacher_forward(self.teacher, inputs)
        return kd_loss(student_logits, teacher_logits, targets, temperature=self.temperature, alpha=self.alpha,
                       label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


# ----------------------------------------------------------------------------- detection
def _levels(outputs, what: str) -> Tuple[List[Tensor], List[Tensor]]:
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2 and all(isinstance(o, (tuple, list))
                                                                             for o in outputs)):
        raise TypeError(f"detection_kd_loss: {what} must be (class outputs per level, box outputs per level), as "
                        f"EfficientDet.forward returns, got {type(outputs).__name__}")
    cls, box = list(outputs[0]), list(outputs[1])
    if len(cls) != len(box) or not cls:
        raise ValueError(f"detection_kd_loss: {what} has {len(cls)} class and {len(box)} box levels")
    return cls, box


def _flat_anchors(t: Tensor, per_anchor: int) -> Tensor:
    """[B, A*K, H, W] -> [B*H*W*A, K] (the anchor layout effdet's post-processing uses)."""
    b, ak, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b * h * w * (ak // per_anchor), per_anchor)


def detection_kd_loss(student_outputs, teacher_outputs, *, temperature: float = 1.0, box_weight: float = 1.0,
                      huber_delta: float = 0.1) -> Tensor:
    """The detection distillation term ``L_kd`` (module docstring) of EfficientDet outputs."""
    num, den = detection_kd_parts(student_outputs, teacher_outputs, temperature=temperature, box_weight=box_weight,
                                  huber_delta=huber_delta)
    return num / den.clamp_min(1.0)


def detection_kd_parts(student_outputs, teacher_outputs, *, temperature: float = 1.0, box_weight: float = 1.0,
                       huber_delta: float = 0.1) -> Tuple[Tensor, Tensor]:
    """``L_kd``'s numerator and its normaliser ``sum_a w_a`` (no gradient) separately: a
    data-parallel loop sums the normaliser over the processes, so that N processes compute what
    one process with the whole batch computes (``effops train --teacher``)."""
    T, _ = _check_T_alpha("detection_kd_loss", temperature, 0.0)
    s_cls, s_box = _levels(student_outputs, "student_outputs")
    t_cls, t_box = _levels(teacher_outputs, "teacher_outputs")
    if len(s_cls) != len(t_cls):
        raise ValueError(f"detection_kd_loss: student has {len(s_cls)} levels, teacher {len(t_cls)}")
    num, den = None, None
    for lvl, (sc, sb, tc, tb) in enumerate(zip(s_cls, s_box, t_cls, t_box)):
        if sc.shape != tc.shape or sb.shape != tb.shape or sc.dim() != 4 or sb.shape[1] % 4:
            raise ValueError(f"detection_kd_loss: level {lvl}: student {list(sc.shape)}/{list(sb.shape)} and teacher "
                             f"{list(tc.shape)}/{list(tb.shape)} outputs must match, [B, A*C, H, W] / [B, A*4, H, W]")
        a = sb.shape[1] // 4
        if sc.shape[1] % a:
            raise ValueError(f"detection_kd_loss: level {lvl}: {sc.shape[1]} class channels for {a} anchors")
        c = sc.shape[1] // a
        s = _flat_anchors(sc, c)
        t = _flat_anchors(tc.detach().to(sc.dtype), c)
        pt = torch.sigmoid(t / T)
        # Bernoulli KL(pt || ps) = BCE(s/T; pt) - BCE(t/T; pt)
        kl = (F.binary_cross_entropy_with_logits(s / T, pt, reduction="none")
              - F.binary_cross_entropy_with_logits(t / T, pt, reduction="none")).sum(1)
        w = torch.sigmoid(t).amax(1)
        hub = F.huber_loss(_flat_anchors(sb, 4), _flat_anchors(tb.detach().to(sb.dtype), 4), reduction="none",
                           delta=huber_delta).sum(1)
        term = (w * (kl * (T * T) + box_weight * hub)).sum()
        num = term if num is None else num + term
        den = w.sum() if den is None else den + w.sum()
    return num, den.detach()


class DetectionDistillationLoss(nn.Module):
    """Detection distillation for EfficientDet-style outputs ``(class levels, box levels)``:
    ``DetectionDistillationLoss(teacher, hard_loss=fn)(model(x), targets, inputs=x)``;
    ``hard_loss(student_outputs, targets)`` is the usual detection loss (focal + box), blended
    with ``alpha``; without it the loss is the distillation term alone."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 1.0, alpha: float = 0.5, box_weight: float = 1.0,
                 huber_delta: float = 0.1, hard_loss: Optional[Callable] = None):
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"DetectionDistillationLoss: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if hard_loss is not None and not callable(hard_loss):
            raise TypeError(f"DetectionDistillationLoss: hard_loss must be callable, got {type(hard_loss).__name__}")
        self.temperature, self.alpha = _check_T_alpha("DetectionDistillationLoss", temperature, alpha)
        for name, v in (("box_weight", box_weight), ("huber_delta", huber_delta)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) >= 0 or not math.isfinite(v):
                raise ValueError(f"DetectionDistillationLoss: {name} must be a finite float >= 0, got {v!r}")
        if not huber_delta > 0:
            raise ValueError(f"DetectionDistillationLoss: huber_delta must be > 0, got {huber_delta}")
        self.box_weight, self.huber_delta = float(box_weight), float(huber_delta)
        self.hard_loss = hard_loss
        self.teacher = teacher

    def forward(self, student_outputs, targets=None, *, inputs=None, teacher_outputs=None) -> Tensor:
        if (inputs is None) == (teacher_outputs is None):
            raise ValueError("DetectionDistillationLoss: give exactly one of inputs= and teacher_outputs=")
        if teacher_outputs is None:
            teacher_outputs = _teacher_forward(self.teacher, inputs)
        kd = detection_kd_loss(student_outputs, teacher_outputs, temperature=self.temperature,
                               box_weight=self.box_weight, huber_delta=self.huber_delta)
        if self.hard_loss is None:
            return kd
        return self.alpha * kd + (1.0 - self.alpha) * self.hard_loss(student_outputs, targets)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, box_weight={self.box_weight}, "
                f"hard_loss={'yes' if self.hard_loss is not None else 'no'}")


# ----------------------------------------------------------------------------- teachers from files
def load_teacher(name: str, weights: str, *, num_classes: int, in_chans: int = 3, where: str = "--teacher") -> nn.Module:
    """The ``effops.models`` classifier ``name`` for ``num_classes`` / ``in_chans`` with the weights
    in ``weights`` (``torch.load(weights_only=True)``: tensors and plain containers only; a pruned
    model's state_dict shrinks the fresh model to its widths first), in eval mode, frozen."""
    from ..models import create_model
    from ..models.weights import read_checkpoint
    from .prune import shrink_to

    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: the teacher must be a model name (effops.models.list_models()), got {name!r}")
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"{where}: a teacher needs its weights (--teacher-weights CKPT): an untrained teacher "
                         f"teaches nothing")
    try:
        teacher = create_model(name, num_classes=num_classes, in_chans=in_chans)
    except TypeError as e:
        raise ValueError(f"{where}: {name!r} is not a classifier (effops.models): {e}") from None
    sd = read_checkpoint(weights)
    try:
        shrink_to(teacher, sd)
        teacher.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: {weights} does not fit {name} with {num_classes} classes and {in_chans} input "
                         f"channels: {str(e)[:400]}") from None
    teacher.eval().requires_grad_(False)
    return teacher


__all__ = ["kd_loss", "DistillationLoss", "detection_kd_loss", "detection_kd_parts", "DetectionDistillationLoss",
           "load_teacher"]
