"""EfficientDet D0-D7 (effops.models.efficientdet) against effdet: names, counts, parity, detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import effops.models as M
from effops.models.anchors import decode_boxes, generate_anchors
from effops.models.detection import letterbox, postprocess

effdet = pytest.importorskip("effdet")
from effdet import DetBenchPredict, get_efficientdet_config  # noqa: E402
from effdet import EfficientDet as EffdetModel  # noqa: E402

NAMES = ["efficientdet_d0", "efficientdet_d1"] + [f"tf_efficientdet_d{i}" for i in range(8)]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _effdet(name, size=None, **cfg_over):
    cfg = get_efficientdet_config(name)
    if size is not None:
        cfg.image_size = (size, size)
    for k, v in cfg_over.items():
        cfg[k] = v
    return EffdetModel(cfg, pretrained_backbone=False)


@torch.no_grad()
def _randomise(model, gen):
    """BN statistics and affine randomised (so folding is real), head outputs spread out."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.empty_like(m.running_mean).uniform_(-0.2, 0.2, generator=gen))
            m.running_var.copy_(torch.empty_like(m.running_var).uniform_(0.5, 2.0, generator=gen))
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(torch.empty_like(m.bias).uniform_(-0.2, 0.2, generator=gen))
    model.class_net.predict.conv_pw.weight.mul_(20)
    model.box_net.predict.conv_pw.weight.mul_(3)


def _pair(name, size, seed=0, **cfg_over):
    torch.manual_seed(seed)
    ref = _effdet(name, size, **cfg_over).eval()
    _randomise(ref, torch.Generator().manual_seed(seed))
    ours = M.create_model(name, image_size=size, **({"num_classes": cfg_over["num_classes"]}
                                                     if "num_classes" in cfg_over else {})).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("name", NAMES)
def test_names_shapes_and_counts_equal_effdet(name):
    with torch.device("meta"):
        ref = _effdet(name)
        ours = M.create_model(name)
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert name in M.list_models()
    # anchors made under a meta-device context are real (and so is the cache they land in)
    assert ours.anchor_boxes.device.type == "cpu"
    assert generate_anchors(ours.image_size, anchor_scale=ours.config.anchor_scale).device.type == "cpu"


def test_published_counts():
    with torch.device("meta"):
        d0 = M.create_model("tf_efficientdet_d0")
    assert round(sum(p.numel() for p in d0.parameters()) / 1e6, 2) == 3.88  # REFERENCE.md: 3.88M


@pytest.mark.parametrize("size,scale", [((512, 512), 4.0), ((128, 128), 4.0), ((1536, 1536), 5.0), ((384, 640), 4.0)])
def test_anchors_equal_effdet(size, scale):
    from effdet.anchors import Anchors

    ref = Anchors(3, 7, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], scale, size).boxes
    ours = generate_anchors(size, anchor_scale=scale)
    assert torch.equal(ref, ours)
    assert generate_anchors(size, anchor_scale=scale) is ours  # cached


def test_decode_equals_effdet():
    from effdet.anchors import decode_box_outputs

    anchors = generate_anchors((256, 256))
    rel = torch.randn(anchors.shape[0], 4, generator=torch.Generator().manual_seed(0)) * 0.5
    assert torch.equal(decode_box_outputs(rel, anchors, output_xyxy=True), decode_boxes(rel, anchors))


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name,size,batch", [
    ("tf_efficientdet_d0", 128, 2), ("efficientdet_d0", 128, 2), ("efficientdet_d1", 128, 1),
    pytest.param("tf_efficientdet_d0", 256, 2, marks=pytest.mark.slow),
    pytest.param("efficientdet_d1", 256, 2, marks=pytest.mark.slow)])
