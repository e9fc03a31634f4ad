"""effops.onnx.export: the written graph uses only standard ONNX ops, ONNX Runtime runs it, and
its outputs equal effops's (fp32: rtol 1e-4, atol 1e-5; NMS indices exactly) on random inputs,
at other batch sizes than the example's. Small blocks and the NMS ops by default; whole
networks (converted timm efficientnet_b0, effops tf_efficientdet_d0 with detection) are slow."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import flat_tensors, randomize_bn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import effops.onnx as eo  # noqa: E402
from effops.nn import DWSeparableConv2d, MBConv  # noqa: E402
from effops.ops import EffopsInputError, EffopsTypeError, batched_nms, multiclass_nms, nms, weighted_fuse  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5



def assert_parity(path, model, inputs, *, exact=False):
    got = eo.run(path, inputs)
    with torch.no_grad():
        want = flat_tensors(model(*inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = torch.from_numpy(np.asarray(g))
        if exact or not w.is_floating_point():
            assert torch.equal(g, w), (g, w)
        else:
            torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


def ops_of(path) -> set:
    return {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}


def assert_standard(path):
    model = onnx.load(str(path))
    assert len(model.functions) == 0
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert not any(op.startswith("effops") for _, op in ops_of(path))


def test_lowerings_match_the_op_schemas():
    # the exporter passes arguments by the schema's names: a renamed argument must fail here
    for target, fn in eo.translations().items():
        names = [a.name for a in target._schema.arguments]
        assert list(inspect.signature(fn).parameters) == names, target.name()
    assert "effops::dwsep_conv" in eo.supported_ops() and "effops::multiclass_nms" in eo.supported_ops()


# ------------------------------------------------------------------------------ fused convs
def _blocks():
    return nn.Sequential(
        DWSeparableConv2d(8, 16, 3, 2, "same", act="relu6"),  # TF 'same', stride 2, odd size: asymmetric pads
        DWSeparableConv2d(16, 16, 5, 1, 2, act="silu", preact=True, pw_act="hardswish", bias=True),
        MBConv(16, 16, 3, 1, 4, 0.25, "silu"),  # SE: dw_conv_act + pw_conv with gates and residual
        MBConv(16, 24, 5, 2, 6, 0.25, "hardswish", padding="same"),
        MBConv(24, 24, 3, 1, 2, 0, "relu"),  # no SE: one dwsep_conv with residual
        DWSeparableConv2d(24, 8, 3, 1, 1, act="sigmoid", dw_norm=False, pw_norm=False, bias=True),
    )


def test_fused_blocks_parity_standard_ops_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    m = randomize_bn(_blocks()).eval()
    path = eo.export(m, torch.randn(2, 8, 17, 19), tmp_path / "blocks.onnx")
    assert_standard(path)
    ops = {op for _, op in ops_of(path)}
    assert {"Conv", "HardSwish", "Clip", "GlobalAveragePool", "Sigmoid"} <= ops
    assert "BatchNormalization" not in ops  # folded into the convs
    inp = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert inp[0].dim_param == "batch" and [d.dim_value for d in inp[1:]] == [8, 17, 19]
    for n in (1, 2, 5):
        assert_parity(path, m, (torch.randn(n, 8, 17, 19),))


def test_batch_one_example_still_gives_a_dynamic_batch(tmp_path):
    m = randomize_bn(nn.Sequential(DWSeparableConv2d(4, 6, 3, 2, "same"))).eval()
    path = eo.export(m, torch.randn(1, 4, 9, 9), tmp_path / "one.onnx")
    assert_parity(path, m, (torch.randn(3, 4, 9, 9),))


def test_static_batch(tmp_path):
    m = randomize_bn(nn.Sequential(DWSeparableConv2d(4, 6, 3, 1, "same"))).eval()
    path = eo.export(m, torch.randn(2, 4, 8, 8), tmp_path / "static.onnx", dynamic_batch=False)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2
    assert_parity(path, m, (torch.randn(2, 4, 8, 8),))


def test_training_mode_model_exports_eval_graph_and_keeps_its_modes(tmp_path):
    m = randomize_bn(_blocks())
    m.train()
    m[2].eval()
    x = torch.randn(2, 8, 17, 19)
    path = eo.export(m, x, tmp_path / "t.onnx")
    assert m.training and m[0].bn_dw.training and not m[2].training
    m.eval()
    assert_parity(path, m, (x,))


class _Fuse(nn.Module):
    """BiFPN-style nodes: every resample mode (nearest x3 -> Resize, nearest 4 -> 9 -> Gather,
    TF 'same' max pool of 17, symmetric max pool of 18) and every fusion method."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w1 = nn.Parameter(torch.rand(4, generator=g) * 2 - 0.3)  # one negative: relu'd away
        self.w2 = nn.Parameter(torch.randn(2, generator=g))

    def forward(self, a9, b3, c4, d17, e18):
        f1 = weighted_fuse([a9, b3, c4, d17], self.w1, resample=["identity", "nearest", "nearest", "maxpool"],
                           method="fastattn", act="silu")
        f2 = weighted_fuse([e18, f1], self.w2, resample=["maxpool_sym", "identity"], method="attn", act="relu")
        f3 = weighted_fuse([c4, f2], None, resample=["nearest", "identity"], method="sum", act=None)
        return f1, f2, f3


