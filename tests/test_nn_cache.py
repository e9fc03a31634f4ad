"""The fused modules' prepared-weight cache (effops.nn._parts): every way a module's parameters,
buffers or options can change after an eval call must be seen - in-place updates, writes
through ``.data`` (no version bump), load_state_dict, an EMA loop, BN eps / momentum, padding,
stride, preact - and never reuse kernel arguments prepared for the old state (issue 14).

The oracle is the module's function composed from plain PyTorch ops on its current parameters,
so a stale cache anywhere (prepared ops, folded BN) shows as a difference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from effops.nn import DWSeparableConv2d, MBConv

ACTS = {"silu": F.silu, "relu": F.relu, "none": lambda t: t}


def _bn(bn, t):
    return t if bn is None else F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def eager_dwsep(m: DWSeparableConv2d, x):
    act, pw_act = ACTS[m.act_name], ACTS[m.pw_act_name]
    c = m.conv_dw
    a = act(x) if m.preact else x
    d = F.conv2d(a, c.weight, None, c.stride, m.padding, c.dilation, c.groups)
    d = _bn(m.bn_dw, d)
    if not m.preact:
        d = act(d)
    p = _bn(m.bn_pw, F.conv2d(d, m.conv_pw.weight, m.conv_pw.bias))
    return pw_act(p)


def eager_mbconv(m: MBConv, x):
    act = ACTS[m.act_name]
    h = x if m.conv_pw is None else act(_bn(m.bn1, F.conv2d(x, m.conv_pw.weight)))
    c = m.conv_dw
    d = act(_bn(m.bn2, F.conv2d(h, c.weight, None, c.stride, m.padding, c.dilation, c.groups)))
    if m.se is not None:
        d = m.se(d)
    out = _bn(m.bn3, F.conv2d(d, m.conv_pwl.weight))
    return out + x if m.skip else out


def randomize(m: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in name else torch.randn(t.shape, generator=g) * 0.5)
    return m


def check(m, x, eager, *, ctx=torch.no_grad):
    with ctx():
        got = m(x)
        want = eager(m, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return got


@pytest.fixture
def dws():
    return randomize(DWSeparableConv2d(8, 12, 3, padding=1, act="silu", bias=True), 0).eval()


@pytest.fixture
def mb():
    return randomize(MBConv(8, 8, 3, expand_ratio=4, se_ratio=0.25), 1).eval()


_X = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=["nchw", "channels_last"])
def X(request):
    """The input in both layouts: channels_last eager inference of MBConv runs the whole-block
    plan (effops.nn._plan), NCHW the op-by-op prepared path; both caches must see every change."""
    return _X.clone() if request.param == "nchw" else _X.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_data_writes_without_version_bump(dws, mb, ctx, X):
    for m, eager in ((dws, eager_dwsep), (mb, eager_mbconv)):
        x = X.clone(memory_format=torch.preserve_format)
        check(m, x, eager, ctx=ctx)  # fills the cache
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if not p.is_floating_point():
                continue
            v = p._version
            p.data.copy_(p.data * 0.5 + 0.25)  # invisible to the version counter
            assert p._version == v
            check(m, x, eager, ctx=ctx), name


def test_in_place_updates_and_replacement(dws, X):
    check(dws, X, eager_dwsep)
    with torch.no_grad():
        dws.conv_dw.weight.mul_(-1)
        dws.bn_pw.running_mean.add_(1)
    check(dws, X, eager_dwsep)
    dws.conv_pw.weight = torch.nn.Parameter(torch.randn_like(dws.conv_pw.weight))  # new tensor
    check(dws, X, eager_dwsep)
    dws.bn_dw.weight.data = torch.randn(8)  # new storage through .data
    check(dws, X, eager_dwsep)


def test_options_changed_after_an_eval_call(dws, mb, X):
    check(dws, X, eager_dwsep)
    dws.bn_dw.eps = 0.5
    check(dws, X, eager_dwsep)
    dws.bn_pw.eps = 1e-1
    check(dws, X, eager_dwsep)
    dws.padding = 0
    assert check(dws, X, eager_dwsep).shape[-1] == 7
    dws.padding = 2
    dws.conv_dw.dilation = (2, 2)
    check(dws, X, eager_dwsep)
    dws.conv_dw.stride = (2, 2)
    assert check(dws, X, eager_dwsep).shape[-1] == 5
    dws.preact = True
    check(dws, X, eager_dwsep)
    check(mb, X, eager_mbconv)
    mb.bn2.eps = 0.3
    check(mb, X, eager_mbconv)
    mb.padding = 0
    mb.skip = False  # the output is smaller than the input now
    assert check(mb, X, eager_mbconv).shape[-1] == 7


def test_momentum_and_training_steps(dws, X):
    check(dws, X, eager_dwsep)
    dws.bn_dw.momentum = 0.9  # no effect in eval ...
    check(dws, X, eager_dwsep)
    dws.train()
    with torch.no_grad():
        dws(X)  # ... but a training step moves the running statistics
    dws.eval()
    check(dws, X, eager_dwsep)


def test_load_state_dict(dws, mb, X):
    for m, eager, seed in ((dws, eager_dwsep, 5), (mb, eager_mbconv, 6)):
        check(m, X, eager)
        other = randomize(copy.deepcopy(m), seed)
        m.load_state_dict(other.state_dict())
        check(m, X, eager)
        torch.testing.assert_close(eager(m, X), eager(other, X))


@pytest.mark.parametrize("style", ["data", "no_grad", "foreach"])
def test_ema_update_loop(mb, style, X):
    """An EMA model evaluated after every update of its weights: timm's ModelEma (``.data`` /
    ``copy_`` on state_dict values), ModelEmaV2/V3 (no_grad in-place, _foreach_lerp_)."""
    ema = copy.deepcopy(mb).eval()
    model = mb.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        loss = model(X).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        d = 0.5
        src = model.state_dict()
        if style == "data":
            for k, v in ema.state_dict().items():
                if v.is_floating_point():
                    getattr_path(ema, k).data.mul_(d).add_(src[k].data, alpha=1 - d)
        elif style == "no_grad":
            with torch.no_grad():
                for k, v in ema.state_dict().items():
                    if v.is_floating_point():
                        v.mul_(d).add_(src[k], alpha=1 - d)
        else:
            with torch.no_grad():
                ks = [k for k, v in ema.state_dict().items() if v.is_floating_point()]
                torch._foreach_lerp_([ema.state_dict()[k] for k in ks], [src[k] for k in ks], 1 - d)
        check(ema, X, eager_mbconv)


def getattr_path(m, path):
    for part in path.split("."):
        m = getattr(m, part)
    return m


def test_pooled_conv_equals_the_conv_and_keeps_hooks():
    """SE convs on pooled means run as one F.linear (nn._parts.pooled_conv): same values as the
    Conv2d, and a conv with hooks (or not a plain 1x1 Conv2d) still runs as a module call."""
    from effops.nn._parts import pooled_conv

    torch.manual_seed(0)
    m = torch.randn(3, 24, 1, 1)
    for conv in (torch.nn.Conv2d(24, 6, 1), torch.nn.Conv2d(24, 6, 1, bias=False), torch.nn.Conv2d(24, 6, 1, stride=2)):
        torch.testing.assert_close(pooled_conv(conv, m), conv(m), rtol=1e-5, atol=1e-6)
    conv = torch.nn.Conv2d(24, 6, 1)
    seen = []
    h = conv.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    pooled_conv(conv, m)
    h.remove()
    assert seen == [torch.Size([3, 6, 1, 1])]
    padded = torch.nn.Conv2d(24, 6, 1, padding=1)  # a padded 1x1 conv on a 1x1 map gives 3x3
    assert pooled_conv(padded, m).shape == (3, 6, 3, 3)
