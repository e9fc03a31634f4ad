"""Benchmark cases of the losses family: sigmoid_focal_loss forward + backward on
EfficientDet-D0's class-head outputs (batch 8, 512x512: 49104 anchors x 90 classes) against
torchvision.ops.sigmoid_focal_loss eager and under torch.compile (fp32 and bf16); match_anchors
for a batch of 8 with 50 gt boxes per image against effdet's AnchorLabeler (its per-image loop)."""

from __future__ import annotations

import os
from typing import List

import torch

from ..models.anchors import feature_sizes, generate_anchors
from ..ops import match_anchors, sigmoid_focal_loss, split_levels
from .harness import EFFOPS, Case


def _focal_check(tol):
    def check(outs):
        ref = outs["torchvision (eager)"]
        for k, v in outs.items():
            err = abs(v - ref) / max(abs(ref), 1e-12)
            if not err <= tol:
                return f"{k}: loss {v} vs torchvision's {ref} (relative {err:.2e})"
        return None
    return check


def _train_step(loss_fn, x):
    """Forward + backward of a summed loss; returns its value (the gradient is dropped each call)."""
    def run():
        x.grad = None
        loss = loss_fn(x)
        loss.backward()
        return float(loss.detach())
    return run


def _focal_cases(device, quick: bool) -> List[Case]:
    import torchvision

    batch, size = (1, 128) if quick else (8, 512)
    A = generate_anchors((size, size)).shape[0]  # 49104 at 512
    C = 90
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(-1, C, (batch, A), generator=g)
    cls[torch.rand(batch, A, generator=g) < 0.97] = -1  # ~3% positives, as a labelled batch has at most
    cls[torch.rand(batch, A, generator=g) < 0.01] = -2
    cls = cls.to(device)
    dense = torch.zeros(batch, A, C, device=device)
    dense.scatter_(-1, cls.clamp(min=0)[..., None], (cls >= 0).float()[..., None])
    keep = (cls != -2).float()[..., None]
    out: List[Case] = []
    for dt, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        x = (torch.randn(batch, A, C, generator=g) * 2 - 4).to(device, dt).requires_grad_()
        t = dense.to(dt)

        def tv(x, t=t):
            return (torchvision.ops.sigmoid_focal_loss(x, t, alpha=0.25, gamma=1.5, reduction="none") * keep).sum()

        impls = {
            EFFOPS: _train_step(lambda x: sigmoid_focal_loss(x, cls, alpha=0.25, gamma=1.5, reduction="sum"), x),
            "torchvision (eager)": _train_step(tv, x),
        }
        if not quick:
            torch._dynamo.reset()
            ctv = torch.compile(tv, dynamic=False)
            impls["torchvision (torch.compile)"] = _train_step(ctv, x)
        nbytes = 2 * x.numel() * x.element_size() * 2  # read logits, write grad; backward reads it, writes dlogits
        out.append(Case("sigmoid_focal_loss", f"D0 head fwd+bwd b{batch} {size}x{size} {A}x{C} (class targets)", dname,
                        impls, _focal_check(1e-4 if dt == torch.float32 else 2e-2), bytes_moved=nbytes,
                        note="effops: class-index targets; torchvision: the one-hot and an ignore mask, pre-built"))
    return out


def _match_cases(device, quick: bool) -> List[Case]:
    try:
        from effdet.anchors import Anchors, AnchorLabeler
    except ImportError:
        return []
    batch, size, G = (2, 256, 20) if quick else (8, 512, 50)
    an = Anchors(3, 7, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], 4.0, (size, size))
    labeler = AnchorLabeler(an, 90, match_threshold=0.5)
    anchors = generate_anchors((size, size)).to(device)
    g = torch.Generator().manual_seed(1)
    yx = torch.rand(batch, G, 2, generator=g) * size * 0.9
    hw = torch.rand(batch, G, 2, generator=g) * size * 0.4 + 8
    gt = torch.cat([yx, yx + hw], -1).clamp(max=size)
    classes = torch.randint(1, 91, (batch, G), generator=g).float()
    classes[0, G // 2:] = -1  # padded rows, as a collated batch has
    gt[0, G // 2:] = -1
    feats = feature_sizes((size, size), 7)[3:8]
    gt_d, cls_d = gt.to(device), classes.to(device)

    def ours():
        c, b, n = match_anchors(anchors, gt_d, cls_d)
        cs, bs = split_levels(c, b, feats, 9)
        return cs, bs, n

    def theirs():
        return labeler.batch_label_anchors(gt, classes)

    def check(outs):
        (c1, b1, n1), (c2, b2, n2) = outs[EFFOPS], outs["effdet AnchorLabeler"]
        for a, b in zip(c1, c2):
            if not torch.equal(a.cpu(), b):
                return "class targets differ from effdet's"
        err = max(float((a.cpu() - b).abs().max()) for a, b in zip(b1, b2))
        if err > 1e-5 or not torch.equal(n1.cpu(), n2):
            return f"box targets / positives differ from effdet's (max {err:.2e})"
        return None

    impls = {EFFOPS: lambda: ours(), "effdet AnchorLabeler": theirs}
    return [Case("match_anchors", f"b{batch} {anchors.shape[0]} anchors {G} gt/image", "fp32", impls, check,
                 note="effdet: its per-image Python loop on the CPU tensors")]


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return _match_cases(device, quick)
    return _focal_cases(device, quick) + _match_cases(device, quick)
