"""Depthwise-separable family: every backend against the float64 reference over a seeded sweep
of kernel sizes, strides, dilations, padding modes, activations, channel counts, sizes, layouts
and dtypes; gradcheck; opcheck; torch.compile; autocast; bad input."""

from __future__ import annotations

import random
import sys
import zlib

import pytest
import torch

import effops
from effops.ops import dw_conv_act, dwsep_conv, pw_conv

R = sys.modules["effops.ops.dwsep"]

ACTS = ["none", "relu", "relu6", "silu", "hardswish", "sigmoid"]


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def rnd(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def make_case(p, seed):
    """Inputs (float64) for one configuration p."""
    g = gen(seed)
    N, C, Co, H, W, k = p["N"], p["C"], p["Co"], p["H"], p["W"], p["k"]
    t = dict(
        x=rnd(N, C, H, W, g=g),
        dw_weight=rnd(C, 1, k, k, g=g, scale=0.5),
        pw_weight=rnd(Co, C, 1, 1, g=g, scale=C ** -0.5),
        dw_scale=rnd(C, g=g).abs() + 0.5,
        dw_bias=rnd(C, g=g, scale=0.1),
        pw_scale=rnd(Co, g=g).abs() + 0.5,
        pw_bias=rnd(Co, g=g, scale=0.1),
    )
    geo = R.conv_geometry("t", (H, W), (k, k), p["stride"], p["padding"], p["dilation"])
    t["residual"] = rnd(N, Co, *geo.out_hw, g=g) if p["residual"] else None
    return t


def call_dwsep(t, p, dtype, layout):
    def cvt(v):
        if v is None:
            return None
        v = v.to(dtype)
        return v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and layout == "cl" else v

    return dwsep_conv(cvt(t["x"]), cvt(t["dw_weight"]), cvt(t["pw_weight"]), stride=p["stride"],
                      padding=p["padding"], dilation=p["dilation"], dw_scale=cvt(t["dw_scale"]),
                      dw_bias=cvt(t["dw_bias"]), act=p["act"], pw_scale=cvt(t["pw_scale"]),
                      pw_bias=cvt(t["pw_bias"]), pw_act=p["pw_act"], residual=cvt(t["residual"]),
                      preact=p["preact"])


def reference(t, p, dtype):
    """The reference function evaluated in dtype (float64: the truth; low precision: eager)."""
    geo = R.conv_geometry("t", t["x"].shape[2:], t["dw_weight"].shape[2:], p["stride"], p["padding"], p["dilation"])
    cv = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    return R.dwsep_conv_reference(cv(t["x"]), cv(t["dw_weight"]), cv(t["pw_weight"]), geo, cv(t["dw_scale"]),
                                  cv(t["dw_bias"]), R.act_name("t", "a", p["act"]), cv(t["pw_scale"]),
                                  cv(t["pw_bias"]), R.act_name("t", "a", p["pw_act"]), cv(t["residual"]),
                                  p["preact"])


def rounded(t, dtype):
    """The case's tensors rounded to dtype and back to float64: the inputs a dtype kernel really
    receives, so the float64 truth does not charge the kernel for input quantisation (which, on
    outputs that cancel to ~0 - a few output values, relu6 - can exceed any atol relative to the
    output scale, whatever the kernel does)."""
    return {k: None if v is None else v.to(dtype).to(torch.float64) for k, v in t.items()}


def assert_close_to_truth(got, truth, eager, dtype):
    """The rule of DESIGN.md: |kernel - fp64| <= 2 |eager - fp64| + atol, elementwise max."""
    got, truth, eager = got.double(), truth.double(), eager.double()
    scale = truth.abs().max().item() + 1e-12
    atol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12, torch.float16: 2e-3}[dtype] * scale
    err = (got - truth).abs().max().item()
    eager_err = (eager - truth).abs().max().item()
    assert not torch.isnan(got).any(), "NaN in the output"
    assert err <= 2 * eager_err + atol, f"error {err:.3g} vs eager {eager_err:.3g} (atol {atol:.3g})"


def sweep(n, seed, small=False):
    """n configurations drawn (seeded) from the full product of the parameters."""
    space = dict(
        k=[3, 5, 7, 2], stride=[1, 2], dilation=[1, 2], padding=["same", "valid", 1, (2, 0)],
        act=ACTS, pw_act=ACTS[:4], preact=[False, True], residual=[False, True],
        C=[1, 3, 16, 88, 120] if not small else [1, 3, 16], Co=[1, 8, 33, 64] if not small else [1, 5],
        HW=[(1, 1), (7, 7), (65, 33), (13, 123)] if not small else [(1, 1), (7, 5), (9, 12)],
        layout=["cl", "nchw"], N=[1, 2],
    )
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p = {k: rng.choice(v) for k, v in space.items()}
        p["H"], p["W"] = p.pop("HW")
        try:  # skip configurations whose input is smaller than the kernel
            R.conv_geometry("t", (p["H"], p["W"]), (p["k"], p["k"]), p["stride"], p["padding"], p["dilation"])
        except ValueError:
            continue
        out.append(p)
    return out


