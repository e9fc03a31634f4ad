"""Hostile-input fuzzing of every public op (effops.ops) and module constructor (effops.nn).

Every generated call either raises effops's named error - a ValueError or TypeError whose
message starts with the op's name (``"nms: ..."``) - or returns what the pure-PyTorch reference
returns. Anything else fails: another exception type, an unnamed message, a different result,
a hang, or a crash. Inputs: wrong dtypes (ints, bool, complex, fp16 on the CPU), wrong ranks and
shapes, zero-sized dims, non-contiguous / expanded / sliced / channels_last layouts, NaN and
inf, meta tensors, and integers from -2**63 to past 2**64.

A segfault must fail a test, not kill the run: the hypothesis tests (``test_fuzz_<family>``)
run in a child process, this file again with EFFOPS_FUZZ_CHILD=1, driven by
``test_fuzz_suite_in_a_child_process``. Seeded (derandomize=True) and small (max_examples=60 per
family), so the default run takes ~20 s; EFFOPS_FUZZ_EXAMPLES=N for a longer local run, and
``--hypothesis-show-statistics`` in the child shows how often each op ran vs raised.

Found and fixed by it: a segfault in soft_nms / matrix_nms when no box is proper, a SIGFPE in the
depthwise / fused / BiFPN kernels for batch size 0, unnamed errors for meta tensors and for bad
module constructor arguments; in the int8 family (qconv): the integer reference let a NaN
multiplier become int64's minimum, which a residual term wrapped to the top code (the kernels
clamp NaN to -2**23), q_weighted_fuse read a table on another device and let inputs without
channels reach torch's pooling, and q_dwsep_conv's errors named dw_mult / dw_lut / pw_mult wrongly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

CHILD = os.environ.get("EFFOPS_FUZZ_CHILD") == "1"
FAMILIES = ("nms", "multiclass", "soft_matrix", "dwsep", "bifpn", "norm", "modules", "bifpn_module", "convert",
            "losses", "qconv")


def test_fuzz_suite_in_a_child_process():
    """All families in one child (one torch import: the default run stays well under a minute);
    a crash fails this test with the child's faulthandler trace instead of killing the run."""
    if CHILD:
        pytest.skip("the driver runs only in the parent")
    env = dict(os.environ, EFFOPS_FUZZ_CHILD="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "fuzz_ and not child"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__))
    out = (r.stdout + r.stderr)[-8000:]
    assert r.returncode >= 0, f"fuzz child crashed (signal {-r.returncode}):\n{out}"
    assert r.returncode == 0, out
    assert f"{len(FAMILIES)} passed" in r.stdout, out


if CHILD:
    from hypothesis import HealthCheck, event, given, settings
    from hypothesis import strategies as st

    import effops.ops as E
    from effops.ops import EffopsInputError, EffopsTypeError

    NMS = sys.modules["effops.ops.nms"]
    DW = sys.modules["effops.ops.dwsep"]
    BF = sys.modules["effops.ops.bifpn"]

    fuzz = settings(max_examples=int(os.environ.get("EFFOPS_FUZZ_EXAMPLES", "60")), deadline=None,
                    derandomize=True, database=None, suppress_health_check=list(HealthCheck))

    BIG_INTS = [-(2**63), -(2**31), -1, 2**31, 2**62, 2**63 - 1, 2**63, 2**64 + 1]
    GOOD_DTYPES = [torch.float32, torch.float32, torch.float64, torch.bfloat16]
    BAD_DTYPES = [torch.float16, torch.int64, torch.bool, torch.complex64, torch.uint8]
    DTYPES = GOOD_DTYPES * 3 + BAD_DTYPES

    def sometimes(draw, n=10):
        """True with probability 1/n: each argument is broken rarely, so that about half the
        examples are valid calls (compared with the reference) and half hit one check."""
        return draw(st.sampled_from([False] * (n - 1) + [True]))  # hypothesis leans to the first: False

    def dtype(draw, good=GOOD_DTYPES):
        return draw(st.sampled_from(BAD_DTYPES)) if sometimes(draw) else draw(st.sampled_from(good))

    def named_error(op: str, call):
        """Run call(); an exception must be effops's named error for op. Returns (ok, result)."""
        try:
            out = call()
            event(f"{op}: ran")  # --hypothesis-show-statistics: how often each op got valid input
            return True, out
        except (EffopsInputError, EffopsTypeError) as e:
            assert str(e).startswith(f"{op}:"), f"unnamed message: {e}"
            event(f"{op}: named error: {str(e)[len(op) + 2:][:40]}")
            return False, None
        except (ValueError, TypeError) as e:  # e.g. act_name of a module constructor
            assert str(e).split(":")[0].strip() != "", e
            raise AssertionError(f"{op}: {type(e).__name__} that is not effops's: {e}") from e

    # -------------------------------------------------------------------------- tensors
    @st.composite
    def layout(draw, t: torch.Tensor) -> torch.Tensor:
        """The same values in another memory layout (or an expanded / meta version)."""
        kind = "meta" if sometimes(draw, 40) else draw(st.sampled_from(["contig", "noncontig", "sliced", "expanded", "cl"]))
        if kind == "noncontig" and t.dim() >= 1:
            big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
            big[..., ::2] = t
            return big[..., ::2]
        if kind == "sliced" and t.dim() >= 1:
            pad = torch.zeros(t.shape[0] + 2, *t.shape[1:], dtype=t.dtype)
            pad[1:-1] = t
            return pad[1:-1]
        if kind == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
            return t[:1].expand(t.shape)  # stride-0 rows (the values change: the reference sees them too)
        if kind == "cl" and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if kind == "meta":
            return t.to("meta")
        return t

    def values(draw, shape, dtype, *, lo=-3.0, hi=3.0, specials=True):
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        t = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
        if specials and t.numel() and draw(st.integers(0, 4)) == 0:
            flat = t.view(-1)
            for _ in range(draw(st.integers(1, 3))):
                flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if dtype.is_complex:
            return t.to(dtype)
        if not dtype.is_floating_point:
            return torch.nan_to_num(t, nan=0.0, posinf=5.0, neginf=-5.0).to(dtype)
        return t.to(dtype)

    def maybe_wrong_shape(draw, shape):
        """The right shape mostly; else one dim off, a dim dropped or added, or a zero dim."""
        k = draw(st.sampled_from([0, 1, 2, 3])) if sometimes(draw, 8) else 9
        shape = list(shape)
        if k == 0 and shape:
            i = draw(st.integers(0, len(shape) - 1))
            shape[i] = max(0, shape[i] + draw(st.sampled_from([-1, 1])))
        elif k == 1 and shape:
            shape.pop()
        elif k == 2:
            shape.append(1)
        elif k == 3 and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = 0
        return tuple(shape)

    def is_meta(*ts):
        return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in ts)

    def real_value(draw, valid=(0.0, 1.0)):
        if not sometimes(draw, 6):
            return draw(st.floats(*valid))
        return draw(st.sampled_from([math.nan, math.inf, -math.inf, True, 10**400, "0.5", None, [0.5]]))

    # -------------------------------------------------------------------------- nms
    @st.composite
    def nms_args(draw):
        n = draw(st.sampled_from([0, 1, 2, 7, 33]))
        dt = dtype(draw, GOOD_DTYPES + [torch.float16])
        xy = values(draw, (n, 2), torch.float64, lo=0, hi=50)
        wh = values(draw, (n, 2), torch.float64, lo=-2, hi=30)
        boxes = torch.cat([xy, xy + wh], 1).to(dt) if dt.is_floating_point else values(draw, (n, 4), dt)
        if sometimes(draw):
            boxes = values(draw, maybe_wrong_shape(draw, (n, 4)), boxes.dtype, lo=0, hi=50)
        sdt = dtype(draw) if sometimes(draw) else dt
        scores = values(draw, maybe_wrong_shape(draw, (n,)), sdt, lo=0, hi=1)
        if sometimes(draw, 20):
            scores = scores.tolist()
        else:
            scores = draw(layout(scores))
        boxes = draw(layout(boxes))
        idxs = values(draw, maybe_wrong_shape(draw, (n,)), dtype(draw, [torch.int64, torch.int32]), lo=0, hi=3)
        return boxes, scores, draw(layout(idxs)), real_value(draw)

    @fuzz
    @given(nms_args())
    def test_fuzz_nms(args):
        boxes, scores, idxs, thr = args
        ok, keep = named_error("nms", lambda: E.nms(boxes, scores, thr))
        if ok and not is_meta(boxes, scores):
            assert torch.equal(keep, NMS.nms_reference(boxes, scores, float(thr)))
        ok, keep = named_error("batched_nms", lambda: E.batched_nms(boxes, scores, idxs, thr))
        if ok and not is_meta(boxes, scores, idxs):
            assert torch.equal(keep, NMS.batched_nms_reference(boxes, scores, idxs, float(thr)))

    @st.composite
    def mc_args(draw):
        B, N, C = (draw(st.sampled_from(v)) for v in ([0, 1, 2], [0, 1, 5, 17], [0, 1, 3]))
        dt = dtype(draw, GOOD_DTYPES + [torch.float16])
        per_class = draw(st.booleans())
        shape = (B, N, C, 4) if per_class else (B, N, 4)
        xy = values(draw, shape[:-1] + (2,), torch.float64, lo=0, hi=20, specials=False)
        boxes = torch.cat([xy, xy + values(draw, shape[:-1] + (2,), torch.float64, lo=0, hi=10)], -1)
        boxes = boxes.to(dt) if dt.is_floating_point else boxes.to(torch.int64)
        if sometimes(draw):
            boxes = values(draw, maybe_wrong_shape(draw, shape), boxes.dtype, lo=0, hi=20)
        scores = values(draw, maybe_wrong_shape(draw, (B, N, C)), dtype(draw) if sometimes(draw) else dt, lo=0, hi=1)
        M = draw(st.sampled_from(BIG_INTS + [2.0, None, True])) if sometimes(draw) else draw(st.integers(0, 6))
        k = draw(st.sampled_from(BIG_INTS + [1.5, True])) if sometimes(draw) else draw(st.one_of(st.none(), st.integers(0, 8)))
        agn = draw(st.sampled_from([1, None])) if sometimes(draw, 20) else draw(st.booleans())
        return draw(layout(boxes)), draw(layout(scores)), real_value(draw), real_value(draw), M, agn, k

    @fuzz
    @given(mc_args())
    def test_fuzz_multiclass(args):
        boxes, scores, thr, sthr, M, agn, k = args
        ok, out = named_error("multiclass_nms", lambda: E.multiclass_nms(boxes, scores, thr, sthr, M, agn, k))
        if ok and not is_meta(boxes, scores):
            want = NMS.multiclass_nms_reference(boxes, scores, float(thr), float(sthr), M, agn, k)
            for a, b in zip(out, want):  # exactly equal, NaN boxes (kept from the input) included
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    @fuzz
    @st.composite
    def soft_args(draw):
        method = draw(st.sampled_from(["hard", None, ["linear"]])) if sometimes(draw) else draw(
            st.sampled_from(["linear", "gaussian"]))
        sigma = draw(st.sampled_from([0.0, -1.0, math.inf, math.nan, -math.inf, "2", True])) if sometimes(draw) \
            else draw(st.floats(0.1, 3))
        sthr = draw(st.sampled_from([math.nan, math.inf, -1.0, None])) if sometimes(draw) else draw(st.floats(0, 0.5))
        return method, sigma, sthr

    @fuzz
    @given(nms_args(), soft_args())
    def test_fuzz_soft_matrix(args, soft):
        boxes, scores, idxs, thr = args
        method, sigma, sthr = soft
        ok, out = named_error("soft_nms", lambda: E.soft_nms(boxes, scores, thr, sigma, method, sthr))
        if ok and not is_meta(boxes, scores):
            keep, sc = NMS.soft_nms_reference(boxes, scores, float(thr), float(sigma), method, float(sthr))
            assert torch.equal(out[0], keep)
            torch.testing.assert_close(out[1], sc, rtol=0, atol=0, equal_nan=True)
        kernel = {"linear": "linear", "hard": "box"}.get(method, "gaussian") if isinstance(method, str) else method
        ok, out = named_error("matrix_nms", lambda: E.matrix_nms(boxes, scores, idxs, kernel, sigma, sthr))
        if ok and not is_meta(boxes, scores, idxs):
            ix = idxs if isinstance(idxs, torch.Tensor) else None
            dec = NMS.matrix_nms_decay_reference(boxes, scores, ix, kernel, float(sigma))
            want = torch.nonzero(dec.double() >= float(sthr)).flatten()
            want = want[torch.sort(dec[want], descending=True, stable=True).indices]
            got_keep, got_sc = out
            torch.testing.assert_close(got_sc.double(), dec[want].double(), rtol=1e-5, atol=1e-6)
            assert got_keep.shape == want.shape

    # -------------------------------------------------------------------------- dwsep
    @st.composite
    def geom_int(draw, lo=1):
        if sometimes(draw, 6):
            return draw(st.sampled_from(BIG_INTS + [0, True, 1.0, None, (1, 2), (1,), "2"]))
        return draw(st.one_of(st.integers(lo, 3), st.tuples(st.integers(lo, 3), st.integers(lo, 3))))

    @st.composite
    def conv_args(draw):
        N, C, H, W = (draw(st.sampled_from(v)) for v in ([2, 1], [8, 3, 17, 1], [7, 4, 1], [6, 3, 1]))
        N, C, H = (0 if sometimes(draw, 12) else v for v in (N, C, H))
        dt = dtype(draw)
        x = draw(layout(values(draw, maybe_wrong_shape(draw, (N, C, H, W)), dt)))
        k = draw(st.sampled_from([(0, 3), (2, 2)])) if sometimes(draw) else draw(st.sampled_from([(3, 3), (5, 3), (1, 1)]))
        wdt = draw(st.sampled_from([torch.float32, dt, dtype(draw)])) if sometimes(draw, 3) else dt
        dw_w = draw(layout(values(draw, maybe_wrong_shape(draw, (C, 1) + k), wdt, specials=False)))
        Co = 0 if sometimes(draw) else draw(st.sampled_from([1, 5, 16]))
        pw_w = draw(layout(values(draw, (Co, C + 1) if sometimes(draw) else draw(st.sampled_from([(Co, C, 1, 1), (Co, C)])),
                                  wdt, specials=False)))
        vec = lambda n: None if draw(st.booleans()) else draw(layout(values(draw, maybe_wrong_shape(draw, (n,)), wdt,  # noqa: E731
                                                                            specials=False)))
        geo = dict(stride=draw(geom_int()) if draw(st.booleans()) else 1,
                   padding=draw(geom_int(0)) if draw(st.booleans()) else draw(st.sampled_from(["same", "valid", "full"][:2 + sometimes(draw)])),
                   dilation=draw(geom_int()) if draw(st.integers(0, 3)) == 0 else 1)
        act = draw(st.sampled_from(["gelu", ["silu"], 3])) if sometimes(draw) else draw(
            st.sampled_from(["silu", "relu", None, "relu6", "hardswish", "sigmoid", "swish"]))
        return x, dw_w, pw_w, vec(C), vec(C), vec(Co), vec(Co), geo, act

    def _empty(*ts):
        """torch's conv2d, pools and interpolate refuse some empty inputs our ops accept: there the
        reference cannot run, and only the result's shape and dtype are checked."""
        return any(isinstance(t, torch.Tensor) and t.numel() == 0 for t in ts)

    def _close(got, want, dtype):
        tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}.get(dtype, 1e-3)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * 10, equal_nan=True)

    @fuzz
    @given(conv_args(), st.booleans())
    def test_fuzz_dwsep(args, preact):
        x, dw_w, pw_w, dws, dwb, pws, pwb, geo, act = args
        a = lambda: DW.act_name("t", "a", act)  # noqa: E731
        geom = lambda: DW.conv_geometry("t", x.shape[2:], dw_w.shape[2:], geo["stride"], geo["padding"],  # noqa: E731
                                        geo["dilation"])
        pw4 = pw_w if pw_w.dim() == 4 else (pw_w[:, :, None, None] if pw_w.dim() == 2 else pw_w)
        ok, y = named_error("dw_conv_act", lambda: E.dw_conv_act(x, dw_w, scale=dws, bias=dwb, act=act, **geo))
        if ok and not is_meta(x, dw_w):
            g = geom()
            if _empty(x):
                assert y[0].shape == (*x.shape[:2], *g.out_hw) and y[1].shape == x.shape[:2]
            else:
                ry, rm = DW.dw_conv_act_reference(x.double(), dw_w.double(), g, _d(dws), _d(dwb), a())
                _close(y[0], ry.to(x.dtype), x.dtype)
                _close(y[1], rm.to(x.dtype), x.dtype)
        ok, y = named_error("pw_conv", lambda: E.pw_conv(x, pw_w, scale=pws, bias=pwb, act=act))
        if ok and not is_meta(x, pw_w):
            if _empty(x):
                assert y.shape == (x.shape[0], pw4.shape[0], *x.shape[2:])
            else:
                want = DW.pw_conv_reference(x.double(), pw4.double(), None, _d(pws), _d(pwb), a())
                _close(y, want.to(x.dtype), x.dtype)
        ok, y = named_error("dwsep_conv", lambda: E.dwsep_conv(x, dw_w, pw_w, dw_scale=dws, dw_bias=dwb, pw_scale=pws,
                                                               pw_bias=pwb, act=act, preact=preact, **geo))
        if ok and not is_meta(x, dw_w, pw_w):
            g = geom()
            if _empty(x):
                assert y.shape == (x.shape[0], pw4.shape[0], *g.out_hw)
            else:
                want = DW.dwsep_conv_reference(x.double(), dw_w.double(), pw4.double(), g, _d(dws), _d(dwb), a(),
                                               _d(pws), _d(pwb), "none", None, preact)
                _close(y, want.to(x.dtype), x.dtype)

    def _d(t):
        return None if t is None else t.double()

    # -------------------------------------------------------------------------- bifpn
    @st.composite
    def fuse_args(draw):
        k = draw(st.sampled_from([1, 5])) if sometimes(draw) else draw(st.sampled_from([2, 3, 4]))
        N, C = (0 if sometimes(draw, 12) else draw(st.sampled_from(v)) for v in ([1, 2], [1, 4, 9]))
        H = draw(st.sampled_from([1, 4, 8]))
        dt = dtype(draw)
        modes, xs = [], []
        for i in range(k):
            m = draw(st.sampled_from(["bilinear", ["identity"]])) if sometimes(draw, 20) else (
                "identity" if i == 0 else draw(st.sampled_from(["identity", "nearest", "maxpool", "maxpool_sym"])))
            h = {"identity": H, "nearest": max(1, H // 2), "maxpool": H * 2, "maxpool_sym": H * 2}.get(m if isinstance(m, str) else "", H)
            h = h + 1 if sometimes(draw, 20) else h
            xs.append(draw(layout(values(draw, (N, C, h, h), torch.float64 if sometimes(draw, 20) else dt))))
            modes.append(m)
        w = None if sometimes(draw, 20) else draw(layout(values(draw, maybe_wrong_shape(draw, (k,)), torch.float32)))
        method = draw(st.sampled_from(["max", ["sum"]])) if sometimes(draw, 20) else draw(
            st.sampled_from(["fastattn", "attn", "sum"]))
        eps = draw(st.sampled_from([math.nan, -1.0, "1e-4", True, None])) if sometimes(draw, 20) else draw(
            st.floats(0, 1e-2))
        act = draw(st.sampled_from(["gelu", ["silu"]])) if sometimes(draw, 20) else draw(
            st.sampled_from(["silu", None, "relu", "swish"]))
        out_size = draw(st.sampled_from([(H, H + 1), (True, True), (2**31, 1), (H,), "8"])) if sometimes(draw, 20) \
            else draw(st.sampled_from([None, (H, H)]))
        return xs, w, modes, method, eps, act, out_size

    @fuzz
    @given(fuse_args(), st.booleans())
    def test_fuzz_bifpn(args, twice):
        xs, w, modes, method, eps, act, out_size = args
        call = lambda: E.weighted_fuse(xs, w, resample=modes, method=method, eps=eps, act=act, out_size=out_size)  # noqa: E731
        ok, y = named_error("weighted_fuse", call)
        if twice:  # the second call may take the validated-plan path: it must agree exactly
            ok2, y2 = named_error("weighted_fuse", call)
            assert ok2 == ok
            if ok:
                torch.testing.assert_close(y, y2, rtol=0, atol=0, equal_nan=True)
        if ok and not is_meta(*xs, w):
            out_hw = tuple(out_size) if out_size is not None else tuple(
                x.shape[2:] for x, m in zip(xs, modes) if m == "identity")[0]
            if _empty(*xs):
                assert y.shape == (*xs[0].shape[:2], *out_hw)
                return
            wn = BF.normalize_weights(w, method, len(xs), float(eps), xs[0].device)
            want = BF.weighted_fuse_reference([x.double() for x in xs], wn.double(), modes,
                                              DW.act_name("t", "a", act), out_hw)
            _close(y, want.to(xs[0].dtype), xs[0].dtype)

    # -------------------------------------------------------------------------- training BN + act
    @st.composite
    def bn_args(draw):
        N, C, H, W = (draw(st.sampled_from(v)) for v in ([0, 1, 2, 3], [0, 1, 5, 17], [0, 1, 3], [1, 2, 5]))
        x = draw(layout(values(draw, maybe_wrong_shape(draw, (N, C, H, W)), dtype(draw))))
        wdt = dtype(draw, [torch.float32, torch.float64])

        def vec():
            if sometimes(draw, 8):
                return draw(st.sampled_from([None, [1.0] * C, 2.0]))
            return draw(layout(values(draw, maybe_wrong_shape(draw, (C,)), wdt, lo=0.5, hi=1.5, specials=False)))

        w, b = vec(), vec()
        running = (vec(), vec()) if draw(st.booleans()) else (None, None)
        if running[1] is not None and isinstance(running[1], torch.Tensor) and running[1].dtype.is_floating_point:
            running = (running[0], running[1].abs() + 0.5)
        act = draw(st.sampled_from(["gelu", ["silu"], 3])) if sometimes(draw, 20) else draw(
            st.sampled_from(["silu", None, "relu", "relu6", "hardswish", "sigmoid", "swish"]))
        eps = real_value(draw, (0.0, 1e-2))
        momentum = real_value(draw, (0.0, 1.0))
        training = draw(st.sampled_from([1, "yes", None])) if sometimes(draw, 20) else draw(st.booleans())
        pool = draw(st.sampled_from([1, None])) if sometimes(draw, 20) else draw(st.booleans())
        return x, w, b, running, act, eps, momentum, training, pool

    @fuzz
    @given(bn_args())
    def test_fuzz_norm(args):
        x, w, b, (rm, rv), act, eps, momentum, training, pool = args
        rm0, rv0 = (t.clone() if isinstance(t, torch.Tensor) else t for t in (rm, rv))
        ok, out = named_error("batch_norm_act", lambda: E.batch_norm_act(
            x, w, b, rm, rv, training=training, momentum=momentum, eps=eps, act=act, pool=pool))
        if not ok or is_meta(x, w, b, rm, rv):
            return
        y, m = out if pool else (out, None)
        if _empty(x):
            assert y.shape == x.shape and y.dtype == x.dtype
            return
        a = DW.act_name("t", "a", act)
        d = lambda t: None if t is None else t.double()  # noqa: E731
        want = DW.apply_act(torch.nn.functional.batch_norm(
            x.double(), d(rm0), d(rv0), d(w), d(b), training, momentum, eps), a)
        _close(y, want.to(x.dtype), x.dtype)
        if pool:
            _close(m, want.mean((2, 3), keepdim=True).to(x.dtype), x.dtype)

    # -------------------------------------------------------------------------- module constructors
    CTOR_INT = st.one_of(st.integers(0, 9), st.sampled_from(BIG_INTS + [True, 2.5, None, "3", (3, 3)]))

    @fuzz
    @given(st.data())
    def test_fuzz_modules(data):
        from effops import nn as enn

        draw = data.draw
        which = draw(st.sampled_from(["DWSeparableConv2d", "MBConv", "SqueezeExcite"]))
        if which == "DWSeparableConv2d":
            kw = dict(in_channels=draw(CTOR_INT), out_channels=draw(CTOR_INT), kernel_size=draw(CTOR_INT),
                      stride=draw(CTOR_INT), padding=draw(st.one_of(CTOR_INT, st.sampled_from(["same", "x"]))),
                      act=draw(st.sampled_from(["silu", None, "gelu", ["relu"]])))
        elif which == "MBConv":
            kw = dict(in_channels=draw(CTOR_INT), out_channels=draw(CTOR_INT), kernel_size=draw(CTOR_INT),
                      stride=draw(CTOR_INT), expand_ratio=draw(st.sampled_from([1.0, 4.0, 0.0, -1.0, math.nan, "6"])),
                      se_ratio=draw(st.sampled_from([0.0, 0.25, -0.5, math.inf])),
                      act=draw(st.sampled_from(["silu", "relu", "gelu", None])))
        else:
            kw = dict(channels=draw(CTOR_INT), reduced=draw(CTOR_INT), act=draw(st.sampled_from(["silu", "relu", "x"])))
        try:
            m = getattr(enn, which)(**kw)
        except (ValueError, TypeError) as e:  # effops's named check, before torch.nn sees the value
            assert str(e).startswith(f"{which}:"), f"{which}({kw}): unnamed {type(e).__name__}: {e}"
            return
        except RuntimeError as e:  # torch.empty with a negative size etc.: a crash-free error, but unnamed
            raise AssertionError(f"{which}({kw}): unnamed RuntimeError: {e}") from e
        # a module that was built runs on an input it accepts, or names the problem
        c = kw.get("in_channels", kw.get("channels"))
        x = torch.randn(1, c, 6, 6) if isinstance(c, int) and 0 < c <= 16 else None
        if x is not None:
            try:
                with torch.no_grad():
                    m.eval()(x)
            except (ValueError, TypeError) as e:
                assert ":" in str(e), e

    # -------------------------------------------------------------------------- BiFPN module, convert()
    @fuzz
    @given(st.data())
    def test_fuzz_bifpn_module(data):
        """BiFPN's constructor with hostile arguments, then a forward on feature lists that may be
        short, long, of the wrong channels or sizes: a named error or the right output shapes."""
        from effops import nn as enn

        draw = data.draw
        small = st.integers(1, 6)

        def arg(good, bad):  # a bad value about one argument in ten
            return draw(st.sampled_from(bad)) if sometimes(draw) else draw(good)

        kw = dict(in_channels=arg(st.lists(small, min_size=1, max_size=3), [[], 3, "abc", [0, 2], [2, -1], [2.5], [True, 2]]),
                  fpn_channels=arg(small, BIG_INTS + [0, 2.5, None]),
                  num_layers=arg(st.integers(1, 2), [0, -1, 10**6, "2"]),
                  image_size=arg(st.tuples(st.integers(1, 20), st.integers(1, 20)),
                                 [16, (0, 8), (8,), (2**62, 2**62), ("a", 8), None]),
                  min_level=arg(st.just(3), [2, 7, -1, 17]),
                  max_level=arg(st.just(7), [5, 3, 40]),
                  weight_method=arg(st.sampled_from(["fastattn", "attn", "sum"]), ["x", None]),
                  act=arg(st.sampled_from(["silu", "relu", None]), ["gelu", 3]),
                  pad_type=arg(st.sampled_from(["same", ""]), ["x"]),
                  eps=arg(st.just(1e-3), [0.0, -1.0, math.nan]))
        if kw["image_size"] is None:
            kw.pop("image_size")  # the default
        ok, m = named_error("BiFPN", lambda: enn.BiFPN(**kw))
        if not ok:
            return
        m.eval()
        sizes = m.sizes
        chans = list(m.in_channels)
        if sometimes(draw, 4):  # a wrong feature list
            which = draw(st.sampled_from(["short", "long", "channels"]))
            if which == "short" and len(chans) > 1:
                chans = chans[:-1]
            elif which == "long":
                chans = chans + [2]
            else:
                chans = [c + 1 for c in chans]
        feats = [torch.randn(1, c, *sizes[min(i, len(sizes) - 1)]) for i, c in enumerate(chans)]
        ok, out = named_error("BiFPN", lambda: m(feats))
        if ok:
            assert [tuple(o.shape) for o in out] == [(1, kw["fpn_channels"], *hw) for hw in sizes]
            assert all(torch.isfinite(o).all() for o in out)

    @fuzz
    @given(st.data())
    def test_fuzz_convert(data):
        """convert() on non-modules and on small models with odd convs: a named TypeError, or a
        model whose output equals the original's (what it cannot reproduce it keeps)."""
        from torch import nn as tnn

        from effops.nn import convert

        draw = data.draw
        what = draw(st.sampled_from(["none", "tensor", "dict", "model", "model", "model"]))
        if what != "model":
            bad = {"none": None, "tensor": torch.zeros(2), "dict": {"a": tnn.Linear(2, 2)}}[what]
            try:
                convert(bad)
            except TypeError as e:
                assert str(e).startswith("convert:"), e
                return
            raise AssertionError(f"convert({what}) accepted a non-module")
        c = draw(st.integers(1, 6))
        k = draw(st.sampled_from([1, 2, 3, 5]))
        stride = draw(st.sampled_from([1, 2]))
        dil = draw(st.sampled_from([1, 1, 2]))
        groups = draw(st.sampled_from([1, c]))
        co = draw(st.integers(1, 6))
        layers = [tnn.Conv2d(c, c, k, stride, k // 2, dilation=dil, groups=groups, bias=draw(st.booleans())),
                  tnn.BatchNorm2d(c), draw(st.sampled_from([tnn.ReLU(), tnn.SiLU(), tnn.GELU(), tnn.Identity()])),
                  tnn.Conv2d(c, co, 1, bias=draw(st.booleans())), tnn.BatchNorm2d(co)]
        model = tnn.Sequential(*layers).eval()
        for mod in model.modules():
            if isinstance(mod, tnn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
        x = torch.randn(2, c, draw(st.integers(1, 9)), draw(st.integers(1, 9)))
        try:
            with torch.no_grad():
                want = model(x)
        except RuntimeError:
            return  # torch itself rejects the geometry (kernel larger than the input)
        conv = convert(model, copy_model=True)
        with torch.no_grad():
            got = conv(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # -------------------------------------------------------------------------- losses
    def _ref_backend(call):
        import effops

        with effops.use_backend("reference"):
            return call()

    @fuzz
    @given(st.data())
    def test_fuzz_losses(data):
        """sigmoid_focal_loss / box_loss / match_anchors with hostile shapes, dtypes, targets and
        arguments: a named error, or the CPU kernel's result equals the reference backend's."""
        draw = data.draw
        E = sys.modules["effops.ops"]

        def arg(good, bad):  # a bad value about one argument in ten
            return draw(st.sampled_from(bad)) if sometimes(draw) else draw(st.sampled_from(good))
        which = draw(st.sampled_from(["focal", "box", "match"]))
        if which == "focal":
            shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
            dt = dtype(draw)
            logits = torch.randn(shape, dtype=torch.float64).mul_(draw(st.sampled_from([1.0, 30.0, 100.0])))
            if sometimes(draw, 4) and logits.numel():
                logits.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            logits = draw(layout(logits.to(dt) if dt not in (torch.complex64,) else logits.to(dt)))
            C = shape[-1]
            kind = arg(["dense", "index"], ["bad"])
            if kind == "dense":
                targets = torch.randint(0, 2, shape).to(draw(st.sampled_from([torch.float32, torch.float64])))
            elif kind == "index":
                targets = torch.randint(-2, max(C, 1), shape[:-1])
            else:
                targets = draw(st.sampled_from([torch.zeros(2, 2, 2, 2), torch.zeros(shape, dtype=torch.bool),
                                                torch.full(shape[:-1], C + 3)]))
            kw = dict(alpha=arg([0.25, -1.0], [math.nan, True]), gamma=arg([2.0, 0.0, 1.5], [-1.0, math.inf]),
                      reduction=arg(["none", "sum", "mean"], ["x"]), label_smoothing=arg([0.0, 0.1], [1.5]))
            call = lambda: E.sigmoid_focal_loss(logits, targets, **kw)  # noqa: E731
            op = "sigmoid_focal_loss"
        elif which == "box":
            n = draw(st.integers(0, 6))
            dt = dtype(draw)
            pred = draw(layout(torch.randn(2, n, 4, dtype=torch.float64).to(dt)))
            target = torch.randn(arg([(2, n, 4)], [(2, n + 1, 4)]), dtype=torch.float64).to(
                pred.dtype if pred.dtype.is_floating_point else torch.float32)
            mask = arg([None, "ok"], ["bad"])
            mask = None if mask is None else (torch.rand(2, n) > 0.5 if mask == "ok" else torch.ones(3))
            kw = dict(kind=arg(["huber", "l1", "giou"], ["x"]), delta=arg([0.1, 0.5], [0.0, -1.0, math.nan]))
            call = lambda: E.box_loss(pred, target, mask, **kw)  # noqa: E731
            op = "box_loss"
        else:
            A, B, G = draw(st.integers(0, 12)), draw(st.integers(0, 3)), draw(st.integers(0, 4))
            yx = torch.rand(A, 2) * 50
            anchors = torch.cat([yx, yx + torch.rand(A, 2) * 20 + draw(st.sampled_from([0.0, 0.0, -30.0]))], 1)
            gyx = torch.rand(B, G, 2) * 50
            gt = torch.cat([gyx, gyx + torch.rand(B, G, 2) * 20], 2)
            cls = torch.randint(-1, 5, (B, G))
            if sometimes(draw):
                gt = draw(st.sampled_from([gt[..., :3], gt.to(torch.int64), gt.double()]))
            if sometimes(draw):
                cls = draw(st.sampled_from([cls[:, :-1] if G else cls[:, :0], cls.float(), cls.bool()]))
            anchors = draw(layout(anchors))
            kw = dict(match_threshold=arg([0.5, 0.3, 1.0], [math.nan, 2.0]), unmatched_threshold=arg([None], [0.4, 0.6]))
            call = lambda: E.match_anchors(anchors, gt, cls, **kw)  # noqa: E731
            op = "match_anchors"
        ok, got = named_error(op, call)
        if not ok:
            return
        want = _ref_backend(call)
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        for g, w in zip(got, want):
            if g.dtype.is_floating_point:
                _close(g, w, g.dtype)
            else:
                assert torch.equal(g, w), (op, g, w)

    # -------------------------------------------------------------------------- qconv (int8)
    Q_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.bool]
    Q_BAD_INTS = [-1, 256, 2**31, -(2**63), 2**64 + 1, True, 1.5, None, "3"]
    Q_LEVELS = [lvl for lvl in ("baseline", "avx2", "avx512")
                if lvl in sys.modules["effops._backend"].ISA_LEVELS[:sys.modules["effops._backend"].ISA_LEVELS.index(
                    sys.modules["effops._backend"].detected_isa()) + 1]]

    Q_STATE = {"hostile": True}

    def qs(draw, n):
        """sometimes(), in a hostile example only: half the examples are valid calls throughout (a
        call has ~20 arguments; each broken now and then would leave few valid ones)."""
        return Q_STATE["hostile"] and sometimes(draw, max(2, n // 2))

    def q_int(draw, lo=0, hi=255):
        """A code / zero point: the edges mostly (0, 128, 255), now and then one out of range."""
        if qs(draw, 20):
            return draw(st.sampled_from(Q_BAD_INTS))
        return draw(st.one_of(st.sampled_from([lo, hi, 128 if lo <= 128 <= hi else lo]), st.integers(lo, hi)))

    def q_tensor(draw, shape, good, make):
        """make(generator, shape) -> int64/float64 values; the dtype is `good` but for one call
        in twenty, the shape right but for one in sixteen, any layout (meta now and then)."""
        dt = draw(st.sampled_from([d for d in Q_DTYPES if d != good])) if qs(draw, 20) else good
        if qs(draw, 2):
            shape = maybe_wrong_shape(draw, shape)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        t = draw(layout(make(g, tuple(shape)).to(dt)))
        return t if Q_STATE["hostile"] or t.device.type != "meta" else make(g, tuple(shape)).to(dt)

    def q_codes(draw, shape):
        kind = draw(st.sampled_from(["uniform", "uniform", "extreme", "const"]))
        c = draw(st.integers(0, 255))
        return q_tensor(draw, shape, torch.uint8, lambda g, s: {
            "uniform": lambda: torch.randint(0, 256, s, generator=g),
            "extreme": lambda: torch.randint(0, 2, s, generator=g) * 255,  # saturating sums
            "const": lambda: torch.full(s, c)}[kind]())

    def q_weight(draw, shape):
        lo = draw(st.sampled_from([-128, -128, 127]))  # 127: all weights +127 (the largest sums)
        return q_tensor(draw, shape, torch.int8, lambda g, s: torch.randint(-128, 128, s, generator=g) if lo < 0
                        else torch.full(s, 127))

    def q_bias(draw, n):
        kind = draw(st.sampled_from(["none", "none", "small", "wrap"]))
        if kind == "none":
            return None
        lo, hi = (-2**16, 2**16) if kind == "small" else (2**31 - 2**20, 2**31 - 1)  # near the limit: wraps
        return q_tensor(draw, (n,), torch.int32, lambda g, s: torch.randint(lo, hi, s, generator=g))

    def q_float(draw, shape, lo=-4.5, hi=-1.5):
        """float32 multipliers / gates: log-uniform, ties (0.5), saturating, or special values."""
        kind = draw(st.sampled_from(["log", "log", "tie", "saturate", "special"]))
        sp = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.02, 1e38, 1e-45]))

        def make(g, s):
            if kind == "log":
                return 10 ** (torch.rand(s, generator=g, dtype=torch.float64) * (hi - lo) + lo)
            if kind == "tie":
                return torch.full(s, 0.5, dtype=torch.float64)
            if kind == "saturate":
                return torch.full(s, 3.0, dtype=torch.float64)
            t = 10 ** (torch.rand(s, generator=g, dtype=torch.float64) * (hi - lo) + lo)
            if t.numel():
                t.view(-1)[0] = sp
            return t
        return q_tensor(draw, shape, torch.float32, make)

    def q_lut(draw):
        if draw(st.booleans()):
            return None
        return q_tensor(draw, (256,), torch.uint8, lambda g, s: torch.randint(0, 256, s, generator=g))

    def q_geometry(draw):
        stride = draw(st.sampled_from([0, -1, 2**40, True, "2", (1,), 1.0])) if qs(draw, 15) else draw(
            st.sampled_from([1, 1, 2, (1, 2), (2, 1)]))
        padding = draw(st.sampled_from(["full", -1, (1, 2, 3), 2**40])) if qs(draw, 15) else draw(
            st.sampled_from(["same", "same", "valid", 0, 1, 2, (1, 0)]))
        return stride, padding

    def q_epilogue(draw):
        zp = q_int(draw)
        if draw(st.booleans()):  # a ReLU-like clamp (qmin > qmax in hostile examples)
            lo, hi = q_int(draw), q_int(draw)
            if not Q_STATE["hostile"]:
                lo, hi = min(lo, hi), max(lo, hi)
            return zp, lo, hi
        return zp, 0, 255

    def q_out_hw(H, W, k, stride, padding):
        try:
            return DW.conv_geometry("t", (H, W), (k, k), stride, padding, 1).out_hw
        except (ValueError, TypeError):
            return (H, W)

    @settings(fuzz, max_examples=4 * fuzz.max_examples)  # four ops, ~10 ms an example
    @given(st.data())
    def test_fuzz_qconv(data):
        """The int8 ops (q_dw_conv_act, q_pw_conv, q_dwsep_conv, q_weighted_fuse) with hostile
        codes, weights, biases near the int32 limit, zero points and clamps at the edges or out of
        range, NaN / inf / huge / denormal multipliers and gates, odd channel counts, empty
        batches, every layout and each CPU ISA level: a named error, or the CPU kernel's integers
        equal the integer reference's bit for bit."""
        import effops

        draw = data.draw
        Q_STATE["hostile"] = draw(st.booleans())
        which = draw(st.sampled_from(["pw", "dwsep", "dw", "fuse"]))
        N = 0 if sometimes(draw, 12) else draw(st.sampled_from([1, 2]))  # an empty batch is valid
        C = 0 if qs(draw, 20) else draw(st.sampled_from([1, 3, 8, 17, 33, 64]))
        H, W = (draw(st.sampled_from([1, 2, 5, 8])) for _ in range(2))
        level = draw(st.sampled_from(Q_LEVELS))
        if which == "fuse":
            k = draw(st.sampled_from([1, 5])) if qs(draw, 20) else draw(st.integers(2, 4))
            modes = ["identity"] + [draw(st.sampled_from(["identity", "nearest", "maxpool", "maxpool_sym"]))
                                    for _ in range(k - 1)]
            if qs(draw, 20):
                modes[-1] = draw(st.sampled_from(["bilinear", None]))
            hw = {"identity": (H, W), "nearest": (max(1, H // 2), max(1, W // 2)), "maxpool": (2 * H, 2 * W),
                  "maxpool_sym": (2 * H, 2 * W)}
            xs = [q_codes(draw, (N, C, *hw.get(m, (H, W)))) for m in modes]
            zps = [q_int(draw) for _ in range(k)]
            mults = [draw(st.sampled_from([2**31, -(2**31), 1.5])) if qs(draw, 20) else
                     draw(st.integers(-(2**31) + 1, 2**31 - 1) | st.integers(-70000, 70000)) for _ in range(k)]
            out_zp, qmin, qmax = q_epilogue(draw)
            out_size = draw(st.sampled_from([None, (H, W), (H + 1, W), (0, W), (True, 1)])) if qs(draw, 10) \
                else None
            kw = dict(zps=zps, mults=mults, resample=modes, out_zp=out_zp, qmin=qmin, qmax=qmax, lut=q_lut(draw),
                      out_size=out_size)
            op, call = "q_weighted_fuse", lambda: E.q_weighted_fuse(xs, **kw)  # noqa: E731
            tensors = xs + [kw["lut"]]
        else:
            x = q_codes(draw, (N, C, H, W))
            Co = 0 if qs(draw, 20) else draw(st.sampled_from([1, 5, 16, 33]))
            kk = draw(st.sampled_from([0, 2, 200])) if qs(draw, 20) else draw(st.sampled_from([1, 3, 5]))
            stride, padding = q_geometry(draw)
            Ho, Wo = q_out_hw(H, W, kk, stride, padding)
            x_zp = q_int(draw)
            out_zp, qmin, qmax = q_epilogue(draw)
            res = None
            if which != "dw" and draw(st.booleans()):
                res = q_codes(draw, (N, Co, *((Ho, Wo) if which == "dwsep" else (H, W))))
            lut = q_lut(draw)
            if res is not None and not qs(draw, 10):
                lut = None  # a residual with a lut is refused: mostly test the valid combination
            rkw = {} if res is None else dict(residual=res, res_zp=q_int(draw),
                                              res_mult=draw(st.sampled_from([math.nan, math.inf, "1", True]))
                                              if qs(draw, 15) else draw(st.floats(1e-3, 4.0)))
            if which == "dw":
                w = q_weight(draw, (C, 1, kk, kk))
                kw = dict(mult=q_float(draw, (C,)), x_zp=x_zp, out_zp=out_zp, qmin=qmin, qmax=qmax, lut=lut,
                          stride=stride, padding=padding)
                b = q_bias(draw, C)
                op, call = "q_dw_conv_act", lambda: E.q_dw_conv_act(x, w, b, **kw)  # noqa: E731
                tensors = [x, w, b]
            elif which == "pw":
                w = q_weight(draw, (Co, C, 1, 1) if not qs(draw, 20) else (Co, C))
                gate = q_float(draw, (N, C), -2.0, 0.0) if draw(st.booleans()) else None
                kw = dict(mult=q_float(draw, (Co,)), x_zp=x_zp, out_zp=out_zp, qmin=qmin, qmax=qmax, lut=lut,
                          gate=gate, **rkw)
                b = q_bias(draw, Co)
                op, call = "q_pw_conv", lambda: E.q_pw_conv(x, w, b, **kw)  # noqa: E731
                tensors = [x, w, b, gate]
            else:
                dw, pw = q_weight(draw, (C, 1, kk, kk)), q_weight(draw, (Co, C, 1, 1))
                mid_zp, mid_qmin, mid_qmax = q_epilogue(draw)
                kw = dict(dw_bias=q_bias(draw, C), dw_mult=q_float(draw, (C,)), dw_lut=q_lut(draw), x_zp=x_zp,
                          mid_zp=mid_zp, dw_zp=None if draw(st.booleans()) else q_int(draw), mid_qmin=mid_qmin,
                          mid_qmax=mid_qmax, pw_bias=q_bias(draw, Co), pw_mult=q_float(draw, (Co,)), lut=lut,
                          out_zp=out_zp, qmin=qmin, qmax=qmax, stride=stride, padding=padding, **rkw)
                op, call = "q_dwsep_conv", lambda: E.q_dwsep_conv(x, dw, pw, **kw)  # noqa: E731
                tensors = [x, dw, pw]
            tensors = tensors + [v for v in kw.values() if isinstance(v, torch.Tensor)]
        with effops.use_isa(level):
            ok, got = named_error(op, call)
        if not ok or is_meta(*tensors):
            return
        want = _ref_backend(call)
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape, (op, level, g.shape, w.shape)
            assert torch.equal(g, w), (op, level, (g.to(torch.int64) - w.to(torch.int64)).abs().max())
