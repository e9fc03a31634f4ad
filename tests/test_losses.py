"""Detection losses: sigmoid_focal_loss against torchvision and effdet's focal loss (dense and
class-index targets, ignore, label smoothing, reductions, gradients), low precision within the
2x-eager rule and finite at +-100; box_loss against effdet's Huber and torchvision's GIoU;
match_anchors against effdet's AnchorLabeler (padded gt, no gt, border boxes, IoU ties, the
ignored band); every backend; gradcheck, opcheck, torch.compile; bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torchvision

import effops
import effops.ops._losses_ref as R
from effops.ops import EffopsInputError, EffopsTypeError, box_loss, match_anchors, sigmoid_focal_loss, split_levels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
effdet_loss = pytest.importorskip("effdet.loss")
effdet_anchors = pytest.importorskip("effdet.anchors")

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def logits_like(shape, seed=0, scale=4.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen(seed), dtype=F64) * scale).to(dtype)


def class_targets(shape, C, seed=0):
    return torch.randint(-2, C, shape, generator=gen(seed + 1))


def one_hot(cls, C):
    return effdet_loss.one_hot(cls, C).to(F64)


# =============================================================================== focal: parity
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.0), (0.25, 1.5), (0.75, 0.5)])
def test_focal_matches_torchvision_dense(backend_device, reduction, alpha, gamma):
    _, dev = backend_device
    x = logits_like((3, 17, 11)).to(dev)
    t = (torch.rand(3, 17, 11, generator=gen(5)) > 0.8).float().to(dev)
    want = torchvision.ops.sigmoid_focal_loss(x.double(), t.double(), alpha=alpha, gamma=gamma, reduction=reduction)
    got = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
    # float64 in: float64 out, equal to torchvision's float64 to rounding
    got64 = sigmoid_focal_loss(x.double(), t.double(), alpha=alpha, gamma=gamma, reduction=reduction)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_focal_gradient_matches_torchvision_autograd(backend_device, reduction):
    _, dev = backend_device
    x0 = logits_like((40, 13), seed=3).to(dev)
    t = torch.rand(40, 13, generator=gen(4)).to(dev)  # soft targets: the general (non-binary) path
    for gamma in (2.0, 1.5, 0.0):
        xr = x0.double().requires_grad_()
        want = torchvision.ops.sigmoid_focal_loss(xr, t.double(), gamma=gamma, reduction=reduction)
        w = torch.rand(want.shape, generator=gen(9), dtype=F64).to(dev) if reduction == "none" else torch.tensor(1.7, dtype=F64)
        (gw,) = torch.autograd.grad((want * w).sum(), xr)
        x = x0.clone().requires_grad_()
        got = sigmoid_focal_loss(x, t, gamma=gamma, reduction=reduction)
        (gg,) = torch.autograd.grad((got * w.to(got.dtype)).sum(), x)
        torch.testing.assert_close(gg.double(), gw, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("C", [1, 7, 90])
def test_focal_class_targets_match_effdet(backend_device, label_smoothing, C):
    """effdet's per-level loss: one_hot(cls) -> new_focal_loss -> * (cls != -2), summed."""
    _, dev = backend_device
    x0 = logits_like((2, 5, 6, C), seed=C).to(dev)
    cls = class_targets((2, 5, 6), C, seed=C).to(dev)
    xr = x0.double().requires_grad_()
    want = effdet_loss.new_focal_loss(xr, one_hot(cls, C), alpha=0.25, gamma=1.5, normalizer=1.0,
                                      label_smoothing=label_smoothing)
    want = (want * (cls != -2).unsqueeze(-1)).sum()
    (gw,) = torch.autograd.grad(want, xr)
    x = x0.clone().requires_grad_()
    got = sigmoid_focal_loss(x, cls, alpha=0.25, gamma=1.5, reduction="sum", label_smoothing=label_smoothing)
    (gg,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gg.double(), gw, rtol=1e-4, atol=1e-6)


