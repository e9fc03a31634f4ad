"""Training-mode BatchNorm + activation (effops.ops.batch_norm_act): parity with torch's
batch_norm + activation in float64 / float32 / bfloat16, every activation, layouts, pooled
means, gradients (gradcheck), running statistics, thread independence, opcheck, compile,
bad input; and the modules' training path (ConvStage.post) against nn.BatchNorm2d's own."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effops
from effops.ops import batch_norm_act
from effops.ops.dwsep import apply_act
from effops.nn._parts import ConvStage, bn_act_train

ACTS = ("none", "relu", "relu6", "silu", "hardswish", "sigmoid")
CL = torch.channels_last
# (N, C, H, W): channel tails at every vector width (1, 3, 17, 19), one pixel per image, rows
# straddling the 256-row tasks (N * H * W not a multiple), many channels
SHAPES = [(2, 19, 5, 7), (3, 1, 2, 2), (4, 3, 1, 1), (2, 17, 13, 23), (1, 40, 3, 2), (2, 1152, 3, 3)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make(shape, dtype=torch.float64, seed=0, layout="cl", shift=0.0, affine=True):
    g = gen(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + shift).to(dtype)
    x = x.contiguous(memory_format=CL) if layout == "cl" else x.contiguous()
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).to(pdt) if affine else None
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(pdt) if affine else None
    return x, w, b


def truth(x, w, b, act, eps=1e-5):
    """float64 torch: batch_norm with batch statistics, then the activation; and its means."""
    y = apply_act(F.batch_norm(x.double(), None, None, None if w is None else w.double(),
                               None if b is None else b.double(), True, 0.1, eps), act)
    return y, y.mean((2, 3), keepdim=True)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_float64_matches_torch(act, shape):
    x, w, b = make(shape, seed=hash((act, shape)) % 1000)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y, m = batch_norm_act(x, w, b, act=act, pool=True)
    assert y.is_contiguous(memory_format=CL) and y.dtype == x.dtype and m.shape == (shape[0], shape[1], 1, 1)
    gy, gm = torch.randn_like(y), torch.randn_like(m)
    grads = torch.autograd.grad((y * gy).sum() + (m * gm).sum(), (x, w, b))
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    yr, mr = truth(xr, wr, br, act)
    ref = torch.autograd.grad((yr * gy).sum() + (mr * gm).sum(), (xr, wr, br))
    assert rel(y, yr) < 1e-12 and rel(m, mr) < 1e-12
    scale = max(float(r.abs().max()) for r in ref)
    for a, r in zip(grads, ref):  # one image-channel of a 1x1 map has an exactly-zero x gradient
        assert float((a - r).abs().max()) <= 1e-11 * scale


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(pool, affine):
    x, w, b = make((2, 5, 3, 4), seed=3, affine=affine)
    args = [x.requires_grad_()] + ([w.requires_grad_(), b.requires_grad_()] if affine else [])

    def f(x, *wb):
        out = batch_norm_act(x, *(wb or (None, None)), act="silu", pool=pool)
        return tuple(out) if pool else out

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("act", ["silu", "relu", "hardswish"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
def test_low_precision_and_layouts(act, dtype, tol, layout):
    """float32 / bfloat16 storage with float32 weights (as under autocast), both layouts: the output
    keeps x's dtype and memory format; errors within the storage precision."""
    x, w, b = make((4, 37, 9, 11), dtype=dtype, seed=5, layout=layout)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y, m = batch_norm_act(x, w, b, act=act, pool=True)
    assert y.dtype == dtype and m.dtype == dtype
    assert y.is_contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)
    gy = torch.randn(y.shape, generator=gen(1)).to(dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    assert gx.dtype == dtype and gw.dtype == torch.float32
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr, mr = truth(xr, wr, br, act)
    ref = torch.autograd.grad(yr, (xr, wr, br), gy.double())
    assert rel(y, yr) < tol and rel(m, mr) < tol
    for a, r in zip((gx, gw, gb), ref):
        assert rel(a, r) < tol


def test_large_mean_keeps_the_variance():
    """Sums around a shift: a map with mean 1e4 and unit spread normalises like float64."""
    x, w, b = make((8, 24, 16, 16), dtype=torch.float32, seed=7, shift=1e4)
    y = batch_norm_act(x, w, b, act="none")
    yr, _ = truth(x, w, b, "none")
    assert rel(y, yr) < 2e-3  # float32 x itself carries ~1e-3 of the unit spread at 1e4
    x64 = x.double()
    assert rel(batch_norm_act(x64, w.double(), b.double(), act="none"), truth(x64, w.double(), b.double(), "none")[0]) < 1e-9


def test_running_statistics_like_batchnorm2d():
    x, _, _ = make((3, 6, 5, 4), dtype=torch.float32, seed=9)
    bn = nn.BatchNorm2d(6, momentum=0.3).train()
    ref = copy.deepcopy(bn)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):
        y = batch_norm_act(x, bn.weight, bn.bias, rm, rv, momentum=0.3, eps=bn.eps, act="relu")
        yr = F.relu(ref(x))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rm, ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, ref.running_var, rtol=1e-6, atol=1e-7)
    # training=False: the running statistics, as F.batch_norm
    torch.testing.assert_close(batch_norm_act(x, bn.weight, bn.bias, rm, rv, training=False, eps=bn.eps, act="silu"),
                               F.silu(ref.eval()(x)), rtol=1e-6, atol=1e-6)
    # float64 parameters with float32 x (torch's batch_norm refuses the mix), and an empty batch
    y64 = batch_norm_act(x, bn.weight.double(), bn.bias.double(), rm.double(), rv.double(), training=False,
                         eps=bn.eps, act="silu")
    assert y64.dtype == torch.float32
    torch.testing.assert_close(y64, F.silu(ref.eval()(x)), rtol=1e-6, atol=1e-6)
    assert batch_norm_act(x[:0], bn.weight, bn.bias, rm, rv, training=False).shape == (0, 6, 5, 4)


