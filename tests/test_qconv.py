"""Int8 fused convolutions (effops.ops.qconv): every backend gives the reference's integers bit for
bit, on adversarial inputs (saturation, zero points 0/128/255, ties of round-half-even, int32
wrap-around of the bias, odd channel counts and spatial sizes, stride 2, TF-same and symmetric
padding), at every CPU ISA level this machine runs."""

from __future__ import annotations

import pytest
import torch

import effops
from effops import _backend
from effops.ops import qconv as Q
from effops.ops.dwsep import conv_geometry

LEVELS = [lvl for lvl in effops._backend.ISA_LEVELS
          if effops._backend.ISA_LEVELS.index(lvl) <= effops._backend.ISA_LEVELS.index(effops._backend.detected_isa())]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _mult(g, C, kind):
    if kind == "tie":  # products k * 0.5 / 0.25: exact ties, round half to even decides
        return torch.tensor([0.5, 0.25] * C, dtype=torch.float32)[:C]
    if kind == "saturate":
        return torch.full((C,), 3.0, dtype=torch.float32)
    if kind == "small":
        return torch.full((C,), 0.004, dtype=torch.float32)
    if kind == "wrap":  # with a bias near the int32 limits: |acc| ~ 2**31 lands inside the code range
        return (10 ** (torch.rand(C, generator=g) * 1.5 - 9.5)).to(torch.float32)
    return (10 ** (torch.rand(C, generator=g) * 3 - 4.5)).to(torch.float32)


def _bias(g, C, kind):
    if kind == "none":
        return None
    if kind == "wrap":  # near the int32 limits: the sum wraps around
        return torch.randint(2 ** 31 - 2 ** 20, 2 ** 31 - 1, (C,), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.randint(-2 ** 16, 2 ** 16, (C,), generator=g, dtype=torch.int32)


def _codes(g, shape, x_zp, kind="uniform"):
    if kind == "const":
        return torch.full(shape, x_zp, dtype=torch.uint8)
    if kind == "extreme":
        return (torch.randint(0, 2, shape, generator=g) * 255).to(torch.uint8)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _lut(g, kind):
    return torch.randint(0, 256, (256,), generator=g, dtype=torch.uint8) if kind == "lut" else None


DW_CASES = [
    # N, C, H, W, k, stride, padding, x_zp, out_zp, mult, bias, act(kind), codes
    (2, 1, 7, 5, 3, 1, "same", 0, 0, "rand", "int", "clamp", "uniform"),
    (1, 3, 9, 9, 5, 2, "same", 128, 3, "tie", "int", "none", "uniform"),
    (2, 7, 6, 11, 3, 2, 1, 255, 255, "wrap", "wrap", "lut", "extreme"),
    (1, 65, 5, 7, 3, 1, 1, 17, 128, "saturate", "int", "none", "extreme"),
    (1, 16, 4, 4, 5, 1, "same", 128, 128, "rand", "none", "lut", "const"),
    (2, 40, 13, 13, 5, 2, "same", 3, 7, "rand", "int", "clamp", "uniform"),
    (1, 96, 8, 8, 3, 1, "same", 200, 90, "rand", "int", "lut", "uniform"),
    (1, 17, 1, 1, 1, 1, 0, 9, 100, "wrap", "wrap", "none", "uniform"),
    # the AVX-512 quad kernel: 7x7 (two quads per row, run-time sizes) with a channel tail, an even
    # kernel at stride 2, and 5x5 without padding on a row of 26 pixels (4-pixel blocks + a tail)
    (1, 20, 11, 23, 7, 1, "same", 77, 10, "small", "int", "lut", "uniform"),
    (2, 33, 10, 19, 4, 2, 1, 250, 5, "rand", "int", "clamp", "extreme"),
    (1, 48, 9, 30, 5, 1, 0, 1, 128, "rand", "int", "none", "uniform"),
    # quad rows stored at every stride-th column (stride 4), and every column (stride 3)
    (1, 19, 13, 17, 3, 4, 1, 60, 20, "rand", "int", "lut", "uniform"),
    (2, 18, 11, 14, 5, 3, "same", 5, 9, "rand", "int", "none", "uniform"),
]


def _dw_case(seed, N, C, H, W, k, stride, padding, x_zp, out_zp, mult, bias, act, codes):
    g = _g(seed)
    x = _codes(g, (N, C, H, W), x_zp, codes)
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (C, 1, k, k), generator=g, dtype=torch.int8)
    kw = dict(mult=_mult(g, C, mult), x_zp=x_zp, out_zp=out_zp, lut=_lut(g, act), stride=stride, padding=padding)
    if act == "clamp":
        kw.update(qmin=out_zp // 2, qmax=min(255, out_zp + 60))
    return x, w, _bias(g, C, bias), kw


def _run(backend, fn, *args, **kw):
    with _backend.use_backend(backend):
        return fn(*args, **kw)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", range(len(DW_CASES)))
def test_q_dw_conv_act_bit_exact(case, level):
    x, w, b, kw = _dw_case(case, *DW_CASES[case])
    ref_y, ref_s = _run("reference", Q.q_dw_conv_act, x, w, b, **kw)
    with effops.use_isa(level):
        y, s = _run("cpu", Q.q_dw_conv_act, x, w, b, **kw)
    assert y.dtype == torch.uint8 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ref_y)
    assert torch.equal(s, ref_s)
    assert ref_y.float().std() > 0 or DW_CASES[case][-1] == "const" or DW_CASES[case][9] == "saturate"