@pytest.mark.parametrize("p", sweep(48, seed=1), ids=lambda p: f"k{p['k']}s{p['stride']}d{p['dilation']}"
                         f"-{p['padding']}-{p['act']}-{p['C']}x{p['H']}x{p['W']}-{p['layout']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dwsep_cpu_matches_reference(p, dtype):
    # the seed must not depend on the process (str hashes are salted per process)
    t = rounded(make_case(p, seed=zlib.crc32(str(p).encode()) % 1000), dtype)
    with effops.use_backend("cpu"):
        got = call_dwsep(t, p, dtype, p["layout"])
    assert got.dtype == dtype
    ambiguous = p["C"] == 1 or p["H"] * p["W"] == 1  # NCHW and NHWC are the same memory: torch says NCHW
    if p["layout"] == "cl" and not ambiguous:
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()
    assert_close_to_truth(got, reference(t, p, torch.float64), reference(t, p, dtype), dtype)


@pytest.mark.parametrize("p", sweep(6, seed=2, small=True), ids=lambda p: f"k{p['k']}s{p['stride']}-{p['act']}")
def test_dwsep_backends_match_reference(backend_device, p):
    _, dev = backend_device
    t = make_case(p, seed=3)
    td = {k: None if v is None else v.to(dev) for k, v in t.items()}
    got = call_dwsep(td, p, torch.float32, p["layout"]).cpu()
    assert_close_to_truth(got, reference(t, p, torch.float64), reference(t, p, torch.float32), torch.float32)


@pytest.mark.parametrize("act", ["silu", "relu6", "hardswish"])
@pytest.mark.parametrize("stride,padding", [(1, "same"), (2, "same"), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_conv_act_and_means(act, stride, padding, dtype):
    g = gen(4)
    x = rnd(2, 88, 17, 19, g=g)
    w = rnd(88, 1, 3, 3, g=g, scale=0.5)
    s, b = rnd(88, g=g).abs() + 0.5, rnd(88, g=g, scale=0.1)
    geo = R.conv_geometry("t", (17, 19), (3, 3), stride, padding, 1)
    y, m = dw_conv_act(x.to(dtype).contiguous(memory_format=torch.channels_last), w.to(dtype), stride=stride,
                       padding=padding, scale=s.to(dtype), bias=b.to(dtype), act=act)
    yt, mt = R.dw_conv_act_reference(x, w, geo, s, b, act)
    ye, me = R.dw_conv_act_reference(x.to(dtype), w.to(dtype), geo, s.to(dtype), b.to(dtype), act)
    assert y.dtype == dtype and m.dtype == dtype and m.shape == (2, 88)
    assert_close_to_truth(y, yt, ye, dtype)
    assert_close_to_truth(m, mt, me, dtype)


@pytest.mark.parametrize("act", ["none", "silu", "sigmoid"])
@pytest.mark.parametrize("C,Co", [(1, 1), (3, 40), (120, 88), (960, 160)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pw_conv_with_se_scale(act, C, Co, dtype):
    g = gen(C)
    y = rnd(2, C, 7, 9, g=g)
    w = rnd(Co, C, 1, 1, g=g, scale=C ** -0.5)
    cs = torch.rand(2, C, generator=g, dtype=torch.float64)
    s, b, r = rnd(Co, g=g).abs() + 0.5, rnd(Co, g=g, scale=0.1), rnd(2, Co, 7, 9, g=g)
    got = pw_conv(y.to(dtype).contiguous(memory_format=torch.channels_last), w.to(dtype), channel_scale=cs.to(dtype),
                  scale=s.float(), bias=b.float(), act=act, residual=r.to(dtype))
    truth = R.pw_conv_reference(y, w, cs, s, b, act, r)
    eager = R.pw_conv_reference(y.to(dtype), w.to(dtype), cs.to(dtype), s.to(dtype), b.to(dtype), act, r.to(dtype))
    assert_close_to_truth(got, truth, eager, dtype)


def test_padding_same_is_tensorflow_same():
    """TF 'same' for stride 2 and even input: the extra pad goes to the bottom/right."""
    assert R.same_padding(8, 3, 2, 1) == (0, 1)
    assert R.same_padding(7, 3, 2, 1) == (1, 1)
    assert R.same_padding(25, 3, 2, 1) == (1, 1)
    assert R.same_padding(6, 5, 2, 1) == (1, 2)
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(4, 1, 3, 3)
    y, _ = dw_conv_act(x, w, stride=2, padding="same", act=None)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w, stride=2, groups=4)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ gradients
GRAD_CASES = [
    dict(k=3, stride=1, padding="same", dilation=1, act="silu", pw_act="none", preact=False, residual=True),
    dict(k=3, stride=2, padding="same", dilation=1, act="hardswish", pw_act="sigmoid", preact=False, residual=False),
    dict(k=5, stride=1, padding=4, dilation=2, act="relu6", pw_act="relu", preact=False, residual=False),
    dict(k=3, stride=1, padding="same", dilation=1, act="silu", pw_act="none", preact=True, residual=True),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", range(len(GRAD_CASES)))
def test_dwsep_gradcheck(backend, case):
    p = dict(GRAD_CASES[case], N=1, C=2, Co=3, H=5, W=4)
    t = make_case(p, seed=case)
    names = [k for k, v in t.items() if v is not None]
    for k in names:
        t[k] = t[k].clone().requires_grad_(True)

    def f(*args):
        d = dict(zip(names, args))
        return dwsep_conv(d["x"], d["dw_weight"], d["pw_weight"], stride=p["stride"], padding=p["padding"],
                          dilation=p["dilation"], dw_scale=d["dw_scale"], dw_bias=d["dw_bias"], act=p["act"],
                          pw_scale=d["pw_scale"], pw_bias=d["pw_bias"], pw_act=p["pw_act"],
                          residual=d.get("residual"), preact=p["preact"])

    with effops.use_backend(backend):
        assert torch.autograd.gradcheck(f, tuple(t[k] for k in names))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dw_conv_act_and_pw_conv_gradcheck(backend):
    g = gen(7)
    x = rnd(2, 3, 6, 5, g=g).requires_grad_(True)
    w = rnd(3, 1, 3, 3, g=g).requires_grad_(True)
    s, b = (rnd(3, g=g).requires_grad_(True) for _ in range(2))
    y = rnd(2, 3, 4, 5, g=g).requires_grad_(True)
    pw = rnd(4, 3, 1, 1, g=g).requires_grad_(True)
    cs = torch.rand(2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    ps, pb = (rnd(4, g=g).requires_grad_(True) for _ in range(2))
    r = rnd(2, 4, 4, 5, g=g).requires_grad_(True)
    with effops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, w, s, b: dw_conv_act(x, w, stride=2, scale=s, bias=b, act="silu"), (x, w, s, b))
        # only the means used: the y gradient is absent
        assert torch.autograd.gradcheck(lambda x, w: dw_conv_act(x, w, act="relu6")[1], (x, w))
        assert torch.autograd.gradcheck(
            lambda y, pw, cs, ps, pb, r: pw_conv(y, pw, channel_scale=cs, scale=ps, bias=pb, act="hardswish",
                                                 residual=r), (y, pw, cs, ps, pb, r))


def test_unused_outputs_cost_no_zero_gradients():
    """An output the loss does not use (dw_conv_act's means without squeeze-excite; the pooled
    means of batch_norm_act) reaches the backward as None: no zero tensor is allocated and
    broadcast-added to the activation's gradient (measured ~2 ms per block at b8 in mobilenetv2)."""
    from torch.profiler import profile

    x = torch.randn(2, 8, 6, 6).requires_grad_(True)
    w = torch.randn(8, 1, 3, 3).requires_grad_(True)
    bw, bb = torch.ones(8).requires_grad_(True), torch.zeros(8).requires_grad_(True)
    y, _ = dw_conv_act(x, w, act="none")
    z, _ = effops.ops.batch_norm_act(y, bw, bb, torch.zeros(8), torch.ones(8), pool=True)
    gout = torch.randn_like(z)
    with profile() as prof:
        z.backward(gout)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::zeros", "aten::add", "aten::zero_"}, ops
    # and the gradient is the one without the means
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.conv2d(x2, w2, padding=1, groups=8)
    m, v = y2.mean((0, 2, 3), keepdim=True), y2.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.nn.functional.silu((y2 - m) / torch.sqrt(v + 1e-5)).backward(gout)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_backward_matches_eager_autograd_in_fp32():
    """The CPU backward against autograd through the eager reference, on a realistic size."""
    p = dict(k=3, stride=2, padding="same", dilation=1, act="silu", pw_act="none", preact=False, residual=False,
             N=2, C=24, Co=40, H=33, W=30)
    t = make_case(p, seed=9)
    tf = {k: v.float().requires_grad_(True) for k, v in t.items() if v is not None}
    ref = R.dwsep_conv_reference(tf["x"], tf["dw_weight"], tf["pw_weight"],
                                 R.conv_geometry("t", (33, 30), (3, 3), 2, "same", 1), tf["dw_scale"],
                                 tf["dw_bias"], "silu", tf["pw_scale"], tf["pw_bias"], "none", None, False)
    gout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, list(tf.values()), gout)
    tc = {k: v.detach().clone().requires_grad_(True) for k, v in tf.items()}
    out = dwsep_conv(tc["x"].contiguous(memory_format=torch.channels_last), tc["dw_weight"], tc["pw_weight"],
                     stride=2, dw_scale=tc["dw_scale"], dw_bias=tc["dw_bias"], act="silu",
                     pw_scale=tc["pw_scale"], pw_bias=tc["pw_bias"])
    grads = torch.autograd.grad(out, list(tc.values()), gout)
    for name, a, b in zip(tc, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=name)


# ------------------------------------------------------------------------------ registration
def test_opcheck():
    g = gen(5)
    x = torch.randn(2, 4, 6, 5, generator=g)
    args = (x, torch.randn(4, 1, 3, 3, generator=g), torch.randn(6, 4, 1, 1, generator=g), torch.rand(4) + 0.5,
            torch.randn(4), torch.rand(6) + 0.5, torch.randn(6), torch.randn(2, 6, 3, 2, generator=g),
            [2, 2], [0, 1, 0, 1], [1, 1], "silu", "none", False)
    torch.library.opcheck(torch.ops.effops.dwsep_conv.default, args)
    torch.library.opcheck(torch.ops.effops.dwsep_conv.default,
                          (x.contiguous(memory_format=torch.channels_last),) + args[1:7] + (None, [1, 1], [1, 1, 1, 1],
                                                                                         [1, 1], "relu", "sigmoid", True))
    torch.library.opcheck(torch.ops.effops.dw_conv_act.default,
                          (x, args[1], args[3], args[4], [1, 1], [1, 1, 1, 1], [1, 1], "silu"))
    torch.library.opcheck(torch.ops.effops.pw_conv.default,
                          (x, args[2], torch.rand(2, 4), args[5], args[6], torch.randn(2, 6, 6, 5), "hardswish"))


def test_torch_compile_fullgraph():
    g = gen(6)
    x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
    dw, pw = torch.randn(8, 1, 3, 3, generator=g), torch.randn(16, 8, 1, 1, generator=g)

    def block(x):
        y, m = dw_conv_act(x, dw, act="silu")
        return pw_conv(y, pw, channel_scale=torch.sigmoid(m)) + dwsep_conv(x, dw, pw, act="relu")

    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-5)


def test_autocast_casts_to_the_autocast_dtype():
    g = gen(13)
    x = torch.randn(2, 8, 9, 9, generator=g)
    dw, pw = torch.randn(8, 1, 3, 3, generator=g), torch.randn(16, 8, 1, 1, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dwsep_conv(x, dw, pw)
        y, m = dw_conv_act(x, dw)
        p = pw_conv(x, pw)
    assert out.dtype == y.dtype == m.dtype == p.dtype == torch.bfloat16
    ref = dwsep_conv(x, dw, pw)
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 rounding of inputs and result


def test_noncontiguous_and_strided_inputs():
    x = torch.randn(2, 8, 20, 20)[:, :, ::2, 1::2]  # strided view
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(4, 8, 1, 1)
    torch.testing.assert_close(dwsep_conv(x, dw, pw), dwsep_conv(x.contiguous(), dw, pw))


# ------------------------------------------------------------------------------ bad input
def test_bad_input():
    x = torch.randn(2, 8, 9, 9)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(4, 8, 1, 1)
    with pytest.raises(ValueError, match=r"dw_weight must have shape \[C, 1, kh, kw\] = \[8, 1, kh, kw\]"):
        dwsep_conv(x, torch.randn(8, 2, 3, 3), pw)  # wrong groups
    with pytest.raises(ValueError, match="dw_weight must have shape"):
        dwsep_conv(x, torch.randn(4, 1, 3, 3), pw)
    with pytest.raises(ValueError, match=r"pw_weight must have shape \[Co, 8, 1, 1\]"):
        dwsep_conv(x, dw, torch.randn(4, 7, 1, 1))
    with pytest.raises(ValueError, match=r"pw_weight must have shape"):
        dwsep_conv(x, dw, torch.randn(4, 8, 3, 3))
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64"):
        dwsep_conv(x.long(), dw, pw)
    with pytest.raises(TypeError, match="float16 is supported on CUDA"):
        dwsep_conv(x.half(), dw.half(), pw.half())
    with pytest.raises(TypeError, match="dw_weight must be torch.bfloat16 or torch.float32"):
        dwsep_conv(x.bfloat16(), dw.double(), pw)
    with pytest.raises(ValueError, match=r"x must be a 4-d tensor"):
        dwsep_conv(x[0], dw, pw)
    with pytest.raises(ValueError, match=r"dw_scale must have shape \[8\]"):
        dwsep_conv(x, dw, pw, dw_scale=torch.ones(4))
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 4, 9, 9\]"):
        dwsep_conv(x, dw, pw, residual=torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="act must be one of"):
        dwsep_conv(x, dw, pw, act="gelu")
    with pytest.raises(ValueError, match="padding must be 'same', 'valid'"):
        dwsep_conv(x, dw, pw, padding="full")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        dwsep_conv(x, dw, pw, stride=0)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        dwsep_conv(torch.randn(1, 8, 2, 2), dw, pw, padding=0)
    with pytest.raises(ValueError, match=r"channel_scale must have shape \[2, 8\]"):
        pw_conv(x, pw, channel_scale=torch.ones(8))
    with pytest.raises(ValueError, match="on meta but x is on cpu"):
        dwsep_conv(x, dw, pw.to("meta"))
    with pytest.raises(TypeError, match="preact must be a bool"):
        dwsep_conv(x, dw, pw, preact=1)


# ------------------------------------------------------------------------------ every backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_and_pw_backends_match_reference(backend_device, dtype):
    _, dev = backend_device
    g = gen(11)
    x = rnd(2, 20, 9, 7, g=g)
    w = rnd(20, 1, 3, 3, g=g, scale=0.5)
    s, b = rnd(20, g=g).abs() + 0.5, rnd(20, g=g, scale=0.1)
    geo = R.conv_geometry("t", (9, 7), (3, 3), 2, "same", 1)
    y, m = dw_conv_act(x.to(dev, dtype), w.to(dev, dtype), stride=2, scale=s.float().to(dev), bias=b.float().to(dev),
                       act="silu")
    yt, mt = R.dw_conv_act_reference(x, w, geo, s, b, "silu")
    ye, me = R.dw_conv_act_reference(x.to(dtype), w.to(dtype), geo, s.to(dtype), b.to(dtype), "silu")
    assert_close_to_truth(y.cpu(), yt, ye, dtype)
    assert_close_to_truth(m.cpu(), mt, me, dtype)
    pw = rnd(24, 20, 1, 1, g=g, scale=0.2)
    cs = torch.rand(2, 20, generator=g, dtype=torch.float64)
    r = rnd(2, 24, 9, 7, g=g)
    out = pw_conv(x.to(dev, dtype), pw.to(dev, dtype), channel_scale=cs.to(dev, dtype), act="hardswish",
                  residual=r.to(dev, dtype))
    truth = R.pw_conv_reference(x, pw, cs, None, None, "hardswish", r)
    eager = R.pw_conv_reference(x.to(dtype), pw.to(dtype), cs.to(dtype), None, None, "hardswish", r.to(dtype))
    assert_close_to_truth(out.cpu(), truth, eager, dtype)


def test_backward_backends_match_reference(backend_device):
    """The backward ops through each backend's primitives, in float32, against float64 autograd."""
    _, dev = backend_device
    p = dict(k=3, stride=2, padding="same", dilation=1, act="silu", pw_act="sigmoid", preact=False, residual=True,
             N=2, C=6, Co=5, H=9, W=8)
    t = make_case(p, seed=12)
    names = [k for k, v in t.items() if v is not None]

    def run(dtype, device):
        ts = {k: t[k].to(device, dtype).requires_grad_(True) for k in names}
        out = dwsep_conv(ts["x"], ts["dw_weight"], ts["pw_weight"], stride=2, dw_scale=ts["dw_scale"],
                         dw_bias=ts["dw_bias"], act="silu", pw_scale=ts["pw_scale"], pw_bias=ts["pw_bias"],
                         pw_act="sigmoid", residual=ts["residual"])
        gout = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out).to(device)
        return torch.autograd.grad(out, [ts[k] for k in names], gout)

    got = run(torch.float32, dev)
    with effops.use_backend("reference"):
        truth = run(torch.float64, "cpu")
    for name, a, b in zip(names, got, truth):
        err = (a.cpu().double() - b).abs().max().item()
        assert err <= 1e-4 * (b.abs().max().item() + 1), (name, err)


def test_bad_geometry_and_kernel_sizes():
    """Issue 14: a zero-sized kernel, and sizes up to and past 2**63, are named errors - never an
    output of act(bias), an int64 overflow in the kernels, or nanobind's 'incompatible function
    arguments'."""
    x = torch.randn(1, 4, 6, 6)
    dw, pw = torch.randn(4, 1, 3, 3), torch.randn(5, 4, 1, 1)
    for w in (torch.randn(4, 1, 0, 3), torch.randn(4, 1, 3, 0)):
        with pytest.raises(ValueError, match=r"dw_conv_act: weight must have a kernel of at least 1x1"):
            dw_conv_act(x, w, padding=1)
        with pytest.raises(ValueError, match=r"dwsep_conv: dw_weight must have a kernel of at least 1x1"):
            dwsep_conv(x, w, pw, padding=1)
    for name in ("stride", "padding", "dilation"):
        for v in (2**31, 2**62, 2**63 - 1, 2**63, 2**64 + 5, (1, 2**63)):
            with pytest.raises(ValueError, match=rf"dwsep_conv: {name} must be <= 2147483647"):
                dwsep_conv(x, dw, pw, **{name: v})
            with pytest.raises(ValueError, match=rf"dw_conv_act: {name} must be <= 2147483647"):
                dw_conv_act(x, dw, **{name: v})
    with pytest.raises(ValueError, match="stride must be >= 1"):
        dw_conv_act(x, dw, stride=-(2**63))
    # the largest accepted stride is fine: one output pixel, as torch computes it
    y, _ = dw_conv_act(x, dw, stride=2**31 - 1, padding=0, act=None)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, dw, stride=2**31 - 1, groups=4))