def test_focal_ignore_masks(backend_device):
    _, dev = backend_device
    x = logits_like((9, 6), seed=2).to(dev)
    t = (torch.rand(9, 6, generator=gen(3)) > 0.5).float().to(dev)
    rows = (torch.rand(9, generator=gen(4)) > 0.6).to(dev)
    elems = (torch.rand(9, 6, generator=gen(5)) > 0.6).to(dev)
    full = torchvision.ops.sigmoid_focal_loss(x.double(), t.double())
    for ig, keep in ((rows, ~rows[:, None].expand(9, 6)), (elems, ~elems)):
        got = sigmoid_focal_loss(x, t, ignore=ig)
        torch.testing.assert_close(got.double(), full * keep, rtol=2e-5, atol=2e-6)
        assert (got[~keep] == 0).all()
    # class targets: -2 rows and an ignore mask combine
    cls = class_targets((9,), 6, seed=8).to(dev)
    got = sigmoid_focal_loss(x, cls, ignore=rows, reduction="none")
    want = torchvision.ops.sigmoid_focal_loss(x.double(), one_hot(cls, 6))
    want = want * ((cls != -2) & ~rows)[:, None]
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_focal_class_out_of_range_is_an_error_on_the_cpu():
    x = torch.randn(4, 5)
    for be in ("cpu", "reference"):
        with effops.use_backend(be):
            with pytest.raises(EffopsInputError, match="class 5"):
                sigmoid_focal_loss(x, torch.tensor([0, 5, 1, -1]))


@pytest.mark.triton
def test_focal_class_out_of_range_is_nan_on_triton():
    if effops._backend.unavailable_reason("triton", torch.device("cpu")):
        pytest.skip("triton backend unavailable")
    with effops.use_backend("triton"):
        out = sigmoid_focal_loss(torch.randn(4, 5), torch.tensor([0, 5, 1, -1]))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


def test_focal_empty_inputs():
    for shape in ((0, 5), (3, 0)):
        x = torch.randn(shape, requires_grad=True)
        t = torch.zeros(shape)
        assert sigmoid_focal_loss(x, t, reduction="none").shape == shape
        s = sigmoid_focal_loss(x, t, reduction="sum")
        assert s.item() == 0.0
        s.backward()
        assert x.grad.shape == shape
        assert math.isnan(sigmoid_focal_loss(x, t, reduction="mean").item())


def test_focal_sum_is_deterministic_across_thread_counts():
    x = logits_like((3000, 90), seed=11)
    cls = class_targets((3000,), 90, seed=11)
    before = torch.get_num_threads()
    try:
        sums = []
        for th in (1, 2):
            torch.set_num_threads(th)
            sums.append(sigmoid_focal_loss(x, cls, reduction="sum").item())
    finally:
        torch.set_num_threads(before)
    assert sums[0] == sums[1]


@pytest.mark.parametrize("level", effops._backend.ISA_LEVELS)
def test_focal_cpu_every_isa_level(level):
    if effops._backend.ISA_LEVELS.index(level) > effops._backend.ISA_LEVELS.index(effops.detected_isa()):
        pytest.skip(f"this CPU has no {level}")
    x = logits_like((50, 37), seed=12).requires_grad_()
    cls = class_targets((50,), 37, seed=12)
    want = torchvision.ops.sigmoid_focal_loss(x.double(), one_hot(cls, 37) * 0.8 + 0.1, gamma=1.5).sum()
    with effops.use_isa(level), effops.use_backend("cpu"):
        got = sigmoid_focal_loss(x, one_hot(cls, 37).float() * 0.8 + 0.1, gamma=1.5, reduction="sum")
        got2 = sigmoid_focal_loss(x, cls, gamma=2.0, reduction="sum")
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    want2 = (torchvision.ops.sigmoid_focal_loss(x.double(), one_hot(cls, 37)) * (cls != -2)[:, None]).sum()
    torch.testing.assert_close(got2.double(), want2.detach(), rtol=1e-5, atol=1e-5)