def test_forward_parity(name, size, batch):
    ref, ours = _pair(name, size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rc, rb = ref(x)
        oc, ob = ours(x)
    assert len(oc) == len(ob) == 5
    for a, b in zip(rc + rb, oc + ob):
        assert a.shape == b.shape
        assert _rel(a, b) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_forward_parity_every_variant_small_input(name):
    ref, ours = _pair(name, 128)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(sum(ref(x), []), sum(ours(x), [])):
            assert _rel(a, b) <= 1e-4


def test_train_mode_matches_effdet_and_backpropagates():
    # batch statistics in train mode; no stochastic depth so both are deterministic
    torch.manual_seed(0)
    ref = _effdet("tf_efficientdet_d0", 128, backbone_args=dict(drop_path_rate=0.0)).train()
    ours = M.create_model("tf_efficientdet_d0", image_size=128, drop_path_rate=0.0).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    rc, rb = ref(x)
    oc, ob = ours(x)
    for a, b in zip(rc + rb, oc + ob):
        assert _rel(a.detach(), b.detach()) <= 1e-3
    (sum(o.square().mean() for o in oc) + sum(o.square().mean() for o in ob)).backward()
    (sum(o.square().mean() for o in rc) + sum(o.square().mean() for o in rb)).backward()
    for key in ("class_net.conv_rep.0.conv_pw.weight", "box_net.bn_rep.1.2.bn.weight", "fpn.cell.0.fnode.0.combine.edge_weights"):
        g_ours = ours.get_parameter(key).grad
        g_ref = ref.get_parameter(key).grad
        assert g_ours is not None and _rel(g_ref, g_ours) <= 1e-2
    assert ours.backbone.conv_stem.weight.grad is not None
    rm = ref.class_net.bn_rep[0][0].bn.running_mean
    assert _rel(rm, ours.class_net.bn_rep[0][0].bn.running_mean) <= 1e-4  # running stats updated alike


# ------------------------------------------------------------------------------ detection
@torch.no_grad()
def _confident(ref, ours, x):
    """Set the class bias so about 300 logits per image are positive: scores spread over
    ~0.5-0.7, well separated (not saturated at 1.0, where float32 sigmoid ties)."""
    for m in (ref, ours):
        m.class_net.predict.conv_pw.bias.zero_()
    cls, _ = ref(x)
    flat = torch.cat([c.permute(0, 2, 3, 1).reshape(x.shape[0], -1) for c in cls], 1)
    v = float(flat.topk(300, dim=1).values[:, -1].min())
    for m in (ref, ours):
        m.class_net.predict.conv_pw.bias.fill_(-v)


def _assert_same_detections(rows, det, b, tol_s=1e-5, tol_b=1e-3):
    """effdet rows [M, 6] vs our Detections of image b: same number, each of ours matched to a
    distinct effdet row with equal class and box and score. The only exception allowed: at the
    cut-off (the M-th score), two candidates whose scores differ by less than the float noise
    between the two implementations may be swapped."""
    n_ref = int((rows[:, 4] > 0).sum())
    n = int(det.num_detections[b])
    assert n == n_ref
    cutoff = float(rows[:n_ref, 4].min()) if n_ref else 0.0
    used = torch.zeros(rows.shape[0], dtype=torch.bool)
    swapped = 0
    for i in range(n):
        ok = ((rows[:, 4] - det.scores[b, i]).abs() <= tol_s) & (rows[:, 5].long() == det.classes[b, i]) & \
            ((rows[:, :4] - det.boxes[b, i]).abs().amax(1) <= tol_b) & ~used
        if not ok.any() and n == rows.shape[0] and float(det.scores[b, i]) <= cutoff + tol_s:
            swapped += 1
            continue
        if not ok.any():
            # Two overlapping same-class candidates whose scores differ by float noise (~1e-7;
            # the raw outputs agree to ~1e-6): NMS keeps the one that rounds higher, which may
            # differ between the implementations. Same class and score, the other box.
            tie = ((rows[:, 4] - det.scores[b, i]).abs() <= tol_s) & (rows[:, 5].long() == det.classes[b, i]) & ~used
            if tie.any():
                swapped += 1
                used[int(tie.nonzero()[0, 0])] = True
                continue
        assert ok.any(), f"detection {i} of image {b} has no equal effdet row"
        used[int(ok.nonzero()[0, 0])] = True
    assert swapped <= 2, f"{swapped} detections of image {b} differ at the cut-off or at score ties"
    assert torch.all(det.scores[b, n:] == 0) and torch.all(det.classes[b, n:] == 0)
    s = det.scores[b, :n]
    assert torch.all(s[:-1] >= s[1:])  # score descending


@pytest.mark.parametrize("name", ["tf_efficientdet_d0", "efficientdet_d0"])
def test_detect_equals_detbench_predict(name):
    ref, ours = _pair(name, 128, seed=4)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    _confident(ref, ours, x)
    with torch.no_grad():
        rows = DetBenchPredict(ref).eval()(x)
        det = ours.detect(x)
    assert det.boxes.shape == (2, 100, 4) and det.scores.shape == (2, 100) and det.classes.dtype == torch.int64
    # well separated: most neighbouring scores differ by far more than the float noise
    gaps = (det.scores[:, :-1] - det.scores[:, 1:]).flatten()
    assert (gaps > 1e-5).float().mean() > 0.5
    for b in range(2):
        _assert_same_detections(rows[b], det, b)


def test_postprocess_clip_and_scale_equal_effdet_img_info():
    """predict's clipping (before NMS) and scaling back follow effdet's img_info path."""
    ref, ours = _pair("tf_efficientdet_d0", 128, seed=6)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(7))
    _confident(ref, ours, x)
    scale = torch.tensor([1.5, 0.75])  # original / model pixels
    size_wh = torch.tensor([[150.0, 100.0], [75.0, 95.0]])  # original (width, height)
    with torch.no_grad():
        rows = DetBenchPredict(ref).eval()(x, dict(img_scale=scale, img_size=size_wh))
        # effdet's own raw outputs through our post-processing: this test is about the clip and
        # scale semantics, so the network's float noise (which can flip an NMS decision between
        # two overlapping candidates whose scores tie to ~1e-7) is kept out of it.
        det = ours._postprocess(ref(x), clip_size=size_wh.flip(-1) / scale[:, None], box_scale=scale)
    for b in range(2):
        _assert_same_detections(rows[b], det, b, tol_b=2e-3)
        n = int(det.num_detections[b])
        assert float(det.boxes[b, :n, 0::2].max()) <= size_wh[b, 0] + 1e-3
        assert float(det.boxes[b, :n, 1::2].max()) <= size_wh[b, 1] + 1e-3
        assert float(det.boxes[b, :n].min()) >= 0


