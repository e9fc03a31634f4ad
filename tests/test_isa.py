"""The CPU kernels at every ISA level this CPU runs (EFFOPS_ISA / effops.set_isa): each level's
copy computes the reference's function, forward and backward (issue 9: one machine tests every
path users run, not only the AVX-512 one the kernels were tuned on)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import effops
from effops.ops import dw_conv_act, dwsep_conv, pw_conv, weighted_fuse

LEVELS = [lvl for lvl in ("baseline", "avx2", "avx512")
          if effops._backend.ISA_LEVELS.index(lvl) <= effops._backend.ISA_LEVELS.index(effops.detected_isa())]


@pytest.fixture(params=LEVELS)
def level(request):
    with effops.use_isa(request.param) as used:
        assert used == request.param == effops.isa()
        yield used


def test_set_isa_semantics():
    top = effops.detected_isa()
    assert effops.isa() in effops._backend.ISA_LEVELS
    with effops.use_isa("baseline"):
        assert effops.isa() == "baseline"
        assert "in use: baseline" in effops.info(print_table=False)["build"]["cpu"]["simd"]
        with effops.use_isa(None):
            assert effops.isa() == top
    assert effops.set_isa("AVX512") == top  # capped at the CPU's level, case-insensitive
    with pytest.raises(ValueError, match="set_isa: level must be one of"):
        effops.set_isa("sse9")
    with pytest.raises(ValueError, match="set_isa: level must be one of"):
        effops.set_isa(2)


def test_effops_isa_environment_variable():
    code = "import effops; print(effops.isa(), effops.info(print_table=False)['build']['cpu']['isa'])"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, EFFOPS_ISA="baseline"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["baseline", "baseline"]
    bad = subprocess.run([sys.executable, "-c", "import effops"], env=dict(os.environ, EFFOPS_ISA="neon"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "EFFOPS_ISA='neon'" in bad.stderr


def _rand(*shape, dtype=torch.float32, cl=True):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    t = torch.randn(*shape, generator=g).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


# Shapes: odd channel counts (vector tails), 1x1 maps, stride 2 with odd sizes, TF 'same'.
CASES = [
    # N, C, H, W, Co, k, stride, padding, act
    (2, 24, 14, 14, 40, 3, 1, 1, "silu"),
    (1, 17, 7, 9, 5, 5, 2, "same", "relu6"),
    (3, 65, 1, 1, 33, 3, 1, 1, "hardswish"),
    (1, 144, 15, 15, 24, 3, 2, "same", "silu"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_dwsep_at_each_level(level, case):
    N, C, H, W, Co, k, s, p, act = case
    x, dw, pw = _rand(N, C, H, W), _rand(C, 1, k, k) * 0.3, _rand(Co, C, 1, 1) * 0.2
    s1, b1 = _rand(C).abs() + 0.5, _rand(C) * 0.1
    got = dwsep_conv(x, dw, pw, stride=s, padding=p, dw_scale=s1, dw_bias=b1, act=act)
    with effops.use_backend("reference"):
        want = dwsep_conv(x.double(), dw.double(), pw.double(), stride=s, padding=p, dw_scale=s1.double(),
                          dw_bias=b1.double(), act=act)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    y, pooled = dw_conv_act(x, dw, stride=s, padding=p, scale=s1, bias=b1, act=act)
    with effops.use_backend("reference"):
        y_ref, pooled_ref = dw_conv_act(x.double(), dw.double(), stride=s, padding=p, scale=s1.double(),
                                        bias=b1.double(), act=act)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled.double(), pooled_ref, rtol=1e-4, atol=1e-4)
    gate = torch.sigmoid(_rand(N, C))
    out = pw_conv(y, pw, channel_scale=gate, act="none")
    torch.testing.assert_close(out.double(), F.conv2d(y.double() * gate.double()[:, :, None, None], pw.double()),
                               rtol=1e-4, atol=1e-4)


def test_bf16_at_each_level(level):
    x, dw, pw = _rand(2, 40, 9, 9, dtype=torch.bfloat16), _rand(40, 1, 3, 3) * 0.3, _rand(24, 40, 1, 1) * 0.2
    got = dwsep_conv(x, dw.bfloat16(), pw.bfloat16(), padding=1, act="silu")
    with effops.use_backend("reference"):
        want = dwsep_conv(x.double(), dw.bfloat16().double(), pw.bfloat16().double(), padding=1, act="silu")
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_backward_at_each_level(level):
    x = _rand(2, 12, 7, 8).double().requires_grad_()
    dw = (_rand(12, 1, 3, 3) * 0.3).double().requires_grad_()
    pw = (_rand(10, 12, 1, 1) * 0.3).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: dwsep_conv(a, b, c, stride=2, padding="same", act="silu"),
                                    (x, dw, pw), eps=1e-6, atol=1e-5)


def test_weighted_fuse_at_each_level(level):
    a, b = _rand(2, 19, 8, 8), _rand(2, 19, 16, 16)
    w = torch.tensor([0.7, 1.3])
    got = weighted_fuse([a, b], w, resample=["identity", "maxpool"], act="silu")
    with effops.use_backend("reference"):
        want = weighted_fuse([a.double(), b.double()], w.double(), resample=["identity", "maxpool"], act="silu")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