def test_kernel_entry_points_check_geometry():
    """Defence in depth: the compiled module bounds stride/padding/dilation itself and uses
    checked arithmetic for the padded extent (direct calls bypass the Python checks)."""
    from effops import _backend

    xn, taps, y = torch.randn(1, 5, 5, 4), torch.randn(3, 3, 4), torch.empty(1, 3, 3, 4)
    ok = dict(stride=[1, 1], pad=[0, 0, 0, 0], dil=[1, 1])
    for key, bad in (("pad", [2**62, 2**62, 0, 0]), ("pad", [-1, 0, 0, 0]), ("stride", [2**40, 1]),
                     ("dil", [1, 2**62]), ("stride", [0, 1])):
        a = dict(ok, **{key: bad})
        with pytest.raises(ValueError, match="dw_forward: (padding|stride and dilation) must be in"):
            _backend._C.dw_forward(xn, taps, None, None, a["stride"], a["pad"], a["dil"], 0, 0, y, None, 1)
    with pytest.raises(ValueError, match="kernel must be at least 1x1"):
        _backend._C.dw_forward(xn, torch.randn(0, 3, 4), None, None, [1, 1], [1, 1, 0, 0], [1, 1], 0, 0,
                               torch.empty(1, 6, 3, 4), None, 1)


