"""Post-training static int8 quantization (effops.compress.quantize): agreement with the float
model on a small trained network, calibration determinism, state_dict round trip,
torch.compile, the module tree, and bad calibration data."""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effops
from effops.compress.quantize import QDWSeparableConv2d, QMBConv, quantize, quantize_tensor
from effops.nn import DWSeparableConv2d, MBConv


class Tiny(nn.Module):
    """EfficientNet-like: stem, MBConv with and without SE / residual / TF-same 5x5 stride 2, a
    depthwise-separable conv with relu6 + silu, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(
            MBConv(16, 24, 3, 2, expand_ratio=4, se_ratio=0.25),
            MBConv(24, 24, 3, 1, expand_ratio=4, se_ratio=0.0),
            MBConv(24, 32, 5, 2, expand_ratio=3, se_ratio=0.25, padding="same"),
            DWSeparableConv2d(32, 48, 3, 1, act="relu6", pw_act="silu"),
        )
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = self.blocks(self.stem(x).contiguous(memory_format=torch.channels_last))
        return self.head(x.mean((2, 3)))


@functools.lru_cache(maxsize=1)
def _digits():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@functools.lru_cache(maxsize=1)
def _trained():
    torch.manual_seed(0)
    xt, yt, _, _ = _digits()
    m = Tiny()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(4):
        for i in range(0, len(yt), 50):
            opt.zero_grad()
            F.cross_entropy(m(xt[i:i + 50]), yt[i:i + 50]).backward()
            opt.step()
    return m.eval()


def _untrained(seed=0):
    torch.manual_seed(seed)
    m = Tiny().eval()
    for mod in m.modules():  # non-trivial BN statistics to fold
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m


def _data(seed, n=24):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_top1_agreement_on_trained_digits(observer):
    m = _trained()
    xt, yt, xv, yv = _digits()
    with torch.no_grad():
        ref_t, ref_v = m(xt).argmax(1), m(xv).argmax(1)
    assert (ref_v == yv).float().mean() > 0.9  # the float model learned the task
    q = quantize(m, xt, observer=observer, batch_size=200)
    with torch.no_grad():
        got_t, got_v = q(xt).argmax(1), q(xv).argmax(1)
    agree = (got_t == ref_t).float().mean().item()
    assert agree >= 0.99, agree
    drop = (ref_v == yv).float().mean().item() - (got_v == yv).float().mean().item()
    assert drop <= 0.01, drop


def test_output_close_to_float():
    m = _untrained()
    x = _data(1)
    q = quantize(m, x)
    with torch.no_grad():
        ref, got = m(x), q(x)
    err = (got - ref).norm() / ref.norm()
    assert err < 0.1, err
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.75


def test_module_tree_and_report():
    m = _untrained()
    q = quantize(m, _data(1))
    assert q is not m and isinstance(m.blocks[0], MBConv)  # the original is untouched
    assert [type(b) for b in q.blocks] == [QMBConv, QMBConv, QMBConv, QDWSeparableConv2d]
    assert isinstance(q.stem[0], nn.Conv2d) and isinstance(q.head, nn.Linear)  # kept float
    assert {n for n, _ in q.named_children()} == {n for n, _ in m.named_children()}
    assert [r[:2] for r in q.quantization_report] == [(f"blocks.{i}", "quantized") for i in range(4)]
    # consecutive blocks pass uint8 codes; the last one returns float
    assert [b.chain_out.item() for b in q.blocks] == [True, True, True, False]
    assert q.blocks[0].se is not None and q.blocks[1].se is None
    assert q.blocks[0].dw_weight.dtype == torch.int8 and q.blocks[0].dw_bias.dtype == torch.int32


class _Staged(nn.Module):
    """Blocks in nested stages: run as one Sequential (a classifier) or stage by stage, keeping
    every stage's output (a features backbone)."""

    def __init__(self, features: bool):
        super().__init__()
        self.features = features
        self.blocks = nn.Sequential(
            nn.Sequential(MBConv(8, 16, 3, 2, expand_ratio=4, se_ratio=0.25), MBConv(16, 16, 3, 1, se_ratio=0.25)),
            nn.Sequential(MBConv(16, 24, 5, 2, expand_ratio=3, se_ratio=0.0)),
            nn.Sequential(MBConv(24, 24, 3, 1, se_ratio=0.25), MBConv(24, 24, 3, 1, se_ratio=0.0)))

    def forward(self, x):
        if not self.features:
            return self.blocks(x)
        feats = []
        for stage in self.blocks:
            x = stage(x)
            feats.append(x)
        return feats