def test_topk_without_materialising_equals_full_topk_semantics():
    """The anchor-max pre-selection keeps exactly the k best (anchor, class) pairs: with NMS
    off (threshold 2) the detections are the top-k of all logits, decoded."""
    g = torch.Generator().manual_seed(8)
    anchors = generate_anchors((128, 128))
    sizes = [16, 8, 4, 2, 1]
    C, k = 7, 500
    cls = [torch.randn(3, 9 * C, s, s, generator=g) for s in sizes]
    box = [torch.randn(3, 36, s, s, generator=g) * 0.2 for s in sizes]
    det = postprocess(cls, box, anchors, num_classes=C, max_detection_points=k, iou_threshold=2.0,
                      max_det_per_image=k)
    flat = torch.cat([c.permute(0, 2, 3, 1).reshape(3, -1) for c in cls], 1)
    rel = torch.cat([b.permute(0, 2, 3, 1).reshape(3, -1, 4) for b in box], 1)
    assert flat.shape[1] == anchors.shape[0] * C
    top = flat.topk(k, dim=1)  # sorted; logits are continuous, so no ties
    for b in range(3):
        assert int(det.num_detections[b]) == k
        assert torch.equal(det.scores[b], top.values[b].sigmoid())
        assert torch.equal(det.classes[b], top.indices[b] % C + 1)
        a = top.indices[b] // C
        assert torch.equal(det.boxes[b], decode_boxes(rel[b, a], anchors[a]))