PW_CASES = [
    # N, C, Co, H, W, x_zp, out_zp, mult, bias, act, gate, residual
    (2, 1, 1, 3, 5, 0, 128, "small", "none", "none", False, False),
    (1, 3, 7, 7, 7, 128, 128, "wrap", "wrap", "clamp", False, True),
    (2, 7, 65, 5, 3, 255, 0, "rand", "int", "lut", True, False),
    (1, 65, 3, 9, 1, 37, 255, "saturate", "none", "none", True, True),
    (1, 24, 144, 6, 6, 128, 120, "rand", "int", "lut", False, False),
    (2, 144, 24, 7, 5, 90, 128, "rand", "int", "none", True, True),
    (1, 193, 81, 2, 3, 1, 2, "rand", "int", "clamp", False, False),
]


def _pw_case(seed, N, C, Co, H, W, x_zp, out_zp, mult, bias, act, gate, residual):
    g = _g(100 + seed)
    x = _codes(g, (N, C, H, W), x_zp)
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (Co, C, 1, 1), generator=g, dtype=torch.int8)
    kw = dict(mult=_mult(g, Co, mult), x_zp=x_zp, out_zp=out_zp, lut=_lut(g, act))
    if act == "clamp":
        kw.update(qmin=out_zp // 3, qmax=min(255, out_zp + 50))
    if gate:  # SE gates in (0, 1), and ties: 0.5 on every other channel
        gv = torch.rand(N, C, generator=g)
        gv[:, ::2] = 0.5
        kw["gate"] = gv
    if residual:
        kw.update(residual=_codes(g, (N, Co, H, W), 0), res_zp=200 - seed, res_mult=[0.5, 1.7, 0.003, 2.5][seed % 4])
    return x, w, _bias(g, Co, bias), kw


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", range(len(PW_CASES)))
def test_q_pw_conv_bit_exact(case, level):
    x, w, b, kw = _pw_case(case, *PW_CASES[case])
    ref = _run("reference", Q.q_pw_conv, x, w, b, **kw)
    with effops.use_isa(level):
        out = _run("cpu", Q.q_pw_conv, x, w, b, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    assert ref.float().std() > 0 or PW_CASES[case][7] == "saturate"  # not a degenerate (constant) case


AMX_PW_CASES = [  # big enough for 32-row blocks inside each task (the cases above give a task <= 32 rows)
    # N, C, Co, H, W, x_zp, out_zp, mult, bias, act, gate, residual
    (2, 40, 240, 14, 14, 7, 128, "rand", "int", "none", False, False),    # K < 64: the K tail only
    (2, 144, 72, 14, 14, 128, 120, "rand", "int", "none", True, True),   # 2 chunks + a 16-k tail, SE, residual
    (1, 96, 24, 28, 28, 3, 100, "rand", "int", "lut", False, False),     # the activation table
    (1, 1152, 200, 20, 20, 90, 128, "rand", "wrap", "clamp", False, True),  # whole chunks, a partial panel
    (3, 67, 33, 13, 11, 255, 0, "rand", "int", "none", True, False),      # odd K and Co, rows past whole blocks
]


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("case", range(len(AMX_PW_CASES)))
def test_q_pw_conv_amx_bit_exact(case, amx):
    """On CPUs with AMX-INT8 the level-2 GEMM runs on the tiles (tdpbusd; with it off, or on other
    CPUs, the vpdpbusd / scalar paths): the same integers as the reference either way."""
    x, w, b, kw = _pw_case(case + 1, *AMX_PW_CASES[case])
    ref = _run("reference", Q.q_pw_conv, x, w, b, **kw)
    with effops.use_amx(amx):
        out = _run("cpu", Q.q_pw_conv, x, w, b, **kw)
    assert torch.equal(out, ref)
    assert ref.float().std() > 0


DWSEP_CASES = [
    # N, C, Co, H, W, k, stride, padding, residual
    (2, 1, 3, 5, 7, 3, 1, "same", False),
    (1, 7, 7, 9, 9, 3, 1, 1, True),
    (2, 65, 17, 11, 6, 5, 2, "same", False),
    (1, 32, 96, 14, 14, 3, 2, 1, False),
    (1, 40, 40, 6, 5, 5, 1, "same", True),
]


def _dwsep_case(seed, N, C, Co, H, W, k, stride, padding, residual):
    g = _g(200 + seed)
    x = _codes(g, (N, C, H, W), 0)
    dw = torch.randint(-128, 128, (C, 1, k, k), generator=g, dtype=torch.int8)
    pw = torch.randint(-128, 128, (Co, C, 1, 1), generator=g, dtype=torch.int8)
    kw = dict(dw_bias=_bias(g, C, "int"), dw_mult=_mult(g, C, "rand"), dw_lut=_lut(g, "lut" if seed % 2 else ""),
              x_zp=[0, 128, 255, 5, 77][seed], mid_zp=[255, 0, 128, 64, 3][seed], dw_zp=[255, 30, 128, 200, 3][seed],
              mid_qmin=seed, mid_qmax=255 - seed,
              pw_bias=_bias(g, Co, "wrap" if seed == 2 else "int"), pw_mult=_mult(g, Co, {1: "tie", 2: "wrap"}.get(seed, "rand")),
              out_zp=[0, 128, 255, 9, 100][seed], stride=stride, padding=padding)
    if residual:
        Ho, Wo = conv_geometry("test", (H, W), (k, k), stride, padding, 1).out_hw
        kw.update(residual=_codes(g, (N, Co, Ho, Wo), 0),
                  res_zp=128, res_mult=0.75)
    return x, dw, pw, kw


CONV_CASES = [
    # N, C, Co, H, W, k, stride, padding, x_zp, out_zp, mult, bias, act, codes
    (2, 3, 32, 17, 15, 3, 2, "same", 128, 30, "rand", "int", "lut", "uniform"),   # a TF stem, odd sizes
    (1, 3, 32, 8, 9, 3, 2, 1, 0, 128, "tie", "int", "clamp", "uniform"),          # symmetric stem
    (3, 4, 5, 9, 11, 3, 1, 1, 255, 255, "wrap", "wrap", "none", "extreme"),       # K = 36: no tail
    (1, 1, 3, 1, 1, 1, 1, 0, 7, 0, "saturate", "none", "none", "uniform"),       # a 1x1 map
    (2, 3, 7, 5, 5, 5, 2, "same", 77, 9, "small", "int", "lut", "const"),        # 5x5: K = 75
    (1, 2, 70, 6, 7, 3, 2, (0, 2), 1, 200, "rand", "int", "none", "uniform"),     # Co past a panel
    (1, 5, 17, 30, 31, 3, 1, 1, 90, 128, "rand", "int", "lut", "uniform"),       # many patch blocks
]


def _conv_case(seed, N, C, Co, H, W, k, stride, padding, x_zp, out_zp, mult, bias, act, codes):
    g = _g(300 + seed)
    x = _codes(g, (N, C, H, W), x_zp, codes)
    if seed % 2:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (Co, C, k, k), generator=g, dtype=torch.int8)
    kw = dict(mult=_mult(g, Co, mult), x_zp=x_zp, out_zp=out_zp, lut=_lut(g, act), stride=stride, padding=padding)
    if act == "clamp":
        kw.update(qmin=out_zp // 3, qmax=min(255, out_zp + 50))
    return x, w, _bias(g, Co, bias), kw


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_q_conv2d_bit_exact(case, level):
    """The dense conv (a stem): the CPU kernel (patches in cache + the pointwise GEMM) and the
    other path (conv_patches + q_pw_conv: other backends, torch.compile) equal the reference."""
    x, w, b, kw = _conv_case(case, *CONV_CASES[case])
    N, C, H, W = x.shape
    geo = conv_geometry("t", (H, W), w.shape[2:], kw["stride"], kw["padding"], 1)
    ref = Q.q_conv2d_reference(x, w, b, kw["mult"], kw["lut"], geo.stride, geo.pad, kw["x_zp"], kw["out_zp"],
                               kw.get("qmin", 0), kw.get("qmax", 255))
    with effops.use_isa(level):
        out = _run("cpu", Q.q_conv2d, x, w, b, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, ref)
    assert torch.equal(_run("reference", Q.q_conv2d, x, w, b, **kw), ref)
    assert ref.float().std() > 0 or CONV_CASES[case][10] == "saturate" or CONV_CASES[case][-1] == "const"


def test_q_conv2d_reference_by_hand():
    x = torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.uint8)  # 1x1x2x2, zp 1: values 0 1 2 3
    w = torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.int8)
    out = Q.q_conv2d_reference(x, w, torch.tensor([1], dtype=torch.int32), torch.tensor([0.5]), None, (1, 1),
                               (0, 0, 0, 0), 1, 10, 0, 255)
    assert out.item() == 10 + 10  # acc = 0*1 + 1*2 + 2*3 + 3*4 + 1 = 21; 21 * 0.5 = 10.5 -> 10 (even)
    pad = Q.q_conv2d_reference(x, w, None, torch.tensor([1.0]), None, (1, 1), (1, 0, 1, 0), 1, 0, 0, 255)
    assert pad[0, 0, 0, 0].item() == 4 * 0  # only the top-left code (value 0) under tap 4: padding is real zero
    assert pad[0, 0, 1, 1].item() == 21 - 1