def _fuse_inputs(n, g):
    return tuple(torch.randn(n, 6, s, s, generator=g) for s in (9, 3, 4, 17, 18))


def test_weighted_fuse_every_mode_and_method(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = _Fuse().eval()
    path = eo.export(m, _fuse_inputs(2, g), tmp_path / "fuse.onnx")
    assert_standard(path)
    assert {"Resize", "Gather", "MaxPool"} <= {op for _, op in ops_of(path)}
    for n in (1, 3):
        assert_parity(path, m, _fuse_inputs(n, g))


# ------------------------------------------------------------------------------ NMS
def _boxes(n, g, span=40.0):
    xy = torch.rand(n, 2, generator=g) * span
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 20 + 1], 1)


class _NMS(nn.Module):
    def __init__(self, thr):
        super().__init__()
        self.thr = thr

    def forward(self, boxes, scores):
        return nms(boxes, scores, self.thr)


class _NMSMany(nn.Module):
    def __init__(self, thrs):
        super().__init__()
        self.thrs = thrs

    def forward(self, boxes, scores):
        return tuple(nms(boxes, scores, t) for t in self.thrs)


class _Batched(nn.Module):
    def forward(self, boxes, scores, idxs):
        return batched_nms(boxes, scores, idxs, 0.5)


class _Multi(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, boxes, scores):
        return tuple(multiclass_nms(boxes, scores, **self.kw))


