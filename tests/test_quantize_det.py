"""quantize() on EfficientDet: the class and box heads become QHeadNet (int8 separable convs per
level, codes passed between them) and the BiFPN nodes QFnode (int8 resample convs, fusion and
separable conv), close to the float model, bit-identical to the integer reference backend, and
the quantized model round-trips through state_dict."""

from __future__ import annotations

import pytest
import torch

import effops
from effops.compress import quantize
from effops.compress._qdet import QFnode, QHeadNet
from effops.compress._qmodules import QDWSeparableConv2d
from effops.train.loop import TrainConfig, build_model

TINY = dict(fpn_channels=16, fpn_cell_repeats=1, box_class_repeats=2, backbone_width=0.25, backbone_depth=0.34)


def _model(seed=0):
    torch.manual_seed(seed)
    m = build_model(TrainConfig(out="-", image_size=128, model_overrides=TINY), 4).eval()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():  # trained-looking BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5, generator=g)
            mod.running_var.uniform_(0.5, 2.0, generator=g)
            mod.running_mean.uniform_(-0.2, 0.2, generator=g)
    return m


@pytest.fixture(scope="module")
def det():
    m = _model()
    x = torch.randn(8, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    return m, quantize(m, x, batch_size=4, bifpn_and_heads=True), x


def test_heads_are_int8_and_close_to_float(det):
    m, q, x = det
    report = dict((n, (s, k)) for n, s, k in q.quantization_report)
    assert report["class_net"] == ("quantized", "QHeadNet") and report["box_net"] == ("quantized", "QHeadNet")
    for head in (q.class_net, q.box_net):
        assert isinstance(head, QHeadNet) and len(head.levels) == 5
        for seq in head.levels:
            assert [type(b) for b in seq] == [QDWSeparableConv2d] * 3  # 2 repeats + the prediction
            assert [b._chain for b in seq] == [True, True, False]  # codes between them, float out
    with torch.no_grad():
        (fc, fb), (qc, qb) = m(x[:2]), q(x[:2])
    for f, g in zip(fc + fb, qc + qb):
        assert f.shape == g.shape and g.dtype == torch.float32
        err = float((f - g).abs().max() / f.abs().max())
        assert err < 0.1, err  # backbone, BiFPN and heads int8
    # the class maps rank the anchors as the float ones do, mostly
    f, g = torch.cat([t.flatten() for t in fc]), torch.cat([t.flatten() for t in qc])
    top_f, top_g = set(f.topk(200).indices.tolist()), set(g.topk(200).indices.tolist())
    assert len(top_f & top_g) > 150


def test_heads_bit_identical_to_the_integer_reference(det):
    _, q, x = det
    feats = [torch.randn(2, 16, s, s, generator=torch.Generator().manual_seed(s)) * 0.3 for s in (16, 8, 4, 2, 1)]
    with torch.no_grad():
        cpu = q.box_net(feats)
        with effops.use_backend("reference"):
            ref = q.box_net(feats)
    for a, b in zip(cpu, ref):
        assert torch.equal(a, b)
    assert any(float(t.std()) > 0 for t in cpu)


def test_quantized_detector_state_dict_round_trip(det):
    _, q, x = det
    other = quantize(_model(), x[4:], batch_size=4, bifpn_and_heads=True)  # other calibration data: other scales
    with torch.no_grad():
        before = other(x[:1])
        other.load_state_dict(q.state_dict())
        after, want = other(x[:1]), q(x[:1])
    for a, b in zip(after[0] + after[1], want[0] + want[1]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before[0], want[0]))
    with pytest.raises(ValueError, match="expected 5 feature levels"):
        q.class_net([torch.zeros(1, 16, 16, 16)])


def test_bifpn_nodes_are_int8_close_and_bit_identical(det):
    m, q, x = det
    nodes = [(n, mod) for n, mod in q.named_modules() if n.startswith("fpn.cell.") and n.count(".") == 4]
    assert len(nodes) == 8 and all(isinstance(mod, QFnode) for _, mod in nodes)
    assert ("fpn.cell.0.fnode.0", "quantized", "QFnode") in q.quantization_report
    convs = sum(len(mod._convs) for _, mod in nodes)
    assert convs > 0  # the first layer's resample convs (backbone widths -> fpn_channels) are int8 too
    # one node on the features the float model gives it: close to the float node, and the CPU kernels'
    # integers equal the reference backend's
    with torch.no_grad():
        feats = m.backbone(x[:2])
        xs = list(feats)
        for key, r in m.fpn.resample.items():
            from effops.nn.bifpn import _apply_conv1x1, _pool

            xs.append(_pool(_apply_conv1x1(xs[-1], r.stage(), None, "t"), r.mode))
        for i in range(3):
            fnode, qnode = m.fpn.cell[0].fnode[i], q.fpn.cell[0].fnode[i]
            want, got = fnode(xs), qnode(xs)
            assert float((want - got).abs().max() / want.abs().max()) < 0.08
            with effops.use_backend("reference"):
                assert torch.equal(qnode(xs), got)
            xs.append(want)


def test_bifpn_and_heads_are_opt_in(det):
    from effops.models.efficientdet import HeadNet
    from effops.nn.bifpn import _Node

    m, _, x = det
    q = quantize(m, x[:4], batch_size=4)
    assert type(q.class_net) is HeadNet and type(q.fpn.cell[0].fnode[0]) is _Node
    assert not any(k in ("QHeadNet", "QFnode") for _, _, k in q.quantization_report)
    with pytest.raises(TypeError, match="bifpn_and_heads must be True or False"):
        quantize(m, x[:4], bifpn_and_heads="yes")