@pytest.mark.parametrize("C,Co", [(2, 1), (7, 24), (40, 72), (64, 33), (96, 576), (1152, 192)])
@pytest.mark.parametrize("se", [False, True])
@pytest.mark.parametrize("isa", ["native", "native-noamx", "avx2"])
def test_pw_conv_bf16_gemm_paths(C, Co, se, isa):
    """bf16 pw_conv: on CPUs with AMX the tile GEMM (32-row blocks: straight from the bf16 rows
    without SE scale, packed with it and for the last 14 of the 110 rows; K past whole 32-k chunks
    zero-padded: C = 2, 7, 40; Co past whole 32-channel panels); with AMX off (or absent) on CPUs
    with AVX512_BF16 the vdpbf16ps GEMM (bf16 rows read as pairs when K is even and there is no
    SE scale, packed otherwise; odd K zero-padded), else the float GEMM; all within the 2x-eager
    rule of the float64 truth."""
    g = gen(C * 7 + Co)
    y = rnd(2, C, 5, 11, g=g)
    w = rnd(Co, C, 1, 1, g=g, scale=C ** -0.5)
    cs = torch.rand(2, C, generator=g, dtype=torch.float64) if se else None
    s, b, r = rnd(Co, g=g).abs() + 0.5, rnd(Co, g=g, scale=0.1), rnd(2, Co, 5, 11, g=g)
    bf = torch.bfloat16
    level = effops.detected_isa() if isa.startswith("native") else isa
    if level not in effops._backend.ISA_LEVELS[: effops._backend.ISA_LEVELS.index(effops.detected_isa()) + 1]:
        pytest.skip(f"the CPU does not run {level}")
    with effops.use_isa(level), effops.use_amx(isa == "native"):
        got = pw_conv(y.to(bf).contiguous(memory_format=torch.channels_last), w.float(),
                      channel_scale=None if cs is None else cs.to(bf), scale=s.float(), bias=b.float(), act="silu",
                      residual=r.to(bf).contiguous(memory_format=torch.channels_last))
    truth = R.pw_conv_reference(y, w, cs, s, b, "silu", r)
    eager = R.pw_conv_reference(y.to(bf), w.to(bf), None if cs is None else cs.to(bf), s.to(bf), b.to(bf), "silu",
                                r.to(bf))
    assert got.dtype == bf
    assert_close_to_truth(got, truth, eager, bf)


