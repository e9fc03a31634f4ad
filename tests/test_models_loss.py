"""effops.models.DetectionLoss against effdet's DetectionLoss (values and gradients, fp32 and bf16
autocast), fed effdet's AnchorLabeler output unchanged, and the on-device path from padded gt."""

import pytest
import torch

effdet = pytest.importorskip("effdet")
from effdet.anchors import AnchorLabeler, Anchors  # noqa: E402
from effdet.config import get_efficientdet_config  # noqa: E402
from effdet.loss import DetectionLoss as EffdetLoss  # noqa: E402

from effops.models import DetectionLoss  # noqa: E402
from effops.models.anchors import generate_anchors  # noqa: E402

SIZE = 128
LEVELS = [(SIZE >> l, SIZE >> l) for l in range(3, 8)]
A = 9


def _effdet_loss(num_classes, **kw):
    cfg = get_efficientdet_config("tf_efficientdet_d0")
    cfg.num_classes = num_classes
    cfg.image_size = (SIZE, SIZE)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return EffdetLoss(cfg), cfg


def _outputs(B, C, dtype=torch.float32, seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cls = [(torch.randn(B, A * C, h, w, generator=g) * 3).to(dtype).contiguous(memory_format=fmt).requires_grad_()
           for h, w in LEVELS]
    box = [(torch.randn(B, A * 4, h, w, generator=g) * 0.3).to(dtype).contiguous(memory_format=fmt).requires_grad_()
           for h, w in LEVELS]
    return cls, box


def _random_targets(B, C, seed=1):
    g = torch.Generator().manual_seed(seed)
    cls_t, box_t = [], []
    for h, w in LEVELS:
        c = torch.randint(-2, C, (B, h, w, A), generator=g)
        b = torch.randn(B, h, w, A, 4, generator=g) * 0.2 * (c >= 0)[..., None]
        cls_t.append(c)
        box_t.append(b.reshape(B, h, w, A * 4))
    return cls_t, box_t, torch.tensor([float(B * 3 + i) for i in range(B)])


def _close(a, b, rtol):
    scale = max(float(b.abs().max()), 1e-30)
    return float((a.float() - b.float()).abs().max()) / scale <= rtol


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("channels_last", [True, False])
def test_parity_fp32_values_and_gradients(label_smoothing, channels_last):
    B, C = 2, 5
    ref, _ = _effdet_loss(C, label_smoothing=label_smoothing)
    mine = DetectionLoss(num_classes=C, label_smoothing=label_smoothing)
    cls, box = _outputs(B, C, channels_last=channels_last)
    cls_t, box_t, npos = _random_targets(B, C)
    want = ref(cls, box, cls_t, box_t, npos)
    got = mine(cls, box, cls_t, box_t, npos)
    for w, g in zip(want, got):
        assert g.dtype == torch.float32 and g.shape == ()
        assert abs(g.item() - w.item()) <= 1e-5 * abs(w.item()), (g.item(), w.item())
    gw = torch.autograd.grad(want[0], cls + box)
    gg = torch.autograd.grad(got[0], cls + box)
    for w, g in zip(gw, gg):
        assert _close(g, w, 1e-5)


def test_parity_bf16_autocast():
    B, C = 2, 4
    ref, _ = _effdet_loss(C)
    mine = DetectionLoss(num_classes=C)
    cls, box = _outputs(B, C, dtype=torch.bfloat16, seed=3)
    cls_t, box_t, npos = _random_targets(B, C, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(cls, box, cls_t, box_t, npos)
        got = mine(cls, box, cls_t, box_t, npos)
    for w, g in zip(want, got):  # both compute in fp32 from the same bf16 outputs
        assert abs(g.item() - w.item()) <= 1e-5 * abs(w.item()), (g.item(), w.item())
    gw = torch.autograd.grad(want[0], cls + box)
    gg = torch.autograd.grad(got[0], cls + box)
    for w, g in zip(gw, gg):
        assert g.dtype == torch.bfloat16
        assert _close(g, w, 2e-2)  # the fp32 gradients agree to 1e-5; bf16 rounding of either may differ by 1 ulp


def _gt(B, seed=5):
    g = torch.Generator().manual_seed(seed)
    G = 6
    yx = torch.rand(B, G, 2, generator=g) * (SIZE - 40)
    hw = 8 + torch.rand(B, G, 2, generator=g) * 60
    boxes = torch.cat([yx, (yx + hw).clamp(max=SIZE)], -1)
    classes = torch.randint(1, 5, (B, G), generator=g).float()
    boxes[0, 4:] = -1  # padded rows
    classes[0, 4:] = -1
    boxes[1, 0] = torch.tensor([0.0, 0.0, 30.0, SIZE])  # on the image border
    return boxes, classes


def test_effdet_labeler_output_unchanged_and_from_gt():
    B, C = 2, 4
    ref, cfg = _effdet_loss(C)
    anchors = Anchors.from_config(cfg)
    labeler = AnchorLabeler(anchors, C, match_threshold=0.5)
    boxes, classes = _gt(B)
    cls_t, box_t, npos = labeler.batch_label_anchors(boxes, classes)
    mine = DetectionLoss(num_classes=C)
    cls, box = _outputs(B, C, seed=7)
    want = ref(cls, box, cls_t, box_t, npos)
    got = mine(cls, box, cls_t, box_t, npos)
    for w, g in zip(want, got):
        assert abs(g.item() - w.item()) <= 1e-5 * abs(w.item())
    # the device path: effops's anchors (equal to effdet's) + match_anchors on the padded gt
    ours = generate_anchors((SIZE, SIZE))
    assert torch.equal(ours, anchors.boxes.float())
    got2 = mine.from_gt(cls, box, ours, boxes, classes)
    for w, g in zip(want, got2):
        assert abs(g.item() - w.item()) <= 1e-5 * abs(w.item()), (g.item(), w.item())
    gw = torch.autograd.grad(want[0], cls + box)
    gg = torch.autograd.grad(got2[0], cls + box)
    for w, g in zip(gw, gg):
        assert _close(g, w, 1e-5)


def test_images_without_gt():
    B, C = 2, 3
    ref, cfg = _effdet_loss(C)
    labeler = AnchorLabeler(Anchors.from_config(cfg), C)
    boxes = torch.full((B, 3, 4), -1.0)
    classes = torch.full((B, 3), -1.0)
    cls_t, box_t, npos = labeler.batch_label_anchors(boxes, classes)
    cls, box = _outputs(B, C, seed=9)
    mine = DetectionLoss(num_classes=C)
    want = ref(cls, box, cls_t, box_t, npos)
    got = mine.from_gt(cls, box, generate_anchors((SIZE, SIZE)), boxes, classes)
    assert got[2].item() == 0.0 and want[2].item() == 0.0
    assert abs(got[0].item() - want[0].item()) <= 1e-5 * abs(want[0].item())


def test_normalizer_override_scales_the_loss():
    B, C = 2, 3
    mine = DetectionLoss(num_classes=C)
    cls, box = _outputs(B, C, seed=11)
    cls_t, box_t, npos = _random_targets(B, C, seed=12)
    base = mine(cls, box, cls_t, box_t, npos)
    n = float(npos.sum()) + 1
    scaled = mine(cls, box, cls_t, box_t, npos, normalizer=torch.tensor(4 * n))
    for b, s in zip(base, scaled):
        assert abs(s.item() * 4 - b.item()) <= 1e-5 * abs(b.item())


def test_giou_box_loss_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    from effops.models.anchors import decode_boxes

    B, C = 2, 3
    mine = DetectionLoss(num_classes=C, box_loss_type="giou", box_loss_weight=1.0)
    boxes, classes = _gt(B, seed=13)
    classes = classes.clamp(max=C)
    anchors = generate_anchors((SIZE, SIZE))
    cls, box = _outputs(B, C, seed=14)
    _, _, box_l = mine.from_gt(cls, box, anchors, boxes, classes)
    cls_t, box_t, npos = mine.label(anchors, boxes, classes)
    pred = torch.cat([b.permute(0, 2, 3, 1).reshape(B, -1, 4) for b in box], 1)
    pos = cls_t >= 0
    want = tv.ops.generalized_box_iou_loss(decode_boxes(pred, anchors)[pos], decode_boxes(box_t, anchors)[pos],
                                           reduction="sum") / (npos.sum() + 1)
    assert abs(box_l.item() - want.item()) <= 1e-4 * abs(want.item())
    with pytest.raises(ValueError, match="giou.*anchors"):
        mine(cls, box, *_random_targets(B, C))


def test_bad_inputs_name_the_argument():
    B, C = 2, 3
    mine = DetectionLoss(num_classes=C)
    cls, box = _outputs(B, C)
    cls_t, box_t, npos = _random_targets(B, C)
    with pytest.raises(ValueError, match="one entry per level"):
        mine(cls, box[:4], cls_t, box_t, npos)
    with pytest.raises(ValueError, match="num_classes"):
        DetectionLoss(num_classes=4)(cls, box, cls_t, box_t, npos)
    with pytest.raises(ValueError, match=r"cls_targets\[1\]"):
        mine(cls, box, [cls_t[0], cls_t[1][:, :-1]] + cls_t[2:], box_t, npos)
    with pytest.raises(TypeError, match=r"cls_targets\[0\].*integer"):
        mine(cls, box, [cls_t[0].float()] + cls_t[1:], box_t, npos)
    with pytest.raises(ValueError, match=r"box_outputs\[2\]"):
        mine(cls, box[:2] + [box[2][:, :8]] + box[3:], cls_t, box_t, npos)
    with pytest.raises(TypeError, match="cls_outputs"):
        mine(cls[0], box, cls_t, box_t, npos)
    with pytest.raises(ValueError, match="anchors"):
        mine.from_gt(cls, box, generate_anchors((256, 256)), *_gt(B))
    for kw, match in ((dict(num_classes=0), "num_classes"), (dict(gamma=-1), "gamma"), (dict(delta=0), "delta"),
                      (dict(box_loss_type="iou"), "box_loss_type"), (dict(label_smoothing=2), "label_smoothing")):
        with pytest.raises(ValueError, match=match):
            DetectionLoss(**kw)