# =============================================================================== focal: low precision
def _eager_error(x, t, gamma, ref_loss, ref_grad):
    """Max error of torchvision eager in x's dtype (loss, grad) against the float64 values."""
    xe = x.clone().requires_grad_()
    le = torchvision.ops.sigmoid_focal_loss(xe, t.to(x.dtype), gamma=gamma)
    (ge,) = torch.autograd.grad(le.sum(), xe)
    return ((le.double() - ref_loss).abs().nan_to_num(math.inf).max().item(),
            (ge.double() - ref_grad).abs().nan_to_num(math.inf).max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_focal_low_precision_within_twice_eager_error(backend_device, dtype, gamma):
    _, dev = backend_device
    x = logits_like((64, 33), seed=21, scale=3.0).to(dtype).to(dev)
    cls = class_targets((64,), 33, seed=21).to(dev)
    t = one_hot(cls, 33).clamp(min=0).to(dev)
    xr = x.double().requires_grad_()
    ref = torchvision.ops.sigmoid_focal_loss(xr, t, gamma=gamma)
    (ref_g,) = torch.autograd.grad(ref.sum(), xr)
    el, eg = _eager_error(x, t, gamma, ref.detach(), ref_g)
    xg = x.clone().requires_grad_()
    got = sigmoid_focal_loss(xg, t, gamma=gamma)
    (gg,) = torch.autograd.grad(got.sum(), xg)
    assert got.dtype == dtype and gg.dtype == dtype
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    assert (got.double() - ref.detach()).abs().max().item() <= 2 * el + atol
    assert (gg.double() - ref_g).abs().max().item() <= 2 * eg + atol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("targets", ["dense", "class"])
def test_focal_extreme_logits_finite_and_exact(backend_device, dtype, targets):
    _, dev = backend_device
    x = torch.tensor([[100.0, -100.0, 30.0, -30.0, 0.0, 1e-3, 60.0, -60.0]] * 3, dtype=dtype, device=dev)
    cls = torch.tensor([0, 1, -1], device=dev)
    t = one_hot(cls, 8).to(dev) if targets == "dense" else cls
    for gamma in (2.0, 1.5, 0.5, 0.0):
        xg = x.clone().requires_grad_()
        loss = sigmoid_focal_loss(xg, t, gamma=gamma)
        (g,) = torch.autograd.grad(loss.sum(), xg)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all(), (gamma, loss, g)
        xr = x.double().requires_grad_()
        ref = torchvision.ops.sigmoid_focal_loss(xr, one_hot(cls, 8).to(dev), gamma=gamma)
        (rg,) = torch.autograd.grad(ref.sum(), xr)
        # torchvision's float64 autograd is NaN where q = 0 and gamma < 1 (0^(gamma-1) * 0): the
        # explicit float64 adjoint is the oracle there, and equals torchvision's elsewhere
        _, eg = R.sigmoid_focal_loss_reference(x.double(), one_hot(cls, 8).to(dev), None, 0.25, gamma, 0.0, "none")
        fin = torch.isfinite(rg)
        torch.testing.assert_close(eg[fin], rg[fin], rtol=1e-9, atol=1e-12)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(g.double(), eg, rtol=tol, atol=tol)


def test_focal_autocast_returns_float32():
    x = logits_like((8, 5)).to(torch.bfloat16)
    t = torch.randint(-1, 5, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sigmoid_focal_loss(x, t, reduction="sum")
    assert out.dtype == torch.float32
    assert sigmoid_focal_loss(x, t, reduction="sum").dtype == torch.bfloat16


# =============================================================================== box loss
@pytest.mark.parametrize("kind", ["huber", "l1"])
@pytest.mark.parametrize("mask_kind", ["effdet", "per_box", "per_coord"])
def test_box_loss_matches_effdet(backend_device, kind, mask_kind):
    _, dev = backend_device
    g = gen(31)
    pred0 = (torch.randn(2, 6, 5, 36, generator=g, dtype=F64) * 0.2).to(dev)
    tgt = (torch.randn(2, 6, 5, 36, generator=g, dtype=F64) * 0.2)
    pos = torch.rand(2, 6, 5, 9, generator=g) > 0.7
    tgt = (tgt.view(2, 6, 5, 9, 4) * pos[..., None]).view(2, 6, 5, 36).to(dev)
    pr = pred0.clone().requires_grad_()
    if mask_kind == "effdet":
        mask, wmask = None, (tgt != 0).to(F64)
    elif mask_kind == "per_box":
        mask = pos.to(dev).reshape(-1)
        wmask = pos[..., None].expand(2, 6, 5, 9, 4).reshape(2, 6, 5, 36).to(F64).to(dev)
    else:
        mask = (torch.rand(2, 6, 5, 36, generator=g) > 0.3).to(dev)
        wmask = mask.to(F64)
        mask = mask.reshape(-1, 4)
    if kind == "huber":
        want = effdet_loss.huber_loss(pr, tgt, delta=0.1, weights=wmask, size_average=False)
    else:
        want = ((pr - tgt).abs() * wmask).sum()
    (gw,) = torch.autograd.grad(want, pr)
    p = pred0.float().requires_grad_()
    got = box_loss(p.reshape(-1, 4), tgt.float().reshape(-1, 4), mask, kind=kind, delta=0.1)
    (gg,) = torch.autograd.grad(got, p)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gg.double(), gw, rtol=1e-5, atol=1e-6)
    if mask_kind == "effdet" and kind == "huber":  # effdet's _box_loss normalisation
        n = torch.tensor(7.0)
        eff = effdet_loss._box_loss(pred0.double(), tgt, n, delta=0.1)
        torch.testing.assert_close((got / (4 * n)).double(), eff, rtol=1e-5, atol=1e-7)


def _boxes(n, seed, dtype=F64):
    g = gen(seed)
    xy = torch.rand(n, 2, generator=g, dtype=F64) * 50
    wh = torch.rand(n, 2, generator=g, dtype=F64) * 30 + 0.5
    return torch.cat([xy, xy + wh], 1).to(dtype)


def test_box_loss_giou_matches_torchvision(backend_device):
    _, dev = backend_device
    p0, t = _boxes(200, 1).to(dev), _boxes(200, 2).to(dev)
    t[:20] = p0[:20]  # identical boxes
    t[20:30] = p0[20:30] + 100  # disjoint
    mask = (torch.rand(200, generator=gen(3)) > 0.2).to(dev)
    pr = p0.clone().requires_grad_()
    want = (torchvision.ops.generalized_box_iou_loss(pr, t, reduction="none") * mask).sum()
    (gw,) = torch.autograd.grad(want, pr)
    p = p0.float().requires_grad_()
    got = box_loss(p, t.float(), mask, kind="giou")
    (gg,) = torch.autograd.grad(got, p)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gg.double(), gw, rtol=1e-4, atol=1e-5)
    per = box_loss(p0.float(), t.float(), mask, kind="giou", reduction="none")
    assert per.shape == (200,)
    torch.testing.assert_close(per.sum(), got.detach(), rtol=1e-5, atol=1e-5)


