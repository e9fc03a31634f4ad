"""effops bench compress: the table of a record (ratios against effops fp32), the latest record per
device file, and (slow) a --quick run end to end: every variant timed, checked and tabled."""

from __future__ import annotations

import json

import pytest

from effops.bench import DEFAULT, FAMILIES, ON_REQUEST
from effops.bench.bench_compress import compress_table, compress_table_of


def _rec(ms_fp32=10.0, date="2026-12-02"):
    rows = [dict(variant="effops", params=4_000_000, macs=390_000_000, accuracy=0.98, ms_b1=ms_fp32, img_s_b8=100.0,
                 note=""),
            dict(variant="effops int8", params=4_000_000, macs=390_000_000, accuracy=0.975, ms_b1=5.0,
                 img_s_b8=150.0, note="")]
    return dict(device="CPU X", threads=1, torch="2.x", date=date, size=224, train=1438, val=359, base_epochs=10,
                epochs=5, in_channels=1, rows=rows)


def test_table_of_a_record():
    t = compress_table_of(_rec())
    assert "| effops fp32 | 4.00 M | 390 M | 98.00% | 10.00 (1.00x) | 100.0 (1.00x) |" in t
    assert "| effops int8 | 4.00 M | 390 M | 97.50% | 5.00 (2.00x) | 150.0 (1.50x) |" in t
    assert "1438 train / 359 held-out" in t and "at 224x224" in t


def test_table_reads_the_latest_record(tmp_path):
    assert "no compress results" in compress_table(str(tmp_path))
    with open(tmp_path / "compress-cpu-x.jsonl", "w") as f:
        f.write(json.dumps(_rec(20.0, "2026-01-01")) + "\n" + json.dumps(_rec(10.0)) + "\n")
    t = compress_table(str(tmp_path))
    assert "2026-12-02" in t and "2026-01-01" not in t and "10.00 (1.00x)" in t


def test_family_runs_only_when_named():
    assert "compress" in FAMILIES and "compress" in ON_REQUEST and "compress" not in DEFAULT


@pytest.mark.slow  # trains efficientnet_b0 for 2 epochs on 160 images, 4 int8 conversions: ~1-2 min
def test_quick_run_end_to_end(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("timm")
    from effops.cli import main

    assert main(["bench", "compress", "--quick", "--threads", "1", "--time", "0.2", "--results", str(tmp_path)]) == 0
    rec = json.loads((next(tmp_path.glob("compress-*.jsonl"))).read_text().splitlines()[-1])
    names = [r["variant"] for r in rec["rows"]]
    for want in ("effops", "effops pruned 30%", "effops pruned 50%", "effops pruned global", "effops int8",
                 "effops pruned 50% + int8", "effops distilled (pruned 50%)", "timm fp32 (eager)"):
        assert want in names, names
    by = {r["variant"]: r for r in rec["rows"]}
    assert by["effops pruned 50%"]["macs"] < by["effops pruned 30%"]["macs"] < by["effops"]["macs"]
    assert by["effops pruned global"]["macs"] <= 1.05 * by["effops pruned 50%"]["macs"]  # matched at 32 px
    assert by["timm fp32 (eager)"]["accuracy"] == by["effops"]["accuracy"]  # the same network
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms_b1"] > 0 for r in rec["rows"])
    assert "| effops fp32 |" in capsys.readouterr().out
    assert main(["bench", "compress", "--table", "--results", str(tmp_path)]) == 0
    assert "| effops int8 |" in capsys.readouterr().out
