"""effops.nn: the fused modules and convert(model) on timm, torchvision and effdet models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import effops
from effops.nn import DWSeparableConv2d, MBConv, convert

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


MODELS = [
    ("timm", "efficientnet_b0", 16), ("timm", "tf_efficientnet_b0", 16), ("timm", "mobilenetv2_100", 17),
    ("timm", "mobilenetv3_large_100", 16), ("torchvision", "efficientnet_b0", 16),
    ("torchvision", "mobilenet_v2", 17), ("torchvision", "mobilenet_v3_large", 15),
    ("timm", "efficientnet_es", 18), ("timm", "tf_efficientnet_es", 18), ("torchvision", "mnasnet0_5", 16),
]


def assert_grads_close(a: nn.Module, b: nn.Module, tol: float):
    """Gradients equal up to tol relative to each tensor's largest entry, plus 1e-5 of the largest
    gradient anywhere: a BN bias feeding a training-mode BN has a mathematically zero gradient,
    and what is computed for it is rounding noise of the (large) gradients flowing past it."""
    floor = 1e-5 * max(p.grad.abs().max().item() for p in a.parameters() if p.grad is not None)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        err = (q.grad - p.grad).abs().max().item()
        assert err <= tol * p.grad.abs().max().item() + floor, (n, err)


def build(lib: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(name) if lib == "timm" else getattr(torchvision.models, name)()
    return randomize_bn(m).eval()


@pytest.mark.parametrize("lib,name,blocks", MODELS, ids=[f"{a}-{b}" for a, b, _ in MODELS])
def test_convert_parity(lib, name, blocks):
    model = build(lib, name)
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict().keys())
    with torch.no_grad():
        ref = model(x)
        conv, rep = convert(copy.deepcopy(model), report=True)
        out = conv(x)
        out_cl = conv.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    trunk = [r for r in rep.replaced if r[2] == "FusedConvNormAct" or r[2].endswith(" fused")]
    assert len(rep.replaced) - len(trunk) == blocks and not rep.skipped, str(rep)
    # the stem (and the head, where it is a conv on a feature map) run fused too (nn._trunk)
    if name != "mnasnet0_5":  # torchvision's MNASNet stem is plain layers in a Sequential
        assert trunk, str(rep)
    assert list(conv.state_dict().keys()) == keys, "state_dict keys must not change"
    for o in (out, out_cl):
        rel = ((o - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-4, rel
    # the original checkpoint loads into the converted model
    conv.load_state_dict(model.state_dict())


def test_convert_shares_weights_in_place():
    model = build("timm", "mobilenetv2_100")
    w = model.blocks[1][0].conv_dw.weight
    same = convert(model)
    assert same is model
    assert model.blocks[1][0].conv_dw.weight is w
    assert type(model.blocks[1][0]).__name__ == "FusedTimmBlock"
    copied = convert(build("timm", "mobilenetv2_100"), copy_model=True)
    assert copied is not model


def test_convert_train_mode_matches_eager():
    """Training (BN batch statistics): same outputs, same running statistics, same gradients."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("efficientnet_b0", drop_path_rate=0.0)).train()
    fused = convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out_ref, out = model(x), fused(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    out_ref.sum().backward()
    out.sum().backward()
    assert_grads_close(model, fused, 1e-3)
    for (n, b), (_, c) in zip(model.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=n)


def test_convert_frozen_bn_trains_through_the_fused_backward():
    """BN in eval mode while the rest trains: the fused kernels with folded BN, and gradients
    (to conv weights and to BN gamma/beta through the folding) equal eager's."""
    model = build("torchvision", "mobilenet_v3_large")
    fused = convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    model(x).square().mean().backward()
    fused(x).square().mean().backward()
    assert_grads_close(model, fused, 1e-3)


def test_convert_effdet_separable_conv():
    effdet = pytest.importorskip("effdet")
    from effdet.efficientdet import SeparableConv2d

    torch.manual_seed(0)
    for kwargs in (dict(act_layer=None), dict(act_layer=nn.SiLU), dict(padding="same", stride=2, bias=True)):
        m = randomize_bn(SeparableConv2d(16, 24, **kwargs)).eval()
        x = torch.randn(2, 16, 11, 13)
        with torch.no_grad():
            ref = m(x)
            fused, rep = convert(copy.deepcopy(m), report=True)
            out = fused(x)
        assert rep.replaced and type(fused).__name__ == "FusedSeparableConv2d"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_unknown_and_unsupported_modules_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU())
    out, rep = convert(model, report=True)
    assert out is model and not rep.replaced
    # a timm block with an activation the kernels do not have: reported, kept
    m = timm.create_model("mobilenetv2_100", act_layer=nn.GELU).eval()
    _, rep = convert(m, report=True)
    assert not rep.replaced and rep.skipped and "GELU" in rep.skipped[0][2]
    assert "kept" in str(rep)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert("resnet")