def test_box_loss_gradcheck_float64():
    p = _boxes(12, 4).requires_grad_()
    t = _boxes(12, 5)
    mask = torch.rand(12, generator=gen(6), dtype=F64)
    for kind in ("giou", "huber", "l1"):
        tt = t if kind == "giou" else p.detach() + torch.randn(12, 4, generator=gen(7), dtype=F64) * 0.3
        assert torch.autograd.gradcheck(lambda p: box_loss(p, tt, mask, kind=kind, delta=0.1), (p,))
        assert torch.autograd.gradcheck(lambda p: box_loss(p, tt, mask, kind=kind, reduction="none"), (p,))


# =============================================================================== matching
ASPECTS = [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]


def _labeler(size, match=0.5):
    an = effdet_anchors.Anchors(3, 7, 3, ASPECTS, 4.0, size)
    return an, effdet_anchors.AnchorLabeler(an, 90, match_threshold=match)


def _check_against_effdet(an, lab, gt, cls, **kw):
    ct, bt, npos = lab.batch_label_anchors(gt, cls)
    c, b, n = match_anchors(an.boxes, gt, cls, **kw)
    cs, bs = split_levels(c, b, [an.feat_sizes[lv] for lv in range(3, 8)], an.get_anchors_per_location())
    for lv in range(5):
        assert torch.equal(cs[lv], ct[lv]), lv
        torch.testing.assert_close(bs[lv], bt[lv], rtol=1e-6, atol=2e-7)
    assert torch.equal(n, npos)
    return c, b, n


def _random_gt(B, G, size, seed, min_wh=4.0):
    g = gen(seed)
    yx = torch.rand(B, G, 2, generator=g) * size * 0.8
    hw = torch.rand(B, G, 2, generator=g) * size * 0.5 + min_wh
    gt = torch.cat([yx, yx + hw], -1).clamp(max=size)
    cls = torch.randint(1, 91, (B, G), generator=g).float()
    return gt, cls


