"""Smoke suite for an installed effops (a wheel under some torch version): every public op on the
CPU against its pure-PyTorch reference, a backward, a converted model, torch.compile of nms and
dwsep_conv. It needs only torch, numpy and pytest (torchvision for the converted model) and runs
in well under a minute, so .ci/torch-matrix can run it under the oldest and newest torch.

``EFFOPS_SMOKE_EXPECT_INSTALLED=1`` (set by .ci/torch-matrix and .ci/wheel-smoke) also checks that
effops was imported from site-packages, not from a source checkout, and that its compiled CPU
module loaded."""

from __future__ import annotations

import os

import pytest
import torch

import effops
from effops import ops
from effops._compat import parse_version

# The first torch whose torch.compile(fullgraph=True) traces ops with data-dependent output
# sizes (nms's keep) without torch._dynamo.config.capture_dynamic_output_shape_ops = True: 2.4
# and 2.5 fail without it (run), and dynamo's OutputGraph allows them under fullgraph from 2.10
# on (read in the 2.6-2.11 wheels).
DYNAMIC_SHAPES_BY_ITSELF = (2, 10)

# Public ops with a case below; a new public op must get one (test_every_public_op_is_covered).
COVERED = {"nms", "batched_nms", "multiclass_nms", "soft_nms", "matrix_nms", "dwsep_conv", "dw_conv_act",
           "pw_conv", "weighted_fuse", "sigmoid_focal_loss", "box_loss", "match_anchors", "split_levels",
           "q_dw_conv_act", "q_pw_conv", "q_dwsep_conv", "q_weighted_fuse", "batch_norm_act"}
NOT_OPS = {"MultiClassNMSResult", "EffopsInputError", "EffopsTypeError"}


def _boxes(n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], 1).to(dtype), torch.rand(n, generator=g).to(dtype)


def _reference(fn, *args, **kwargs):
    with effops.use_backend("reference"):
        return fn(*args, **kwargs)


def test_installed_build():
    if os.environ.get("EFFOPS_SMOKE_EXPECT_INSTALLED") != "1":
        pytest.skip("EFFOPS_SMOKE_EXPECT_INSTALLED is not set")
    assert "site-packages" in effops.__file__, effops.__file__
    info = effops._backend.build_info()
    assert isinstance(info["cpu"], dict), info["cpu"]
    assert effops._backend.select("nms", torch.device("cpu")) == "cpu"


def test_every_public_op_is_covered():
    public = set(ops.__all__) - NOT_OPS
    assert public - COVERED == set(), "add a smoke case to tests/test_wheel_smoke.py for these ops"


