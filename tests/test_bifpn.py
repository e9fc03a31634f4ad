"""BiFPN fusion: weighted_fuse against the reference for every method, resample combination, input
count, dtype, layout and backend; gradients including the weights; registration; BiFPN modules
and the effdet conversion; bad input."""

from __future__ import annotations

import copy
import itertools
import sys

import pytest
import torch

import effops
from effops.ops import weighted_fuse
from effops.nn import BiFPN, convert

B = sys.modules["effops.ops.bifpn"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def input_size(mode, out_hw, g):
    """An input size that mode maps to out_hw (odd sizes included)."""
    if mode == "identity":
        return out_hw
    if mode == "nearest":
        return tuple(max(1, -(-s // int(torch.randint(1, 4, (1,), generator=g)))) for s in out_hw)
    # pools: ceil(n / 2) == out  <=>  n in {2 out - 1, 2 out}
    return tuple(2 * s - int(torch.randint(0, 2, (1,), generator=g)) for s in out_hw)


def make(modes, out_hw, N=2, C=5, dtype=torch.float64, seed=0, layout="cl"):
    g = gen(seed)
    xs = []
    for m in modes:
        x = torch.randn(N, C, *input_size(m, out_hw, g), generator=g, dtype=torch.float64).to(dtype)
        xs.append(x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x)
    w = torch.randn(len(modes), generator=g, dtype=torch.float64).float()
    return xs, w


def fused_reference(xs, w, modes, method, act, out_hw, dtype):
    wn = B.normalize_weights(w, method, len(xs), 1e-4, "cpu")
    return B.weighted_fuse_reference([x.to(dtype) for x in xs], wn.to(dtype), modes, B.act_name("t", "a", act), out_hw)


MODE_SETS = [("identity", "nearest"), ("identity", "maxpool"), ("nearest", "identity", "maxpool"),
             ("identity", "maxpool_sym", "nearest", "identity"), ("maxpool", "nearest")]


@pytest.mark.parametrize("modes", MODE_SETS, ids=lambda m: "+".join(m))
@pytest.mark.parametrize("method", ["fastattn", "attn", "sum"])
@pytest.mark.parametrize("act", ["silu", None, "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_fuse_cpu_matches_reference(modes, method, act, dtype):
    out_hw = (13, 9)
    xs, w = make(modes, out_hw, seed=len(modes) * 7 + len(method))
    out = weighted_fuse([x.to(dtype) for x in xs], w, resample=list(modes), method=method, act=act,
                        out_size=out_hw if "identity" not in modes else None)
    truth = fused_reference(xs, w, modes, method, act, out_hw, torch.float64)
    eager = fused_reference(xs, w, modes, method, act, out_hw, dtype)
    err = (out.double() - truth).abs().max().item()
    eager_err = (eager.double() - truth).abs().max().item()
    atol = (1e-5 if dtype == torch.float32 else 1e-2) * truth.abs().max().item()
    assert out.dtype == dtype and out.shape == (2, 5, *out_hw)
    assert err <= 2 * eager_err + atol, (err, eager_err)


def test_d0_node_shapes_and_odd_sizes():
    """effdet's shapes: 2x upsample, 25 -> 13 TF-same pool, 3 inputs; and NCHW input."""
    g = gen(1)
    p4 = torch.randn(2, 16, 13, 13, generator=g)
    p3 = torch.randn(2, 16, 25, 25, generator=g)
    p5 = torch.randn(2, 16, 7, 7, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0])
    out = weighted_fuse([p4, p3, p5], w, resample=["identity", "maxpool", "nearest"])
    want = fused_reference([p4, p3, p5], w, ["identity", "maxpool", "nearest"], "fastattn", "silu", (13, 13),
                           torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert out.is_contiguous()  # NCHW in, NCHW out


def test_nan_propagates_through_pools_like_torch():
    x = torch.randn(1, 3, 8, 8)
    x[0, 1, 2, 3] = float("nan")
    ident = torch.randn(1, 3, 4, 4)
    out = weighted_fuse([ident, x], None, resample=["identity", "maxpool_sym"], method="sum", act=None)
    want = ident + torch.nn.functional.max_pool2d(x, 3, 2, 1)
    torch.testing.assert_close(out, want, equal_nan=True)


@pytest.mark.parametrize("modes", [("identity", "nearest", "maxpool"), ("identity", "maxpool_sym")])
def test_weighted_fuse_backends(backend_device, modes):
    _, dev = backend_device
    out_hw = (6, 5)
    xs, w = make(modes, out_hw, N=1, C=3, dtype=torch.float32, seed=3)
    for method, act in (("fastattn", "silu"), ("attn", "hardswish"), ("sum", None)):
        xg = [x.to(dev).requires_grad_(True) for x in xs]
        wg = w.to(dev).requires_grad_(True)
        out = weighted_fuse(xg, wg, resample=list(modes), method=method, act=act)
        gout = torch.linspace(-1, 1, out.numel()).view_as(out).to(dev)
        grads = torch.autograd.grad(out, xg + ([wg] if method != "sum" else []), gout)
        with effops.use_backend("reference"):
            xr = [x.double().requires_grad_(True) for x in xs]
            wr = w.double().requires_grad_(True)
            ref = weighted_fuse(xr, wr, resample=list(modes), method=method, act=act)
            rgrads = torch.autograd.grad(ref, xr + ([wr] if method != "sum" else []), gout.double().cpu())
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, rgrads):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("modes", [("identity", "nearest", "maxpool"), ("nearest", "identity", "maxpool_sym", "identity")])
@pytest.mark.parametrize("method", ["fastattn", "attn"])
def test_weighted_fuse_gradcheck(backend, modes, method):
    xs, w = make(modes, (5, 4), N=1, C=2, seed=5)
    xs = [x.requires_grad_(True) for x in xs]
    w = w.double().requires_grad_(True)
    with effops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: weighted_fuse(list(a[:-1]), a[-1], resample=list(modes), method=method, act="silu"),
            tuple(xs) + (w,))


def test_opcheck_and_compile():
    xs, w = make(("identity", "nearest", "maxpool"), (6, 6), dtype=torch.float32, seed=6)
    wn = B.normalize_weights(w, "fastattn", 3, 1e-4, "cpu")
    torch.library.opcheck(torch.ops.effops.weighted_fuse.default, (xs, wn, [0, 1, 2], [6, 6], "silu"))
    f = torch.compile(lambda a, b, c, w: weighted_fuse([a, b, c], w, resample=["identity", "nearest", "maxpool"]) * 2,
                      fullgraph=True)
    torch.testing.assert_close(f(*xs, w), 2 * weighted_fuse(xs, w, resample=["identity", "nearest", "maxpool"]))


def test_bad_input():
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)
    w = torch.ones(2)
    with pytest.raises(ValueError, match=r"inputs\[1\] must be \[N, C, H, W\] with N, C = \[1, 4\]"):
        weighted_fuse([a, torch.randn(1, 3, 4, 4)], w, resample=["identity", "nearest"])  # mismatched channels
    with pytest.raises(ValueError, match=r"resample\[1\]='maxpool' maps inputs\[1\] \(4x4\) to 2x2, not the output size 8x8"):
        weighted_fuse([a, b], w, resample=["identity", "maxpool"])
    with pytest.raises(ValueError, match="cannot be upsampled"):
        weighted_fuse([b, a], w, resample=["identity", "nearest"])
    with pytest.raises(ValueError, match=r"weights must have shape \[2\]"):
        weighted_fuse([a, b], torch.ones(3), resample=["identity", "nearest"])  # wrong number of weights
    with pytest.raises(ValueError, match="2 to 4 tensors"):
        weighted_fuse([a], torch.ones(1), resample=["identity"])
    with pytest.raises(ValueError, match=r"resample\[1\] must be one of"):
        weighted_fuse([a, b], w, resample=["identity", "bilinear"])
    with pytest.raises(ValueError, match="method must be one of"):
        weighted_fuse([a, b], w, resample=["identity", "nearest"], method="max")
    with pytest.raises(ValueError, match="weights are required"):
        weighted_fuse([a, b], None, resample=["identity", "nearest"])
    with pytest.raises(ValueError, match="out_size is required"):
        weighted_fuse([b, b], w, resample=["nearest", "nearest"])
    with pytest.raises(TypeError, match="one dtype"):
        weighted_fuse([a, b.double()], w, resample=["identity", "nearest"])
    with pytest.raises(ValueError, match="one device"):
        weighted_fuse([a, b.to("meta")], w, resample=["identity", "nearest"])
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a 4-d tensor \[N, C, H, W\]"):
        weighted_fuse([a[0], b], w, resample=["identity", "nearest"])
    with pytest.raises(TypeError, match=r"inputs\[0\] must be float32, bfloat16, float16 or float64, got torch.int64"):
        weighted_fuse([a.long(), b.long()], w, resample=["identity", "nearest"])
    with pytest.raises(TypeError, match="float16 is supported on CUDA"):
        weighted_fuse([a.half(), b.half()], w, resample=["identity", "nearest"])


def test_repeated_calls_use_the_validated_plan_and_stay_exact():
    """The second and later eager inference calls of one configuration skip Python validation;
    results, weight updates, layouts and errors must be exactly those of the first call."""
    xs, w = make(("identity", "nearest", "maxpool"), (9, 7), C=6, dtype=torch.float32, seed=5)
    modes = ["identity", "nearest", "maxpool"]
    B._PLANS.clear()
    with torch.inference_mode():
        first = weighted_fuse(xs, w, resample=modes)
        assert B._PLANS  # recorded
        again = weighted_fuse(xs, w, resample=modes)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        w2 = w * 3 - 1  # new weight values: same plan, new normalisation
        torch.testing.assert_close(weighted_fuse(xs, w2, resample=modes),
                                   fused_reference(xs, w2, modes, "fastattn", "silu", (9, 7), torch.float32))
        nchw = [x.contiguous() for x in xs]  # other layout: same plan key, output follows the input
        out = weighted_fuse(nchw, w, resample=modes)
        assert out.is_contiguous() and torch.equal(out, first.contiguous())
        with pytest.raises(ValueError, match="cannot be upsampled"):  # a new shape is validated again
            weighted_fuse([xs[0], torch.randn(2, 6, 10, 7), xs[2]], w, resample=modes)
    # outside inference: the autograd path, not the plan
    xg = [x.clone().requires_grad_() for x in xs]
    weighted_fuse(xg, w, resample=modes).sum().backward()
    assert all(x.grad is not None for x in xg)


# ------------------------------------------------------------------------------ modules
def test_bifpn_graph_is_efficientdets():
    nodes = effops.nn.bifpn_nodes()
    assert [o for _, o in nodes] == [[3, 4], [2, 5], [1, 6], [0, 7], [1, 7, 8], [2, 6, 9], [3, 5, 10], [4, 11]]
    assert [lvl for lvl, _ in nodes] == [6, 5, 4, 3, 4, 5, 6, 7]


effdet = pytest.importorskip("effdet")


def _effdet(name):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from effdet import create_model

    torch.manual_seed(0)
    m = create_model(name, pretrained=False, pretrained_backbone=False).eval()
    g = gen(2)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        if getattr(mod, "edge_weights", None) is not None:
            mod.edge_weights.data.uniform_(-0.5, 2.0, generator=g)
    return m


def test_effdet_d0_conversion_parity():
    m = _effdet("tf_efficientdet_d0")
    x = torch.randn(1, 3, 512, 512, generator=gen(3))
    with torch.no_grad():
        ref = m(x)
        conv, rep = convert(copy.deepcopy(m), report=True)
        out = conv(x)
    assert sum(1 for r in rep.replaced if r[2] == "FusedFnode") == 24 and not rep.skipped
    assert list(conv.state_dict().keys()) == list(m.state_dict().keys())
    for a, b in zip(itertools.chain(*ref), itertools.chain(*out)):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("name", ["tf_efficientdet_d0", "efficientdet_d0"])
def test_effdet_bifpn_state_dict_loads_into_effops_bifpn(name):
    m = _effdet(name)
    mine = BiFPN([40, 112, 320], 64, 3, (512, 512), pad_type=m.config.pad_type,
                 redundant_bias=m.config.redundant_bias).eval()
    mine.load_state_dict(m.fpn.state_dict(), strict=True)
    g = gen(4)
    feats = [torch.randn(1, c, s, s, generator=g) for c, s in ((40, 64), (112, 32), (320, 16))]
    with torch.no_grad():
        ref = m.fpn([f.clone() for f in feats])
        out = mine([f.clone() for f in feats])
    for a, b in zip(ref, out):
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4


def test_bifpn_trains():
    torch.manual_seed(0)
    m = BiFPN([8, 12, 16], 8, 1, (64, 64)).train()
    feats = [torch.randn(2, c, s, s, requires_grad=True) for c, s in ((8, 8), (12, 4), (16, 2))]
    out = m(feats)
    sum(o.square().mean() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.cell[0].fnode[0].combine.edge_weights.grad.abs().sum() > 0


def test_bad_options_are_named_errors_not_hash_errors():
    """Issue 14: the validated-plan cache hashes its key before the checks run; an unhashable
    or oddly typed option must still reach the checks and get the named error."""
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)
    w = torch.ones(2)
    modes = ["identity", "nearest"]
    weighted_fuse([a, b], w, resample=modes)  # a plan for this configuration now exists
    with pytest.raises(TypeError, match="weighted_fuse: act must be an activation name"):
        weighted_fuse([a, b], w, resample=modes, act=["silu"])
    with pytest.raises(ValueError, match="weighted_fuse: method must be one of"):
        weighted_fuse([a, b], w, resample=modes, method=["fastattn"])
    with pytest.raises(ValueError, match=r"weighted_fuse: resample\[1\] must be one of"):
        weighted_fuse([a, b], w, resample=["identity", ["nearest"]])
    with pytest.raises(ValueError, match=r"weighted_fuse: resample\[0\] must be one of"):
        weighted_fuse([a, b], w, resample=[{}, "nearest"])
    with pytest.raises(TypeError, match="weighted_fuse: eps must be a real number"):
        weighted_fuse([a, b], w, resample=modes, eps="1e-4")
    with pytest.raises(TypeError, match="weighted_fuse: eps must be a real number"):
        weighted_fuse([a, b], w, resample=modes, eps=[1e-4])
    for eps in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="weighted_fuse: eps must"):
            weighted_fuse([a, b], w, resample=modes, eps=eps)
    for size in ((True, True), (8, 2**31), ([8], 8), (8.0, 8)):
        with pytest.raises(ValueError, match="weighted_fuse: out_size must be a pair of positive ints"):
            weighted_fuse([a, b], w, resample=modes, out_size=size)
    # True == 1 == 1.0 as dict keys: eps=1 (valid) and eps=True (not a real number) are kept apart
    weighted_fuse([a, b], w, resample=modes, eps=1)
    with pytest.raises(TypeError, match="eps must be a real number"):
        weighted_fuse([a, b], w, resample=modes, eps=True)


def test_fastattn_all_weights_nonpositive_and_zero_eps_is_nan_like_torch():
    # relu(w) sums to 0 and eps = 0: 0 / 0. The eager CPU path normalised in Python floats and
    # raised ZeroDivisionError (found by the fuzz suite on CI); torch's formula gives NaN.
    xs = [torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3)]
    w = torch.tensor([-2.5, -1.5])
    got = weighted_fuse(xs, w, resample=["identity", "identity"], method="fastattn", eps=0.0, act="none")
    with effops.use_backend("reference"):
        want = weighted_fuse(xs, w, resample=["identity", "identity"], method="fastattn", eps=0.0, act="none")
    assert torch.isnan(got).all() and torch.isnan(want).all()
