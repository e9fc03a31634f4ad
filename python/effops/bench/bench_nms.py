"""Benchmark cases of the NMS family: effops vs torchvision (what users run today) and vs the
eager pure-PyTorch reference. Every case first checks that the implementations agree."""

from __future__ import annotations

import sys
from typing import List

import torch

import effops
import effops.ops as E

from .harness import EFFOPS, Case

R = sys.modules["effops.ops.nms"]


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def uniform_boxes(n: int, seed: int, device, img: float = 1000.0):
    """n boxes with sides 1-100 spread over an img x img image; distinct scores."""
    g = _gen(seed)
    xy = torch.rand(n, 2, generator=g) * img
    wh = 1 + torch.rand(n, 2, generator=g) * 99
    scores = torch.randperm(n, generator=g).float() / n
    return torch.cat([xy, xy + wh], 1).to(device), scores.to(device)


def clustered_boxes(n: int, objects: int, seed: int, device, img: float = 1000.0):
    """n boxes jittered around `objects` objects (a detector's raw output)."""
    g = _gen(seed)
    centers = torch.rand(objects, 2, generator=g) * img
    sizes = 20 + torch.rand(objects, 2, generator=g) * 180
    o = torch.randint(0, objects, (n,), generator=g)
    c = centers[o] + torch.randn(n, 2, generator=g) * sizes[o] * 0.1
    wh = (sizes[o] * (1 + 0.1 * torch.randn(n, 2, generator=g))).abs()
    scores = torch.randperm(n, generator=g).float() / n
    return torch.cat([c - wh / 2, c + wh / 2], 1).to(device), scores.to(device)


def anchors(B: int, N: int, C: int, seed: int, device, img: float = 512.0):
    g = _gen(seed)
    xy = torch.rand(B, N, 2, generator=g) * img
    wh = 8 + torch.rand(B, N, 2, generator=g) * 120
    scores = torch.stack([torch.randperm(N * C, generator=g) for _ in range(B)]).float() / (N * C)
    return torch.cat([xy, xy + wh], -1).to(device), scores.view(B, N, C).to(device)


def _same(a, b) -> bool:
    return torch.equal(a.cpu(), b.cpu())


def torchvision_multiclass(boxes, scores, iou_thr, score_thr, M, K):
    """What users write today: top-k over (anchor, class), batched_nms per image, first M."""
    import torchvision

    B, N, C = scores.shape
    out = []
    for b in range(B):
        flat = scores[b].reshape(-1)
        v, top = torch.topk(flat, K)
        top = top[v > score_thr]
        anchor, cls = top // C, top % C
        keep = torchvision.ops.batched_nms(boxes[b, anchor], flat[top], cls, iou_thr)[:M]
        out.append((anchor[keep], cls[keep]))
    return out


def _check_multiclass(outs):
    det, tv = outs[EFFOPS], outs["torchvision"]
    for b, (anchor, cls) in enumerate(tv):
        n = int(det.num_detections[b])
        if n != anchor.numel() or not _same(det.indices[b, :n], anchor) or not _same(det.classes[b, :n], cls):
            return f"image {b}: detections differ"
    return None


def _check_equal(outs):
    ref = outs[EFFOPS]
    for k, v in outs.items():
        if k == EFFOPS:
            continue
        if isinstance(v, tuple):
            v, ref_v = v[0], ref[0]
        else:
            ref_v = ref
        if not _same(v, ref_v):
            return f"{k} differs from effops"
    return None


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    import torchvision

    ops = torchvision.ops
    out: List[Case] = []
    scale = 10 if quick else 1
    gpu = device.type == "cuda"

    def add_triton(impls, fn):
        if gpu and effops._backend.unavailable_reason("triton", device) is None:
            def forced():
                with effops.use_backend("triton"):
                    return fn()
            impls["effops[triton]"] = forced

    for n in (1000, 5000, 20000):
        n //= scale
        b, s = uniform_boxes(n, seed=n, device=device)
        impls = {EFFOPS: lambda b=b, s=s: E.nms(b, s, 0.5), "torchvision": lambda b=b, s=s: ops.nms(b, s, 0.5)}
        if n <= 1000:
            impls["reference"] = lambda b=b, s=s: R.nms_reference(b, s, 0.5)
        add_triton(impls, impls[EFFOPS])
        out.append(Case("nms", f"uniform n={n}", "fp32", impls, _check_equal))

    n = 10000 // scale
    b, s = clustered_boxes(n, max(1, n // 100), seed=1, device=device)
    impls = {EFFOPS: lambda: E.nms(b, s, 0.5), "torchvision": lambda: ops.nms(b, s, 0.5)}
    add_triton(impls, impls[EFFOPS])
    out.append(Case("nms", f"clustered n={n} objects={n // 100}", "fp32", impls, _check_equal))

    n = 10000 // scale
    bb, bs = uniform_boxes(n, seed=2, device=device)
    idx = torch.randint(0, 80, (n,), generator=_gen(3)).to(device)
    impls = {EFFOPS: lambda: E.batched_nms(bb, bs, idx, 0.5), "torchvision": lambda: ops.batched_nms(bb, bs, idx, 0.5)}
    add_triton(impls, impls[EFFOPS])
    out.append(Case("batched_nms", f"n={n} classes=80", "fp32", impls, _check_equal))

    B, N, C, K, M = (8, 5000 // scale, 90, 5000 // scale, 100)
    mb, ms = anchors(B, N, C, seed=4, device=device)
    impls = {
        EFFOPS: lambda: E.multiclass_nms(mb, ms, 0.5, 0.05, M, pre_nms_top_k=K),
        "torchvision": lambda: torchvision_multiclass(mb, ms, 0.5, 0.05, M, K),
    }
    add_triton(impls, impls[EFFOPS])
    out.append(Case("multiclass_nms", f"B={B} N={N} C={C} top_k={K} M={M}", "fp32", impls, _check_multiclass))

    n = 1000 // scale
    sb, ss = clustered_boxes(n, max(1, n // 50), seed=5, device=device)
    impls = {
        EFFOPS: lambda: E.soft_nms(sb, ss, 0.3, 0.5, "gaussian", 0.001),
        "reference": lambda: R.soft_nms_reference(sb, ss, 0.3, 0.5, "gaussian", 0.001),
    }
    add_triton(impls, impls[EFFOPS])
    out.append(Case("soft_nms", f"gaussian clustered n={n}", "fp32", impls, _check_equal))

    n = 2000 // scale
    mb2, ms2 = clustered_boxes(n, max(1, n // 50), seed=6, device=device)
    impls = {
        EFFOPS: lambda: E.matrix_nms(mb2, ms2, None, "gaussian", 2.0, 0.05),
        "reference": lambda: _matrix_reference(mb2, ms2),
    }
    add_triton(impls, impls[EFFOPS])
    out.append(Case("matrix_nms", f"gaussian clustered n={n}", "fp32", impls, _check_equal))
    return out


def _matrix_reference(b, s):
    d = R.matrix_nms_decay_reference(b, s, None, "gaussian", 2.0)
    keep = torch.nonzero(d.double() >= 0.05).flatten()
    keep = keep[torch.sort(d[keep], descending=True, stable=True).indices]
    return keep, d[keep]