@pytest.mark.parametrize("features", [False, True])
def test_codes_pass_across_stages_only_inside_one_call(features):
    """A Sequential of stages run as a whole passes uint8 codes across the stage boundaries too
    (dequantising and quantising again would give the same codes: the outputs are bit-identical
    with the boundaries unchained); a backbone that keeps each stage's output gets floats there."""
    import copy

    from effops.compress.quantize import _chain

    torch.manual_seed(0)
    m = _Staged(features).eval()
    x = torch.randn(8, 8, 32, 32, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=torch.channels_last)
    q = quantize(m, x)
    chained = [b.chain_out.item() for stage in q.blocks for b in stage]
    assert chained == ([True, False, False, True, False] if features else [True, True, True, True, False])
    unchained = copy.deepcopy(q)
    for b in unchained.modules():
        if isinstance(b, QMBConv):
            b.set_chain_out(False)
    _chain(unchained)  # the children of one Sequential only
    assert [b.chain_out.item() for stage in unchained.blocks for b in stage] == [True, False, False, True, False]
    with torch.no_grad():
        got, ref = q(x[:2]), unchained(x[:2])
    for g, r in zip(got if features else [got], ref if features else [ref]):
        assert g.dtype == torch.float32 and torch.equal(g, r)


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_calibration_is_deterministic(observer):
    m = _untrained()
    a = quantize(m, _data(2), observer=observer, batch_size=8).state_dict()
    b = quantize(m, [_data(2)[i:i + 8] for i in range(0, 24, 8)], observer=observer).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = quantize(m, _data(3), observer=observer).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # other data, other ranges


def test_state_dict_round_trip():
    m = _untrained()
    x = _data(4)
    q1 = quantize(m, _data(5))
    q2 = quantize(m, _data(6))
    with torch.no_grad():
        assert not torch.equal(q1(x), q2(x))
    buf = io.BytesIO()
    torch.save(q1.state_dict(), buf)
    buf.seek(0)
    q2.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))
    assert [b.chain_out.item() for b in q2.blocks] == [b.chain_out.item() for b in q1.blocks]


def test_eager_cpu_path_is_profiled_by_op_name(monkeypatch):
    """Eager CPU calls skip the dispatcher (compress._qmodules._q_call) but still show in
    torch.profiler under the custom ops' names; an MBConv block run by its C++ plan shows as
    effops::q_mbconv_block."""
    from effops.compress import _qmodules

    q = quantize(_untrained(), _data(1))

    def names():
        with torch.no_grad(), torch.profiler.profile() as prof:
            q(_data(8, n=2))
        return {e.key for e in prof.key_averages()}

    got = names()
    assert {"effops::q_mbconv_block", "effops::q_dwsep_conv", "effops::quantize_tensor"} <= got, got
    assert "effops::q_pw_conv" not in got
    monkeypatch.setattr(_qmodules, "_PLANS", False)
    got = names()
    assert {"effops::q_pw_conv", "effops::q_dw_conv_act", "effops::q_dwsep_conv", "effops::quantize_tensor",
            "effops::q_se_gates"} <= got, got


def test_torch_compile():
    m = _untrained()
    q = quantize(m, _data(7))
    x = _data(8, n=4)
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(eager, compiled)


