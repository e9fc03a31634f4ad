"""effops._C.act_inplace (csrc/dwsep/act.cpp) and its use for a converted network's stem
(nn._parts.act_inplace): every activation at every ISA level this CPU runs against the float64
truth, on adversarial values and lengths (vector bodies, two-vector steps, scalar tails, chunk
borders), in place, in both layouts; bad input gives a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effops
from effops import _backend
from effops.nn._parts import act_inplace
from effops.ops.dwsep import ACT_CODES

pytestmark = pytest.mark.skipif(_backend._C is None, reason="effops._C not built")

LEVELS = [lvl for lvl in ("baseline", "avx2", "avx512")
          if _backend.ISA_LEVELS.index(lvl) <= _backend.ISA_LEVELS.index(effops.detected_isa())]

_TRUTH = {
    "relu": lambda x: x.clamp_min(0),
    "relu6": lambda x: x.clamp(0, 6),
    "silu": F.silu,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
}


def _values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 4
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 6.0, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30,
                            float("inf"), float("-inf")])
    k = min(n, special.numel())
    x[:k] = special[:k]
    return x


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("act", sorted(_TRUTH))
@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 31, 33, 100, (1 << 15) + 3, 3 * (1 << 15)])
def test_act_inplace_matches_float64(level, act, n):
    x = _values(n, seed=n)
    want = _TRUTH[act](x.double())
    y = x.clone()
    with effops.use_isa(level):
        _backend._C.act_inplace(y, ACT_CODES[act], 2)
    finite = torch.isfinite(want)
    err = ((y.double() - want)[finite].abs() / want[finite].abs().clamp_min(1e-30)).max().item()
    eager_err = ((_TRUTH[act](x).double() - want)[finite].abs() / want[finite].abs().clamp_min(1e-30)).max().item()
    # relative error within a few float32 ulp where the truth is normal; absolute below that
    tiny = want[finite].abs() < 1e-30
    assert err <= max(4 * eager_err, 6e-7) or bool(tiny.any()), (err, eager_err)
    assert ((y.double() - want)[finite].abs() <= 6e-7 * want[finite].abs() + 1e-30).all()
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    torch.testing.assert_close(y[~finite], want[~finite].float(), rtol=0, atol=0, equal_nan=True)


def test_act_inplace_nan_and_none():
    x = torch.tensor([float("nan"), 1.0, -2.0] * 11)
    y = x.clone()
    _backend._C.act_inplace(y, ACT_CODES["silu"], 1)
    assert torch.isnan(y[::3]).all()
    torch.testing.assert_close(y[1::3], F.silu(x[1::3]), rtol=1e-6, atol=0)
    z = x.clone()
    _backend._C.act_inplace(z, ACT_CODES["none"], 1)
    assert torch.equal(z[1::3], x[1::3])


def test_act_inplace_rejects_bad_input():
    with pytest.raises(ValueError, match="act_inplace: x must be float32"):
        _backend._C.act_inplace(torch.zeros(8, dtype=torch.float64), ACT_CODES["silu"], 1)
    with pytest.raises(ValueError, match="act_inplace: x must be a 1-d array"):
        _backend._C.act_inplace(torch.zeros(2, 4), ACT_CODES["silu"], 1)
    with pytest.raises(ValueError, match="act_inplace: unknown activation code 9"):
        _backend._C.act_inplace(torch.zeros(8), 9, 1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_stem_act_inplace_in_both_layouts(layout):
    """nn._parts.act_inplace: in place, torch's values within float32 rounding, any layout (a
    non-dense tensor takes torch's in-place SiLU)."""
    x = torch.randn(2, 5, 9, 7, generator=torch.Generator().manual_seed(3)) * 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2]
    want = F.silu(x.double())
    y = x.clone(memory_format=torch.preserve_format) if layout != "strided" else x.clone()[:, :, :]
    ptr = y.data_ptr()
    with torch.inference_mode():
        out = act_inplace(y, "silu")
    assert out is y and y.data_ptr() == ptr
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-7)
    for name in ("relu6", "hardswish", "none"):
        z = x.clone()
        torch.testing.assert_close(act_inplace(z, name), _TRUTH.get(name, lambda t: t)(x), rtol=0, atol=0)