def test_threads_do_not_change_the_result():
    x, w, b = make((4, 40, 30, 30), dtype=torch.float32, seed=11)
    x.requires_grad_()
    gy = torch.randn(x.shape, generator=gen(2)).contiguous(memory_format=CL)
    out = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            y, m = batch_norm_act(x, w, b, act="silu", pool=True)
            gx, = torch.autograd.grad((y * gy).sum() + m.sum(), (x,))
            out.append((y, m, gx))
    finally:
        torch.set_num_threads(old)
    for a, c in zip(*out):
        assert torch.equal(a, c)


def test_reference_backend_equals_cpu():
    x, w, b = make((2, 21, 6, 7), dtype=torch.float32, seed=13)
    x.requires_grad_()
    res = []
    for backend in ("cpu", "reference"):
        with effops.use_backend(backend):
            y, m = batch_norm_act(x, w, b, act="hardswish", pool=True)
            gx, = torch.autograd.grad((y * y).sum() + (m * m).sum(), (x,))
        res.append((y, m, gx))
    for a, c in zip(*res):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile():
    x, w, b = make((2, 5, 3, 4), dtype=torch.float32, seed=15)
    for pool in (False, True):
        torch.library.opcheck(torch.ops.effops.batch_norm_act.default, (x, w, b, 1e-5, "silu", pool))
    y, mean, invstd, var, pooled = torch.ops.effops.batch_norm_act(x, w, b, 1e-5, "silu", True)
    torch.library.opcheck(torch.ops.effops.batch_norm_act_backward.default,
                          (torch.randn_like(y), x, w, b, mean, invstd, torch.randn_like(pooled), "silu"))

    def step(x, w, b):
        y, m = batch_norm_act(x, w, b, act="silu", pool=True)
        return (y * y).sum() + m.sum()

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xc, wc, bc = (t.clone().requires_grad_() for t in (x, w, b))
    step(xs, ws, bs).backward()
    torch.compile(step, fullgraph=True, backend="aot_eager")(xc, wc, bc).backward()
    for a, c in ((xs, xc), (ws, wc), (bs, bc)):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: batch_norm_act(x[0], w, w), "must be \\[N, C, H, W\\]"),
    (lambda x, w: batch_norm_act(x.long(), w, w), "floating dtype"),
    (lambda x, w: batch_norm_act(x, w[:3], w), "weight must have shape \\[4\\]"),
    (lambda x, w: batch_norm_act(x, w, w.long()), "bias must have a floating dtype"),
    (lambda x, w: batch_norm_act(x, w, w, running_mean=w.clone()), "both running_mean and running_var"),
    (lambda x, w: batch_norm_act(x[:1, :, :1, :1], w, w), "more than 1 value per channel"),
    (lambda x, w: batch_norm_act(x, w, w, act="gelu"), "act must be one of"),
    (lambda x, w: batch_norm_act(x, w, w, eps=-1.0), "eps must be >= 0"),
    (lambda x, w: batch_norm_act(x, w, w, eps=float("nan")), "eps must not be NaN"),
    (lambda x, w: batch_norm_act(x, w, w, eps=0.0), "eps must be > 0 when training"),
    (lambda x, w: batch_norm_act(x, w, w, training=1), "training must be a bool"),
    (lambda x, w: batch_norm_act(x, w, w, pool="yes"), "pool must be a bool"),
    (lambda x, w: batch_norm_act(x, w, w, training=False), "training=False needs running_mean"),
    (lambda x, w: batch_norm_act("x", w, w), "x must be a torch.Tensor"),
])
def test_bad_input(call, match):
    x = torch.randn(2, 4, 3, 3)
    w = torch.ones(4)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, w)


