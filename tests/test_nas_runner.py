"""effops.nas runs: journal, crash/resume, process pool, Ray, report, export, CLI errors."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from effops.cli import main as effops_main
from effops.nas import (
    OPS,
    Genotype,
    ProxyConfig,
    SearchConfig,
    SearchError,
    build,
    count_params,
    export,
    load_exported,
    pareto_front,
    read_journal,
    run_search,
)
from effops.nas.runner import Search, TrialError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


_TARGET = np.random.default_rng(7).integers(0, 1000, size=200)
CALLS = {"n": 0}


def fake_trial(payload):
    """A deterministic stand-in for proxy training: "accuracy" = the fraction of choices that
    match a hidden target (any space)."""
    CALLS["n"] += 1
    g = Genotype.from_dict(payload["genotype"])
    hits, n = 0, 0
    for c, cell in enumerate((g.normal, g.reduce)):
        for i, b in enumerate(cell.blocks):
            for j, (state, op) in enumerate(((b.input_a, b.op_a), (b.input_b, b.op_b))):
                k = 2 * (4 * i + 2 * j + 40 * c)
                hits += (op == OPS[_TARGET[k] % len(OPS)]) + (state == _TARGET[k + 1] % (2 + i))
                n += 2
    acc = hits / n
    return {"accuracy": acc, "val_loss": 1 - acc, "train_loss": 0.0, "params": 1000 + hits,
            "flops": 10_000 + hits, "train_seconds": 0.0}


def fake_latency(g: Genotype) -> float:
    return 1.0 + 0.1 * sum(op.startswith(("sep", "conv")) for c in (g.normal, g.reduce) for b in c.blocks
                           for op in (b.op_a, b.op_b))


def config(**kw) -> SearchConfig:
    base = dict(strategy="evolution", budget=12, population=4, sample=2, progress=False, seed=1,
                proxy=ProxyConfig(max_samples=100, threads=1))
    base.update(kw)
    return SearchConfig(**base)


def stable(records):
    return [{k: v for k, v in r.items() if k != "finished_at"} for r in records]


class Crash(Exception):
    pass


def crash_on_save(monkeypatch, call: int, after: bool):
    """Make the call-th checkpoint write crash (before or after writing)."""
    original = Search._save_state
    count = {"n": 0}

    def save(self):
        count["n"] += 1
        if count["n"] == call:
            if after:
                original(self)
            raise Crash(f"killed at checkpoint write {call}")
        original(self)

    monkeypatch.setattr(Search, "_save_state", save)


@pytest.mark.parametrize("strategy", ["evolution", "reinforce", "random"])
def test_resume_after_crashes_is_exactly_the_uninterrupted_search(tmp_path, monkeypatch, strategy):
    cfg = dict(strategy=strategy)
    reference = run_search(config(**cfg), str(tmp_path / "ref"), trial_fn=fake_trial, latency_fn=fake_latency,
                           report=False)
    assert [r["trial"] for r in reference] == list(range(12))
    out = str(tmp_path / "run")
    # Crash at the n-th checkpoint write of each run, before or after the write: a finished
    # trial journaled but not checkpointed, a proposal checkpointed but not started, a
    # proposal lost before its checkpoint, a finish fully written.
    crashes = [(3, False), (6, True), (8, False), (3, False), (2, True)]
    resume = False
    for call, after in crashes:
        crash_on_save(monkeypatch, call, after)
        with pytest.raises(Crash):
            run_search(config(**cfg), out, resume=resume, trial_fn=fake_trial, latency_fn=fake_latency, report=False)
        monkeypatch.undo()
        resume = True
        records = read_journal(out)
        ids = [r["trial"] for r in records]
        assert len(ids) == len(set(ids)) and 0 < len(ids) < 12
    final = run_search(config(**cfg), out, resume=True, trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    assert stable(final) == stable(reference)
    state = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    assert state["strategy"]["num_observed"] == 12 and state["pending"] == []


def test_crash_inside_a_trial_and_a_torn_journal_line(tmp_path):
    out = str(tmp_path / "run")
    seen = {"n": 0}

    def flaky(payload):
        seen["n"] += 1
        if seen["n"] == 5:
            raise Crash("worker died")
        return fake_trial(payload)

    with pytest.raises(TrialError, match=r"trial 4 failed: Crash: worker died; .*--resume") as e:
        run_search(config(), out, trial_fn=flaky, latency_fn=fake_latency, report=False)
    assert isinstance(e.value.error, Crash)
    assert len(read_journal(out)) == 4
    with open(os.path.join(out, "journal.jsonl"), "ab") as f:
        f.write(b'{"trial": 4, "genotype": {"norm')  # the run died while writing a line
    records = run_search(config(), out, resume=True, trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    reference = run_search(config(), str(tmp_path / "ref"), trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    assert stable(records) == stable(reference)
    text = Path(out, "journal.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())


def test_duplicate_genotypes_are_not_retrained(tmp_path):
    tiny = dict(num_blocks=1, ops=["identity", "conv_1x1"], strategy="random", budget=40)
    CALLS["n"] = 0
    records = run_search(config(**tiny), str(tmp_path / "run"), trial_fn=fake_trial, latency_fn=fake_latency,
                         report=False)
    assert len(records) == 40 and [r["trial"] for r in records] == list(range(40))
    keys = [json.dumps(r["genotype"], sort_keys=True) for r in records]
    reused = [r for r in records if "reused_from" in r]
    assert reused and CALLS["n"] == len(set(keys)) == 40 - len(reused)
    by_trial = {r["trial"]: r for r in records}
    for r in reused:
        src = by_trial[r["reused_from"]]
        assert r["genotype"] == src["genotype"] and r["accuracy"] == src["accuracy"] and "reused_from" not in src


def test_search_directory_rules(tmp_path):
    out = str(tmp_path / "run")
    run_search(config(budget=3), out, trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    with pytest.raises(SearchError, match="already holds a search; pass --resume"):
        run_search(config(budget=3), out, trial_fn=fake_trial, latency_fn=fake_latency)
    with pytest.raises(SearchError, match="settings differ from the saved search .*population: saved 4, given 5"):
        run_search(config(budget=3, population=5), out, resume=True, trial_fn=fake_trial, latency_fn=fake_latency)
    with pytest.raises(SearchError, match="holds no search"):
        run_search(config(), str(tmp_path / "empty"), resume=True, trial_fn=fake_trial, latency_fn=fake_latency)
    # A larger budget continues the search.
    more = run_search(config(budget=5), out, resume=True, trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    assert [r["trial"] for r in more] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="budget must be in \\[1, 1000000\\], got 0"):
        config(budget=0)
    with pytest.raises(ValueError, match="workers must be in \\[1, 4096\\]"):
        config(workers=-1)


def test_mnas_objective_in_the_journal(tmp_path):
    records = run_search(config(objective="mnas", target_latency_ms=2.0, budget=4), str(tmp_path / "run"),
                         trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    for r in records:
        assert r["latency_ms"] == fake_latency(Genotype.from_dict(r["genotype"]))
        assert r["reward"] == pytest.approx(r["accuracy"] * (r["latency_ms"] / 2.0) ** -0.07)


def test_report_and_export(tmp_path):
    import matplotlib.image

    out = str(tmp_path / "run")
    records = run_search(config(budget=10), out, trial_fn=fake_trial, latency_fn=fake_latency)
    for name in ("report.md", "report.json", "best_genotype.json", "pareto.png", "best_cell.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    for png in ("pareto.png", "best_cell.png"):
        img = matplotlib.image.imread(os.path.join(out, png))
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    rep = json.load(open(os.path.join(out, "report.json")))
    best = max(records, key=lambda r: (r["reward"], -r["trial"]))
    assert rep["best"][0]["trial"] == best["trial"]
    assert [r["trial"] for r in rep["pareto_front"]] == [records[i]["trial"] for i in pareto_front(records)]
    g = Genotype.from_json(Path(out, "best_genotype.json").read_text())
    assert g.to_dict() == best["genotype"]
    assert str(g).splitlines()[0] in Path(out, "report.md").read_text()

    doc = export(out, str(tmp_path / "model.json"))
    net = load_exported(str(tmp_path / "model.json"))
    expected = build(g, 8, 1, 10, in_channels=1)
    assert count_params(net) == count_params(expected) and doc["trial"] == best["trial"]
    assert net(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert count_params(load_exported(str(tmp_path / "model.json"), C=12)) > count_params(net)

    second = export(out, str(tmp_path / "second.py"), rank=2)
    assert second["trial"] == sorted(records, key=lambda r: (-r["reward"], r["trial"]))[1]["trial"]
    mod = runpy.run_path(str(tmp_path / "second.py"))
    assert mod["GENOTYPE"].to_dict() == second["genotype"]
    assert mod["model"]()(torch.zeros(1, 1, 16, 16)).shape == (1, 10)
    assert effops_main(["nas", "export", out, "--out", str(tmp_path / "m.py"), "--trial", "3"]) == 0
    assert runpy.run_path(str(tmp_path / "m.py"))["GENOTYPE"].to_dict() == records[3]["genotype"]


# ------------------------------------------------------------------------------ CLI errors
@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "--out", "X", "--budget", "0"], "argument --budget: must be >= 1, got 0"),
        (["search", "--out", "X", "--budget", "-3"], "argument --budget: must be >= 1, got -3"),
        (["search", "--out", "X", "--ops", "identity,sep_conv_4x4"], "argument --ops: unknown op 'sep_conv_4x4'"),
        (["search", "--out", "X", "--target-latency", "0"], "argument --target-latency: must be a finite number > 0"),
        (["search", "--out", "X", "--strategy", "annealing"], "argument --strategy: invalid choice: 'annealing'"),
    ],
)
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        effops_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert effops_main(["search", "--out", out, "--data", "/nonexistent/digits"]) == 2
    assert "effops search: error: data: '/nonexistent/digits' does not exist" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "config.json"))  # nothing written
    assert effops_main(["search", "--out", out, "--objective", "mnas"]) == 2
    assert "objective 'mnas' needs a target latency (--target-latency MS)" in capsys.readouterr().err
    assert effops_main(["search", "--out", out, "--resume"]) == 2
    assert "holds no search" in capsys.readouterr().err
    assert effops_main(["nas", "show", '{"normal": oops'] ) == 2
    assert "invalid JSON" in capsys.readouterr().err
    assert effops_main(["nas", "show", '{"normal": {"blocks": [[0, "conv_2x2", 1, "identity"]]}, '
                                       '"reduce": {"blocks": [[0, "identity", 1, "identity"]]}}']) == 2
    assert "unknown op 'conv_2x2'" in capsys.readouterr().err
    assert effops_main(["nas", "show", "nasnet-a"]) == 0
    assert "C=44 N=4 classes=1000 stem=imagenet: 5,287,076 parameters" in capsys.readouterr().out
    run_search(config(budget=2), out, trial_fn=fake_trial, latency_fn=fake_latency)
    assert effops_main(["nas", "export", out, "--out", str(tmp_path / "m.txt")]) == 2
    assert "--out must end in .py or .json" in capsys.readouterr().err
    assert effops_main(["nas", "export", out, "--out", str(tmp_path / "m.py"), "--rank", "9"]) == 2
    assert "--rank must be in 1..2, got 9" in capsys.readouterr().err
    assert effops_main(["search", "--out", out, "--resume", "--epochs", "5"]) == 2
    assert "--resume: --epochs 5 differs from the saved search's 3" in capsys.readouterr().err


def test_cli_evaluate_with_latency_matching(tmp_path, capsys):
    out = str(tmp_path / "run")
    run_search(config(budget=3), out, trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    argv = ["nas", "evaluate", out, "--epochs", "1", "--data-seed", "1"]
    assert effops_main(argv + ["--genotype", "baseline", "--channels", "4"]) == 0
    text = capsys.readouterr().out
    assert "C=4 N=1 epochs=1: accuracy" in text and "ms (whole forward)" in text and "42,530" not in text
    assert effops_main(argv + ["--genotype", "best", "--match-latency", "baseline"]) == 0
    text = capsys.readouterr().out
    assert "--match-latency baseline: C = " in text and "(whole forward; baseline: " in text
    assert effops_main(argv + ["--genotype", "trial:7"]) == 2
    assert "trial 7 is not in the journal" in capsys.readouterr().err
    assert effops_main(argv + ["--genotype", "missing.json"]) == 2
    assert "--genotype: 'missing.json' is neither a named genotype" in capsys.readouterr().err


# ------------------------------------------------------------------------------ real runs
def _journal_lines(path: Path):
    if not path.exists():
        return []
    data = path.read_bytes()
    return data.split(b"\n")[:-1]  # complete lines only


def test_killed_search_resumes_without_loss_or_repeats(tmp_path):
    """A real search (process pool, proxy training on digits) is SIGKILLed mid-run, resumed
    with --resume, and finishes with every trial exactly once."""
    out = tmp_path / "run"
    budget = 8
    argv = [sys.executable, "-m", "effops.cli", "search", "--out", str(out), "--budget", str(budget),
            "--epochs", "1", "--workers", "2", "--max-samples", "300", "--channels", "4",
            "--population", "3", "--sample", "2", "--seed", "5"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv + ["--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    journal = out / "journal.jsonl"
    deadline = time.time() + 240
    try:
        while len(_journal_lines(journal)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the search finished no trial in 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool workers, no chance to clean up
        proc.wait()
    before = _journal_lines(journal)
    assert 2 <= len(before) < budget, "the kill must land mid-run"
    done = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{budget}/{budget}" in done.stderr  # the progress bar
    after = _journal_lines(journal)
    assert after[: len(before)] == before  # finished trials kept, byte for byte
    records = [json.loads(line) for line in after]
    ids = [r["trial"] for r in records]
    assert len(records) == budget and len(set(ids)) == budget
    by_trial = {r["trial"]: r for r in records}
    for r in records:
        if "reused_from" in r:  # a genotype proposed again: reused, not retrained
            assert by_trial[r["reused_from"]]["genotype"] == r["genotype"]
    trained = [r for r in records if "reused_from" not in r]
    assert len({json.dumps(r["genotype"], sort_keys=True) for r in trained}) == len(trained)  # none trained twice
    assert all(r["pid"] != proc.pid and 0 <= r["accuracy"] <= 1 and r["latency_ms"] > 0 for r in trained)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["strategy"]["num_observed"] == budget and state["pending"] == []
    assert state["strategy"]["num_proposed"] >= budget
    for name in ("report.md", "pareto.png", "best_cell.png", "best_genotype.json"):
        assert (out / name).exists()


def test_ray_backend_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'effops[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = config(backend="ray", workers=2, budget=4, proxy=ProxyConfig(max_samples=200, epochs=1, channels=4,
                                                                           threads=1))
        records = run_search(cfg, str(tmp_path / "run"), report=False)
        assert ray.is_initialized()  # the search used, and left alone, the caller's Ray instance
    finally:
        ray.shutdown()
    assert sorted(r["trial"] for r in records) == [0, 1, 2, 3]  # journal order = finishing order
    assert all(r["pid"] != os.getpid() for r in records)  # trained in Ray worker processes
    assert all(0 <= r["accuracy"] <= 1 and r["params"] > 0 and r["latency_ms"] > 0 for r in records)
