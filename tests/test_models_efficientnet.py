"""effops.models EfficientNet against timm (the oracle; test-only): names, parameter counts,
strict state_dict loading, fp32 / bf16 / train-mode parity, the features backbone, checkpoint
files in every accepted form, bad input."""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from effops.models import create_model, efficientnet_features, list_models, load_weights, register_model
from effops.models.efficientnet import VARIANTS, block_specs, round_channels

timm = pytest.importorskip("timm")

NAMES = [f"{p}_{v}" for p in ("efficientnet", "tf_efficientnet") for v in VARIANTS]
# published parameter counts (millions, timm / the EfficientNet paper): ../shared/REFERENCE.md
PUBLISHED_M = {"b0": 5.29, "b1": 7.79, "b2": 9.11, "b3": 12.23, "b4": 19.34, "b5": 30.39, "b6": 43.04, "b7": 66.35}


def randomize_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random BN affine parameters and running statistics, so that folding BN is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def pair(name: str, **kw):
    """(timm model, effops model) with the same random weights, both eval, timm channels_last."""
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model(name, **kw)).eval()
    ours = (efficientnet_features(name, **{k: v for k, v in kw.items() if k != "features_only"})
            if kw.get("features_only") else create_model(name, **kw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(memory_format=torch.channels_last), ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output scale max |a|."""
    return ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()


# ------------------------------------------------------------------------------------ structure
def test_list_models_has_every_efficientnet():
    assert set(NAMES) <= set(list_models())
    assert list_models("tf_efficientnet_b*") == sorted(n for n in NAMES if n.startswith("tf_"))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_strict_state_dict_equal_timm(name):
    with torch.device("meta"):  # shapes only: fast for B7 too
        ref = timm.create_model(name)
        ours = create_model(name)
        ref_f = timm.create_model(name, features_only=True, out_indices=(2, 3, 4))
        ours_f = efficientnet_features(name)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert round(count / 1e6, 2) == PUBLISHED_M[name.rsplit("_", 1)[1]]
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    ours.load_state_dict(ref.state_dict(), strict=True)  # shapes checked too
    assert list(ours_f.state_dict()) == list(ref_f.state_dict())
    ours_f.load_state_dict(ref_f.state_dict(), strict=True)
    assert ours_f.feature_channels == ref_f.feature_info.channels()
    assert ours_f.reductions == ref_f.feature_info.reduction()


def test_scaling_rules():
    assert [round_channels(c, 1.1) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)] == \
        [32, 16, 24, 48, 88, 120, 208, 352, 1408]  # B2
    assert round_channels(3) == 8  # never below the divisor
    assert round_channels(10) == 16  # rounding down to 8 would lose more than 10%
    assert [len(s) for s in block_specs(1.0, 3.1)] == [4, 7, 7, 10, 10, 13, 4]  # ceil(3.1 r): B7


def test_drop_path_rates_scaled_by_block_index_as_timm():
    with torch.device("meta"):
        ref = timm.create_model("tf_efficientnet_b3", drop_path_rate=0.3)
        ours = create_model("tf_efficientnet_b3", drop_path_rate=0.3)
    theirs = [getattr(b.drop_path, "drop_prob", 0.0) for s in ref.blocks for b in s]
    mine = [b.drop_path_rate for s in ours.blocks for b in s]
    assert mine == pytest.approx(theirs, abs=1e-12) and mine[0] == 0.0 and max(mine) > 0.28


# ------------------------------------------------------------------------------------ fp32 parity
@pytest.mark.parametrize("name,size", [("efficientnet_b0", 64), ("tf_efficientnet_b0", 95), ("efficientnet_b1", 64),
                                       ("tf_efficientnet_b3", 65)])
def test_eval_logits_equal_timm(name, size):
    ref, ours = pair(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ref(x), ours(x)
        b2 = ours(x)  # the second call runs on the prepared (cached) kernels
        feats = ours.forward_features(x)
    assert b.shape == a.shape == (2, 1000)
    assert rel_err(a, b) <= 1e-4
    assert torch.equal(b, b2)
    assert feats.shape == (2, ours.num_features, -(-size // 32), -(-size // 32))


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "efficientnet_b1"])
def test_features_equal_timm_features_only(name):
    ref, ours = pair(name, features_only=True, out_indices=(2, 3, 4))
    x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert [t.shape[1] for t in b] == ours.feature_channels == [40, 112, 320]
    assert ours.reductions == [8, 16, 32]
    assert [tuple(t.shape) for t in a] == [tuple(t.shape) for t in b]
    assert max(rel_err(p, q) for p, q in zip(a, b)) <= 1e-4


def test_features_early_levels_only():
    ref, ours = pair("tf_efficientnet_b0", features_only=True, out_indices=(0, 1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert ours.feature_channels == [16, 24] and ours.reductions == [2, 4]
    assert len(b) == 2 and max(rel_err(p, q) for p, q in zip(a, b)) <= 1e-4


# ------------------------------------------------------------------------------------ train mode
@pytest.fixture(scope="module")
def b0_pair():
    return pair("efficientnet_b0", drop_rate=0.2, drop_path_rate=0.2)


def _grads_close(ref, ours):
    """Per tensor: max |g - g_timm| <= 1e-3 * max |g_timm| + 1e-6 * (largest gradient anywhere).
    Measured: <= 3.5e-5 relative (fp32, other summation orders amplified by batch statistics);
    the 1e-6 term covers the biases of BNs that feed a training-mode BN, whose exact gradient is
    0 (BN removes shifts), so only rounding noise (~1e-7 of the largest gradient) is left."""
    theirs = dict(ref.named_parameters())
    top = max(p.grad.abs().max().item() for p in theirs.values())
    for k, p in ours.named_parameters():
        g = theirs[k].grad
        assert p.grad is not None, k
        err = (p.grad - g).abs().max().item()
        assert err <= 1e-3 * g.abs().max().item() + 1e-6 * top, (k, err, g.abs().max().item())


def test_train_mode_forward_backward_equal_timm(b0_pair):
    ref, ours = (copy.deepcopy(m).train() for m in b0_pair)  # running stats change: keep the fixture's
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([1, 5, 999])
    outs = []
    for m in (ref, ours):
        torch.manual_seed(123)  # the same drop-path and dropout masks (same RNG order as timm)
        out = m(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
    assert rel_err(*outs) <= 1e-4
    _grads_close(ref, ours)
    buffers = dict(ref.named_buffers())  # running statistics updated from the same batch statistics
    for k, b in ours.named_buffers():
        assert torch.allclose(b.float(), buffers[k].float(), rtol=1e-4, atol=1e-5), k
    # with another seed the masks differ: drop path really drops
    torch.manual_seed(7)
    assert rel_err(outs[1], ours(x).detach()) > 1e-3


def test_frozen_bn_training_uses_fused_backward_and_matches_timm(b0_pair):
    ref, ours = (copy.deepcopy(m).eval() for m in b0_pair)  # BN frozen: folded into the fused kernels
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    grads = []
    for m in (ref, ours):
        xi = x.detach().clone().requires_grad_(True)
        m(xi).square().mean().backward()
        grads.append(xi.grad)
    assert rel_err(*grads) <= 1e-4
    _grads_close(ref, ours)


# ------------------------------------------------------------------------------------ layout, dtypes
def test_channels_last_by_default_and_either_layout_gives_the_same(b0_pair):
    ref, ours = (m.eval() for m in b0_pair)
    assert ours.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert ours.blocks[1][0].conv_pw.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = ours.forward_features(x)
        assert f.is_contiguous(memory_format=torch.channels_last)
        a = ours(x)
        b = ours(x.contiguous(memory_format=torch.channels_last))
        nchw = create_model("efficientnet_b0", channels_last=False).eval()
        nchw.load_state_dict(ours.state_dict())
        c = nchw(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-6 * a.abs().max().item())
    assert rel_err(a, c) <= 1e-5


def test_bf16_autocast_on_cpu_close_to_fp64(b0_pair):
    ref, ours = (m.eval() for m in b0_pair)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        truth = copy.deepcopy(ref).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = ref(x), ours(x)
    assert b.dtype == torch.bfloat16
    e_ref, e_ours = rel_err(truth, a.float()), rel_err(truth, b.float())
    assert e_ours <= 2 * e_ref + 1e-3, (e_ours, e_ref)  # measured 0.0053 vs timm's 0.0062


def test_num_classes_zero_and_reset_classifier():
    ref, ours = pair("efficientnet_b0", num_classes=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert b.shape == (1, 1280) and rel_err(a, b) <= 1e-4
    ours.reset_classifier(7)
    with torch.no_grad():
        assert ours(x).shape == (1, 7)


def test_prepared_kernels_follow_parameter_updates():
    """Eval caches the folded/prepared weights (stem, blocks, head); an optimizer step or
    load_state_dict must invalidate them."""
    torch.manual_seed(3)
    model = create_model("efficientnet_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    model(x).square().mean().backward()  # frozen BN: gradients for every parameter, BN affines included
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    fresh = create_model("efficientnet_b0").eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        after, expect = model(x), fresh(x)
        model.load_state_dict(create_model("efficientnet_b0").state_dict())
        reloaded = model(x)
    assert rel_err(before, after) > 1e-3
    assert torch.equal(after, expect)
    assert rel_err(after, reloaded) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_runs_and_matches_eager(fullgraph):
    model = create_model("efficientnet_b0").eval()
    randomize_bn(model)
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=fullgraph)  # fullgraph: no graph breaks anywhere
    with torch.no_grad():
        assert rel_err(model(x), compiled(x)) <= 1e-5


def test_effops_models_does_not_import_timm():
    code = "import sys, effops.models; m = effops.models.create_model('efficientnet_b0'); assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ bad input
def test_unknown_name_lists_the_known_models():
    with pytest.raises(ValueError, match="unknown model 'efficientnet_b9'.*efficientnet_b0.*tf_efficientnet_b7"):
        create_model("efficientnet_b9")
    with pytest.raises(TypeError, match="name"):
        create_model(3)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(num_classes=-1), ValueError, "num_classes"), (dict(num_classes=2.5), TypeError, "num_classes"),
    (dict(drop_rate=1.0), ValueError, "drop_rate"), (dict(drop_path_rate="x"), TypeError, "drop_path_rate"),
    (dict(features_only=True, out_indices=(5,)), ValueError, "out_indices"),
    (dict(features_only=True, out_indices=(3, 2)), ValueError, "out_indices"),
    (dict(image_size=0), ValueError, "image_size"), (dict(bogus=1), TypeError, "bogus"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        create_model("efficientnet_b0", **kw)


def test_bad_input_tensor():
    model = create_model("efficientnet_b0").eval()
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="tensor"):
        model([1, 2])


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_model("efficientnet_b0", lambda **kw: None)


# ------------------------------------------------------------------------------------ weights files
@pytest.fixture(scope="module")
def b0_state():
    torch.manual_seed(11)
    return randomize_bn(create_model("efficientnet_b0", channels_last=False)).state_dict()


def _same(model, sd):
    got = model.state_dict()
    return all(torch.equal(got[k], v) for k, v in sd.items())


@pytest.mark.parametrize("form", ["bare", "state_dict", "model", "module_prefix", "timm_train", "safetensors"])
def test_weights_every_accepted_form(tmp_path, b0_state, form):
    sd = b0_state
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pth")
    if form == "safetensors":
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        obj = {"bare": sd, "state_dict": {"state_dict": sd}, "model": {"model": sd, "epoch": 3},
               "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}},
               # timm's train.py checkpoint: arch, args (an argparse.Namespace), optimizer state, ...
               "timm_train": {"epoch": 9, "arch": "efficientnet_b0", "state_dict": sd, "version": 2,
                              "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                              "args": argparse.Namespace(lr=0.1, model="efficientnet_b0")}}[form]
        torch.save(obj, path)
    model = create_model("efficientnet_b0", weights=path)
    assert _same(model, sd)


@pytest.mark.parametrize("key", ["state_dict_ema", "model_ema"])
def test_weights_ema_preferred(tmp_path, b0_state, key):
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in b0_state.items()}
    torch.save({"state_dict": b0_state, key: {"module." + k: v for k, v in ema.items()}}, tmp_path / "w.pth")
    model = create_model("efficientnet_b0", weights=str(tmp_path / "w.pth"))
    assert _same(model, ema)


def test_weights_roundtrip_gives_the_same_logits(tmp_path, b0_state):
    torch.save(b0_state, tmp_path / "b0.pt")
    a = create_model("efficientnet_b0").eval()
    a.load_state_dict(b0_state)
    b = create_model("efficientnet_b0", weights=tmp_path / "b0.pt").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_features_backbone_loads_a_classifier_checkpoint(tmp_path, b0_state):
    torch.save(b0_state, tmp_path / "b0.pth")
    feats = efficientnet_features("efficientnet_b0", weights=tmp_path / "b0.pth")
    assert _same(feats, {k: v for k, v in b0_state.items() if k in feats.state_dict()})


def test_weights_wrong_num_classes_says_which_classifier(tmp_path, b0_state):
    torch.save(b0_state, tmp_path / "b0.pth")
    with pytest.raises(ValueError, match=r"classifier for 1000 classes \(classifier.weight \[1000, 1280\]\).*"
                                         r"10 classes.*num_classes=1000"):
        create_model("efficientnet_b0", num_classes=10, weights=tmp_path / "b0.pth")
    with pytest.raises(ValueError, match="num_classes=1000"):
        create_model("efficientnet_b0", num_classes=0, weights=tmp_path / "b0.pth")


def test_weights_missing_unexpected_and_mismatched_keys(tmp_path, b0_state):
    sd = dict(b0_state)
    del sd["blocks.2.1.conv_dw.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 missing from the file: blocks\.2\.1\.conv_dw\.weight.*"
                                         r"1 unexpected in the file: extra\.weight"):
        create_model("efficientnet_b0", weights=tmp_path / "bad.pth")
    # another variant's checkpoint: shapes differ, named
    with pytest.raises(ValueError, match="shapes differ.*vs"):
        create_model("efficientnet_b2", weights=tmp_path / "bad.pth")
    # strict=False loads what is there and reports the rest
    model = create_model("efficientnet_b0")
    res = load_weights(model, tmp_path / "bad.pth", strict=False)
    assert res.missing_keys == ["blocks.2.1.conv_dw.weight"] and res.unexpected_keys == ["extra.weight"]


def test_weights_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        create_model("efficientnet_b0", weights=tmp_path / "none.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported extension '.onnx'"):
        create_model("efficientnet_b0", weights=tmp_path / "w.onnx")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")  # a whole pickled module: refused
    with pytest.raises(ValueError, match="weights_only"):
        create_model("efficientnet_b0", weights=tmp_path / "pickled.pth")
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no state_dict"):
        create_model("efficientnet_b0", weights=tmp_path / "empty.pth")
    with pytest.raises(TypeError, match="weights must be a path"):
        create_model("efficientnet_b0", weights=42)


def test_stem_output_channels_last_with_ambiguous_weight_strides():
    """A 1-channel stem whose weight has NCHW strides ([C, 1, 3, 3] is also channels_last, e.g.
    after pruning slices it): the stem still returns channels_last, so the blocks take the fused
    plan (it returned NCHW and every block ran the op path with layout copies: 3x slower)."""
    from effops.models import create_model

    torch.manual_seed(0)
    m = create_model("efficientnet_b0", num_classes=3, in_chans=1).eval()
    m.conv_stem.weight = torch.nn.Parameter(m.conv_stem.weight.detach().clone(memory_format=torch.contiguous_format))
    assert m.conv_stem.weight.stride()[1] != 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        s = m.forward_stem(m._input(x))
        assert s.is_contiguous(memory_format=torch.channels_last) and s.stride()[1] == 1
        with torch.profiler.profile() as prof:
            m(x)
    names = {e.key for e in prof.key_averages()}
    assert "effops::mbconv_block" in names and "effops::dw_conv_act" not in names, names