def test_match_anchors_matches_effdet_labeler(backend_device):
    _, dev = backend_device
    an, lab = _labeler((128, 128))
    gt, cls = _random_gt(5, 9, 128, seed=1)
    cls[1, 4:] = -1  # padded rows
    gt[1, 4:] = -1
    cls[2] = -1  # an image with no gt
    gt[2] = -1
    gt[3, 0] = torch.tensor([0.0, 0.0, 128.0, 128.0])  # the whole image (on the border)
    gt[3, 1] = torch.tensor([0.0, 100.0, 28.0, 128.0])  # touching two borders
    gt[3, 2] = gt[3, 3]  # duplicate gt: per-anchor IoU ties (the first gt wins)
    gt[4, 5] = torch.tensor([60.0, 60.0, 60.5, 60.5])  # tiny: IoU < 0.5 everywhere, force-matched
    if dev.type != "cpu":
        pytest.skip("effdet's labeler runs on the CPU")
    _check_against_effdet(an, lab, gt, cls)
    c, b, n = match_anchors(an.boxes, gt, cls)
    assert n[2] == 0 and (c[2] == -1).all() and (b[2] == 0).all()
    # num_valid marks the same padding as the -1 classes
    cls2 = cls.clone()
    cls2[1, 4:] = 5.0
    c2, b2, n2 = match_anchors(an.boxes, gt, cls2, num_valid=torch.tensor([9, 4, 0, 9, 9]))
    assert torch.equal(c2, c) and torch.equal(b2, b) and torch.equal(n2, n)


def test_match_anchors_anchor_ties_take_the_first_anchor(backend_device):
    """A gt centred between anchors (equal IoU with several): effdet's argmax takes the first,
    and two gts claiming the same best anchor: the lower gt index wins it."""
    _, dev = backend_device
    an, lab = _labeler((64, 64))
    A = an.boxes
    # a box equal to the union midpoint of two same-shape neighbouring level-3 anchors
    a0, a1 = A[0], A[9]  # same octave/aspect, adjacent positions
    mid = (a0 + a1) / 2
    gt = torch.stack([mid, mid + 0.0, A[5]])[None]  # gt 0 and 1 identical: both claim the same anchor
    cls = torch.tensor([[3.0, 7.0, 11.0]])
    if dev.type == "cpu":
        c, _, _ = _check_against_effdet(an, lab, gt, cls)
        assert (c == 2).any() and not (c == 6).any()  # gt 0 (class 3 -> 2) won every tie over gt 1
    c, b, n = match_anchors(A.to(dev), gt.to(dev), cls.to(dev))
    want = match_anchors(A, gt, cls)
    assert torch.equal(c.cpu(), want[0]) and torch.equal(n.cpu(), want[2])


def test_match_anchors_ignored_band_matches_effdet_matcher():
    """unmatched_threshold < match_threshold: effdet's ArgMaxMatcher marks the band -2; its
    labeler then writes -1 there (ignored_class=-1 reproduces it), the loss ignores -2."""
    from effdet.object_detection import ArgMaxMatcher, BoxList, FasterRcnnBoxCoder, IouSimilarity, TargetAssigner

    an, _ = _labeler((128, 128))
    gt, cls = _random_gt(3, 6, 128, seed=7)
    ta = TargetAssigner(IouSimilarity(), ArgMaxMatcher(0.5, 0.4, True, True), FasterRcnnBoxCoder())
    c, b, n = match_anchors(an.boxes, gt, cls, match_threshold=0.5, unmatched_threshold=0.4)
    c1, _, _ = match_anchors(an.boxes, gt, cls, match_threshold=0.5, unmatched_threshold=0.4, ignored_class=-1)
    for i in range(3):
        ct, bt, m = ta.assign(BoxList(an.boxes), BoxList(gt[i]), cls[i])
        assert torch.equal(c1[i], (ct - 1).long())
        assert torch.equal(c[i] == -2, m.match_results == -2) and (m.match_results == -2).any()
        torch.testing.assert_close(b[i], bt, rtol=1e-6, atol=2e-7)
        assert n[i].item() == (m.match_results >= 0).sum().item()


@pytest.mark.parametrize("G", [0, 1, 50])
def test_match_anchors_backends_agree(backend_device, G):
    _, dev = backend_device
    an, _ = _labeler((256, 256))
    gt, cls = _random_gt(3, G, 256, seed=G + 3, min_wh=2.0)
    if G:
        cls[0, G // 2:] = -1
    want = R.match_anchors_reference(an.boxes, gt, (cls - 1).long(), cls > -1, 0.5, 0.5)
    got = match_anchors(an.boxes.to(dev), gt.to(dev), cls.to(dev))
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[2].cpu(), want[2])
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-6, atol=2e-7)


def test_match_anchors_xyxy_and_class_offset():
    an, _ = _labeler((128, 128))
    gt, cls = _random_gt(2, 5, 128, seed=9)
    c, b, n = match_anchors(an.boxes, gt, cls)
    xy = [1, 0, 3, 2]
    c2, b2, n2 = match_anchors(an.boxes[:, xy], gt[..., xy], cls - 1, box_format="xyxy", class_offset=0)
    assert torch.equal(c, c2) and torch.equal(b, b2) and torch.equal(n, n2)