def test_nms_family_vs_reference():
    boxes, scores = _boxes(300)
    from effops.ops.nms import batched_nms_reference, nms_reference

    keep = ops.nms(boxes, scores, 0.5)
    assert 0 < keep.numel() < 300
    assert torch.equal(keep, nms_reference(boxes, scores, 0.5))
    classes = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ops.batched_nms(boxes, scores, classes, 0.5),
                       batched_nms_reference(boxes, scores, classes, 0.5))

    b = boxes.reshape(3, 100, 4)
    s = torch.rand(3, 100, 7, generator=torch.Generator().manual_seed(2))
    got = ops.multiclass_nms(b, s, 0.5, score_threshold=0.1, max_output_boxes=20, pre_nms_top_k=200)
    want = _reference(ops.multiclass_nms, b, s, 0.5, score_threshold=0.1, max_output_boxes=20, pre_nms_top_k=200)
    assert int(got.num_detections.min()) > 0
    for f in ("num_detections", "boxes", "scores", "classes", "indices"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f

    for method in ("gaussian", "linear"):
        k, sc = ops.soft_nms(boxes, scores, 0.3, sigma=0.5, method=method)
        kr, scr = _reference(ops.soft_nms, boxes, scores, 0.3, sigma=0.5, method=method)
        assert torch.equal(k, kr)
        torch.testing.assert_close(sc, scr, rtol=1e-5, atol=1e-6)

    k, sc = ops.matrix_nms(boxes, scores, classes, kernel="gaussian", sigma=2.0, score_threshold=0.05)
    kr, scr = _reference(ops.matrix_nms, boxes, scores, classes, kernel="gaussian", sigma=2.0, score_threshold=0.05)
    assert k.numel() > 0 and torch.equal(k, kr)
    torch.testing.assert_close(sc, scr, rtol=1e-5, atol=1e-6)


def _dwsep_args(C=16, Co=24, k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, 13, 11, generator=g, dtype=dtype)
    dw = torch.randn(C, 1, k, k, generator=g, dtype=dtype) * 0.3
    pw = torch.randn(Co, C, 1, 1, generator=g, dtype=dtype) * 0.2
    aff = [torch.rand(c, generator=g, dtype=dtype) + 0.5 for c in (C, C, Co, Co)]
    return x, dw, pw, aff


@pytest.mark.parametrize("channels_last", [False, True])
def test_dwsep_family_vs_reference(channels_last):
    x, dw, pw, (s1, b1, s2, b2) = _dwsep_args()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kw = dict(stride=2, padding="same", dw_scale=s1, dw_bias=b1, act="silu", pw_scale=s2, pw_bias=b2)
    y = ops.dwsep_conv(x, dw, pw, **kw)
    assert y.shape == (2, 24, 7, 6)
    torch.testing.assert_close(y, _reference(ops.dwsep_conv, x, dw, pw, **kw), rtol=1e-4, atol=1e-4)

    h, means = ops.dw_conv_act(x, dw, scale=s1, bias=b1, act="hardswish")
    hr, mr = _reference(ops.dw_conv_act, x, dw, scale=s1, bias=b1, act="hardswish")
    torch.testing.assert_close(h, hr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(means, mr, rtol=1e-4, atol=1e-4)

    gate = torch.sigmoid(torch.randn(2, 16, generator=torch.Generator().manual_seed(3)))
    res = torch.randn(2, 24, 13, 11)
    out = ops.pw_conv(h, pw, channel_scale=gate, scale=s2, bias=b2, act="relu6", residual=res)
    want = _reference(ops.pw_conv, h, pw, channel_scale=gate, scale=s2, bias=b2, act="relu6", residual=res)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_weighted_fuse_vs_reference():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 8, 10, 10, generator=g), torch.randn(2, 8, 5, 5, generator=g),
          torch.randn(2, 8, 20, 20, generator=g)]
    w = torch.rand(3, generator=g)
    kw = dict(resample=["identity", "nearest", "maxpool"], method="fastattn", act="silu")
    y = ops.weighted_fuse(xs, w, **kw)
    assert y.shape == (2, 8, 10, 10)
    torch.testing.assert_close(y, _reference(ops.weighted_fuse, xs, w, **kw), rtol=1e-5, atol=1e-5)


def test_batch_norm_act_vs_reference_with_backward():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 20, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(20, generator=g) + 0.5, torch.randn(20, generator=g)
    res = []
    for backend in ("cpu", "reference"):
        xa = x.clone().requires_grad_()
        with effops.use_backend(backend):
            y, m = ops.batch_norm_act(xa, w, b, act="silu", pool=True)
            gx, = torch.autograd.grad((y * y).sum() + m.sum(), (xa,))
        res.append((y, m, gx))
    for a, c in zip(*res):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_int8_family_bit_identical_to_reference():
    # The int8 ops (loaded lazily by effops.ops) on the CPU give the reference's integers exactly.
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 256, (2, 12, 9, 7), generator=g, dtype=torch.uint8)
    dw = torch.randint(-128, 128, (12, 1, 3, 3), generator=g, dtype=torch.int8)
    pw = torch.randint(-128, 128, (20, 12, 1, 1), generator=g, dtype=torch.int8)
    b12 = torch.randint(-2 ** 14, 2 ** 14, (12,), generator=g, dtype=torch.int32)
    b20 = torch.randint(-2 ** 14, 2 ** 14, (20,), generator=g, dtype=torch.int32)
    m12 = torch.rand(12, generator=g) * 0.01 + 0.002
    m20 = torch.rand(20, generator=g) * 0.003 + 0.0005
    lut = torch.randint(0, 256, (256,), generator=g, dtype=torch.uint8)
    gate = torch.rand(2, 12, generator=g)

    def both(fn, *args, **kw):
        got, want = fn(*args, **kw), _reference(fn, *args, **kw)
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert got[0].float().std() > 0  # not a saturated, constant output
        return got[0]

    y, sums = ops.q_dw_conv_act(x, dw, b12, mult=m12, x_zp=128, out_zp=10, qmin=10, lut=lut, stride=2)
    assert y.shape == (2, 12, 5, 4) and y.dtype == torch.uint8 and sums.dtype == torch.int32
    assert torch.equal(sums, y.to(torch.int64).sum((2, 3)).to(torch.int32))
    both(ops.q_dw_conv_act, x, dw, b12, mult=m12, x_zp=128, out_zp=10, qmin=10, lut=lut, stride=2)
    res = torch.randint(0, 256, (2, 20, 9, 7), generator=g, dtype=torch.uint8)
    both(ops.q_pw_conv, x, pw, b20, mult=m20, x_zp=3, out_zp=128, gate=gate, residual=res, res_zp=120, res_mult=0.7)
    both(ops.q_dwsep_conv, x, dw, pw, dw_bias=b12, dw_mult=m12, dw_lut=lut, x_zp=5, mid_zp=0, dw_zp=100,
         pw_bias=b20, pw_mult=m20, out_zp=128, residual=res, res_zp=7, res_mult=1.3)
    xs = [x, torch.randint(0, 256, (2, 12, 5, 4), generator=g, dtype=torch.uint8),
          torch.randint(0, 256, (2, 12, 18, 14), generator=g, dtype=torch.uint8)]
    y = both(ops.q_weighted_fuse, xs, zps=[128, 3, 250], mults=[30000, -20000, 41000],
             resample=["identity", "nearest", "maxpool"], out_zp=128, lut=lut)
    assert y.shape == (2, 12, 9, 7)