def test_q_conv2d_bad_input():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    w = torch.zeros(4, 3, 3, 3, dtype=torch.int8)
    m = torch.ones(4)
    with pytest.raises(TypeError, match="weight must be int8"):
        Q.q_conv2d(x, w.float(), mult=m, x_zp=0, out_zp=0)
    with pytest.raises(ValueError, match=r"weight must have shape \[\*, 3, \*, \*\]"):
        Q.q_conv2d(x, torch.zeros(4, 2, 3, 3, dtype=torch.int8), mult=m, x_zp=0, out_zp=0)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        Q.q_conv2d(x[:, :, :2, :2], w, mult=m, x_zp=0, out_zp=0)
    with pytest.raises(ValueError, match="x_zp"):
        Q.q_conv2d(x, w, mult=m, x_zp=256, out_zp=0)
    with pytest.raises(ValueError, match="KH \\* KW \\* C"):
        Q.q_conv2d(torch.zeros(1, 700, 8, 8, dtype=torch.uint8), torch.zeros(1, 700, 7, 7, dtype=torch.int8),
                   mult=torch.ones(1), x_zp=0, out_zp=0)
    with pytest.raises(ValueError, match=r"w must be \[Co, Kp\]"):  # the kernel's own check
        _backend._C.q_conv_forward(x.permute(0, 2, 3, 1).contiguous(), torch.zeros(4, 26, dtype=torch.int8), 3, 3, None, m, None,
                                   [1, 1], [0, 0, 0, 0], 0, 0, 0, 255, torch.empty(1, 6, 6, 4, dtype=torch.uint8),
                                   None, 1)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", range(len(DWSEP_CASES)))