def test_efficientnet_b0_blocks_all_quantized():
    from effops.models import create_model

    torch.manual_seed(0)
    m = create_model("efficientnet_b0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(m, x)
    kinds = [r[1] for r in q.quantization_report]
    assert kinds.count("quantized") == 18 and "kept" not in kinds  # 16 blocks, the stem and the head conv
    assert ("conv_head", "quantized", "QConv2d (conv_head + bn2 + silu)") in q.quantization_report
    assert ("conv_stem", "quantized", "QConv2d (conv_stem + bn1 + silu)") in q.quantization_report
    with torch.no_grad():
        out = q(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0"])  # symmetric / TF 'same' stem
def test_efficientnet_stem_and_head_convs_quantized(name):
    """QConv2d: the stem (3x3 s2, patches + GEMM) and the head conv (1x1) equal the integer
    reference of their folded stage on the input codes, within a few output steps of the float
    stage; the stem passes its codes to the first block (the first block's input parameters);
    stem=False / head=False keep them float; state_dict round trip; torch.compile(fullgraph)."""
    from effops.compress.quantize import QConv2d
    from effops.models import create_model
    from effops.ops.qconv import conv_geometry, q_conv2d_reference, q_pw_conv_reference

    torch.manual_seed(0)
    m = create_model(name, num_classes=10).eval()
    x = torch.randn(3, 3, 65, 63, generator=torch.Generator().manual_seed(0))  # odd sizes
    q = quantize(m, x)
    st, h = q.conv_stem, q.conv_head
    assert isinstance(st, QConv2d) and isinstance(h, QConv2d) and (h.in_channels, h.out_channels) == (320, 1280)
    assert st.out_qparams() == q.blocks[0][0].in_qparams() and bool(st.chain_out) and not bool(h.chain_out)
    xc = quantize_tensor(x.contiguous(memory_format=torch.channels_last), *st.in_qparams())
    g = conv_geometry("t", x.shape[2:], (3, 3), 2, st.padding, 1)
    zp, qmin, qmax, ozp = st.cfg.tolist()
    ref = q_conv2d_reference(xc, st.weight, st.bias, st.mult, st.lut, g.stride, g.pad, st.in_qparams()[1], zp, qmin,
                             qmax)
    with torch.no_grad():
        codes = q.forward_stem(x)
        assert codes.dtype == torch.uint8 and torch.equal(codes, ref)
        s_in, zp_in = st.in_qparams()  # the float stem on the input the codes represent
        f_stem = m.forward_stem((xc.float() - zp_in) * s_in)
    assert ((codes.float() - ozp) * float(st.out_scale) - f_stem).abs().max() < 0.1 * f_stem.abs().max() + 2 * float(st.out_scale)

    feats = q.blocks(codes)  # float (the last block dequantises)
    hc = quantize_tensor(feats, *h.in_qparams())
    zp, qmin, qmax, ozp = h.cfg.tolist()
    ref = q_pw_conv_reference(hc, h.weight, h.bias, h.mult, h.lut, None, None, h.in_qparams()[1], zp, qmin, qmax)
    with torch.no_grad():
        got = h(feats)
        assert torch.equal(got, (ref.to(torch.float32) - ozp) * float(h.out_scale))
        f_float = F.silu(m.bn2(m.conv_head((hc.float() - h.in_qparams()[1]) * h.in_qparams()[0])))
    # (random weights: features of ~1e-5, where the pre-activation table's steps dominate)
    assert (got - f_float).abs().max() < 0.1 * f_float.abs().max() + 2 * float(h.out_scale)

    kept = quantize(m, x, stem=False, head=False)
    assert isinstance(kept.conv_stem, nn.Conv2d) and isinstance(kept.conv_head, nn.Conv2d)
    with pytest.raises(TypeError, match="stem must be True or False"):
        quantize(m, x, stem=1)
    with torch.no_grad():
        logits = q(x)
        q2 = quantize(m, torch.randn(2, 3, 64, 64))
        q2.load_state_dict(q.state_dict())
        assert torch.equal(q2(x), logits)
        assert torch.equal(torch.compile(st, fullgraph=True)(x), codes)  # patches + q_pw_conv there
        assert torch.equal(torch.compile(h, fullgraph=True)(feats), got)
    q.reset_classifier(3)
    assert q.classifier.weight.dtype == torch.float32


def test_block_scratch_buffers_are_reused_safely():
    """The blocks' internal intermediates go to reused per-thread buffers: results stay equal to
    a run without reuse across batch sizes that grow and shrink, earlier outputs are not
    overwritten, and threads do not share the buffers."""
    import threading

    from effops.compress import _qmodules
    from effops.models import create_model

    torch.manual_seed(0)
    m = create_model("efficientnet_b0", num_classes=10).eval()
    q = quantize(m, torch.randn(4, 3, 64, 64))
    xs = [torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) for n in (1, 4, 2, 4)]
    with torch.no_grad():
        limit, plans = _qmodules._Scratch.LIMIT, _qmodules._PLANS
        try:
            _qmodules._Scratch.LIMIT = -1  # every buffer per call, op by op (the plans reuse C++ buffers)
            _qmodules._PLANS = False
            want = [q(x) for x in xs]
        finally:
            _qmodules._Scratch.LIMIT, _qmodules._PLANS = limit, plans
        _qmodules.release_scratch()
        got = [q(x) for x in xs]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        res = {}
        ts = [threading.Thread(target=lambda i=i: res.__setitem__(i, [q(xs[i]) for _ in range(3)])) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert all(torch.equal(r, want[i]) for i, rs in res.items() for r in rs)


@pytest.mark.parametrize("threads", [1, 2])
def test_block_plan_equals_op_by_op_path(monkeypatch, threads):
    """QMBConv's C++ plan (one call per block) writes the op-by-op path's codes bit for bit, block
    by block: with and without expand and SE, residual, stride 2, TF-same 5x5, odd sizes, NCHW and
    channels_last inputs, batch 1 and 3, 1 and 2 threads; it rejects inputs of the wrong shape."""
    from effops.compress import _qmodules
    from effops.models import create_model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    cases = [(quantize(_untrained(), _data(1)), [torch.randn(n, 1, 17, 15, generator=g) for n in (1, 3)]),
             (quantize(create_model("tf_efficientnet_b0", num_classes=4).eval(), torch.randn(2, 3, 40, 40)),
              [torch.randn(n, 3, 37, 45, generator=g) for n in (1, 3)])]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for q, xs in cases:
            blocks = [m for m in q.modules() if isinstance(m, QMBConv)]
            assert blocks and all(b._plan is not None for b in blocks)
            assert any(b.se is None for b in blocks) or any("expand" not in b._cfg for b in blocks)
            outs = []
            hooks = [b.register_forward_hook(lambda mod, a, out: outs.append(out)) for b in blocks]
            try:
                for x in xs:
                    for fmt in (torch.contiguous_format, torch.channels_last):
                        runs = []
                        for plans in (True, False):
                            monkeypatch.setattr(_qmodules, "_PLANS", plans)
                            outs.clear()
                            with torch.no_grad():
                                y = q(x.contiguous(memory_format=fmt))
                            runs.append((y, list(outs)))
                        (y1, o1), (y2, o2) = runs
                        assert torch.equal(y1, y2) and len(o1) == len(o2) == len(blocks)
                        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(o1, o2))
            finally:
                for h in hooks:
                    h.remove()
    finally:
        torch.set_num_threads(old)
    b = cases[0][0].blocks[0]
    bad = torch.zeros(1, 9, 9, 5, dtype=torch.uint8)  # NHWC, 5 channels: the block takes 16
    with pytest.raises(ValueError, match=r"QBlockPlan.run: x must have shape"):
        b._plan.run(torch.utils.dlpack.to_dlpack(bad),
                    torch.utils.dlpack.to_dlpack(torch.empty(1, 5, 5, 24, dtype=torch.uint8)), [0, 1, 0, 1], 1)


def test_empty_batch(monkeypatch):
    """A batch of 0 images: an empty result (the int8 kernels split work by image: no division by
    zero), op by op and through the block plans."""
    from effops.compress import _qmodules
    from effops.models import create_model

    torch.manual_seed(0)
    q = quantize(create_model("efficientnet_b0", num_classes=10).eval(), torch.randn(2, 3, 64, 64))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for plans in (True, False):
            monkeypatch.setattr(_qmodules, "_PLANS", plans)
            with torch.no_grad():
                assert q(torch.zeros(0, 3, 64, 64)).shape == (0, 10)
    finally:
        torch.set_num_threads(old)


def test_bad_calibration_data():
    m = _untrained()
    with pytest.raises(ValueError, match=r"calibration_data batch 0 must have shape \[N, 1, H, W\]"):
        quantize(m, torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="calibration_data batch 0 must have shape"):
        quantize(m, torch.randn(1, 16, 16))
    with pytest.raises(TypeError, match="must be floating point"):
        quantize(m, torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="calibration_data is empty"):
        quantize(m, [])
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(m, torch.full((2, 1, 16, 16), float("nan")))
    with pytest.raises(TypeError, match="calibration_data must be a tensor"):
        quantize(m, 3)
    fixed = nn.Sequential(MBConv(1, 8, 3, 1, se_ratio=0), nn.Flatten(), nn.Linear(8 * 16 * 16, 2)).eval()
    with pytest.raises(ValueError, match="the model failed on calibration_data batch 0"):
        quantize(fixed, torch.randn(2, 1, 8, 8))  # the linear layer wants 16x16 inputs
    with pytest.raises(ValueError, match="observer must be one of"):
        quantize(m, _data(0), observer="mse")
    with pytest.raises(ValueError, match="percentile must be"):
        quantize(m, _data(0), observer="percentile", percentile=30)
    with pytest.raises(ValueError, match="activation must be 'per_tensor'"):
        quantize(m, _data(0), activation="per_channel")
    with pytest.raises(ValueError, match="no block the int8 kernels implement"):
        quantize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), _data(0))