def test_losses_vs_formulas():
    # Each against its textbook formula (torchvision's focal loss, effdet's Huber) written out
    # here, and against the reference backend; gradients against autograd of the formula.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(6, 5, generator=g) > 0.7).double()
    loss = ops.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="sum")
    p = torch.sigmoid(x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    want = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).sum()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])
    torch.testing.assert_close(_reference(ops.sigmoid_focal_loss, x, t, reduction="sum"), want)

    pred = torch.randn(3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=g) > 0.4
    loss = ops.box_loss(pred, target, mask, kind="huber", delta=0.1, reduction="sum")
    hub = torch.nn.functional.huber_loss(pred, target, reduction="none", delta=0.1)
    want = (hub * mask[..., None]).sum()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(want, pred)[0])

    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 9.0, 10.0]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    cls, box, npos = ops.match_anchors(anchors, gt, torch.tensor([[3.0, -1.0]]), match_threshold=0.5)
    assert cls.tolist() == [[2, -1, 2]]  # class 3 - class_offset 1; the far anchor is background
    torch.testing.assert_close(box[0, 0], torch.zeros(4))  # the anchor is the box: zero offsets
    assert float(npos[0]) == 2
    cls_l, box_l = ops.split_levels(cls, box, [(1, 1)], anchors_per_location=3)
    assert cls_l[0].shape == (1, 1, 1, 3) and box_l[0].shape == (1, 1, 1, 12)


def test_backward_float64_gradcheck():
    x, dw, pw, (s1, b1, s2, b2) = _dwsep_args(C=3, Co=4, dtype=torch.float64)
    x = x[:1, :, :6, :5].contiguous()
    leaves = [t.detach().requires_grad_() for t in (x, dw, pw, s1, b2)]

    def f(x, dw, pw, s1, b2):
        return ops.dwsep_conv(x, dw, pw, dw_scale=s1, dw_bias=b1, act="silu", pw_bias=b2)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)

    xs = [torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True),
          torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)]
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, w: ops.weighted_fuse([a, b], w, resample=["identity", "nearest"], act="silu"),
        (*xs, w), eps=1e-6, atol=1e-6)


def test_converted_model_matches_original():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2(weights=None, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        fused, rep = effops.nn.convert(model, copy_model=True, report=True)
        got = fused(x)
    assert len(rep.replaced) >= 10, str(rep)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_torch_compile_nms_and_dwsep():
    pytest.importorskip("torch._dynamo")
    boxes, scores = _boxes(200, seed=5)
    x, dw, pw, (s1, b1, s2, b2) = _dwsep_args(seed=6)
    torch._dynamo.reset()
    cnms = torch.compile(lambda b, s: ops.nms(b, s, 0.5), fullgraph=True)
    try:
        got = cnms(boxes, scores)
    except torch._dynamo.exc.Unsupported as e:
        # torch < 2.10 (README: Torch versions): a data-dependent output size (nms's keep) under
        # fullgraph=True needs capture_dynamic_output_shape_ops; newer torch allows it by itself.
        if "capture_dynamic_output_shape_ops" not in str(e) or parse_version(torch.__version__) >= DYNAMIC_SHAPES_BY_ITSELF:
            raise
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            got = torch.compile(lambda b, s: ops.nms(b, s, 0.5), fullgraph=True)(boxes, scores)
    assert torch.equal(got, ops.nms(boxes, scores, 0.5))
    cdw = torch.compile(lambda t: ops.dwsep_conv(t, dw, pw, dw_scale=s1, dw_bias=b1, act="hardswish"),
                        fullgraph=True)
    torch.testing.assert_close(cdw(x), ops.dwsep_conv(x, dw, pw, dw_scale=s1, dw_bias=b1, act="hardswish"),
                               rtol=1e-5, atol=1e-5)