@pytest.mark.parametrize("isa", ["native", "native-noamx", "avx2"])
def test_pw_conv_bf16_denormals_and_specials(isa):
    """bf16 pw_conv with bf16 denormals in the input (and an SE scale that makes more), outputs in
    the denormal range, inf and NaN: the vdpbf16ps / AMX paths read denormal inputs as zero and
    flush denormal results (vcvtneps2bf16), the float GEMM keeps them - every path within the
    rule of the float64 truth (scaled by the largest output) and at most one bf16 denormal step
    (2^-126) off it where the output is tiny; NaN / inf propagate as in float."""
    level = effops.detected_isa() if isa.startswith("native") else isa
    if level not in effops._backend.ISA_LEVELS[: effops._backend.ISA_LEVELS.index(effops.detected_isa()) + 1]:
        pytest.skip(f"the CPU does not run {level}")
    g = gen(77)
    C, Co = 48, 40
    y = rnd(2, C, 6, 7, g=g)
    y[:, ::3] *= 1e-39  # every third channel in bf16's denormal range
    w = rnd(Co, C, 1, 1, g=g, scale=C ** -0.5)
    cs = torch.rand(2, C, generator=g, dtype=torch.float64) * 1e-30 + 1e-9
    s = torch.full((Co,), 1.0, dtype=torch.float64)
    s[: Co // 2] = 1e-38  # half the output channels' results are denormal or near it
    bf = torch.bfloat16
    yb = y.to(bf).contiguous(memory_format=torch.channels_last)
    with effops.use_isa(level), effops.use_amx(isa == "native"):
        for se in (None, cs):
            got = pw_conv(yb, w.float(), channel_scale=None if se is None else se.to(bf), scale=s.float(), act="none")
            truth = R.pw_conv_reference(yb.double(), w.to(bf).double(), None if se is None else se.to(bf).double(),
                                        s.float().double(), None, "none", None)
            assert got.dtype == bf and torch.isfinite(got).all()
            err = (got.double() - truth).abs()
            big = truth.abs() > 1e-30
            assert (err[~big] <= 2.0 ** -126 * 4).all(), err[~big].max()
            assert (err[big] <= 1e-2 * truth[big].abs().max()).all()
        ys = y.clone()
        ys[0, 1, 2, 3], ys[1, 4, 0, 0] = float("nan"), float("inf")
        got = pw_conv(ys.to(bf).contiguous(memory_format=torch.channels_last), w.float(), scale=s.float(), act="none")
        ref = torch.nn.functional.conv2d(ys.to(bf).float(), w.to(bf).float()) * s.float()[:, None, None]
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
        # the depthwise conv's bf16 stores (vcvtneps2bf16 on CPUs with AVX512_BF16): tiny results
        xd = y[:, :8].to(bf).contiguous(memory_format=torch.channels_last)
        wd = rnd(8, 1, 3, 3, g=g)
        sd = torch.full((8,), 1e-38)
        out, _ = dw_conv_act(xd, wd.float(), scale=sd, act="none")
        want = torch.nn.functional.conv2d(xd.double(), wd.to(bf).double(), padding=1, groups=8) * sd.double()[:, None, None]
        assert out.dtype == bf and (out.double() - want).abs().max() <= 2.0 ** -126 * 4


@pytest.mark.parametrize("N,HW,C,Co", [
    (1, (7, 7), 1152, 192),   # transposed GEMM (few pixels, many channels); AVX-512: 32 + half panel + 1 dot
    (1, (5, 10), 96, 577),    # 50 pixels: 32 + 16 + 2 dot-product pixels (AVX-512), 48 + 2 (AVX2, baseline)
    (1, (4, 9), 96, 400),     # 36 pixels: 32 + 4 dot-product pixels
    (1, (4, 5), 128, 640),    # 20 pixels: a half panel + 4 dot-product pixels (AVX-512), 16 + 4 (AVX2)
    (1, (1, 1), 64, 256),     # one pixel: dot products only
    (2, (3, 3), 200, 300),    # 18 pixels of two images: the dot-product pixels' SE scale is image 2's
    (1, (3, 5), 40, 1280),    # transposed, one partial pixel panel, Co past whole MR blocks
    (2, (2, 3), 96, 577),     # transposed across two images (SE scale per image), odd Co
    (1, (14, 14), 112, 672),  # packed weights, one image: the SE scale goes into the weights
    (1, (7, 7), 64, 40),      # packed weights, few row tiles: the panels are split into tasks
])
@pytest.mark.parametrize("se", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("isa", ["native", "avx2", "baseline"])
def test_pw_conv_gemm_path_choice(N, HW, C, Co, se, dtype, isa):
    """pw_conv picks its GEMM by shape (pw.cpp pw_run): the transposed small-M GEMM (weights read
    as they are, pixels packed, output stored with stride Co), the packed-weight GEMM with one
    image's SE scale folded into the weights, and the panel-split tasks; every choice, at every
    ISA level and dtype, with SE scale, activation and residual, against the float64 truth."""
    level = effops.detected_isa() if isa == "native" else isa
    if level not in effops._backend.ISA_LEVELS[: effops._backend.ISA_LEVELS.index(effops.detected_isa()) + 1]:
        pytest.skip(f"the CPU does not run {level}")
    g = gen(C + Co + N)
    y = rnd(N, C, *HW, g=g)
    w = rnd(Co, C, 1, 1, g=g, scale=C ** -0.5)
    cs = torch.rand(N, C, generator=g, dtype=torch.float64) if se else None
    s, b, r = rnd(Co, g=g).abs() + 0.5, rnd(Co, g=g, scale=0.1), rnd(N, Co, *HW, g=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    prev = torch.get_num_threads()
    with effops.use_isa(level):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                got = pw_conv(y.to(dtype).contiguous(memory_format=torch.channels_last), w.to(acc),
                              channel_scale=None if cs is None else cs.to(dtype), scale=s.to(acc), bias=b.to(acc),
                              act="silu", residual=r.to(dtype).contiguous(memory_format=torch.channels_last))
            finally:
                torch.set_num_threads(prev)
            truth = R.pw_conv_reference(y, w, cs, s, b, "silu", r)
            eager = R.pw_conv_reference(y.to(dtype), w.to(dtype), None if cs is None else cs.to(dtype), s.to(dtype),
                                        b.to(dtype), "silu", r.to(dtype))
            assert got.dtype == dtype and got.shape == (N, Co, *HW)
            assert_close_to_truth(got, truth, eager, dtype)


@pytest.mark.parametrize("N, HW, C, Co", [
    (2, (9, 7), 24, 40),       # small: torch.mm on the pixel rows
    (1, (256, 256), 16, 130),  # output over 32 MiB: effops's kernel (huge-page advice)
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pw_conv_plain_float32_gemm(N, HW, C, Co, channels_last):
    """A float32 pw_conv with nothing fused (the conv before a training BatchNorm) runs a plain
    GEMM (dwsep._plain_gemm): both of its branches give the reference's values in the input's
    layout, and the same gradients as the reference."""
    from effops.ops import dwsep as D
    g = gen(C + Co)
    y = rnd(N, C, *HW, g=g)
    w = rnd(Co, C, 1, 1, g=g, scale=C ** -0.5)
    assert D._plain_gemm(y.float(), None, None, None, "none", None)
    yf = y.float()
    if channels_last:
        yf = yf.contiguous(memory_format=torch.channels_last)
    yf.requires_grad_(True)
    wf = w.float().requires_grad_(True)
    got = pw_conv(yf, wf)
    truth = R.pw_conv_reference(y, w)
    assert got.dtype == torch.float32 and got.shape == (N, Co, *HW)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_to_truth(got.detach(), truth, R.pw_conv_reference(y.float(), w.float()), torch.float32)
    if N * HW[0] * HW[1] > 1000:
        return  # the backward is the same op for both branches; keep the large case fast
    gout = rnd(*got.shape, g=g).float()
    gy, gw = torch.autograd.grad(got, [yf, wf], gout)
    y64, w64 = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ty, tw = torch.autograd.grad(R.pw_conv_reference(y64, w64), [y64, w64], gout.double())
    assert (gy.double() - ty).abs().max() <= 1e-4 * (ty.abs().max() + 1)
    assert (gw.double() - tw).abs().max() <= 1e-4 * (tw.abs().max() + 1)


@pytest.mark.parametrize("C", [4, 8, 12, 20, 24, 40, 44])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["native", "avx2", "baseline"])
def test_channel_tails_of_every_width(C, dtype, isa):
    """Channels past the last full vector run on half-width (then quarter-width) vectors, then
    scalars (dw_row_impl.h dw_pixels): every tail length against the float64 truth, border and
    interior pixels, stride 1 and 2, the SE channel means, and the fused separable conv."""
    level = effops.detected_isa() if isa == "native" else isa
    if level not in effops._backend.ISA_LEVELS[: effops._backend.ISA_LEVELS.index(effops.detected_isa()) + 1]:
        pytest.skip(f"the CPU does not run {level}")
    g = gen(C * 31)
    x = rnd(2, C, 13, 11, g=g)
    w = rnd(C, 1, 3, 3, g=g, scale=0.3)
    pw = rnd(8, C, 1, 1, g=g, scale=C ** -0.5)
    s, b = rnd(C, g=g).abs() + 0.5, rnd(C, g=g, scale=0.1)
    xc = x.to(dtype).contiguous(memory_format=torch.channels_last)
    with effops.use_isa(level):
        for stride in (1, 2):
            geo = R.conv_geometry("t", (13, 11), (3, 3), stride, 1, 1)
            y, m = dw_conv_act(xc, w.to(dtype), stride=stride, padding=1, scale=s.to(dtype), bias=b.to(dtype), act="silu")
            yt, mt = R.dw_conv_act_reference(x, w, geo, s, b, "silu")
            ye, me = R.dw_conv_act_reference(x.to(dtype), w.to(dtype), geo, s.to(dtype), b.to(dtype), "silu")
            assert_close_to_truth(y, yt, ye, dtype)
            assert_close_to_truth(m, mt, me, dtype)
            got = dwsep_conv(xc, w.to(dtype), pw.to(dtype), stride=stride, padding=1, act="relu6")
            truth = R.dwsep_conv_reference(x, w, pw, geo, act="relu6")
            eager = R.dwsep_conv_reference(x.to(dtype), w.to(dtype), pw.to(dtype), geo, act="relu6")
            assert_close_to_truth(got, truth, eager, dtype)
