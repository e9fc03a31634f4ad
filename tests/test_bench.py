"""The benchmark harness: every family's cases run (agreeing implementations, timed), rows land in
the CSV, and the README table is built from them. Quick sizes and short timing: a smoke test,
never a speed assertion (speed targets live in the benchmarks themselves)."""

from __future__ import annotations

import csv

import pytest

from effops.cli import main


@pytest.fixture
def keep_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_quick_all_families_writes_rows_and_table(tmp_path, capsys, keep_threads):
    assert main(["bench", "--quick", "--time", "0.02", "--threads", "1", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for fam in ("nms", "dwsep_conv", "weighted_fuse", "bifpn", "batch_norm_act", "model"):
        assert f"\n{fam} " in out, fam
    (path,) = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(open(path)))
    ops = {r["op"] for r in rows}
    assert {"nms", "batched_nms", "multiclass_nms", "soft_nms", "matrix_nms", "dwsep_conv", "weighted_fuse",
            "bifpn", "batch_norm_act", "model"} <= ops
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["ratio"]) > 0
        assert r["threads"] == "1"
    assert any(r["gbps"] and float(r["pct_of_copy"]) > 0 for r in rows if r["op"] == "dwsep_conv")

    assert main(["bench", "--table", "--results", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| op | case | dtype | effops ms |" in table
    n_cases = len({(r["op"], r["case"], r["dtype"]) for r in rows})
    assert table.count("\n| ") == n_cases + 1  # header + one row per case
    assert "Geometric mean speed-ups: " in table and "dwsep_conv (fp32) vs eager (channels_last)" in table


@pytest.mark.parametrize("argv, msg", [
    (["bench", "nope", "--quick", "--no-save"], "unknown family nope"),
    (["bench", "nms", "--device", "cuda", "--quick", "--no-save"], "no CUDA device"),
])
def test_bench_bad_arguments(argv, msg, capsys):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(argv) != 0
    assert msg in capsys.readouterr().err