def test_nms_equals_effops_with_ties_and_any_box_count(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = eo.export(_NMS(0.3), (_boxes(50, g), torch.rand(50, generator=g)), tmp_path / "nms.onnx")
    assert_standard(path)
    assert ("", "NonMaxSuppression") in ops_of(path)
    for n in (200, 37, 1, 0):
        s = torch.rand(n, generator=g)
        s[: n // 3] = 0.25  # a block of tied scores: ties go to the lower index in both
        assert_parity(path, _NMS(0.3), (_boxes(n, g), s), exact=True)


def test_nms_threshold_semantics(tmp_path):
    # IoU exactly 0.5 (areas 3 and 3, intersection 2): kept at threshold 0.5 (effops: IoU > t
    # suppresses), suppressed at 0.4999. 0.7 is no float32: float32_at_most keeps effops's decision.
    b = torch.tensor([[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    s = torch.tensor([0.9, 0.8, 0.7])
    # 0.5 - 1e-12 rounds to 0.5 in float32: a plain float32 threshold would keep the IoU-0.5 box
    cases = ((0.5, 2), (0.4999, 1), (0.5 - 1e-12, 1), (0.7, 2), (1.0, 3))
    mod = _NMSMany([t for t, _ in cases])
    path = eo.export(mod, (b, s), tmp_path / "thr.onnx")
    assert [len(k) for k in mod(b, s)] == [kept for _, kept in cases]
    assert_parity(path, mod, (b, s), exact=True)
    # the score threshold likewise: a score of 0.5 is a candidate above 0.5 - 1e-12
    mod = _Multi(iou_threshold=0.5, score_threshold=0.5 - 1e-12, max_output_boxes=4)
    mb, ms = b[None], torch.tensor([[[0.5, 0.25], [0.75, 0.5], [0.5, 0.5]]])
    path = eo.export(mod, (mb, ms), tmp_path / "score.onnx")
    assert int(mod(mb, ms)[0][0]) == 4
    assert_parity(path, mod, (mb, ms), exact=True)
    g = torch.Generator().manual_seed(2)
    path = eo.export(_NMS(0.7), (_boxes(60, g), torch.rand(60, generator=g)), tmp_path / "t07.onnx")
    for _ in range(3):  # dense boxes: many IoUs near 0.7
        assert_parity(path, _NMS(0.7), (_boxes(300, g, 10.0), torch.rand(300, generator=g)), exact=True)


def test_batched_nms_classes_never_suppress_each_other(tmp_path):
    g = torch.Generator().manual_seed(3)
    path = eo.export(_Batched(), (_boxes(40, g), torch.rand(40, generator=g), torch.randint(0, 3, (40,), generator=g)),
                     tmp_path / "bnms.onnx")
    assert_standard(path)
    for n in (150, 9, 0):
        s = torch.rand(n, generator=g)
        s[::4] = 0.5
        ids = torch.randint(-2, 3, (n,), generator=g) * 1000  # sparse, negative ids
        assert_parity(path, _Batched(), (_boxes(n, g, 15.0), s, ids), exact=True)


@pytest.mark.parametrize("per_class,kw", [
    (False, dict()), (False, dict(class_agnostic=True)), (False, dict(pre_nms_top_k=50)),
    (True, dict()), (True, dict(class_agnostic=True)), (False, dict(max_output_boxes=400)),
], ids=["per-class", "agnostic", "top-k", "class-boxes", "class-boxes-agnostic", "M>N*C"])
def test_multiclass_nms_padded_outputs(tmp_path, per_class, kw):
    g = torch.Generator().manual_seed(4)
    N, C = 60, 5
    args = dict(iou_threshold=0.45, score_threshold=0.3, max_output_boxes=20)
    args.update(kw)
    mod = _Multi(**args)

    def inputs(b):
        boxes = torch.stack([_boxes(N * C, g, 25.0).view(N, C, 4) if per_class else _boxes(N, g, 25.0)
                             for _ in range(b)])
        s = torch.rand(b, N, C, generator=g)
        s[0, :6] = 0.5  # tied scores across anchors and classes
        return boxes, s

    path = eo.export(mod, inputs(2), tmp_path / "mnms.onnx")
    assert_standard(path)
    for b in (1, 3):
        assert_parity(path, mod, inputs(b), exact=True)


class _Post(nn.Module):
    """EfficientDet's post-processing alone (effops.models.detection.postprocess) on given head
    outputs: top-k over anchors and (anchor, class) pairs, decoding, multiclass NMS, padding."""

    def __init__(self, num_classes: int):
        super().__init__()
        from effops.models.anchors import generate_anchors

        self.C = num_classes
        self.register_buffer("anchors", generate_anchors((128, 128)).clone(), persistent=False)

    def forward(self, *outs):
        from effops.models.detection import postprocess

        return tuple(postprocess(outs[:5], outs[5:], self.anchors, num_classes=self.C, max_detection_points=600,
                                 max_det_per_image=50))


def _head_outputs(b, C, g, tied: bool):
    cls = [torch.randn(b, 9 * C, s, s, generator=g) for s in (16, 8, 4, 2, 1)]
    if tied:  # logits on a coarse grid: many exactly equal scores across anchors and classes
        cls = [torch.round(t * 2) / 2 for t in cls]
    box = [torch.randn(b, 36, s, s, generator=g) * 0.5 for s in (16, 8, 4, 2, 1)]
    return tuple(cls + box)


def test_topk_lower_index_breaks_ties_like_onnx_topk():
    from effops.models.detection import _topk_lower_index

    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 6, (3, 500), generator=g).float()  # ~80 copies of each value
    for k in (1, 7, 100, 333, 500):
        got = _topk_lower_index(x, k).sort(dim=1).values
        want = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        assert torch.equal(got, want), k


def test_detection_postprocess_with_tied_scores(tmp_path):
    g = torch.Generator().manual_seed(6)
    mod = _Post(4).eval()
    path = eo.export(mod, _head_outputs(2, 4, g, tied=False), tmp_path / "post.onnx")
    assert_standard(path)
    for b, tied in ((3, False), (2, True), (1, True)):
        inputs = _head_outputs(b, 4, g, tied)
        got = eo.run(path, inputs)
        with torch.no_grad():
            want = mod(*inputs)
        torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=RTOL, atol=1e-4)  # boxes, pixels
        torch.testing.assert_close(torch.from_numpy(got[1]), want[1], rtol=RTOL, atol=ATOL)
        assert torch.equal(torch.from_numpy(got[2]), want[2]) and torch.equal(torch.from_numpy(got[3]), want[3])


# ------------------------------------------------------------------------------ errors
class _SoftNMSHead(nn.Module):
    def forward(self, boxes, scores):
        keep, _ = torch.ops.effops.soft_nms(boxes, scores, 0.3, 0.5, 1, 0.001)
        return keep


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.post = _SoftNMSHead()

    def forward(self, boxes, scores):
        return self.post(boxes, scores)


def test_unsupported_op_names_the_module(tmp_path):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(EffopsInputError, match=r"post \(_SoftNMSHead\) calls effops::soft_nms.*no ONNX lowering"):
        eo.export(_Wrapper().eval(), (_boxes(8, g), torch.rand(8, generator=g)), tmp_path / "x.onnx")


def test_bad_arguments(tmp_path):
    m = nn.Sequential(DWSeparableConv2d(4, 4)).eval()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(EffopsTypeError, match="model"):
        eo.export(lambda t: t, x, tmp_path / "a.onnx")
    with pytest.raises(EffopsTypeError, match="example_inputs"):
        eo.export(m, [x.numpy()], tmp_path / "a.onnx")
    with pytest.raises(EffopsTypeError, match="path"):
        eo.export(m, x, 3)
    with pytest.raises(EffopsInputError, match="opset"):
        eo.export(m, x, tmp_path / "a.onnx", opset=17)
    with pytest.raises(EffopsTypeError, match="dynamic_batch"):
        eo.export(m, x, tmp_path / "a.onnx", dynamic_batch="yes")
    with pytest.raises(EffopsInputError, match="batch sizes"):
        eo.export(_NMS(0.5), (torch.rand(3, 4), torch.rand(4)), tmp_path / "a.onnx")


# ------------------------------------------------------------------------------ whole networks
@pytest.mark.slow
def test_converted_timm_efficientnet_b0(tmp_path):
    timm = pytest.importorskip("timm")
    from effops.nn import convert

    torch.manual_seed(0)
    m = convert(randomize_bn(timm.create_model("efficientnet_b0", pretrained=False)).eval())
    path = eo.export(m, torch.randn(2, 3, 64, 64), tmp_path / "b0.onnx")
    assert_standard(path)
    for n in (1, 3):
        assert_parity(path, m, (torch.randn(n, 3, 64, 64),))


class _Detect(nn.Module):
    def __init__(self, det):
        super().__init__()
        self.det = det

    def forward(self, x):
        return tuple(self.det.detect(x))


@pytest.mark.slow
def test_effops_tf_efficientdet_d0_heads_and_detections(tmp_path):
    from effops.models import create_model

    torch.manual_seed(1)
    det = randomize_bn(create_model("tf_efficientdet_d0", image_size=128)).eval()
    x = torch.randn(2, 3, 128, 128)
    path = eo.export(det, x, tmp_path / "d0.onnx")
    assert_standard(path)
    assert_parity(path, det, (torch.randn(3, 3, 128, 128),))  # 5 class maps, 5 box maps
    wrapped = _Detect(det).eval()
    path = eo.export(wrapped, x, tmp_path / "d0_detect.onnx")
    assert_standard(path)
    got = eo.run(path, (x,))
    with torch.no_grad():
        want = det.detect(x)
    torch.testing.assert_close(torch.from_numpy(got[0]), want.boxes, rtol=RTOL, atol=1e-3)  # pixels, up to 128
    torch.testing.assert_close(torch.from_numpy(got[1]), want.scores, rtol=RTOL, atol=ATOL)
    assert torch.equal(torch.from_numpy(got[2]), want.classes)
    assert torch.equal(torch.from_numpy(got[3]), want.num_detections)


def test_info_reports_the_exporter(monkeypatch):
    import effops
    from importlib import metadata

    assert "effops.onnx.export, opset 18" in effops.info(print_table=False)["onnx"]
    assert "onnx " in effops.format_info(effops.info(print_table=False))
    real = metadata.version

    def fake(pkg):
        if pkg == "onnxscript":
            raise metadata.PackageNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(metadata, "version", fake)
    line = eo.availability()
    assert line.startswith("unavailable: pip install onnxscript") and "effops[onnx]" in line
