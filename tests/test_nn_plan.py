"""The whole-block plan (effops.nn._plan, effops._C.BlockPlan): eager CPU inference of MBConv and
DepthwiseSeparableBlock on channels_last float32 / bfloat16 inputs runs the block as one kernel
call. It must give what the op-by-op path gives (same kernels; only the SE MLP's sums are in
another order), be used where it applies and only there, and survive copies of the module.
The cache-invalidation cases (in-place updates, .data writes, load_state_dict, options, EMA) run
on channels_last inputs in tests/test_nn_cache.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import effops
import effops.models.efficientnet as en
import effops.nn.dwsep as nd
from effops.models.efficientnet import DepthwiseSeparableBlock
from effops.nn import MBConv

from effops.ops.dwsep import same_padding
from test_nn_cache import randomize

ACTS = {"silu": F.silu, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish}


def _bn(bn, t):
    return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def eager_mbconv(m: MBConv, x):
    """The block from plain torch ops (TF 'same' padding as an explicit pad)."""
    act = ACTS[m.act_name]
    h = x if m.conv_pw is None else act(_bn(m.bn1, F.conv2d(x, m.conv_pw.weight)))
    c = m.conv_dw
    if m.padding == "same":
        ph = same_padding(h.shape[2], c.kernel_size[0], c.stride[0], 1)
        pw = same_padding(h.shape[3], c.kernel_size[1], c.stride[1], 1)
        h, pad = F.pad(h, (pw[0], pw[1], ph[0], ph[1])), 0
    else:
        pad = m.padding
    d = act(_bn(m.bn2, F.conv2d(h, c.weight, None, c.stride, pad, c.dilation, c.groups)))
    if m.se is not None:
        d = m.se(d)
    out = _bn(m.bn3, F.conv2d(d, m.conv_pwl.weight))
    return out + x if m.skip else out


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _small_block(seed: int) -> MBConv:
    """The 8 -> 32 -> 8 residual MBConv (SE on) the behaviour tests use, randomized, in eval."""
    return randomize(MBConv(8, 8, 3, 1, expand_ratio=4), seed).eval()


def _planned(m) -> bool:
    p = m._cache.get("plan")
    return p is not None and p.c is not None


@pytest.fixture
def op_path(monkeypatch):
    """Runs the op-by-op path (the plan switched off) inside ``with op_path():``."""
    import contextlib

    @contextlib.contextmanager
    def off():
        with monkeypatch.context() as mp:
            mp.setattr(nd, "block_forward", lambda *a, **k: None)
            mp.setattr(en, "block_forward", lambda *a, **k: None)
            yield

    return off


MB_CASES = [  # in, out, k, stride, expand, se_ratio, act, padding, size
    (8, 8, 3, 1, 4, 0.25, "silu", None, 9),
    (8, 8, 3, 1, 1, 0.25, "silu", None, 9),  # no expand conv
    (8, 16, 5, 2, 6, 0.25, "silu", "same", 11),  # TF 'same', stride 2, odd size
    (12, 12, 3, 1, 6, 0.0, "relu", None, 7),  # no SE
    (6, 10, 3, 2, 3, 0.5, "hardswish", None, 1),  # 1x1 map
    (5, 5, 3, 1, 3, 0.4, "relu6", "same", 6),  # odd channels
    (16, 24, 3, 2, 6, 0.25, "silu", 1, 8),
]


@pytest.mark.parametrize("case", MB_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mbconv_plan_equals_the_op_path_and_the_oracle(case, dtype, op_path):
    cin, cout, k, s, e, se, act, pad, size = case
    m = randomize(MBConv(cin, cout, k, s, expand_ratio=e, se_ratio=se, act=act, padding=pad), 7).eval().to(dtype)
    x = _cl(torch.randn(2, cin, size, size)).to(dtype)
    with torch.no_grad():
        got = m(x)
        assert _planned(m)
        assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
        with op_path():
            want = m(x)
        oracle = eager_mbconv(m.float(), x.float())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, oracle, rtol=1e-4, atol=1e-5)
    else:  # the same bf16 roundings: the SE sums' order can move a gate by one bf16 step at most
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", MB_CASES[:4], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("amx", [True, False])
def test_mbconv_plan_under_bf16_autocast(case, amx, op_path):
    """Under CPU bf16 autocast the plan runs the block in bf16 (the input cast as conv2d's would
    be, the output bf16), with the AMX tiles where the CPU has them (weights packed once per plan)
    or without: what the op path gives under autocast, within bf16 roundings."""
    cin, cout, k, s, e, se, act, pad, size = case
    m = randomize(MBConv(cin, cout, k, s, expand_ratio=e, se_ratio=se, act=act, padding=pad), 11).eval()
    x = _cl(torch.randn(2, cin, size, size))
    with torch.no_grad(), effops.use_amx(amx), torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
        assert _planned(m) and got.dtype == torch.bfloat16
        assert got.is_contiguous(memory_format=torch.channels_last)
        again = m(x.bfloat16())  # a bf16 input: the same call
        with op_path():
            want = m(x)
    assert torch.equal(got, again)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    oracle = eager_mbconv(m, x)
    assert (got.float() - oracle).abs().max() <= 0.05 * oracle.abs().max()


def test_plan_amx_toggled_between_calls():
    """A bf16 plan made with the AMX kernels on keeps its packed weights; turned off it runs the
    other GEMM, turned on again the packed weights: the results stay within bf16 roundings of each
    other, and each setting is deterministic."""
    m = randomize(MBConv(16, 24, 3, 2, expand_ratio=6), 12).eval().bfloat16()
    x = _cl(torch.randn(3, 16, 23, 17)).bfloat16()
    with torch.no_grad():
        a = m(x)
        with effops.use_amx(False):
            b = m(x)
            assert torch.equal(m(x), b)
        c = m(x)
    assert _planned(m) and torch.equal(a, c)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("which", ["conv_pw", "conv_pwl"])
def test_autocast_plan_sees_data_writes_to_float_weights(which, op_path):
    """Under bf16 autocast a float32 block's plan packs its 1x1 weights once, for AMX or (AMX off
    or absent, AVX512_BF16) for the vdpbf16ps GEMM: a copy of weights it otherwise reads in place. A write through .data (no version bump; timm's ModelEma)
    must still reach the result: the plan watches those weights' bytes and prepares again."""
    m = _small_block(13)
    x = _cl(torch.randn(2, 8, 9, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = m(x)
        getattr(m, which).weight.data.mul_(-1.5)
        got = m(x)
        with op_path():
            want = m(x)
    assert not torch.equal(got, first)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_amx_api():
    assert isinstance(effops.amx(), bool)
    with effops.use_amx(False):
        assert effops.amx() is False
    with pytest.raises(TypeError, match="set_amx: on must be a bool"):
        effops.set_amx(1)
    with effops.use_isa("avx2"):
        assert effops.amx() is False  # the AMX kernels run at the AVX-512 level only


@pytest.mark.parametrize("se", [0, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_separable_block_plan(se, stride, op_path):
    m = randomize(DepthwiseSeparableBlock(8, 8 if stride == 1 else 12, 3, stride, se_channels=se, padding="same"),
                  3).eval()
    x = _cl(torch.randn(3, 8, 13, 13))
    with torch.no_grad():
        got = m(x)
        assert _planned(m)
        with op_path():
            want = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_efficientnet_runs_every_block_planned(op_path):
    torch.manual_seed(2)
    m = en.efficientnet("efficientnet_b0", num_classes=10).eval()  # its own init, BN statistics random
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = m(x)
        blocks = [b for st in m.blocks for b in st]
        assert all(_planned(b) for b in blocks)
        with op_path():
            want = m(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), got, rtol=0, atol=0)  # deterministic, plan reused


def test_threads_give_the_same_result():
    m = randomize(MBConv(16, 16, 3, 1, expand_ratio=6), 4).eval()
    x = _cl(torch.randn(2, 16, 20, 20))
    n = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            a = m(x)
            torch.set_num_threads(max(2, n))
            b = m(x)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("se,expand,size", [(0.25, 6, 28), (0.0, 4, 29), (0.25, 1, 30), (0.25, 6, 27)])  # 27: batched
def test_batches_of_large_maps_run_image_by_image(se, expand, size, op_path):
    """Maps of >= 784 pixels run image by image (their intermediates stay in L2): each image of a
    batch gets exactly what it gets alone, and the batch matches the op path and the oracle."""
    m = randomize(MBConv(8, 8, 3, 1, expand_ratio=expand, se_ratio=se), 12).eval()
    x = _cl(torch.randn(3, 8, size, size, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        got = m(x)
        assert _planned(m)
        alone = torch.cat([m(x[i:i + 1]) for i in range(3)])
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(2)  # a thread per image
            two = m(x)
        finally:
            torch.set_num_threads(n)
        with op_path():
            want = m(x)
        oracle = eager_mbconv(m, x)
    torch.testing.assert_close(two, got, rtol=0, atol=0)
    if size * size >= 784:
        torch.testing.assert_close(got, alone, rtol=0, atol=0)
    else:  # the batch together: its SE gates scale the rows, not the weights (other roundings)
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, oracle, rtol=1e-4, atol=1e-5)


def test_not_used_where_it_does_not_apply():
    m = _small_block(5)
    x = _cl(torch.randn(2, 8, 9, 9))
    # autograd: parameters need a gradient
    out = m(x)
    assert out.grad_fn is not None and "plan" not in m._cache
    out.sum().backward()
    assert m.conv_dw.weight.grad is not None
    # NCHW input, float64 (a float64 copy of the block): the op path; float16 autocast: the op
    # path's clear error (no float16 kernels on the CPU)
    with torch.no_grad():
        m(x.contiguous())
        copy.deepcopy(m).double()(x.double())
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(TypeError, match="float16 is supported on CUDA"):
            m(x)
    assert "plan" not in m._cache
    # a BN in training mode inside an eval block: batch statistics, so no plan
    m.bn2.train()
    with torch.no_grad():
        m(x)
    assert "plan" not in m._cache
    m.bn2.eval()
    with torch.no_grad():
        m(x)
    assert _planned(m)


def test_se_hooks_are_called():
    m = _small_block(6)
    x = _cl(torch.randn(1, 8, 9, 9))
    seen = []
    h = m.se.conv_reduce.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        a = m(x)
    h.remove()
    assert seen == [torch.Size([1, 2, 1, 1])]
    with torch.no_grad():
        b = m(x)
    assert _planned(m)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_unsupported_se_gate_runs_the_op_path():
    m = _small_block(8)
    m.se.gate = torch.nn.Tanh()
    x = _cl(torch.randn(2, 8, 9, 9))
    with torch.no_grad():
        got = m(x)
    assert m._cache["plan"].c is None  # remembered for this key: not retried every call
    torch.testing.assert_close(got, eager_mbconv(m, x), rtol=1e-4, atol=1e-5)
    m.se.gate = torch.nn.Sigmoid()
    with torch.no_grad():
        m(x)
    assert _planned(m)


def test_copies_of_a_planned_module():
    m = _small_block(9)
    x = _cl(torch.randn(2, 8, 9, 9))
    with torch.no_grad():
        a = m(x)
        c = copy.deepcopy(m)
        assert c._cache.get("plan") is None  # raw addresses are not copied
        with torch.no_grad():
            m.conv_dw.weight.data.mul_(-1)  # the original changes; the copy must not
        torch.testing.assert_close(c(x), a, rtol=0, atol=0)
        torch.testing.assert_close(m(x), eager_mbconv(m, x), rtol=1e-4, atol=1e-5)
    buf = __import__("io").BytesIO()
    torch.save(m, buf)  # a whole-module pickle drops the plan too
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own bytes, written just above
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_inference_tensors():
    with torch.inference_mode():
        m = _small_block(10)  # parameters without versions
        x = _cl(torch.randn(2, 8, 9, 9))
        got = m(x)
    assert "plan" not in m._cache
    m2 = _small_block(10)
    with torch.inference_mode():
        got2 = m2(x.clone())  # an inference-mode input: planned
        want = eager_mbconv(m, x)
    assert _planned(m2)
    torch.testing.assert_close(got2, got, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compile_skips_the_plan():
    m = _small_block(11)
    x = _cl(torch.randn(2, 8, 9, 9))
    with torch.no_grad():
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_plan_arguments_are_errors():
    """The C++ plan checks what it is given (it is private, but must never read out of bounds)."""
    from effops import _backend

    C = _backend._C._module if hasattr(_backend._C, "_module") else _backend._C
    cap = torch.utils.dlpack.to_dlpack
    taps = torch.randn(3, 3, 8)
    pw = torch.randn(8, 8)
    with pytest.raises(Exception, match="project_w"):
        C.BlockPlan(None, None, None, 0, cap(taps), None, None, 0, [1, 1], [1, 1], None, None, 0, None, None, 0,
                    cap(torch.randn(8, 7)), None, None, 0, False, [], [], [])
    plan = C.BlockPlan(None, None, None, 0, cap(taps), None, None, 0, [1, 1], [1, 1], None, None, 0, None, None, 0,
                       cap(pw), None, None, 0, True, [], [], [])
    x = torch.randn(1, 5, 5, 8)
    with pytest.raises(Exception, match="out"):
        plan.run(cap(x), cap(torch.empty(1, 4, 4, 8)), 1, 1, 1, 1, 1)
    with pytest.raises(Exception, match="channels"):
        plan.run(cap(torch.randn(1, 5, 5, 6)), cap(torch.empty(1, 5, 5, 8)), 1, 1, 1, 1, 1)
    with pytest.raises(Exception, match="smaller than"):
        plan.run(cap(torch.randn(1, 1, 1, 8)), cap(torch.empty(1, 1, 1, 8)), 0, 0, 0, 0, 1)
    out = torch.empty(1, 5, 5, 8)
    assert plan.run(cap(x), cap(out), 1, 1, 1, 1, 1)


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_se_gates(gate, op_path):
    m = randomize(MBConv(8, 12, 3, 2, expand_ratio=4, act="relu"), 12).eval()
    if gate == "hardsigmoid":
        m.se.gate = torch.nn.Hardsigmoid()
    x = _cl(torch.randn(2, 8, 15, 15) * 3)
    with torch.no_grad():
        got = m(x)
        assert _planned(m)
        with op_path():
            want = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, eager_mbconv(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["timm:efficientnet_b0", "timm:tf_efficientnet_b0", "timm:mobilenetv3_large_100",
                                  "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0",
                                  "torchvision:mobilenet_v2"])
def test_converted_blocks_are_planned(name):
    """effops.nn.convert's timm / torchvision blocks run the plan too (BN with the activation
    inside, TF 'same' padding, torchvision's SE with its pool, hard-sigmoid gates)."""
    lib, model = name.split(":")
    if lib == "timm":
        timm = pytest.importorskip("timm")
        m = timm.create_model(model, pretrained=False)
    else:
        tv = pytest.importorskip("torchvision")
        m = getattr(tv.models, model)()
    from effops.nn import convert

    torch.manual_seed(0)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
    m.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = m(x)
        c = convert(copy.deepcopy(m)).eval()
        for xi in (x, _cl(x)):
            got = c(xi)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    blocks = [b for b in c.modules() if hasattr(b, "_cache") and hasattr(b, "se_name")]
    assert blocks and all(_planned(b) for b in blocks), [type(b).__name__ for b in blocks if not _planned(b)]


# ------------------------------------------------------------- the banded expand -> depthwise path
def _set_bands(m, fuse_bytes, band_bytes=None):
    """Sets the banded path's thresholds on every planned block of m (plans built first)."""
    for b in m.modules():
        p = getattr(b, "_cache", {}).get("plan") if hasattr(b, "_cache") else None
        if p is not None and p.c is not None:
            p.c.fuse_bytes = fuse_bytes
            if band_bytes is not None:
                p.c.band_bytes = band_bytes


BAND_CASES = [  # in, out, k, stride, expand, se_ratio, act, padding, size, band_bytes (None: the default)
    (8, 8, 3, 1, 6, 0.25, "silu", None, 80, None),  # the default bands: a 1.2 MB expanded map, residual
    (8, 16, 5, 2, 6, 0.25, "silu", "same", 23, 1),  # one output row a band, TF 'same', odd size
    (8, 12, 5, 1, 4, 0.0, "relu6", 2, 17, 1),  # 5x5 pad 2: the second band's rows start in the padding
    (6, 10, 3, 2, 3, 0.5, "silu", 1, 16, 3000),  # several rows a band, stride 2 on an even size
    (5, 5, 3, 1, 3, 0.4, "hardswish", "same", 9, 700),  # odd channels, rows shared by bands
    (4, 4, 3, 1, 2, 0.0, "relu", 1, 3, 1),  # a 3-row map
]


@pytest.mark.parametrize("case", BAND_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_banded_expand_equals_the_unbanded_block(case, dtype):
    """A large expanded map runs band by band through an L2-sized buffer: the same expand and
    depthwise results row for row (bitwise without SE; with SE only the sums' order differs),
    for one and two threads."""
    cin, cout, k, s, e, se, act, pad, size, band = case
    m = randomize(MBConv(cin, cout, k, s, expand_ratio=e, se_ratio=se, act=act, padding=pad), 11).eval().to(dtype)
    x = _cl(torch.randn(2, cin, size, size)).to(dtype)
    n = torch.get_num_threads()
    with torch.no_grad():
        m(x)
        assert _planned(m)
        _set_bands(m, -1)
        flat = m(x)  # the unbanded path
        _set_bands(m, 0 if band is not None else 1 << 20, band)
        got = {}
        try:
            for t in (1, 2):
                torch.set_num_threads(t)
                got[t] = m(x)
        finally:
            torch.set_num_threads(n)
        oracle = eager_mbconv(m.float(), x.float())
    torch.testing.assert_close(got[2], got[1], rtol=0, atol=0)  # bands do not depend on the threads
    if se == 0:
        torch.testing.assert_close(got[1], flat, rtol=0, atol=0)
    elif dtype == torch.float32:
        torch.testing.assert_close(got[1], flat, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(got[1].float(), flat.float(), rtol=2e-2, atol=2e-2)
    if dtype == torch.float32:
        torch.testing.assert_close(got[1], oracle, rtol=1e-4, atol=1e-5)


def test_banded_path_defaults():
    """The defaults: maps over 1 MB, 1 MB bands; the band size is checked."""
    m = randomize(MBConv(8, 8, 3, 1, expand_ratio=6), 2).eval()
    with torch.no_grad():
        m(_cl(torch.randn(1, 8, 8, 8)))
    c = m._cache["plan"].c
    assert c.fuse_bytes == 1 << 20 and c.band_bytes == 1 << 20
    with pytest.raises(ValueError, match="band_bytes must be >= 1"):
        c.band_bytes = 0


def test_banded_dilated_converted_blocks():
    """torchvision's dilated MobileNetV3 (dilation 2 in the last stage), every block banded with
    one output row a band, equals the unbanded run."""
    tv = pytest.importorskip("torchvision")
    from effops.nn import convert

    torch.manual_seed(1)
    m = tv.models.mobilenet_v3_large(dilated=True)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
    m.eval()
    x = _cl(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        want = m(x)
        c = convert(copy.deepcopy(m)).eval()
        c(x)
        _set_bands(c, -1)
        flat = c(x)
        _set_bands(c, 0, 1)
        got = c(x)
    dil = [b for b in c.modules() if isinstance(b, torch.nn.Conv2d) and b.dilation != (1, 1)]
    assert dil, "no dilated conv in the model"
    torch.testing.assert_close(got, flat, rtol=1e-5, atol=1e-5 * flat.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ------------------------------------------------------------- the block as one op under torch.compile
def _graph_ops(model, x):
    """The call_function targets of the FX graphs torch.compile makes of model(x)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return out, seen


def test_compiled_effops_model_runs_each_block_as_one_op():
    """torch.compile of an effops model in inference: one effops::mbconv_block per block (the
    eager plan's kernels), no graph break, the eager result; invalidation as in eager."""
    torch.manual_seed(3)
    m = en.efficientnet("efficientnet_b0", num_classes=10).eval()
    x = _cl(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        want = m(x)
    got, ops = _graph_ops(m, x)
    assert sum("mbconv_block" in o for o in ops) == 16, ops
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    c = torch.compile(m)
    with torch.no_grad():
        torch.testing.assert_close(c(x), want, rtol=0, atol=0)
        blk = m.blocks[1][0]
        blk.conv_pw.weight.mul_(1.5)  # in place: a new version
        want2 = m(x)
        torch.testing.assert_close(c(x), want2, rtol=0, atol=0)
        blk.bn2.running_var.data.mul_(2.0)  # behind the version counter: the content check
        want3 = m(x)
        assert not torch.equal(want3, want2)
        torch.testing.assert_close(c(x), want3, rtol=0, atol=0)
    # bf16 autocast: still one op per block (the input cast to bf16 in the graph), eager's result
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            want = m(x)
        got, ops = _graph_ops(m, x)
    assert sum("mbconv_block" in o for o in ops) == 16, ops
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_block_op_only_in_inference():
    """With gradients (training) the compiled graph has the op-by-op path, and backward works;
    torch.export keeps the standard ops too."""
    m = _small_block(9)
    x = _cl(torch.randn(2, 8, 9, 9))
    torch._dynamo.reset()
    xg = x.clone().requires_grad_()
    c = torch.compile(m)
    c(xg).sum().backward()
    assert xg.grad is not None and m.conv_pw.weight.grad is not None
    with torch.no_grad():
        prog = torch.export.export(m, (x,))
    assert not any("mbconv_block" in str(n.target) for n in prog.graph.nodes)
    _, ops = _graph_ops(m, x)
    assert any("mbconv_block" in o for o in ops)


def test_block_op_plan_cache_is_bounded(monkeypatch):
    import effops.nn._plan as P

    monkeypatch.setattr(P, "_OP_PLANS_MAX", 2)
    P._OP_PLANS.clear()
    x = _cl(torch.randn(1, 8, 5, 5))
    blocks = [_small_block(s) for s in range(4)]
    for b in blocks:
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(b)(x), b(x), rtol=0, atol=0)
    assert len(P._OP_PLANS) == 2


def test_block_op_keeps_one_plan_per_block():
    """Weights updated between compiled calls replace the block's plan (no pile of plans holding
    old copies); input sizes share one plan."""
    import effops.nn._plan as P

    P._OP_PLANS.clear(), P._OP_SLOTS.clear()
    m = _small_block(13).bfloat16()  # bf16: the plan holds float copies of the weights
    torch._dynamo.reset()
    c = torch.compile(m, dynamic=True)
    with torch.no_grad():
        for i in range(5):
            m.conv_pw.weight.mul_(1.01)
            for size in (7, 9):
                x = _cl(torch.randn(1, 8, size, size)).bfloat16()
                torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)
            assert len(P._OP_PLANS) == 1 and len(P._OP_SLOTS) == 1


def test_parametrized_weights_are_read_through_the_parametrization():
    """The plan reads parameters from the modules' dicts; a parametrized weight (a property, not
    in _parameters) is read through getattr, so the block sees the parametrization's value."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    m = _small_block(12)
    x = _cl(torch.randn(2, 8, 9, 9))
    with torch.no_grad():
        plain = m(x)
        parametrize.register_parametrization(m.conv_pwl, "weight", Double())
        got = m(x)
        again = m(x)
    assert not torch.equal(got, plain)
    torch.testing.assert_close(got, eager_mbconv(m, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def _op_args(m, x):
    """effops::mbconv_block's arguments for block m on x, as block_forward makes them under compile."""
    import effops.nn._plan as P
    from effops.ops.dwsep import conv_geometry

    src, ints, eps = P._structure(m.conv_pw, m.bn1, m._act, m.conv_dw, m.bn2, m._act, m.padding, m.se, m.conv_pwl,
                                  m.bn3, None, m.skip)
    cg = conv_geometry("MBConv", tuple(x.shape[2:]), tuple(m.conv_dw.kernel_size), tuple(m.conv_dw.stride),
                       m.padding, tuple(m.conv_dw.dilation))
    return x, [None if t is None else t.detach() for t in src], ints + list(cg.pad), eps


def test_block_op_opcheck_and_eager_parity():
    """The op passes torch.library.opcheck (schema, fake tensor, autograd registration, AOT
    dispatch) and called directly gives the eager block's result."""
    m = _small_block(14)
    x = _cl(torch.randn(2, 8, 9, 9))
    args = _op_args(m, x)
    torch.library.opcheck(torch.ops.effops.mbconv_block.default, args)
    with torch.no_grad():
        torch.testing.assert_close(torch.ops.effops.mbconv_block(*args), m(x), rtol=0, atol=0)


def test_block_op_bad_tensors_are_a_clear_error():
    m = _small_block(15)
    x, src, ints, eps = _op_args(m, _cl(torch.randn(1, 8, 7, 7)))
    import effops.nn._plan as P

    src[P._PJ_W] = src[P._PJ_W].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # not contiguous
    with pytest.raises(RuntimeError, match="cannot run as one block"):
        torch.ops.effops.mbconv_block(x, src, ints, eps)