def test_split_levels_layout_and_errors():
    an, lab = _labeler((128, 128))
    c = torch.arange(2 * an.boxes.shape[0]).view(2, -1)
    b = torch.zeros(2, an.boxes.shape[0], 4)
    cs, bs = split_levels(c, b, [an.feat_sizes[lv] for lv in range(3, 8)])
    assert [tuple(t.shape) for t in cs] == [(2, 16, 16, 9), (2, 8, 8, 9), (2, 4, 4, 9), (2, 2, 2, 9), (2, 1, 1, 9)]
    assert bs[0].shape == (2, 16, 16, 36) and cs[1][0, 0, 0, 0] == 16 * 16 * 9
    with pytest.raises(EffopsInputError, match="split_levels"):
        split_levels(c, b, [(16, 16)])


def test_ops_reproduce_effdets_detection_loss():
    """effdet's loss_fn fed match_anchors' split targets equals it fed its own labeler's, and the
    fused ops (focal sum, Huber sum) reproduce its value with its normalisation."""
    an, lab = _labeler((128, 128))
    gt, cls = _random_gt(2, 6, 128, seed=13)
    cls[1, 4:] = -1
    feats = [an.feat_sizes[lv] for lv in range(3, 8)]
    g = gen(14)
    cls_out = [torch.randn(2, 9 * 6, h, w, generator=g) for h, w in feats]
    box_out = [torch.randn(2, 36, h, w, generator=g) * 0.1 for h, w in feats]
    ct, bt, npos = lab.batch_label_anchors(gt, cls)
    c, b, n = match_anchors(an.boxes, gt, cls)
    cs, bs = split_levels(c, b, feats)
    kw = dict(num_classes=6, alpha=0.25, gamma=1.5, delta=0.1, box_loss_weight=50.0)
    cs6 = [torch.where(t >= 6, torch.full_like(t, -1), t) for t in cs]  # 6 classes: fold the rest into background
    ct6 = [torch.where(t >= 6, torch.full_like(t, -1), t) for t in ct]
    ref = effdet_loss.loss_fn(cls_out, box_out, ct6, bt, npos, **kw)
    via = effdet_loss.loss_fn(cls_out, box_out, cs6, bs, n, **kw)
    torch.testing.assert_close(torch.stack(via), torch.stack(ref), rtol=1e-6, atol=1e-6)
    norm = n.sum() + 1.0
    flat_cls = torch.cat([o.permute(0, 2, 3, 1).reshape(2, -1, 6) for o in cls_out], 1)
    flat_box = torch.cat([o.permute(0, 2, 3, 1).reshape(2, -1, 4) for o in box_out], 1)
    c6 = torch.where(c >= 6, torch.full_like(c, -1), c)
    lc = sigmoid_focal_loss(flat_cls, c6, alpha=0.25, gamma=1.5, reduction="sum") / norm
    lb = box_loss(flat_box, b, None, kind="huber", delta=0.1) / (4 * norm)
    torch.testing.assert_close(torch.stack([lc + 50 * lb, lc, lb]), torch.stack(ref), rtol=1e-5, atol=1e-6)


# =============================================================================== registration
def test_gradcheck_focal_float64():
    x = logits_like((6, 5), seed=40, dtype=F64).requires_grad_()
    cls = class_targets((6,), 5, seed=40)
    t = torch.rand(6, 5, generator=gen(41), dtype=F64)
    for gamma in (2.0, 1.5, 0.5):
        assert torch.autograd.gradcheck(
            lambda x: sigmoid_focal_loss(x, cls, gamma=gamma, label_smoothing=0.1, reduction="mean"), (x,))
        assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, t, gamma=gamma), (x,))


