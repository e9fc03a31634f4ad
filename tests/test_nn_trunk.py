"""effops.nn.convert on a network's stem and head (effops.nn._trunk): timm EfficientNet /
EfficientNetFeatures / MobileNetV3 get a fused subclass of their own class; torchvision's
Conv2dNormActivation becomes FusedConvNormAct."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from effops.nn import _trunk, convert

from test_nn_convert import assert_grads_close, randomize_bn  # noqa: E402  (the same checks)

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _timm(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, **kw)).eval()


def _x(n=2, h=64, w=48, seed=1):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-4):
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel <= tol, rel


@pytest.mark.parametrize("name,what", [
    ("efficientnet_b0", "conv_stem+bn1, conv_head+bn2"),
    ("tf_efficientnet_b0", "conv_stem+bn1, conv_head+bn2"),  # TF 'same' padding (Conv2dSame stem)
    ("mobilenetv2_100", "conv_stem+bn1, conv_head+bn2"),  # ReLU6
    ("mobilenetv3_large_100", "conv_stem+bn1"),  # hard-swish; its head conv runs on the pooled map
])
def test_timm_stem_and_head_fused(name, what):
    model = _timm(name)
    keys = list(model.state_dict())
    x = _x(h=67, w=50)  # odd sizes: the stride-2 stem's TF padding is asymmetric
    with torch.no_grad():
        ref = model(x)
        fused, rep = convert(copy.deepcopy(model), report=True)
        out = fused(x)
        out_cl = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert ("", type(model).__name__, f"{type(model).__name__} with {what} fused") in rep.replaced, str(rep)
    assert isinstance(fused, type(model)) and type(fused).__name__ == type(model).__name__
    assert list(fused.state_dict()) == keys
    _close(out, ref)
    _close(out_cl, ref)
    fused.load_state_dict(model.state_dict())


def test_timm_features_backbone_fused():
    """timm's features_only EfficientNet (effdet's backbone): every feature map equal."""
    model = _timm("efficientnet_b0", features_only=True, out_indices=(0, 2, 3, 4))
    x = _x(h=96, w=64)
    with torch.no_grad():
        ref = model(x)
        fused, rep = convert(copy.deepcopy(model), report=True)
        out = fused(x)
    assert any(r[0] == "" and r[2].endswith("conv_stem+bn1 fused") for r in rep.replaced), str(rep)
    assert len(out) == len(ref) == 4
    for o, r in zip(out, ref):
        _close(o, r)


def test_timm_trunk_pickles_copies_and_converts_once():
    model = _timm("mobilenetv2_100")
    x = _x()
    fused = convert(copy.deepcopy(model))
    with torch.no_grad():
        out = fused(x)
        for other in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
            assert type(other) is type(fused)
            torch.testing.assert_close(other(x), out)
        again, rep = convert(fused, report=True)
        assert again is fused and type(again) is type(fused)
        assert not rep.replaced and not rep.skipped, str(rep)
        torch.testing.assert_close(again(x), out)


def test_timm_trunk_hooks_and_checkpointing_run_timms_own_forward():
    model = _timm("efficientnet_b0")
    x = _x()
    fused = convert(copy.deepcopy(model))
    seen = []
    with torch.no_grad():
        ref = model(x)
        h = fused.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        _close(fused(x), ref)  # a hook added after the conversion fires: timm's forward runs
        assert seen == [torch.Size([2, 32, 32, 24])]
        h.remove()
        fused.set_grad_checkpointing(True)
        _close(fused(x), ref)


def test_timm_trunk_training_matches_eager():
    """Training mode (BN batch statistics): outputs, running statistics and gradients as timm's
    (a smooth activation: with ReLU6 at batch 2 a last-bit difference in a batch statistic moves
    values across the clip and the gradients differ by percents, converted or not)."""
    model = _timm("efficientnet_b0", drop_path_rate=0.0).train()
    fused = convert(copy.deepcopy(model))
    x = _x(seed=3)
    a, b = model(x), fused(x)
    _close(b, a, 1e-4)
    a.square().mean().backward()
    b.square().mean().backward()
    assert_grads_close(model, fused, 1e-3)
    for (n, p), (_, q) in zip(model.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


def test_timm_trunk_other_forward_is_reported(monkeypatch):
    """A timm version whose forward reads other attributes: nothing is swapped, the reason is reported."""
    key = ("timm.models.efficientnet", "EfficientNet")
    mixin, methods, pairs = _trunk._TIMM_FORWARDS[key]
    other = {k: v + ("something_new",) for k, v in methods.items()}
    monkeypatch.setitem(_trunk._TIMM_FORWARDS, key, (mixin, other, pairs))
    model = _timm("efficientnet_b0")
    fused, rep = convert(copy.deepcopy(model), report=True)
    assert type(fused) is type(model)
    assert any(r[0] == "" and "another timm version" in r[2] for r in rep.skipped), str(rep)


def test_timm_trunk_compiles_without_graph_breaks():
    fused = convert(_timm("efficientnet_b0"))
    x = _x()
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(fused)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        _close(torch.compile(fused, backend="eager", fullgraph=True)(x), fused(x), 1e-5)


# ------------------------------------------------------------------------------ torchvision
def test_conv_norm_act_stays_a_sequential():
    from torchvision.ops.misc import Conv2dNormActivation

    torch.manual_seed(0)
    m = randomize_bn(nn.Sequential(Conv2dNormActivation(3, 16, 3, 2, activation_layer=nn.Hardswish),
                                   Conv2dNormActivation(16, 24, 1, norm_layer=None),  # conv + act
                                   Conv2dNormActivation(24, 8, 1, activation_layer=None))).eval()  # conv + BN
    x = _x(h=33, w=17)
    with torch.no_grad():
        ref = m(x)
        fused, rep = convert(copy.deepcopy(m), report=True)
        assert [r[2] for r in rep.replaced] == ["FusedConvNormAct"] * 3, str(rep)
        assert isinstance(fused[0], nn.Sequential) and len(fused[0]) == 3 and isinstance(fused[0][1], nn.BatchNorm2d)
        assert list(fused.state_dict()) == list(m.state_dict())
        _close(fused(x), ref, 1e-5)
        seen = []
        fused[0][2].register_forward_hook(lambda mod, i, o: seen.append(1))
        _close(fused(x), ref, 1e-5)  # a hooked layer: the layers run as they are
        assert seen == [1]


def test_conv_norm_act_train_and_grads():
    from torchvision.ops.misc import Conv2dNormActivation

    torch.manual_seed(0)
    m = randomize_bn(Conv2dNormActivation(3, 8, 3, 2, activation_layer=nn.SiLU)).train()
    fused = convert(copy.deepcopy(m))
    x = _x(h=15, w=10).requires_grad_()
    a, b = m(x), fused(x)
    _close(b, a, 1e-5)
    a.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    b.sum().backward()
    torch.testing.assert_close(x.grad, gx, rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(m.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    fused.eval(), m.eval()  # BN frozen: gradients through the folded weights
    x.grad = None
    for mod in (m, fused):
        mod.zero_grad()
        mod(x).square().sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("kw", [dict(in_chs=16, out_chs=24, kernel_size=1),  # MobileNetV3's last stage
                                dict(in_chs=16, out_chs=16, kernel_size=3, skip=True),  # with its residual
                                dict(in_chs=16, out_chs=32, kernel_size=3, stride=2, group_size=8)])  # grouped
def test_timm_conv_bn_act_block(kw):
    from timm.models._efficientnet_blocks import ConvBnAct

    torch.manual_seed(0)
    block = randomize_bn(ConvBnAct(act_layer=nn.Hardswish, **kw)).eval()
    x = torch.randn(2, 16, 11, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = block(x)
        fused, rep = convert(copy.deepcopy(block), report=True)
        assert type(fused).__name__ == "FusedConvBnAct" and list(fused.state_dict()) == list(block.state_dict())
        _close(fused(x), ref, 1e-5)
        _close(fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)), ref, 1e-5)
    block.train(), fused.train()
    a, b = block(x), fused(x)
    _close(b, a, 1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (n, p), (_, q) in zip(block.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=n)