def test_kernel_entry_checks_shapes():
    """The C++ entry point refuses inconsistent arrays itself (never reads out of bounds)."""
    C = effops._backend._C
    x = torch.randn(12, 5)
    stats = [torch.empty(5) for _ in range(3)]
    with pytest.raises(ValueError, match="images must be >= 1 and divide the rows"):
        C.bn_act_forward(x, 5, None, None, 1e-5, 3, torch.empty_like(x), *stats, None, 1)
    with pytest.raises(ValueError, match="pooled must have shape"):
        C.bn_act_forward(x, 3, None, None, 1e-5, 3, torch.empty_like(x), *stats, torch.empty(2, 5), 1)
    with pytest.raises(ValueError, match="weight must have shape"):
        C.bn_act_forward(x, 3, torch.ones(4), None, 1e-5, 3, torch.empty_like(x), *stats, None, 1)
    with pytest.raises(ValueError, match="unknown activation"):
        C.bn_act_forward(x, 3, None, None, 1e-5, 9, torch.empty_like(x), *stats, None, 1)


# ----------------------------------------------------------------------------- module path
def _bn_act_modules(momentum=0.1, act=nn.SiLU):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(7, momentum=momentum).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return bn, act()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("pool", [False, True])
def test_conv_stage_training_path_equals_modules(momentum, pool):
    """ConvStage.post on a training BN: nn.BatchNorm2d + SiLU's outputs, gradients, running
    statistics and num_batches_tracked (momentum None: cumulative average), over three steps."""
    bn, act = _bn_act_modules(momentum)
    bn_ref, act_ref = copy.deepcopy(bn), copy.deepcopy(act)
    stage = ConvStage(nn.Conv2d(7, 7, 1), bn, act)
    for step in range(3):
        x = torch.randn(3, 7, 5, 6, generator=gen(step)).contiguous(memory_format=CL)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, m = stage.post_pooled(xa) if pool else (stage.post(xa), None)
        yr = act_ref(bn_ref(xb))
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
        loss = (y * y).sum() + (0 if m is None else (m * 3).sum())
        loss_r = (yr * yr).sum() + (0 if m is None else (yr.mean((2, 3), keepdim=True) * 3).sum())
        loss.backward(), loss_r.backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, bn_ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, bn_ref.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-6, atol=1e-7)
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 3