def test_opcheck():
    x = torch.randn(7, 5, requires_grad=True)
    cls = torch.randint(-2, 5, (7,))
    ig = torch.rand(7) > 0.5
    for args in ((x, cls, None, 0.25, 1.5, 0.1, 1, False, True), (x, torch.rand(7, 5), ig, 0.25, 2.0, 0.0, 0, False, True),
                 (x.detach(), cls, None, -1.0, 0.0, 0.0, 2, True, False)):
        torch.library.opcheck(torch.ops.effops.sigmoid_focal_loss.default, args)
    xt = torch.randn(5, 7).t().requires_grad_()  # strided (transposed) logits
    torch.library.opcheck(torch.ops.effops.sigmoid_focal_loss.default,
                          (xt, torch.randint(-2, 5, (7,)), None, 0.25, 2.0, 0.0, 1, False, True))
    p = _boxes(9, 1).float().requires_grad_()
    t = _boxes(9, 2).float()
    for kind in (0, 2):
        torch.library.opcheck(torch.ops.effops.box_loss.default, (p, t, torch.rand(9), kind, 0.1, 1, True))
    an, _ = _labeler((64, 64))
    gt, cls = _random_gt(2, 4, 64, seed=3)
    torch.library.opcheck(torch.ops.effops.match_anchors.default,
                          (an.boxes, gt, (cls - 1).long(), (cls > -1).to(torch.uint8), 0.5, 0.4, -2))


def test_torch_compile_fullgraph():
    an, _ = _labeler((64, 64))
    gt, cls = _random_gt(2, 4, 64, seed=5)
    A = an.boxes.shape[0]
    cls_out = torch.randn(2, A, 6)
    box_out = torch.randn(2, A, 4) * 0.1

    def step(cls_out, box_out):
        ct, bt, npos = match_anchors(an.boxes, gt, cls.clamp(max=6))
        norm = npos.sum() + 1.0
        lc = sigmoid_focal_loss(cls_out, ct, gamma=1.5, reduction="sum") / norm
        lb = box_loss(box_out, bt, ct >= 0) / (4 * norm)
        return lc + 50 * lb

    compiled = torch.compile(step, fullgraph=True)
    a, b = cls_out.clone().requires_grad_(), box_out.clone().requires_grad_()
    ea, eb = cls_out.clone().requires_grad_(), box_out.clone().requires_grad_()
    got, want = compiled(a, b), step(ea, eb)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, ea.grad)
    torch.testing.assert_close(b.grad, eb.grad)


def test_backends_listed():
    caps = effops._backend.capabilities()
    for op in ("sigmoid_focal_loss", "box_loss", "match_anchors"):
        assert {"cpu", "triton", "reference"} <= set(caps[op])


# =============================================================================== bad input
def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 5)
    cases = [
        (lambda: sigmoid_focal_loss(x.long(), torch.zeros(4)), EffopsTypeError, "logits"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 6)), EffopsInputError, "targets"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(5, dtype=torch.int64)), EffopsInputError, "targets"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, dtype=torch.bool)), EffopsTypeError, "targets"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 5), reduction="avg"), EffopsInputError, "reduction"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 5), gamma=-1), EffopsInputError, "gamma"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 5), gamma=math.nan), EffopsInputError, "gamma"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 5), label_smoothing=1.5), EffopsInputError, "label_smoothing"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 5), ignore=torch.zeros(3, dtype=torch.bool)), EffopsInputError,
         "ignore"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 5), ignore=torch.zeros(4)), EffopsTypeError, "ignore"),
        (lambda: sigmoid_focal_loss(x, torch.zeros(4, 5, device="meta")), EffopsInputError, "device"),
        (lambda: sigmoid_focal_loss(torch.tensor(1.0), torch.tensor(1.0)), EffopsInputError, "logits"),
        (lambda: box_loss(x, x, None), EffopsInputError, "pred"),
        (lambda: box_loss(torch.zeros(3, 4), torch.zeros(2, 4), None), EffopsInputError, "target"),
        (lambda: box_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2)), EffopsInputError, "mask"),
        (lambda: box_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, 4), kind="giou"), EffopsInputError, "mask"),
        (lambda: box_loss(torch.zeros(3, 4), torch.zeros(3, 4), None, kind="smooth"), EffopsInputError, "kind"),
        (lambda: box_loss(torch.zeros(3, 4), torch.zeros(3, 4), None, delta=0), EffopsInputError, "delta"),
        (lambda: box_loss(torch.zeros(3, 4), torch.zeros(3, 4, requires_grad=True), None), EffopsInputError, "target"),
        (lambda: box_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, dtype=torch.int32)), EffopsTypeError,
         "mask"),
        (lambda: match_anchors(torch.zeros(5, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2)), EffopsInputError, "anchors"),
        (lambda: match_anchors(torch.zeros(5, 4), torch.zeros(2, 4), torch.zeros(1, 2)), EffopsInputError, "gt_boxes"),
        (lambda: match_anchors(torch.zeros(5, 4), torch.zeros(1, 2, 4), torch.zeros(1, 3)), EffopsInputError,
         "gt_classes"),
        (lambda: match_anchors(torch.zeros(5, 4, dtype=torch.int32), torch.zeros(1, 2, 4), torch.zeros(1, 2)),
         EffopsTypeError, "anchors"),
        (lambda: match_anchors(torch.zeros(5, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2), unmatched_threshold=0.6),
         EffopsInputError, "unmatched_threshold"),
        (lambda: match_anchors(torch.zeros(5, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2), num_valid=torch.ones(2)),
         EffopsTypeError, "num_valid"),
        (lambda: match_anchors(torch.zeros(5, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2), box_format="cxcywh"),
         EffopsInputError, "box_format"),
        (lambda: match_anchors(torch.zeros(5, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2), match_threshold=math.nan),
         EffopsInputError, "match_threshold"),
    ]
    for fn, err, word in cases:
        with pytest.raises(err, match=word):
            fn()


