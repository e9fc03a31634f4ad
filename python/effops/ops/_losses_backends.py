"""Backend adapters of the detection losses (effops/ops/losses.py): the argument layout of the
compiled and Triton kernels - outputs and workspaces allocated here with torch - for the cpu,
cuda and triton backends. The kernels compute in float32; float64 never reaches them."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ._common import EffopsInputError


def _has(module, name: str) -> bool:
    return module is not None and hasattr(getattr(module, "_module", module), name)


# A compiled module built before this family existed lacks its entry points: the op then runs on
# the other backends (effops.info() lists what each op has).
BACKENDS = tuple(b for b, ok in (("cpu", _has(_backend._C, "focal_loss")), ("cuda", _has(_backend._cuda, "focal_loss")),
                                 ("triton", True), ("reference", True)) if ok)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _rows(x: Tensor) -> Tensor:
    """[..., C] as [N, C] (N = the product of the leading sizes, also when C is 0)."""
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return x.reshape(n, x.shape[-1])


def _stream(t: Tensor):
    return torch.cuda.current_stream(t.device).cuda_stream, t.device.index


def _bad_class(cls: int, C: int) -> None:
    raise EffopsInputError(f"sigmoid_focal_loss: targets holds class {cls}, but logits has {C} classes "
                           f"(valid: 0..{C - 1}, -1 background, -2 ignore)")


# =============================================================================== focal loss
def focal(backend: str, logits: Tensor, targets: Tensor, ignore, alpha: float, gamma: float, ls: float, red: str,
          out_dtype: torch.dtype, need_grad: bool):
    """(loss in out_dtype, per-element gradient in the logits' dtype or an empty tensor)."""
    C = logits.shape[-1]
    x = _rows(logits).contiguous()
    N = x.shape[0]
    dense = targets.dtype.is_floating_point
    t = (targets.reshape(N, C).float() if dense else targets.reshape(N)).contiguous()
    ig = None
    if ignore is not None:
        ig = ignore.reshape(N) if ignore.dim() == logits.dim() - 1 else ignore.reshape(N, C)
        ig = (ig.view(torch.uint8) if ig.dtype == torch.bool else ig.to(torch.uint8)).contiguous()
    grad = torch.empty_like(x) if need_grad else None
    if backend == "cpu":
        loss_el, total = _focal_cpu(x, t, ig, alpha, gamma, ls, red, grad)
    elif backend == "cuda":
        loss_el, total = _focal_cuda(x, t, ig, alpha, gamma, ls, red, grad)
    else:
        from ..triton import losses as tl

        loss_el, total = tl.focal(x, t, ig, alpha, gamma, ls, red != "none", grad)
    if red == "none":
        loss = loss_el.reshape(logits.shape).to(out_dtype)
    else:
        loss = total / max(x.numel(), 1) if red == "mean" else total
        if red == "mean" and x.numel() == 0:
            loss = torch.full_like(total, float("nan"))
        loss = loss.to(out_dtype)
    g = grad.reshape(logits.shape) if grad is not None else logits.new_empty(0)
    return loss, g


def _focal_cpu(x, t, ig, alpha, gamma, ls, red, grad):
    N, C = x.shape
    if red == "none":
        loss_el, part = torch.empty(N, C, dtype=torch.float32), None
    else:
        rpt = _backend._C.focal_rows_per_task(max(C, 1))
        loss_el, part = None, torch.zeros(-(-N // rpt), dtype=torch.float64)
    bad = _backend._C.focal_loss(x, t, ig, alpha, gamma, ls, loss_el, part, grad, _threads())
    if bad >= 0:
        _bad_class(bad, C)
    return loss_el, (None if part is None else part.sum().float())


def _focal_cuda(x, t, ig, alpha, gamma, ls, red, grad):
    N, C = x.shape
    loss_el = torch.empty(N, C, dtype=torch.float32, device=x.device) if red == "none" else None
    blocks = _backend._cuda.focal_blocks(N * C)
    part = None if red == "none" else torch.zeros(max(blocks, 1), dtype=torch.float32, device=x.device)
    _backend._cuda.focal_loss(x, t, ig, alpha, gamma, ls, loss_el, part, grad, *_stream(x))
    # classes >= C are flagged by NaN losses on the GPU (no host synchronisation)
    return loss_el, (None if part is None else part.double().sum().float())


def scale_on_cpu(saved: Tensor) -> bool:
    """The focal backward of a reduced loss runs the CPU scaling kernel (a fresh output of D0's
    size takes ~250 ms of page faults without the huge-page advice it gives the buffer)."""
    return (saved.device.type == "cpu" and saved.dtype != torch.float64 and saved.is_contiguous()
            and _has(_backend._C, "focal_scale") and _backend.select("sigmoid_focal_loss", saved.device) == "cpu")


def scale(saved: Tensor, factor: float) -> Tensor:
    out = torch.empty_like(saved)
    _backend._C.focal_scale(saved, factor, out, _threads())
    return out


# =============================================================================== box loss
def box(backend: str, pred: Tensor, target: Tensor, mask: Tensor, kind: str, delta: float, red: str, need_grad: bool):
    """(loss float32: sum, or per coordinate / per box for 'none'; d/dpred float32 or empty)."""
    code = {"huber": 0, "l1": 1, "giou": 2}[kind]
    p = pred.reshape(-1, 4).float().contiguous()
    g = target.reshape(-1, 4).float().contiguous()
    N = p.shape[0]
    m = mask.reshape(N, 4) if mask.dim() == pred.dim() else mask.reshape(N)
    m = m.float().contiguous()
    grad = torch.empty(N, 4, dtype=torch.float32, device=p.device) if need_grad else None
    lshape = (N,) if code == 2 else (N, 4)
    loss_el = torch.empty(lshape, dtype=torch.float32, device=p.device) if red == "none" else None
    if backend == "cpu":
        per = _backend._C.box_rows_per_task()
        part = None if red == "none" else torch.zeros(-(-N // per), dtype=torch.float64)
        _backend._C.box_loss(p, g, m, code, delta, loss_el, part, grad, _threads())
        total = None if part is None else part.sum().float()
    elif backend == "cuda":
        part = None if red == "none" else torch.empty(max(_backend._cuda.box_blocks(N), 1), dtype=torch.float32,
                                                      device=p.device)
        _backend._cuda.box_loss(p, g, m, code, delta, loss_el, part, grad, *_stream(p))
        total = None if part is None else part.double().sum().float()
    else:
        from ..triton import losses as tl

        loss_el, total = tl.box(p, g, m, code, delta, red != "none", grad)
    if red == "none":
        loss = loss_el.reshape(pred.shape[:-1] if code == 2 else pred.shape)
    else:
        loss = total.reshape(())
    grad = grad.reshape(pred.shape) if grad is not None else pred.new_empty(0, dtype=torch.float32)
    return loss, grad


# =============================================================================== matching
def match(backend: str, anchors: Tensor, gt_boxes: Tensor, labels: Tensor, valid: Tensor, mt: float, ut: float,
          ignored_class: int):
    B, G = labels.shape
    A = anchors.shape[0]
    dev = anchors.device
    anchors, gt_boxes, labels, valid = (t.contiguous() for t in (anchors, gt_boxes, labels, valid))
    cls = torch.empty(B, A, dtype=torch.int64, device=dev)
    box_t = torch.empty(B, A, 4, dtype=torch.float32, device=dev)
    npos = torch.empty(B, dtype=torch.float32, device=dev)
    if backend == "cpu":
        _backend._C.match_anchors(anchors, gt_boxes, labels, valid, mt, ut, ignored_class, cls, box_t, npos, _threads())
    elif backend == "cuda":
        keys = torch.zeros(B, G, dtype=torch.int64, device=dev)  # per gt: IoU bits << 32 | ~anchor (atomicMax)
        npos.zero_()
        _backend._cuda.match_anchors(anchors, gt_boxes, labels, valid, mt, ut, ignored_class, keys, cls, box_t, npos,
                                     *_stream(anchors))
    else:
        from ..triton import losses as tl

        tl.match(anchors, gt_boxes, labels, valid, mt, ut, ignored_class, cls, box_t, npos)
    return cls, box_t, npos