def test_postprocess_compiles_fullgraph():
    g = torch.Generator().manual_seed(9)
    anchors = generate_anchors((128, 128))
    cls = [torch.randn(2, 9 * 5, s, s, generator=g) for s in (16, 8, 4, 2, 1)]
    box = [torch.randn(2, 36, s, s, generator=g) * 0.2 for s in (16, 8, 4, 2, 1)]

    def f(c, b):
        return postprocess(c, b, anchors, num_classes=5)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")  # fullgraph: fails on any graph break
    for a, b in zip(f(cls, box), compiled(cls, box)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_detect_compiles_fullgraph_inductor():
    torch.manual_seed(0)
    m = M.create_model("tf_efficientdet_d0", image_size=128).eval()
    x = torch.randn(2, 3, 128, 128)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = m.detect(x)
        comp = torch.compile(m.detect, fullgraph=True)(x)
    assert torch.equal(eager.classes, comp.classes) and torch.equal(eager.num_detections, comp.num_detections)
    assert torch.allclose(eager.boxes, comp.boxes, atol=1e-3) and torch.allclose(eager.scores, comp.scores, atol=1e-5)


@pytest.mark.slow
def test_predict_tensor_path_compiles_fullgraph():
    """The whole predict path (letterbox, normalise, forward, post-processing) is one graph."""
    torch.manual_seed(0)
    m = M.create_model("tf_efficientdet_d0", image_size=128).eval()
    imgs = torch.randint(0, 255, (2, 3, 100, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = m.predict(imgs)
        comp = torch.compile(m.predict, fullgraph=True, backend="eager")(imgs)
    for a, b in zip(eager, comp):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ predict
def _smooth_image(rng, h, w):
    from PIL import Image

    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))


def test_letterbox_matches_effdet_transforms():
    from PIL import Image
    from effdet.data.transforms import transforms_coco_eval

    tf = transforms_coco_eval(256, use_prefetcher=True)
    rng = np.random.default_rng(0)
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    std = torch.tensor(STD).view(3, 1, 1) * 255
    for h, w in [(100, 150), (300, 200), (256, 256), (512, 300)]:
        arr = _smooth_image(rng, h, w)
        img, anno = tf(Image.fromarray(arr), {})
        ref = (torch.from_numpy(img).float() - mean) / std
        ours, scale, size = letterbox([arr], (256, 256), MEAN, STD, device=torch.device("cpu"))
        assert ours.shape == (1, 3, 256, 256)
        assert abs(float(scale[0]) - anno["img_scale"]) < 1e-6 and size[0].tolist() == [h, w]
        # PIL's and torch's antialiased bilinear agree to one intensity level
        assert float(((ours[0] - ref).abs() * std).max()) <= 1.01


def test_predict_list_of_sizes():
    torch.manual_seed(0)
    m = M.create_model("tf_efficientdet_d0", num_classes=4, image_size=128).eval()
    rng = np.random.default_rng(1)
    imgs = [_smooth_image(rng, h, w) for h, w in [(90, 160), (200, 120), (128, 128)]]
    with torch.no_grad():
        det = m.predict(imgs)
        singles = [m.predict([im]) for im in imgs]
        as_tensor = m.predict(torch.from_numpy(imgs[0].copy()).permute(2, 0, 1)[None].contiguous())
        as_float = m.predict(torch.from_numpy(imgs[0].copy()).permute(2, 0, 1)[None].float() / 255)
    assert det.boxes.shape == (3, 100, 4)
    for i, (im, one) in enumerate(zip(imgs, singles)):
        h, w = im.shape[:2]
        n = int(det.num_detections[i])
        assert n > 0
        b = det.boxes[i, :n]
        assert float(b.min()) >= 0 and float(b[:, 0::2].max()) <= w + 1e-3 and float(b[:, 1::2].max()) <= h + 1e-3
        assert torch.allclose(det.boxes[i], one.boxes[0], atol=1e-3)  # batching does not change results
        assert torch.equal(det.classes[i], one.classes[0])
        assert int(det.classes[i, :n].min()) >= 1 and int(det.classes[i, :n].max()) <= 4
    assert torch.allclose(as_tensor.boxes[0], det.boxes[0], atol=1e-3)
    assert torch.allclose(as_float.scores[0], det.scores[0], atol=1e-3)


def test_bad_input():
    m = M.create_model("tf_efficientdet_d0", image_size=128).eval()
    with pytest.raises(ValueError, match="x must be"):
        m.detect(torch.zeros(3, 128, 128))
    with pytest.raises(ValueError, match="image size"):
        m.detect(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match=r"EfficientDet.forward: x must be \[B, 3, 128, 128\]"):
        m(torch.zeros(1, 3, 256, 256))  # the BiFPN is built for its size: said, not a weighted_fuse error
    with pytest.raises(TypeError, match="float"):
        m.detect(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m.predict(torch.zeros(3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        m.predict(torch.zeros(1, 3, 64, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"images\[0\].*uint8"):
        m.predict([np.zeros((64, 64, 3), dtype=np.float64)])
    with pytest.raises(ValueError, match=r"images\[1\].*H x W x 3"):
        m.predict([np.zeros((64, 64, 3), dtype=np.uint8), np.zeros((64, 64, 5), dtype=np.uint8)])
    with pytest.raises(ValueError, match="empty list"):
        m.predict([])
    with pytest.raises(TypeError, match="images must be"):
        m.predict("image.png")
    with pytest.raises(ValueError, match="multiples of 2\\*\\*max_level"):
        M.create_model("tf_efficientdet_d0", image_size=200)
    with pytest.raises(TypeError, match="unexpected keyword"):
        M.create_model("tf_efficientdet_d0", features_only=True)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        M.create_model("tf_efficientdet_d0", num_classes=0)


def test_wrong_num_classes_checkpoint(tmp_path):
    small = M.create_model("tf_efficientdet_d0", num_classes=3, image_size=128)
    path = tmp_path / "d0_3cls.pth"
    torch.save({"state_dict": small.state_dict()}, path)
    with pytest.raises(ValueError, match="num_classes=3"):
        M.create_model("tf_efficientdet_d0", image_size=128, weights=str(path))
    loaded = M.create_model("tf_efficientdet_d0", num_classes=3, image_size=128, weights=str(path))
    assert torch.equal(loaded.class_net.predict.conv_pw.weight, small.class_net.predict.conv_pw.weight)


# ------------------------------------------------------------------------------ CLI
def test_cli_detect(tmp_path, capsys):
    from PIL import Image

    from effops.cli import main

    torch.manual_seed(0)
    m = M.create_model("tf_efficientdet_d0", num_classes=3, image_size=128).eval()
    with torch.no_grad():
        m.class_net.predict.conv_pw.bias.zero_()  # scores around 0.5: some above the threshold
    weights = tmp_path / "w.pth"
    torch.save(m.state_dict(), weights)
    rng = np.random.default_rng(2)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    arrays = {"000000000001.png": _smooth_image(rng, 100, 150), "b.png": _smooth_image(rng, 140, 90)}
    for n, a in arrays.items():
        Image.fromarray(a).save(imgs / n)
    (imgs / "broken.png").write_bytes(b"not a png")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    out = tmp_path / "out"
    rc = main(["detect", str(imgs), str(tmp_path / "missing.jpg"), "--weights", str(weights), "--image-size", "128",
               "--threshold", "0.45", "--out", str(out), "--labels", str(labels)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png" in err and "missing.jpg" in err
    res = json.loads((out / "detections.json").read_text())
    assert (out / "000000000001.png").is_file() and (out / "b.png").is_file()
    assert not (out / "broken.png").exists()
    with torch.no_grad():
        for name, a in arrays.items():
            det = m.predict([a])
            n = int(det.num_detections[0])
            keep = det.scores[0, :n] >= 0.45
            mine = [r for r in res if r["file_name"] == name]
            assert len(mine) == int(keep.sum()) > 0
            assert {"image_id", "category_id", "bbox", "score"} <= set(mine[0])
            x1, y1, x2, y2 = det.boxes[0, 0].tolist()
            assert mine[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
            assert mine[0]["category_id"] == int(det.classes[0, 0])
    assert {r["image_id"] for r in res if r["file_name"] == "000000000001.png"} == {1}


@pytest.mark.parametrize("case", ["random", "ties", "few_anchors", "one_class", "bf16_nchw"])
def test_cpu_candidate_selection_equals_the_torch_ops(case):
    """The C++ candidate selection of eager CPU post-processing (csrc/nms/topk.cpp) picks exactly
    the (anchor, class) pairs of the torch-op path (_candidates_torch): same anchors, same pairs,
    same logits, ties to the lower flat index included; best first."""
    from effops.models.detection import _candidates_cpu, _candidates_torch, flatten_levels

    g = torch.Generator().manual_seed(hash(case) % 1000)
    B, C, A, k, sizes = 3, 7, 9, 500, [16, 8, 4, 2, 1]
    if case == "few_anchors":  # k > number of anchors: every anchor is a candidate anchor
        sizes, k = [2, 1], 200
    if case == "one_class":
        C = 1
    cls = [torch.randn(B, A * C, s, s, generator=g) for s in sizes]
    if case == "ties":  # a handful of values: long runs of equal logits across the k-th place
        cls = [torch.randint(-3, 3, (B, A * C, s, s), generator=g).float() for s in sizes]
    if case == "bf16_nchw":
        cls = [c.bfloat16() for c in cls]
    else:
        cls = [c.contiguous(memory_format=torch.channels_last) for c in cls]
    N = sum(A * s * s for s in sizes)
    K = min(k, N * C)
    got = _candidates_cpu(cls, C, K, N)
    assert got is not None
    ta, pos, vals = _candidates_torch(flatten_levels(cls, C).float(), K)
    assert torch.equal(got[0], ta)
    assert torch.equal(got[1].sort(dim=1).values, pos.sort(dim=1).values)
    order = pos.argsort(dim=1)
    torch.testing.assert_close(got[2].gather(1, got[1].argsort(dim=1)), vals.gather(1, order), rtol=0, atol=0)
    assert bool((got[2][:, :-1] >= got[2][:, 1:]).all())  # best first
    # anchors mismatched with the box outputs: no fast path (the torch path names the mismatch)
    assert _candidates_cpu(cls, C, K, N + 1) is None