def test_q_dwsep_conv_bit_exact(case, level):
    x, dw, pw, kw = _dwsep_case(case, *DWSEP_CASES[case])
    ref = _run("reference", Q.q_dwsep_conv, x, dw, pw, **kw)
    with effops.use_isa(level):
        out = _run("cpu", Q.q_dwsep_conv, x, dw, pw, **kw)
    assert torch.equal(out, ref)
    assert ref.float().std() > 0
    # the fused op is the two ops back to back
    mid, _ = _run("reference", Q.q_dw_conv_act, x, dw, kw["dw_bias"], mult=kw["dw_mult"], x_zp=kw["x_zp"],
                  out_zp=kw["dw_zp"], qmin=kw["mid_qmin"], qmax=kw["mid_qmax"], lut=kw["dw_lut"],
                  stride=kw["stride"], padding=kw["padding"])
    two = _run("reference", Q.q_pw_conv, mid, pw, kw["pw_bias"], mult=kw["pw_mult"], x_zp=kw["mid_zp"],
               out_zp=kw["out_zp"], residual=kw.get("residual"), res_zp=kw.get("res_zp", 0),
               res_mult=kw.get("res_mult", 1.0))
    assert torch.equal(out, two)


def test_reference_arithmetic_by_hand():
    """The definition on numbers small enough to check by hand: acc = (x - zp) * w + bias,
    float32 product, round half to even, + zp, clamp."""
    x = torch.tensor([[[[10, 11, 12]]]], dtype=torch.uint8).permute(0, 3, 1, 2)  # N=1, C=3, H=W=1
    w = torch.tensor([[[[1]]], [[[1]]], [[[1]]]], dtype=torch.int8)
    b = torch.tensor([0, 0, 1], dtype=torch.int32)
    y, s = Q.q_dw_conv_act_reference(x, w, b, torch.tensor([0.5, 0.5, 0.5]), None, (1, 1), (0, 0, 0, 0), 7, 100,
                                     0, 255)
    # (10-7)*0.5 = 1.5 -> 2; (11-7)*0.5 = 2.0 -> 2; (12-7+1)*0.5 = 3.0 -> 3
    assert y.flatten().tolist() == [102, 102, 103]
    assert s.flatten().tolist() == [102, 102, 103]
    # wrap-around: 2**31 - 1 + 1 -> -2**31
    assert Q.wrap32(torch.tensor([2 ** 31])).item() == -2 ** 31


def test_activation_lut_and_clamp_range():
    lut = Q.activation_lut("silu", 0.05, 128, 0.04, 10)
    q = torch.arange(256)
    want = (torch.round(torch.nn.functional.silu(0.05 * (q - 128.0).double()) / 0.04) + 10).clamp(0, 255)
    assert torch.equal(lut.long(), want.long())
    assert Q.clamp_range("relu6", 0.1, 20) == (20, 80)
    assert Q.clamp_range("relu", 0.1, 20) == (20, 255)