def test_unquantizable_kept_with_reason():
    m = nn.Sequential(DWSeparableConv2d(1, 8, 3, preact=True), DWSeparableConv2d(8, 8, 3)).eval()
    q = quantize(m, _data(0))
    report = dict((r[0], (r[1], r[2])) for r in q.quantization_report)
    assert report["0"][0] == "kept" and "preact" in report["0"][1]
    assert report["1"] == ("quantized", "QDWSeparableConv2d")
    assert isinstance(q[0], DWSeparableConv2d) and isinstance(q[1], QDWSeparableConv2d)


def test_converted_timm_model():
    timm = pytest.importorskip("timm")
    from effops.nn import convert

    torch.manual_seed(0)
    m = convert(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(m, x)
    kinds = [r[1] for r in q.quantization_report]
    assert kinds.count("quantized") == 16, q.quantization_report
    with torch.no_grad():
        out = q(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


LEVELS = [lvl for lvl in effops._backend.ISA_LEVELS
          if effops._backend.ISA_LEVELS.index(lvl) <= effops._backend.ISA_LEVELS.index(effops._backend.detected_isa())]


def _quantize_ops(x, scale, zp):  # the definition: torch ops, float32 division
    return torch.div(x, scale).round_().add_(zp).clamp_(0, 255).to(torch.uint8)


@pytest.mark.parametrize("level", LEVELS)
def test_quantize_tensor_kernel_equals_the_torch_ops(level):
    """The CPU kernel behind quantize_tensor (one pass) gives the torch ops' codes exactly: ties
    half to even, saturation, +-inf, -0, huge values, NaN -> 0, every length around the vector
    widths and the task chunk, contiguous and channels_last (kept), other layouts by the ops."""
    g = torch.Generator().manual_seed(7)
    with effops.use_isa(level):
        for n in (0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 1000, 65535, 65536 + 17, 200003):
            scale = float(torch.rand(1, generator=g)) * 0.3 + 1e-3
            zp = int(torch.randint(0, 256, (1,), generator=g))
            x = torch.randn(n, generator=g) * 40 * scale
            k = n // 3
            x[:k] = (torch.randint(-400, 400, (k,), generator=g).float() + 0.5) * scale  # exact ties (mostly)
            if n >= 8:
                x[:8] = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, -0.0, 0.0, float("nan"), 1e-40])
            assert torch.equal(quantize_tensor(x, scale, zp), _quantize_ops(x, scale, zp)), (n, scale, zp)
        x = torch.randn(3, 5, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
        q = quantize_tensor(x, 0.01, 100)
        assert q.is_contiguous(memory_format=torch.channels_last) and torch.equal(q, _quantize_ops(x, 0.01, 100))
        t = x.transpose(2, 3)  # neither layout: the torch ops
        assert torch.equal(quantize_tensor(t, 0.01, 100), _quantize_ops(t, 0.01, 100))


def test_quantize_tensor_kernel_rejects_bad_arguments():
    from effops import _backend
    x, out = torch.zeros(4), torch.empty(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="zp must be a code"):
        _backend._C.q_quantize(x, out, 0.1, 256, 1)
    with pytest.raises(ValueError, match="scale must be a positive"):
        _backend._C.q_quantize(x, out, 0.0, 3, 1)
    with pytest.raises(ValueError, match="one length"):
        _backend._C.q_quantize(x, out[:3], 0.1, 3, 1)


def test_se_hooks_still_fire():
    """The SE runs as one op (q_se_gates) unless hooks are on it or its parts: then its modules run."""
    from effops.models import create_model

    torch.manual_seed(0)
    m = create_model("efficientnet_b0", num_classes=3).eval()
    q = quantize(m, torch.randn(2, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = q(x)
        seen = []
        h = q.blocks[1][0].se.conv_reduce.register_forward_hook(lambda mod, a, out: seen.append(out.shape))
        try:
            got = q(x)
        finally:
            h.remove()
    assert seen and torch.allclose(got, want, atol=1e-4 * want.abs().max().item() + 1e-6)
