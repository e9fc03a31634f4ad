"""The whole-network benchmark (effops bench models) and the per-op profile: the quick run gives
rows of the harness's schema, a variant whose outputs disagree is refused (not timed), ONNX
Runtime / OpenVINO are skipped with a note when absent, and effops's ops appear by name in
torch.profiler on the eager CPU fast path. Smoke tests of the machinery, never speed assertions."""

from __future__ import annotations

import csv
import re
import sys

import pytest
import torch

pytest.importorskip("timm")

from effops.bench import bench_models as bm  # noqa: E402
from effops.bench.harness import COLUMNS, EFFOPS  # noqa: E402
from effops.cli import main  # noqa: E402


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_onnx_runtimes(monkeypatch):
    """ONNX Runtime and OpenVINO made absent (import fails), as without the bench extra."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "openvino", None)


def _rows(path):
    (f,) = path.glob("*.csv")
    with open(f) as fh:
        r = csv.DictReader(fh)
        assert r.fieldnames == COLUMNS
        return list(r)


def test_quick_run_rows_and_skip_notes(tmp_path, capsys, keep_threads, no_onnx_runtimes):
    assert main(["bench", "models", "--quick", "--time", "0.05", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = _rows(tmp_path)
    by = {r["backend"]: r for r in rows}
    assert {EFFOPS, "eager (NCHW)", "eager (channels_last)", "compute floor", "traffic floor"} <= set(by)
    assert "onnxruntime" not in by and "openvino" not in by
    assert "onnxruntime: not installed" in out and "openvino: not installed" in out
    for r in rows:
        assert r["op"] == "model inference" and r["dtype"] == "fp32" and r["threads"] == "1"
        assert "mobilenetv2_100" in r["case"] and "b1" in r["case"]
        assert float(r["median_ms"]) > 0 and float(r["ratio"]) > 0
        assert float(r["gbps"]) > 0 and float(r["pct_of_copy"]) > 0  # compulsory traffic per time
    assert float(by[EFFOPS]["ratio"]) == 1.0
    ms = {k: float(v["median_ms"]) for k, v in by.items()}
    for k in ("eager (NCHW)", "compute floor"):
        assert float(by[k]["ratio"]) == pytest.approx(ms[k] / ms[EFFOPS], rel=2e-3, abs=1e-3)  # CSV rounding
    assert float(by["traffic floor"]["pct_of_copy"]) == pytest.approx(100, rel=1e-2)  # the floor is the copy rate
    # the printed table: one line per timed variant with its error against the reference
    for label in (EFFOPS, "eager (NCHW)", "eager (channels_last)"):
        line = next(ln for ln in out.splitlines() if re.match(rf"\s+{re.escape(label)}\s+\d", ln))
        assert re.search(r"\d\.\de[+-]\d\d", line), line

    # the README's whole-network table from those rows; the op-level table leaves them out
    assert main(["bench", "models", "--table", "--results", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| inference: model, batch, threads | dtype | run | effops ms | eager (NCHW) | eager (channels_last) |" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("| timm mobilenetv2_100"))
    assert f"| {by[EFFOPS]['date']} |" in row  # each row names its run's date (rows of several runs)
    assert f"({float(by['eager (NCHW)']['ratio']):.2f}x)" in row
    assert f"{float(by[EFFOPS]['median_ms']) / float(by['compute floor']['median_ms']):.1f}x" in row
    assert main(["bench", "--table", "--results", str(tmp_path)]) == 0
    assert "mobilenetv2_100" not in capsys.readouterr().out


def _perturbed():
    m = bm.build_original(bm.QUICK).to(memory_format=torch.channels_last)
    with torch.no_grad():
        m.conv_stem.weight.mul_(1.5)
    return m


def test_refuses_variants_whose_outputs_disagree(capsys, keep_threads, no_onnx_runtimes):
    lines = []
    rows = bm.run(quick=True, target_s=0.05, log=lines.append, wrong={"eager (channels_last)": _perturbed()})
    labels = {r["backend"] for r in rows}
    assert "eager (channels_last)" not in labels and {EFFOPS, "eager (NCHW)"} <= labels
    text = "\n".join(lines)
    assert "REFUSED eager (channels_last)" in text and "max relative error" in text

    # effops's own variant wrong: refused too; the others are still timed, without a ratio
    lines.clear()
    rows = bm.run(quick=True, target_s=0.05, log=lines.append, wrong={EFFOPS: _perturbed()})
    labels = {r["backend"] for r in rows}
    assert EFFOPS not in labels and "eager (NCHW)" in labels
    assert all(r["ratio"] == "" for r in rows)
    assert "REFUSED effops" in "\n".join(lines)


def test_quick_run_with_onnxruntime_and_openvino(tmp_path, keep_threads):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ov = pytest.importorskip("openvino")
    del ort, ov
    lines = []
    bm.run(quick=True, target_s=0.05, log=lines.append, results_dir=str(tmp_path))
    by = {r["backend"]: r for r in _rows(tmp_path)}
    assert {"onnxruntime", "openvino"} <= set(by), "\n".join(lines)


def test_bad_arguments(capsys):
    assert main(["bench", "models", "--models", "resnet9000", "--no-save"]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err
    assert main(["bench", "models", "--batch", "0", "--no-save"]) == 2
    assert "batch: positive integers required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype"):
        bm.validate([], [1], [1], ["fp16"])


def test_compulsory_bytes_counts_block_outputs():
    m = bm.build_original(bm.QUICK)
    x = torch.randn(1, 3, 64, 64)
    base = x.numel() * 4 + sum(p.numel() for p in m.parameters()) * 4
    got = bm.compulsory_bytes(m, x, 4)
    # the stem's output (32 x 32 x 32) alone is written and read once
    assert got > base + 2 * 4 * 32 * 32 * 32
    assert bm.compulsory_bytes(m, x, 2) == got // 2
    assert bm.count_macs(m, x) > 0


def test_profile_names_effops_ops_on_the_fast_path(monkeypatch, keep_threads):
    """The converted model's fast path (no dispatcher: the public ops are never called) still
    shows effops's ops in torch.profiler, by the custom ops' names."""
    from effops.bench.profile import format_profile, profile_model
    from effops.ops import dwsep

    called = []
    for name in ("dwsep_conv", "dw_conv_act", "pw_conv"):
        orig = getattr(dwsep, name)
        monkeypatch.setattr(dwsep, name, lambda *a, _o=orig, _n=name, **k: called.append(_n) or _o(*a, **k))
    spec = bm.ModelSpec("efficientnet_b0", "timm", 64)
    prof = profile_model(spec, batch=1, threads=1, reps=2)
    names = {o.name: o for o in prof.ops}
    assert not called, f"fast path not taken: {called}"
    # eager inference runs each MBConv / DS block as one call (effops.nn._plan)
    assert "effops::mbconv_block" in names
    assert names["effops::mbconv_block"].calls == 16  # one per MBConv / DS block of efficientnet_b0
    assert sum(o.pct for o in prof.ops) == pytest.approx(100, abs=1)
    table = format_profile(prof)
    assert "| op | calls | total ms | % |" in table and "effops::mbconv_block" in table


def test_profiled_opens_no_scope_without_a_profiler(monkeypatch):
    from effops.ops._common import profiled

    def boom(name):
        raise AssertionError("record_function entered without a profiler")

    monkeypatch.setattr(torch.profiler, "record_function", boom)
    assert profiled("effops::x", lambda a, b: a + b, 2, 3) == 5


def test_a_compile_that_compiled_nothing_is_refused():
    with pytest.raises(RuntimeError, match="compiled no graph"):
        bm._timed_build(lambda: (lambda: torch.ones(1)), compiled=True)
    assert bm._timed_build(lambda: (lambda: torch.ones(1))).first_s >= 0


def test_effops_models_detector_runs_effops_post_processing(monkeypatch):
    """The effops.models detector variant is effops end to end (its network and its own
    post-processing, as EfficientDet.detect), in the Detector's output form, and agrees with
    effdet's DetBenchPredict on the same weights."""
    pytest.importorskip("effdet")
    import dataclasses

    from effops.models import detection as D

    spec = dataclasses.replace(bm.MODELS["tf_efficientdet_d0"], size=128)
    original = bm.build_original(spec).eval()
    make, why = bm._effops_models_make(spec, original)
    assert why is None
    model = make()
    calls = []
    real = D._candidates_cpu
    monkeypatch.setattr(D, "_candidates_cpu", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (det, raw), (ref_det, ref_raw) = model(x), original(x)
    assert calls, "effops's post-processing did not run"
    assert det.shape == ref_det.shape == (2, 100, 6)
    torch.testing.assert_close(raw, ref_raw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det[..., 4].sort(dim=1).values, ref_det[..., 4].sort(dim=1).values, rtol=1e-4, atol=1e-5)