# =============================================================================== Triton: compiles for GPUs
def _compile_ptx(fn, signature, constexprs, arch):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False}).asm["ptx"]


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_to_ptx(arch):
    """The interpreter accepts programs the compiler rejects: compile each kernel for real GPUs,
    and check the matcher's IoU uses IEEE division without fused multiply-adds."""
    import re

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("the interpreter replaces the kernels by Python functions (compiled in the default run)")
    from effops.triton import losses as tls

    focal_sig = {"x_ptr": "*bf16", "cls_ptr": "*i64", "dense_ptr": "*fp32", "ign_ptr": "*u8", "loss_ptr": "*fp32",
                 "part_ptr": "*fp32", "grad_ptr": "*bf16", "n": "i64", "C": "i64", "alpha1": "fp32", "alpha0": "fp32",
                 "gamma": "fp32", "ls_scale": "fp32", "ls_add": "fp32",
                 **{k: "constexpr" for k in ("DENSE", "IGN", "GMODE", "STORE", "GRAD", "BLOCK")}}
    ptx = _compile_ptx(tls._focal_kernel, focal_sig,
                       dict(DENSE=False, IGN=1, GMODE=3, STORE=False, GRAD=True, BLOCK=1024), arch)
    assert ".entry" in ptx
    box_sig = {"p_ptr": "*fp32", "g_ptr": "*fp32", "m_ptr": "*fp32", "loss_ptr": "*fp32", "part_ptr": "*fp32",
               "grad_ptr": "*fp32", "N": "i32", "delta": "fp32",
               **{k: "constexpr" for k in ("KIND", "MASK4", "STORE", "GRAD", "BLOCK")}}
    for kind in (0, 2):
        assert ".entry" in _compile_ptx(tls._box_kernel, box_sig,
                                        dict(KIND=kind, MASK4=False, STORE=False, GRAD=True, BLOCK=256), arch)
    p1 = {"an_ptr": "*fp32", "gt_ptr": "*fp32", "valid_ptr": "*u8", "best_ptr": "*fp32", "arg_ptr": "*i32",
          "gb_ptr": "*fp32", "gi_ptr": "*i64", "A": "i32", "G": "i32", "nblk": "i32", "BLOCK": "constexpr"}
    ptx = _compile_ptx(tls._match_pass1, p1, {"BLOCK": 256}, arch)
    assert re.search(r"div\.rn\.f32", ptx) and not re.search(r"div\.(full|approx)\.f32", ptx)
    assert not re.search(r"fma\.rn\.f32", ptx)
    p2 = {"gb_ptr": "*fp32", "gi_ptr": "*i64", "valid_ptr": "*u8", "fa_ptr": "*i64", "G": "i32", "nblk": "i32",
          "BLOCK": "constexpr"}
    assert ".entry" in _compile_ptx(tls._match_pass2, p2, {"BLOCK": 64}, arch)
    p3 = {"an_ptr": "*fp32", "gt_ptr": "*fp32", "lab_ptr": "*i64", "best_ptr": "*fp32", "arg_ptr": "*i32",
          "fa_ptr": "*i64", "cls_ptr": "*i64", "box_ptr": "*fp32", "cnt_ptr": "*i32", "A": "i32", "G": "i32",
          "nblk": "i32", "mt": "fp32", "ut": "fp32", "ignored_class": "i64", "BLOCK": "constexpr"}
    assert ".entry" in _compile_ptx(tls._match_pass3, p3, {"BLOCK": 256}, arch)