def test_bad_input():
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    w = torch.zeros(4, 1, 3, 3, dtype=torch.int8)
    m = torch.ones(4)
    with pytest.raises(TypeError, match="x must be uint8"):
        Q.q_dw_conv_act(x.float(), w, mult=m, x_zp=0, out_zp=0)
    with pytest.raises(TypeError, match="weight must be int8"):
        Q.q_dw_conv_act(x, w.float(), mult=m, x_zp=0, out_zp=0)
    with pytest.raises(ValueError, match="x_zp must be <= 255"):
        Q.q_dw_conv_act(x, w, mult=m, x_zp=256, out_zp=0)
    with pytest.raises(ValueError, match="mult must have shape"):
        Q.q_dw_conv_act(x, w, mult=torch.ones(3), x_zp=0, out_zp=0)
    with pytest.raises(ValueError, match="qmin .* must be <= qmax"):
        Q.q_dw_conv_act(x, w, mult=m, x_zp=0, out_zp=0, qmin=9, qmax=3)
    with pytest.raises(ValueError, match="lut must have shape"):
        Q.q_pw_conv(x, torch.zeros(2, 4, 1, 1, dtype=torch.int8), mult=torch.ones(2), x_zp=0, out_zp=0,
                    lut=torch.zeros(255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="residual must have shape"):
        Q.q_pw_conv(x, torch.zeros(2, 4, 1, 1, dtype=torch.int8), mult=torch.ones(2), x_zp=0, out_zp=0,
                    residual=x)
    with pytest.raises(TypeError, match="bias must be int32"):
        Q.q_pw_conv(x, torch.zeros(2, 4, 1, 1, dtype=torch.int8), torch.zeros(2), mult=torch.ones(2), x_zp=0,
                    out_zp=0)


def test_custom_ops_opcheck_and_compile():
    x, w, b, kw = _dw_case(3, *DW_CASES[3])
    torch.library.opcheck(torch.ops.effops.q_dw_conv_act.default,
                          (x, w, b, kw["mult"], kw["lut"], [1, 1], [1, 1, 1, 1], kw["x_zp"], kw["out_zp"], 0, 255))
    xp, wp, bp, kp = _pw_case(2, *PW_CASES[2])
    torch.library.opcheck(torch.ops.effops.q_pw_conv.default,
                          (xp, wp, bp, kp["mult"], kp["lut"], kp["gate"], None, kp["x_zp"], kp["out_zp"], 0, 255, 0,
                           1.0))
    xs, dw, pw, ks = _dwsep_case(1, *DWSEP_CASES[1])

    def f(t):
        return Q.q_dwsep_conv(t, dw, pw, **ks)

    eager = f(xs)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(xs)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_q_se_gates(gate):
    """The SE gates op: the CPU kernel's means are the torch expression's bit for bit (identity
    MLP, no activation: the gate of the means), the MLP close to torch's (its own summation
    order); the op checks (opcheck), runs on the reference backend, and rejects bad codes."""
    g = _g(5)
    N, C, R, hw = 3, 40, 10, 49
    sums = torch.randint(0, 255 * hw, (N, C), generator=g, dtype=torch.int32)
    code = Q.SE_GATES[gate]
    eye = torch.eye(C)
    got = _run("cpu", torch.ops.effops.q_se_gates, sums, hw, 17, 0.013, eye, None, 0, eye, None, code)
    means = (sums.to(torch.float32) / float(hw) - 17) * 0.013
    want = torch.sigmoid(means) if gate == "sigmoid" else torch.nn.functional.hardsigmoid(means)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    if gate == "hardsigmoid":
        assert torch.equal(got, torch.nn.functional.relu6(means + 3.0) / 6.0)  # no exp: exact
    w1, b1 = torch.randn(R, C, generator=g) * 0.1, torch.randn(R, generator=g)
    w2, b2 = torch.randn(C, R, generator=g) * 0.3, torch.randn(C, generator=g)
    args = (sums, hw, 17, 0.013, w1, b1, Q.ACTIVATIONS.index("silu"), w2, b2, code)
    cpu = _run("cpu", torch.ops.effops.q_se_gates, *args)
    ref = _run("reference", torch.ops.effops.q_se_gates, *args)
    assert cpu.dtype == torch.float32 and torch.allclose(cpu, ref, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.effops.q_se_gates.default, args)
    with pytest.raises(ValueError, match="gate must be 5"):
        _backend._C.q_se_gates(sums, hw, 17, 0.013, w1, b1, 3, w2, b2, 7, torch.empty(N, C))
    with pytest.raises(ValueError, match=r"w2 must have shape"):
        _backend._C.q_se_gates(sums, hw, 17, 0.013, w1, b1, 3, w2[:, :3].contiguous(), b2, 5, torch.empty(N, C))


def test_cpu_level_name():
    assert effops._backend._C_module.q_isa() in ("avx512-vnni", "avx-vnni", "avx2", "scalar")
    with effops.use_isa("baseline"):
        assert effops._backend._C_module.q_isa() == "scalar"
    if "avx2" in LEVELS:  # at the AVX2 level whatever EFFOPS_ISA caps the run at
        with effops.use_isa("avx2"), effops.use_vnni(False) as level:
            assert level == "avx2" and effops._backend._C_module.q_isa() == "avx2"
    with pytest.raises(TypeError, match="on must be a bool"):
        effops.set_vnni(1)


NO_VNNI = pytest.mark.skipif("avx2" not in LEVELS, reason="needs AVX2")


@NO_VNNI
@pytest.mark.parametrize("family", ["dw", "pw", "dwsep", "conv"])
def test_avx2_without_vnni_bit_exact(family):
    """The AVX2 level with the VNNI dot products emulated (vpmaddwd: CPUs with AVX2 and no
    AVX-VNNI, e.g. Zen 2/3, Haswell-Skylake; and AVX-512 CPUs without VNNI) gives the reference's
    integers on every case of each family, the pointwise ones packed once too."""
    cases = {"dw": DW_CASES, "pw": PW_CASES + AMX_PW_CASES, "dwsep": DWSEP_CASES, "conv": CONV_CASES}[family]
    for i in range(len(cases)):
        if family == "dw":
            x, w, b, kw = _dw_case(i, *cases[i])
            fn = Q.q_dw_conv_act
        elif family == "pw":
            x, w, b, kw = _pw_case(i, *cases[i])
            fn = Q.q_pw_conv
        elif family == "dwsep":
            x, w, b, kw = _dwsep_case(i, *cases[i])  # b: the pointwise weight
            fn = Q.q_dwsep_conv
        else:
            x, w, b, kw = _conv_case(i, *cases[i])
            fn = Q.q_conv2d
        ref = _run("reference", fn, x, w, b, **kw)
        with effops.use_isa("avx2"), effops.use_vnni(False):
            out = _run("cpu", fn, x, w, b, **kw)
        for a, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            assert torch.equal(a, r), (family, i)


FUSE_CASES = [
    # sizes of the inputs, modes, zero points, normalised weights, scales
    ([(9, 9), (5, 5)], ["identity", "nearest"], [0, 128], [0.6, 0.4], [0.05, 0.02]),
    ([(9, 9), (5, 5), (17, 17)], ["identity", "nearest", "maxpool"], [255, 3, 128], [0.2, 0.3, 0.5], [0.1, 0.03, 0.2]),
    ([(7, 6), (13, 12), (7, 6), (4, 3)], ["identity", "maxpool_sym", "identity", "nearest"], [9, 0, 255, 77],
     [0.25, 0.25, 0.25, 0.25], [1.0, 0.001, 0.5, 3.0]),
    ([(10, 10), (20, 20)], ["identity", "maxpool"], [128, 128], [0.5, 0.5], [0.04, 0.04]),
]


def _fuse_case(i):
    from effops.ops import qconv_fuse as QF

    sizes, modes, zps, wn, scales = FUSE_CASES[i]
    g = _g(300 + i)
    C = [1, 7, 65, 16][i]
    xs = [_codes(g, (2, C, *s), 0, "extreme" if i == 2 else "uniform") for s in sizes]
    mults = QF.fuse_multipliers(wn, scales, 0.04)
    return xs, dict(zps=zps, mults=mults, resample=modes, out_zp=[0, 128, 255, 5][i], lut=_lut(g, "lut" if i % 2 else ""),
                    qmin=[0, 3, 0, 10][i], qmax=[255, 250, 255, 200][i])


@pytest.mark.parametrize("case", range(len(FUSE_CASES)))
def test_q_weighted_fuse_bit_exact(case):
    from effops.ops import qconv_fuse as QF

    assert hasattr(_backend._C_module, "q_fuse_forward"), "rebuild effops._C"
    xs, kw = _fuse_case(case)
    ref = _run("reference", QF.q_weighted_fuse, xs, **kw)
    out = _run("cpu", QF.q_weighted_fuse, xs, **kw)
    assert torch.equal(out, ref)
    # against the float definition: acc / 2**16 rounded half up
    acc = sum((QF.resample_reference(x.double(), m, ref.shape[2:]) - z) * mu
              for x, m, z, mu in zip(xs, kw["resample"], kw["zps"], kw["mults"]))
    q = (torch.floor(acc / 2 ** 16 + 0.5) + kw["out_zp"]).clamp(kw["qmin"], kw["qmax"]).long()
    if kw["lut"] is not None:
        q = kw["lut"].long()[q]
    assert torch.equal(q.to(torch.uint8), ref)


def test_q_weighted_fuse_bad_input():
    from effops.ops import qconv_fuse as QF

    a = torch.zeros(1, 4, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="must be uint8"):
        QF.q_weighted_fuse([a, a.float()], zps=[0, 0], mults=[1, 1], resample=["identity"] * 2, out_zp=0)
    with pytest.raises(ValueError, match="does not give"):
        QF.q_weighted_fuse([a, a[..., :5, :5]], zps=[0, 0], mults=[1, 1], resample=["identity"] * 2, out_zp=0)
    with pytest.raises(ValueError, match="one entry per input"):
        QF.q_weighted_fuse([a, a], zps=[0], mults=[1, 1], resample=["identity"] * 2, out_zp=0)
    # found by tests/test_fuzz.py's qconv family: no channels (the reference's resampling failed
    # inside torch) and a table on another device (the CPU kernel read a meta tensor's table)
    e = a[:, :0]
    with pytest.raises(ValueError, match="inputs must have at least one channel"):
        QF.q_weighted_fuse([e, e], zps=[0, 0], mults=[1, 1], resample=["identity"] * 2, out_zp=0)
    with pytest.raises(ValueError, match="lut is on meta"):
        QF.q_weighted_fuse([a, a], zps=[0, 0], mults=[1, 1], resample=["identity"] * 2, out_zp=0,
                           lut=torch.zeros(256, dtype=torch.uint8, device="meta"))


def test_q_dwsep_conv_errors_name_the_argument():
    # q_dwsep_conv's two epilogues named dw_mult / dw_lut "mid_mult" / "mid_lut" and pw_mult
    # "mult" (found by the fuzz suite): each message names the argument the caller passed.
    x = torch.zeros(1, 4, 5, 5, dtype=torch.uint8)
    dw, pw = torch.zeros(4, 1, 3, 3, dtype=torch.int8), torch.zeros(6, 4, 1, 1, dtype=torch.int8)
    kw = dict(dw_mult=torch.ones(4), pw_mult=torch.ones(6), x_zp=0, mid_zp=0, out_zp=0)
    for bad, match in ((dict(dw_mult=torch.ones(3)), "dw_mult must have shape"),
                       (dict(pw_mult=torch.ones(3)), "pw_mult must have shape"),
                       (dict(dw_lut=torch.zeros(9, dtype=torch.uint8)), "dw_lut must have shape"),
                       (dict(lut=torch.zeros(9, dtype=torch.uint8)), ": lut must have shape"),
                       (dict(dw_zp=300), "dw_zp must be <= 255"),
                       (dict(mid_zp=-1), "mid_zp must be >= 0"),
                       (dict(mid_qmin=9, mid_qmax=3), r"mid_qmin \(9\) must be <= mid_qmax \(3\)"),
                       (dict(qmin=9, qmax=3), r": qmin \(9\) must be <= qmax \(3\)")):
        with pytest.raises(ValueError, match=match):
            Q.q_dwsep_conv(x, dw, pw, **{**kw, **bad})


def _triton_device():
    return "cuda" if torch.cuda.is_available() and not _backend.triton_interpret() else "cpu"


def _to(dev, obj):
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to(dev, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(dev, v) for v in obj)
    return obj


@pytest.mark.triton
@pytest.mark.parametrize("case", [0, 1, 2, 3, 7])
def test_triton_q_dw_conv_act(case):
    dev = _triton_device()
    x, w, b, kw = _dw_case(case, *DW_CASES[case])
    ref_y, ref_s = _run("reference", Q.q_dw_conv_act, x, w, b, **kw)
    y, s = _run("triton", Q.q_dw_conv_act, *_to(dev, (x, w, b)), **_to(dev, kw))
    assert torch.equal(y.cpu(), ref_y) and torch.equal(s.cpu(), ref_s)


@pytest.mark.triton
@pytest.mark.parametrize("case", [0, 1, 2, 3])
def test_triton_q_pw_conv(case):
    dev = _triton_device()
    x, w, b, kw = _pw_case(case, *PW_CASES[case])
    ref = _run("reference", Q.q_pw_conv, x, w, b, **kw)
    out = _run("triton", Q.q_pw_conv, *_to(dev, (x, w, b)), **_to(dev, kw))
    assert torch.equal(out.cpu(), ref)


@pytest.mark.triton
@pytest.mark.parametrize("case", [0, 2])
def test_triton_q_conv2d(case):  # patches + the Triton q_pw_conv
    dev = _triton_device()
    x, w, b, kw = _conv_case(case, *CONV_CASES[case])
    ref = _run("cpu", Q.q_conv2d, x, w, b, **kw)
    out = _run("triton", Q.q_conv2d, *_to(dev, (x, w, b)), **_to(dev, kw))
    assert torch.equal(out.cpu(), ref)


@pytest.mark.triton
@pytest.mark.parametrize("case", [0, 1])
def test_triton_q_dwsep_conv(case):
    dev = _triton_device()
    x, dw, pw, kw = _dwsep_case(case, *DWSEP_CASES[case])
    ref = _run("reference", Q.q_dwsep_conv, x, dw, pw, **kw)
    out = _run("triton", Q.q_dwsep_conv, *_to(dev, (x, dw, pw)), **_to(dev, kw))
    assert torch.equal(out.cpu(), ref)


@pytest.mark.triton
@pytest.mark.parametrize("case", range(len(FUSE_CASES)))
def test_triton_q_weighted_fuse(case):
    from effops.ops import qconv_fuse as QF

    dev = _triton_device()
    xs, kw = _fuse_case(case)
    ref = _run("reference", QF.q_weighted_fuse, xs, **kw)
    out = _run("triton", QF.q_weighted_fuse, _to(dev, xs), **_to(dev, kw))
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("level", LEVELS)
def test_prepacked_pointwise_weights(level):
    """pack_pw's blob gives the same integers; a blob made at another ISA level or zero point is
    not used (the kernel packs per call), never misread."""
    x, w, b, kw = _pw_case(5, *PW_CASES[5])
    ref = _run("reference", Q.q_pw_conv, x, w, b, **kw)
    args = (x, w, b, kw["mult"], kw["lut"], kw["gate"], kw["residual"], kw["x_zp"], kw["out_zp"], 0, 255,
            kw["res_zp"], kw["res_mult"])
    with effops.use_isa(level):
        blob = Q.pack_pw(w, b, kw["x_zp"])
        assert torch.equal(torch.ops.effops.q_pw_conv(*args, blob), ref)
    other = Q.pack_pw(w, b, kw["x_zp"])  # the highest level
    wrong_zp = Q.pack_pw(w, b, (kw["x_zp"] + 1) % 256)
    with effops.use_isa(level):
        assert torch.equal(torch.ops.effops.q_pw_conv(*args, other), ref)
        assert torch.equal(torch.ops.effops.q_pw_conv(*args, wrong_zp), ref)
    xs, dw, pw, ks = _dwsep_case(2, *DWSEP_CASES[2])
    ref = _run("reference", Q.q_dwsep_conv, xs, dw, pw, **ks)
    with effops.use_isa(level):
        blob = Q.pack_pw(pw, ks["pw_bias"], ks["mid_zp"])
        g = conv_geometry("t", xs.shape[2:], dw.shape[2:], ks["stride"], ks["padding"], 1)
        out = torch.ops.effops.q_dwsep_conv(
            xs, dw, ks["dw_bias"], ks["dw_mult"], ks["dw_lut"], pw, ks["pw_bias"], ks["pw_mult"], None, None,
            list(g.stride), list(g.pad), ks["x_zp"], ks["dw_zp"], ks["mid_qmin"], ks["mid_qmax"], ks["mid_zp"],
            ks["out_zp"], 0, 255, 0, 1.0, blob)
    assert torch.equal(out, ref)


def _nan_case():
    # NaN / inf / huge multipliers and SE gates, with a residual term that could carry a
    # NaN's int64 minimum back into range (the reference once did): NaN clamps to -2**23
    g = _g(900)
    x = _codes(g, (2, 4, 5, 6), 0)
    m = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=torch.float32)
    kw = dict(mult=m, x_zp=3, out_zp=7, qmin=2, qmax=250, residual=_codes(g, (2, 4, 5, 6), 0), res_zp=200,
              res_mult=2.5e4, gate=torch.tensor([[float("nan"), 1.0, 0.5, float("inf")]] * 2))
    return x, torch.randint(-128, 128, (4, 4, 1, 1), generator=g, dtype=torch.int8), \
        torch.randint(-128, 128, (4, 1, 3, 3), generator=g, dtype=torch.int8), kw


@pytest.mark.parametrize("level", LEVELS)
def test_nan_multipliers_and_gates_cpu(level):
    x, pw, dw, kw = _nan_case()
    dkw = {k: kw[k] for k in ("mult", "x_zp", "out_zp", "qmin", "qmax")}
    with effops.use_isa(level):
        assert torch.equal(_run("cpu", Q.q_pw_conv, x, pw, **kw), _run("reference", Q.q_pw_conv, x, pw, **kw))
        got, want = _run("cpu", Q.q_dw_conv_act, x, dw, **dkw), _run("reference", Q.q_dw_conv_act, x, dw, **dkw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert int(want[0][:, 0].max()) == 2  # the NaN channel: -2**23, clamped to qmin


@pytest.mark.triton
def test_nan_multipliers_and_gates_triton():
    dev = _triton_device()
    x, pw, dw, kw = _nan_case()
    ref = _run("reference", Q.q_pw_conv, x, pw, **kw)
    assert torch.equal(_run("triton", Q.q_pw_conv, *_to(dev, (x, pw)), **_to(dev, kw)).cpu(), ref)
