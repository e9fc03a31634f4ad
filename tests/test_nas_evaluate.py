"""effops.nas evaluation: datasets, proxy training, FLOPs, the latency table, objectives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from effops.nas import (
    HANDMADE_BASELINE,
    DataError,
    LatencyTable,
    NASNetSpace,
    Objective,
    ProxyConfig,
    TableLatency,
    build,
    count_flops,
    load_dataset,
    mnas_reward,
    pareto_front,
    proxy_train,
)
from effops.nas.evaluate import match_channels, trace_latency_keys


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ data
def test_digits_default_split():
    ds = load_dataset("digits")
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 16
    assert len(ds.train_y) + len(ds.val_y) == 1797
    assert abs(len(ds.val_y) / 1797 - 0.2) < 0.01
    assert sorted(set(ds.val_y.tolist())) == list(range(10))  # stratified: every class held out
    assert abs(float(ds.train_x.mean())) < 1e-4 and abs(float(ds.train_x.std()) - 1) < 1e-2
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.val_y, ds.val_y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.val_x, ds.val_x)
    small = load_dataset("digits", image_size=8, max_samples=100)
    assert small.image_size == 8 and len(small.train_y) + len(small.val_y) == 100


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path), image_size=12)
    assert ds.num_classes == 3 and ds.in_channels == 3 and ds.image_size == 12
    assert len(ds.train_y) + len(ds.val_y) == 15 and len(ds.val_y) == 3
    assert load_dataset(str(tmp_path)).image_size == 32  # folder default


def test_tensor_files(tmp_path):
    x = torch.randint(0, 256, (40, 2, 10, 10), dtype=torch.uint8)
    y = torch.arange(40) % 4
    torch.save({"images": x, "labels": y}, tmp_path / "d.pt")
    ds = load_dataset(str(tmp_path / "d.pt"))
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (4, 2, 10)
    torch.save((x.float()[:, 0], y), tmp_path / "t.pt")  # [N, H, W] tuple
    assert load_dataset(str(tmp_path / "t.pt")).in_channels == 1
    torch.save(torch.utils.data.TensorDataset(x.float(), y), tmp_path / "td.pt")
    assert load_dataset(str(tmp_path / "td.pt"), image_size=6).image_size == 6
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    assert load_dataset(str(tmp_path / "d.npz")).num_classes == 4


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data: '/nonexistent/x' does not exist"):
        load_dataset("/nonexistent/x")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="data: '.*garbage.pt': cannot read"):
        load_dataset(str(tmp_path / "garbage.pt"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="neither a directory nor a .pt/.pth/.npz file"):
        load_dataset(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot read the image folder"):
        load_dataset(str(tmp_path / "empty"))
    torch.save({"pixels": torch.zeros(4, 3, 3)}, tmp_path / "nokeys.pt")
    with pytest.raises(DataError, match="has no images"):
        load_dataset(str(tmp_path / "nokeys.pt"))
    torch.save({"x": torch.zeros(4, 3, 3), "y": torch.zeros(4)}, tmp_path / "floaty.pt")
    with pytest.raises(DataError, match="labels .* must be integers"):
        load_dataset(str(tmp_path / "floaty.pt"))
    torch.save({"x": torch.zeros(4, 3, 3), "y": torch.zeros(5, dtype=torch.long)}, tmp_path / "short.pt")
    with pytest.raises(DataError, match=r"must be \[N\] with N = 4"):
        load_dataset(str(tmp_path / "short.pt"))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_dataset("digits", val_fraction=1.0)


def test_unreadable_data_path(tmp_path, monkeypatch):
    torch.save({"x": torch.zeros(4, 3, 3), "y": torch.arange(4)}, tmp_path / "locked.pt")
    import effops.nas.data as data_mod

    # Tests may run as root, for whom chmod 000 does not stop reading: deny access instead.
    monkeypatch.setattr(data_mod.os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match="data: '.*locked.pt' is not readable \\(permission denied\\)"):
        load_dataset(str(tmp_path / "locked.pt"))


# ------------------------------------------------------------------------------ training
TINY = dict(max_samples=400, channels=4, epochs=1, batch_size=32, threads=1)


def test_proxy_training_learns_and_is_deterministic():
    g = NASNetSpace().sample(0)
    learned = proxy_train(g, ProxyConfig(max_samples=600, channels=4, epochs=2, batch_size=32, threads=1), seed=0)
    assert learned["accuracy"] > 0.5  # chance is 0.1
    cfg = ProxyConfig(**TINY)
    a = proxy_train(HANDMADE_BASELINE, cfg, seed=0)
    b = proxy_train(HANDMADE_BASELINE, cfg, seed=0)
    assert a["accuracy"] == b["accuracy"] and a["val_loss"] == b["val_loss"] and a["train_loss"] == b["train_loss"]
    c = proxy_train(HANDMADE_BASELINE, cfg, seed=1)
    assert c["train_loss"] != a["train_loss"]
    assert a["params"] == sum(p.numel() for p in cfg.build(HANDMADE_BASELINE).parameters())
    assert a["flops"] == count_flops(cfg.build(HANDMADE_BASELINE), (1, 1, 16, 16))


def test_proxy_config_errors():
    with pytest.raises(ValueError, match="epochs must be an integer in \\[1, 100000\\]"):
        ProxyConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be a finite number in \\(0.0"):
        ProxyConfig(lr=0)


def test_count_flops_of_a_conv():
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(5 * 8 * 8, 2))
    assert count_flops(net, (4, 3, 8, 8)) == 2 * (3 * 5 * 9 * 64) + 2 * (320 * 2)
    small = count_flops(build(HANDMADE_BASELINE, 4, 1, 10, in_channels=1), (1, 1, 16, 16))
    big = count_flops(build(HANDMADE_BASELINE, 8, 1, 10, in_channels=1), (1, 1, 16, 16))
    assert 0 < small < big


# ------------------------------------------------------------------------------ latency
def fast_table(**kw):
    return LatencyTable(repeats=1, min_time_s=0.0, **kw)


def test_latency_table_times_each_configuration_once(tmp_path):
    cfg = ProxyConfig(**TINY, cells=2)
    net = cfg.build(HANDMADE_BASELINE)
    calls = trace_latency_keys(net, (1, 1, 16, 16))
    distinct = {(s, sh) for s, sh in calls}
    assert len(distinct) < len(calls)  # repeated cells share entries
    table = fast_table(path=str(tmp_path / "lat.json"))
    ms = table.estimate(net, (1, 1, 16, 16))
    assert table.measurements == len(distinct)
    assert ms == pytest.approx(sum(table.entries[table.key(s, sh)] for s, sh in calls))
    assert table.estimate(net, (1, 1, 16, 16)) == ms and table.measurements == len(distinct)
    reloaded = fast_table(path=str(tmp_path / "lat.json"))
    assert reloaded.estimate(net, (1, 1, 16, 16)) == ms and reloaded.measurements == 0


def test_latency_table_warm_covers_the_space():
    cfg = ProxyConfig(**TINY)
    space = NASNetSpace()
    table = fast_table()
    assert table.warm(space, cfg) > 50
    lat = TableLatency(table, cfg)
    n = table.measurements
    rng = np.random.default_rng(0)
    for _ in range(25):
        assert lat(space.sample(rng)) > 0
    lat(HANDMADE_BASELINE)
    assert table.measurements == n  # every configuration was timed by warm()
    assert table.warm(space, cfg) == 0


def test_latency_grows_with_width_and_match_channels():
    cfg = ProxyConfig(**TINY)
    table = fast_table()
    lat = TableLatency(table, cfg)
    # A fake latency keeps the search deterministic; the table's own monotonicity is noisy.
    calls = []

    def fake(c):
        calls.append(c)
        return 0.5 * c

    assert match_channels(fake, 10.2, start=4) == (20, 10.0)  # the widest no slower than the target
    assert len(calls) == len(set(calls)) < 12  # cached, and a bracket + bisection, not a scan
    assert match_channels(fake, 9.9, start=64) == (19, 9.5)
    assert match_channels(fake, 1.0, start=64) == (2, 1.0)
    assert match_channels(fake, 0.1, start=8) == (2, 1.0)  # nothing is fast enough: the smallest
    assert match_channels(fake, 1e9, start=8, c_max=100) == (100, 50.0)
    # measured latencies: the least disturbed of 5 timings and a 16x width gap, so that a loaded
    # machine (one timing per entry in fast_table) cannot invert them
    steady = TableLatency(LatencyTable(repeats=5, min_time_s=0.002), cfg)
    assert steady(HANDMADE_BASELINE, 64) > steady(HANDMADE_BASELINE, 4)


# ------------------------------------------------------------------------------ objectives
def test_mnas_reward():
    assert mnas_reward(0.9, 5.0, 5.0) == pytest.approx(0.9)
    assert mnas_reward(0.9, 10.0, 5.0) == pytest.approx(0.9 * 2 ** -0.07)
    assert mnas_reward(0.9, 2.5, 5.0) == pytest.approx(0.9 * 0.5 ** -0.07)
    obj = Objective("mnas", 5.0)
    assert obj({"accuracy": 0.8, "latency_ms": 20.0}) == pytest.approx(0.8 * 4 ** -0.07)
    assert Objective("accuracy")({"accuracy": 0.8, "latency_ms": 20.0}) == 0.8
    with pytest.raises(ValueError, match="needs a target latency"):
        Objective("mnas")
    with pytest.raises(ValueError, match="target latency must be a finite number > 0"):
        Objective("mnas", -1.0)
    with pytest.raises(ValueError, match="objective must be 'accuracy' or 'mnas'"):
        Objective("flops")


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        pts = [{"accuracy": float(rng.integers(0, 6)), "latency_ms": float(rng.integers(0, 6))} for _ in range(n)]
        front = pareto_front(pts)

        def dominated(i):
            return any(
                (p["accuracy"] >= pts[i]["accuracy"] and p["latency_ms"] <= pts[i]["latency_ms"]
                 and (p["accuracy"] > pts[i]["accuracy"] or p["latency_ms"] < pts[i]["latency_ms"]))
                for p in pts
            )

        expected = {(pts[i]["accuracy"], pts[i]["latency_ms"]) for i in range(n) if not dominated(i)}
        assert {(pts[i]["accuracy"], pts[i]["latency_ms"]) for i in front} == expected
        assert len(front) == len(expected)  # identical points appear once
        lats = [pts[i]["latency_ms"] for i in front]
        assert lats == sorted(lats) and all(not math.isnan(v) for v in lats)