def test_conv_stage_keeps_the_modules_where_it_must():
    x = torch.randn(2, 7, 4, 4).contiguous(memory_format=CL)
    bn, act = _bn_act_modules()
    assert bn_act_train(bn, act, x) is not None
    assert bn_act_train(bn.eval(), act, x) is None  # eval: folded elsewhere / the module
    bn.train()
    seen = []
    h = bn.register_forward_hook(lambda *a: seen.append(1))
    assert bn_act_train(bn, act, x) is None  # a hook must see its call
    h.remove()
    assert bn_act_train(bn, nn.GELU(), x) is None  # an activation the kernel does not have
    assert bn_act_train(bn, act, x.half()) is None  # a dtype it does not take

    class MyBN(nn.BatchNorm2d):
        pass

    assert bn_act_train(MyBN(7).train(), act, x) is None  # a subclass keeps its own forward
    with effops.use_backend("reference"):
        assert bn_act_train(bn, act, x) is None  # a forced backend: the modules' torch ops


def test_timm_batchnormact2d():
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import BatchNormAct2d

    torch.manual_seed(1)
    bn = BatchNormAct2d(6, act_layer=nn.SiLU).train()
    ref = copy.deepcopy(bn)
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=CL)
    # its own activation (ConvStage with bn_has_act)
    y = ConvStage(nn.Conv2d(6, 6, 1), bn, bn.act, bn_has_act=True).post(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
    # an activation after it while it carries one: the modules run (both activations)
    bn2, ref2 = copy.deepcopy(ref), copy.deepcopy(ref)
    assert bn_act_train(bn2, nn.ReLU(), x) is None
    torch.testing.assert_close(ConvStage(nn.Conv2d(6, 6, 1), bn2, nn.ReLU()).post(x), F.relu(ref2(x)))
    assert timm is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_activation_kinks(dtype):
    """Pre-activations exactly at the kinks (weight 0, bias = the kink): effops's act_grad
    conventions, shared by every fused op's backward: relu' = relu6' = 0 at 0, relu6' = 0 at 6,
    hardswish' = x / 3 + 0.5 on [-3, 3] (-0.5 at -3, 1.5 at 3; torch 2.14's own hardswish
    backward gives 0 and 1 there, older releases x / 3 + 0.5)."""
    x, _, _ = make((2, 3, 4, 4), dtype=dtype, seed=17)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    for act, kink, slope in (("relu", 0.0, 0.0), ("relu6", 0.0, 0.0), ("relu6", 6.0, 0.0), ("relu6", 3.0, 1.0),
                             ("hardswish", 3.0, 1.5), ("hardswish", -3.0, -0.5), ("hardswish", -3.5, 0.0)):
        w = torch.zeros(3, dtype=pdt, requires_grad=True)
        b = torch.full((3,), kink, dtype=pdt, requires_grad=True)
        y = batch_norm_act(x, w, b, act=act)
        gb, = torch.autograd.grad(y.sum(), (b,))
        torch.testing.assert_close(gb, torch.full_like(gb, slope * x[:, 0].numel()), msg=f"{act} at {kink}")


@pytest.mark.parametrize("act", ["silu", "relu6", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_matches_float64(backend_device, act, dtype):
    """cpu, reference and Triton (interpreted on CPU tensors; on CUDA when a GPU is present) give
    the float64 truth's outputs, pooled means and gradients within the storage precision."""
    backend, device = backend_device
    if backend not in effops._backend.capabilities()["batch_norm_act"]:
        pytest.skip(f"batch_norm_act has no {backend} backend (torch's batch norm runs there)")
    x, w, b = make((2, 19, 5, 7), dtype=dtype, seed=23)
    x, w, b = (t.to(device) for t in (x, w, b))
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y, m = batch_norm_act(x, w, b, act=act, pool=True)
    assert y.is_contiguous(memory_format=CL) and y.dtype == dtype
    gy = torch.randn(y.shape, generator=gen(3)).to(device, dtype)
    gm = torch.randn(m.shape, generator=gen(4)).to(device, dtype)
    grads = torch.autograd.grad((y * gy).float().sum() + (m * gm).float().sum(), (x, w, b))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr, mr = truth(xr, wr, br, act)
    ref = torch.autograd.grad((yr * gy.double()).sum() + (mr * gm.double()).sum(), (xr, wr, br))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel(y, yr) < tol and rel(m, mr) < tol
    for a, r in zip(grads, ref):
        assert rel(a, r) < tol