# ------------------------------------------------------------------------------ native modules
def _eager_sepconv(mod: DWSeparableConv2d, x: torch.Tensor) -> torch.Tensor:
    """The same computation with plain PyTorch modules (symmetric padding)."""
    a = mod._act(x) if mod.preact else x
    p = mod.padding
    d = nn.functional.conv2d(a, mod.conv_dw.weight, stride=mod.conv_dw.stride, padding=p,
                             dilation=mod.conv_dw.dilation, groups=a.shape[1])
    if mod.bn_dw is not None:
        d = mod.bn_dw(d)
    if not mod.preact:
        d = mod._act(d)
    y = mod.conv_pw(d)
    if mod.bn_pw is not None:
        y = mod.bn_pw(y)
    return mod._pw_act(y)


@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_dwseparable_module(preact, train):
    torch.manual_seed(0)
    mod = randomize_bn(DWSeparableConv2d(8, 12, 3, stride=1, padding=1, act="silu", preact=preact,
                                         dw_norm=not preact, bias=True))
    mod.train(train)
    ref_mod = copy.deepcopy(mod)
    x = torch.randn(2, 8, 9, 10, requires_grad=True)
    out = mod(x)
    ref = _eager_sepconv(ref_mod, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    (g1,) = torch.autograd.grad(out.sum(), x)
    (g2,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    assert "preact=True" in repr(mod) if preact else "act='silu'" in repr(mod)


def test_mbconv_module_eval_and_train_agree_on_statistics():
    torch.manual_seed(0)
    block = randomize_bn(MBConv(16, 16, kernel_size=5, stride=1, expand_ratio=4, se_ratio=0.25))
    x = torch.randn(4, 16, 12, 12)
    # train mode updates the running statistics like eager BN; eval mode then uses them, fused
    block.train()
    y_train = block(x)
    assert y_train.shape == x.shape
    block.eval()
    with torch.no_grad():
        y_eval = block(x)
        with effops.use_backend("reference"):
            y_ref = block(x)
    torch.testing.assert_close(y_eval, y_ref, rtol=1e-4, atol=1e-5)
    assert "expand_to=64" in repr(block) and "se=True" in repr(block)


def test_flop_counter_sees_the_fused_ops():
    """torch.utils.flop_counter counts the custom ops like the convs they replace, also in
    inference (the prepared fast path steps aside when a dispatch mode is watching)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build("timm", "efficientnet_b0")
    fused = convert(copy.deepcopy(model))
    x = torch.randn(1, 3, 64, 64)
    counts = []
    for m in (model, fused):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
        counts.append(fc.get_total_flops())
    assert abs(counts[1] - counts[0]) / counts[0] < 0.01, counts


# ------------------------------------------------------------------------------ strict recognition
def _timm_ir(**kw):
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    torch.manual_seed(0)
    kw.setdefault("se_layer", SqueezeExcite)
    return randomize_bn(InvertedResidual(16, 16, dw_kernel_size=3, exp_ratio=4, act_layer=nn.SiLU, **kw)).eval()


def _kept(block: nn.Module, x: torch.Tensor, reason: str):
    """convert keeps the block, says why, and the model still computes what it did."""
    wrapped = nn.Sequential(block)
    with torch.no_grad():
        ref = wrapped(x)
        out, rep = convert(copy.deepcopy(wrapped), report=True)
        got = out(x)
    assert not rep.replaced and len(rep.skipped) == 1, str(rep)
    assert reason in rep.skipped[0][2], rep.skipped[0][2]
    torch.testing.assert_close(got, ref)


class _ScaledConv(nn.Conv2d):  # a Conv2d subclass computing something else (like timm's StdConv2d)
    def forward(self, x):
        return super().forward(x) * 2


class SiLU(nn.Module):  # named like torch's, computes something else
    def forward(self, x):
        return x * torch.tanh(x)


def test_strict_recognition_keeps_what_it_does_not_understand():
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    x = torch.randn(2, 16, 12, 12)
    ok = _timm_ir()
    _, rep = convert(nn.Sequential(copy.deepcopy(ok)), report=True)
    assert len(rep.replaced) == 1
    b = copy.deepcopy(ok)
    b.extra = nn.ReLU()  # a stage the block class does not have: the fused form would drop it
    _kept(b, x, "unrecognised stage(s) extra")
    b = copy.deepcopy(ok)
    b.conv_dw.register_forward_hook(lambda m, i, o: o * 0.5)
    _kept(b, x, "conv_dw has hooks")
    b = copy.deepcopy(ok)
    b.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    _kept(b, x, "the block has hooks")
    b = copy.deepcopy(ok)
    conv = _ScaledConv(64, 64, 3, padding=1, groups=64, bias=False)
    conv.weight.data.copy_(b.conv_dw.weight.data)
    b.conv_dw = conv
    _kept(b, x, "_ScaledConv")
    b = copy.deepcopy(ok)
    b.bn2.act = SiLU()
    _kept(b, x, "activation SiLU has no fused equivalent")
    from timm.layers import SEModule
    b = copy.deepcopy(ok)
    b.se = SEModule(64)
    _kept(b, x, "squeeze-excite module SEModule")
    b = copy.deepcopy(ok)
    b.bn1 = nn.GroupNorm(4, 64)
    _kept(b, x, "GroupNorm")
    b = copy.deepcopy(ok)
    b.aa = nn.AvgPool2d(1)
    _kept(b, x, "anti-aliasing")

    class SubIR(InvertedResidual):  # a subclass may compute anything: not matched at all
        pass

    torch.manual_seed(0)
    sub = SubIR(16, 16, exp_ratio=4).eval()
    _, rep = convert(nn.Sequential(sub), report=True)
    assert not rep.replaced and not rep.skipped
    # space-to-depth stages (efficientnet_x / efficientnet_h)
    for cls, kw in ((DepthwiseSeparableConv, {}), (InvertedResidual, {"exp_ratio": 4})):
        torch.manual_seed(0)
        blk = randomize_bn(cls(16, 24, dw_kernel_size=3, s2d=1, **kw)).eval()
        _kept(blk, x, "space-to-depth stage")


def test_known_unfused_blocks_are_reported():
    x = torch.randn(1, 3, 32, 32)
    for name, reason in (("efficientnet_cc_b0_4e", "CondConv"), ("ghostnet_050", "Ghost module"),
                         ("mixnet_s", "MixedConv2d")):
        torch.manual_seed(0)
        m = randomize_bn(timm.create_model(name)).eval()
        with torch.no_grad():
            ref = m(x)
            conv, rep = convert(copy.deepcopy(m), report=True)
            out = conv(x)
        assert any(reason in why for _, _, why in rep.skipped), str(rep)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ------------------------------------------------------------------------------ dense-conv blocks
def _edge(**kw):
    from timm.models._efficientnet_blocks import EdgeResidual, SqueezeExcite

    torch.manual_seed(0)
    args = dict(exp_kernel_size=3, exp_ratio=4, act_layer=nn.SiLU)
    args.update(kw)
    if args.pop("se", False):
        args["se_layer"] = SqueezeExcite
    return randomize_bn(EdgeResidual(args.pop("cin", 16), args.pop("cout", 16), **args))


def _fused_mbconv(expand: float, cin=16, cout=16, stride=1):
    from functools import partial

    from torchvision.models.efficientnet import FusedMBConv, FusedMBConvConfig

    torch.manual_seed(0)
    cnf = FusedMBConvConfig(expand, 3, stride, cin, cout, 1)
    return randomize_bn(FusedMBConv(cnf, 0.0, partial(nn.BatchNorm2d, eps=1e-3)))


DENSE = {
    "edge": lambda: _edge(), "edge-se": lambda: _edge(se=True), "edge-s2": lambda: _edge(stride=2, cout=24),
    "edge-same": lambda: _edge(pad_type="same", stride=2, exp_kernel_size=4, se=True),
    "edge-relu-5x5": lambda: _edge(act_layer=nn.ReLU, exp_kernel_size=5, cin=16, cout=32),
    "fused-mbconv": lambda: _fused_mbconv(4), "fused-mbconv-s2": lambda: _fused_mbconv(4, 16, 24, 2),
}


@pytest.mark.parametrize("kind", sorted(DENSE))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_dense_blocks_eval(kind, layout):
    block = DENSE[kind]().eval()
    x = torch.randn(2, 16, 13, 11, generator=torch.Generator().manual_seed(4))
    if layout == "nhwc":
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = block(x)
        fused, rep = convert(copy.deepcopy(block), report=True)
        out = fused(x)
        again = fused(x)  # the prepared (cached) path
    assert type(fused).__name__ == "FusedDenseBlock", str(rep)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    for o in (out, again):
        torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["edge-se", "fused-mbconv"])
def test_dense_blocks_train_and_frozen_bn(kind):
    """Train mode: the original's computation (batch statistics, same running averages, same
    gradients); frozen BN (eval with gradients): folded weights, gradients equal eager's."""
    block = DENSE[kind]()
    x = torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(5))
    for train in (True, False):
        ref_b = copy.deepcopy(block).train(train)
        fused = convert(copy.deepcopy(block)).train(train)
        assert type(fused).__name__ == "FusedDenseBlock"
        ref, out = ref_b(x), fused(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        ref.square().mean().backward()
        out.square().mean().backward()
        assert_grads_close(ref_b, fused, 1e-3)
        for (n, b), (_, c) in zip(ref_b.named_buffers(), fused.named_buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=n)


def test_lone_fused_mbconv_is_kept():
    """A FusedMBConv without expansion (kxk conv + BN + act): no block kernel; its conv stage
    (a Conv2dNormActivation) runs with the BN folded (nn._trunk), as a network's stem does."""
    block, x = _fused_mbconv(1).eval(), torch.randn(1, 16, 8, 8)
    wrapped = nn.Sequential(block)
    with torch.no_grad():
        ref = wrapped(x)
        out, rep = convert(copy.deepcopy(wrapped), report=True)
        got = out(x)
    assert len(rep.skipped) == 1 and "no faster than eager" in rep.skipped[0][2], str(rep)
    assert [r[2] for r in rep.replaced] == ["FusedConvNormAct"], str(rep)
    assert type(out[0]).__name__ == "FusedMBConv"
    torch.testing.assert_close(got, ref)


def test_dense_block_weights_update_invalidates_the_prepared_conv():
    block = _edge(se=True).eval()
    fused = convert(copy.deepcopy(block))
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        fused(x)
        for m in (block, fused):
            m.conv_exp.weight.mul_(1.5)
            m.bn1.running_var.mul_(2.0)
        torch.testing.assert_close(fused(x), block(x), rtol=1e-4, atol=1e-5)
