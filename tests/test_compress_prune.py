"""effops.compress.prune: exact slicing (removing dead channels leaves the function unchanged),
widths / params / MACs equal a freshly built model of those widths, criteria, target_macs,
ignore, reload from a state_dict, bad input, the fused modules and torch.compile."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from effops.compress import count_macs, count_params, prune, shrink_to
from effops.compress._prune_graph import build_groups
from effops.compress.prune import _keep_count
from effops.models import create_model
from effops.models.efficientdet import EfficientDet
from effops.models.efficientnet import BlockSpec, DepthwiseSeparableBlock, EfficientNet
from effops.nn import MBConv, DWSeparableConv2d, convert

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)


def _kill(model: nn.Module, amount: float, g: torch.Generator) -> int:
    """Make exactly the channels prune(amount) removes dead in every prunable group: BatchNorm
    gamma = beta = 0 over the whole group (so the group's tensor is 0 there and every consumer
    reads 0), or, for SE reduced channels (no BatchNorm), zero reduce filters and bias."""
    groups, _, _ = build_groups(model)
    killed = 0
    with torch.no_grad():
        for gr in groups:
            if gr.fixed or gr.size < 2:
                continue
            dead = torch.randperm(gr.size, generator=g)[: gr.size - _keep_count(gr.size, amount, 1, 1)]
            killed += len(dead)
            for s in gr.sites:
                m = model.get_submodule(s.name)
                if gr.has_bn and s.kind == "bn":
                    m.weight[dead] = 0
                    m.bias[dead] = 0
                elif not gr.has_bn and s.kind == "out":
                    m.weight[dead] = 0
                    if m.bias is not None:
                        m.bias[dead] = 0
    return killed


def _flat(o):
    return [o] if isinstance(o, torch.Tensor) else [t for q in o for t in _flat(q)]


def _max_rel(a, b) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(_flat(a), _flat(b)))


def _dead_then_prune(model, x, amount=0.5):
    g = torch.Generator().manual_seed(0)
    model.eval()
    _randomize_bn(model, g)
    assert _kill(model, amount, g) > 0
    with torch.no_grad():
        ref = model(x)
    pruned, rep = prune(model, amount=amount, example_input=x)
    pruned.eval()
    with torch.no_grad():
        out = pruned(x)
    return ref, out, pruned, rep


# ----------------------------------------------------------------------------- exactness
def test_exact_effops_efficientnet():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    ref, out, pruned, rep = _dead_then_prune(model, x)
    assert _max_rel(out, ref) < 1e-5
    assert rep.params_after < 0.35 * rep.params_before and rep.macs_after < 0.35 * rep.macs_before
    # the modules are still effops's fused ones, and their widths changed
    assert type(pruned.blocks[1][0]) is MBConv and type(pruned.blocks[0][0]) is DepthwiseSeparableBlock
    assert pruned.blocks[1][0].conv_dw.in_channels == 48 and pruned.conv_head.out_channels == 640
    assert "expand_to=48" in repr(pruned.blocks[1][0])
    names = {g.name for g in rep.groups}
    assert {"conv_stem", "blocks.1.0.conv_pw", "blocks.1.0.se.conv_reduce", "conv_head"} <= names
    assert dict(rep.kept)["classifier"] == "the model's output"


def test_exact_converted_timm():
    torch.manual_seed(0)
    model = convert(timm.create_model("tf_efficientnet_b0", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    ref, out, pruned, rep = _dead_then_prune(model, x)
    assert _max_rel(out, ref) < 1e-5
    assert type(pruned.blocks[1][0]).__name__ == "FusedTimmBlock"
    assert pruned.num_features == pruned.classifier.in_features == 640
    assert pruned.feature_info[1]["num_chs"] == 12
    assert not rep.opaque


def test_exact_converted_torchvision_mobilenet_v3():
    torch.manual_seed(0)
    model = convert(torchvision.models.mobilenet_v3_small(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    ref, out, _, rep = _dead_then_prune(model, x)
    assert _max_rel(out, ref) < 1e-5
    # the hidden Linear of the classifier is a group of its own (Linear out -> Linear in)
    assert "classifier.0" in {g.name for g in rep.groups}


def test_exact_efficientdet_bifpn_and_heads():
    torch.manual_seed(0)
    model = create_model("tf_efficientdet_d0", num_classes=5, image_size=128)
    x = torch.randn(1, 3, 128, 128)
    ref, out, pruned, rep = _dead_then_prune(model, x)
    assert _max_rel(out, ref) < 1e-5
    # every BiFPN node, the extra levels and both heads' inputs share one channel set
    fpn = [g for g in rep.groups if any(n.startswith("fpn.cell.2.fnode.7") for n in g.layers)]
    assert len(fpn) == 1 and fpn[0].before == 64 and fpn[0].after == 32
    assert any(n.startswith("class_net.conv_rep.0") for n in fpn[0].layers)
    assert any(n.startswith("fpn.resample.3.conv") for n in fpn[0].layers)
    assert pruned.config.fpn_channels == 32
    assert pruned.config.backbone_channels == (20, 56, 160) == tuple(pruned.fpn.in_channels)
    kept = dict(rep.kept)
    assert "class_net.predict.conv_pw" in kept and "box_net.predict.conv_pw" in kept


# ----------------------------------------------------------------------------- counts
def _fresh_efficientnet(p: EfficientNet, num_classes: int) -> EfficientNet:
    specs = []
    for stage in p.blocks:
        row = []
        for blk in stage:
            ds = isinstance(blk, DepthwiseSeparableBlock)
            cin = blk.conv_dw.in_channels if ds else blk.conv_pw.in_channels
            out = (blk.conv_pw if ds else blk.conv_pwl).out_channels
            row.append(BlockSpec("ds" if ds else "ir", cin, out, blk.conv_dw.kernel_size[0], blk.conv_dw.stride[0],
                                 blk.conv_dw.in_channels, blk.se.conv_reduce.out_channels, 0.0))
        specs.append(row)
    return EfficientNet("efficientnet_b0", specs, "symmetric", 1e-5, 0.1, num_classes=num_classes, in_chans=3,
                        drop_rate=0.0, num_features=p.conv_head.out_channels, image_size=224,
                        channels_last=True).eval()


@pytest.mark.parametrize("criterion", ["bn_scale", "l1"])
def test_counts_equal_fresh_model(criterion):
    torch.manual_seed(1)
    model = create_model("efficientnet_b0", num_classes=7).eval()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    x = torch.randn(1, 3, 64, 64)
    pruned, rep = prune(model, amount=0.3, criterion=criterion, example_input=x)
    fresh = _fresh_efficientnet(pruned, 7)
    assert count_params(fresh) == count_params(pruned) == rep.params_after
    assert count_macs(fresh, x) == count_macs(pruned, x) == rep.macs_after
    assert rep.params_before == count_params(model) and rep.macs_before == count_macs(model, x)
    fresh.load_state_dict(pruned.state_dict(), strict=True)  # same keys, same shapes
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned.eval()(x))
    changed = {n: (a, b) for n, _, a, b in rep.layers if a != b}
    assert changed["blocks.1.0.conv_dw"] == ((96, 96), (67, 67))


def test_counts_efficientdet_equal_fresh_bifpn_and_heads():
    torch.manual_seed(0)
    model = create_model("tf_efficientdet_d0", num_classes=3, image_size=128).eval()
    x = torch.randn(1, 3, 128, 128)
    pruned, rep = prune(model, amount=0.25, example_input=x)
    cfg = pruned.config
    fresh = EfficientDet(replace(model.config, fpn_channels=cfg.fpn_channels, backbone_channels=cfg.backbone_channels),
                         backbone=copy.deepcopy(pruned.backbone)).eval()
    assert count_params(fresh) == count_params(pruned)
    assert count_macs(fresh, x) == count_macs(pruned, x)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        assert _max_rel(fresh(x), pruned(x)) == 0


# ----------------------------------------------------------------------------- criteria, options
def test_criteria_rank_differently_and_taylor_needs_a_loss():
    from effops.compress.study import mini_net

    torch.manual_seed(2)
    model = mini_net(1.0, in_chans=3, num_classes=4).eval()
    _randomize_bn(model, torch.Generator().manual_seed(2))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="taylor.*loss_fn"):
        prune(model, amount=0.5, criterion="taylor", example_input=x)
    kept = {}
    for crit, kw in (("bn_scale", {}), ("l1", {}), ("taylor", dict(targets=y)),
                     ("taylor", dict(loss_fn=lambda out: nn.functional.cross_entropy(out, y)))):
        p, rep = prune(model, amount=0.5, criterion=crit, example_input=x, **kw)
        assert all(g.criterion == ("l1" if crit == "bn_scale" and "se." in g.name else crit) for g in rep.groups)
        kept.setdefault(crit, []).append(p[3].bn2.weight.detach().clone())  # the first MBConv's depthwise BN
    # same widths for every criterion, different channels chosen (taylor with targets == taylor with loss_fn)
    assert torch.equal(kept["taylor"][0], kept["taylor"][1])
    assert not torch.equal(kept["bn_scale"][0], kept["l1"][0]) and not torch.equal(kept["bn_scale"][0], kept["taylor"][0])
    # bn_scale keeps the channels with the largest summed |gamma| of the group's BNs (bn1, bn2)
    g1, g2 = model[3].bn1.weight.detach().abs(), model[3].bn2.weight.detach().abs()
    expect = torch.sort(torch.argsort(-(g1 + g2), stable=True)[:32]).values
    assert torch.equal(kept["bn_scale"][0], model[3].bn2.weight.detach()[expect])
    for g in model.parameters():
        assert g.grad is None  # taylor used autograd.grad: the model's .grad stay untouched


def test_target_macs_and_ignore():
    from effops.compress.study import mini_net

    torch.manual_seed(3)
    model = create_model("efficientnet_b0", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    small, xs = mini_net(1.0, in_chans=3).eval(), torch.randn(1, 3, 16, 16)
    macs = count_macs(small, xs)
    _, rep = prune(small, target_macs=0.5, example_input=xs)
    assert 0.45 * macs < rep.macs_after <= 0.5 * macs and 0 < rep.amount < 0.6
    _, rep2 = prune(small, target_macs=int(0.6 * macs), example_input=xs)
    assert 0.55 * macs < rep2.macs_after <= 0.6 * macs
    p3, rep3 = prune(model, amount=0.5, example_input=x, ignore=["blocks.2", model.conv_head])
    assert p3.blocks[2][1].conv_dw.in_channels == 240 and p3.blocks[2][0].conv_pwl.out_channels == 40
    assert p3.blocks[3][0].conv_pwl.out_channels == 40  # 80 -> 40: stage 3's output group is its own
    assert p3.conv_head.out_channels == 1280 and p3.blocks[1][0].conv_dw.in_channels == 48
    assert any("ignored" in why for _, why in rep3.kept)
    assert model.blocks[1][0].conv_dw.in_channels == 96  # the input model is not changed


def test_shrink_to_reloads_a_pruned_state_dict():
    torch.manual_seed(4)
    model = create_model("efficientnet_b0", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    p, _ = prune(model, amount=0.4, criterion="l1", example_input=x)
    fresh = shrink_to(create_model("efficientnet_b0", num_classes=3), p.state_dict()).eval()
    fresh.load_state_dict(p.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), p.eval()(x))
    bad = dict(p.state_dict())
    bad["classifier.weight"] = torch.zeros(2, bad["classifier.weight"].shape[1])
    with pytest.raises(ValueError, match="classifier"):
        shrink_to(create_model("efficientnet_b0", num_classes=3), bad)


def test_opaque_layer_is_kept_and_named():
    class Scale(nn.Module):  # a layer prune does not know
        def forward(self, x):
            return x * 2

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Scale(),
                          nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.SiLU(),
                          MBConv(32, 32, 3, expand_ratio=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    p, rep = prune(model, amount=0.5, example_input=torch.randn(2, 3, 16, 16))
    assert p[0].out_channels == 16  # read by the unknown layer: kept
    assert p[4].out_channels == 16 and p[7].conv_dw.in_channels == 64 and p[10].in_features == 16
    assert ("3", "Scale: a layer prune does not know") in rep.opaque
    assert any("Scale" in why for _, why in rep.kept)
    assert type(p[7]) is MBConv and p[7].skip


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    model = create_model("efficientnet_b0", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    for a in (0, 0.0, 1, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"amount must be in \(0, 1\)"):
            prune(model, amount=a, example_input=x)
    for a in (True, "0.5"):
        with pytest.raises(TypeError, match="amount"):
            prune(model, amount=a, example_input=x)
    with pytest.raises(ValueError, match="exactly one of amount"):
        prune(model, amount=0.5, target_macs=0.5, example_input=x)
    with pytest.raises(ValueError, match="exactly one of amount"):
        prune(model, example_input=x)
    with pytest.raises(ValueError, match="criterion"):
        prune(model, amount=0.5, criterion="l2", example_input=x)
    with pytest.raises(ValueError, match=r"example_input of shape \[1, 1, 32, 32\] does not run"):
        prune(model, amount=0.5, example_input=torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        prune(model, amount=0.5, example_input=[[1.0]])
    with pytest.raises(ValueError, match="no prunable layer"):
        prune(nn.Sequential(nn.Conv2d(3, 4, 3)), amount=0.5, example_input=x)
    with pytest.raises(ValueError, match="not supported"):
        prune(nn.Conv2d(3, 4, 3), amount=0.5, example_input=x)
    with pytest.raises(ValueError, match="ignore names 'nope'"):
        prune(model, amount=0.5, example_input=x, ignore=["nope"])
    with pytest.raises(ValueError, match="target_macs .* below what pruning can reach"):
        prune(model, target_macs=10, example_input=x)
    with pytest.raises(ValueError, match="target_macs as a float"):
        prune(model, target_macs=1.5, example_input=x)
    with pytest.raises(TypeError, match="model must be"):
        prune("efficientnet_b0", amount=0.5, example_input=x)


# ----------------------------------------------------------------------------- kernels, compile
@pytest.mark.slow  # torch.compile on 2 cores: ~30 s
def test_pruned_runs_fused_and_under_compile():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
                          MBConv(16, 16, 3, expand_ratio=4), MBConv(16, 24, 5, stride=2, expand_ratio=6),
                          DWSeparableConv2d(24, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    _randomize_bn(model, torch.Generator().manual_seed(6))
    x = torch.randn(2, 3, 16, 16)
    p, rep = prune(model, amount=0.5, example_input=x)
    p.eval()
    assert [type(m) for m in p][3:6] == [MBConv, MBConv, DWSeparableConv2d]
    assert p[3].conv_dw.in_channels == 32 and p[5].conv_pw.out_channels == 16
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        p(x)
    ops = {str(k) for k in fc.get_flop_counts()["Global"]}
    assert any("effops" in o for o in ops), ops  # runs on effops's fused ops
    with torch.no_grad():
        eager = p(x)
        compiled = torch.compile(p, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
