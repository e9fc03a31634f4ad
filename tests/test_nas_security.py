"""Run directories are untrusted (issue 14): nothing read from them executes code, and every
hostile value is a specific error naming the file, the line and the field."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from effops.nas import Genotype, ProxyConfig, SearchConfig, SearchError, export, load_exported, read_journal, run_search
from effops.nas.data import DataError, load_dataset
from effops.nas.evaluate import LatencyTable
from effops.nas.report import write_report
from effops.nas.space import GenotypeError, load_genotype

from test_nas_runner import config, fake_latency, fake_trial

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Evil:
    """Unpickling this calls os.system(cmd): what a crafted .pt file would do."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture()
def search_dir(tmp_path):
    out = tmp_path / "run"
    run_search(config(budget=4), str(out), trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    return out


def _rewrite_journal(out: Path, edit) -> None:
    lines = (out / "journal.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    edit(recs)
    (out / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


# ------------------------------------------------------------------------ 1. export .py
def test_export_py_is_built_from_validated_literals(search_dir, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"1\nimport os; os.system('touch {marker}')\n"
    # A string image_size in dataset.json: rejected, never formatted into code.
    info = json.loads((search_dir / "dataset.json").read_text())
    (search_dir / "dataset.json").write_text(json.dumps({**info, "image_size": payload}))
    with pytest.raises(SearchError, match=r"dataset\.json.*image_size must be an integer"):
        export(str(search_dir), str(tmp_path / "m.py"))
    (search_dir / "dataset.json").write_text(json.dumps(info))
    # A string trial id (or a genotype with a code-carrying op name) in the journal.
    journal = (search_dir / "journal.jsonl").read_text()
    _rewrite_journal(search_dir, lambda recs: recs[0].update(trial=payload))
    with pytest.raises(SearchError, match=r"journal\.jsonl: line 1: trial must be an integer"):
        export(str(search_dir), str(tmp_path / "m.py"), trial=0)

    def bad_op(recs):
        recs[0]["genotype"]["normal"]["blocks"][0][1] = "identity\"\"\"\nimport os\n\"\"\""

    (search_dir / "journal.jsonl").write_text(journal)
    _rewrite_journal(search_dir, bad_op)
    with pytest.raises(SearchError, match=r"line 1: genotype: .*unknown op"):
        export(str(search_dir), str(tmp_path / "m.py"))
    assert not (tmp_path / "m.py").exists()
    assert not marker.exists()


def test_export_py_with_a_hostile_search_path(tmp_path):
    # The search directory's own name carries quotes, a newline and code: it is written as a
    # string literal, so importing the module runs nothing but the template.
    marker = tmp_path / "pwned"
    out = tmp_path / f'r"""\nimport os; os.system("touch {marker}")\n"""'
    run_search(config(budget=3), str(out), trial_fn=fake_trial, latency_fn=fake_latency, report=False)
    module = tmp_path / "model.py"
    export(str(out), str(module))
    res = subprocess.run([sys.executable, str(module)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "parameters; output (1, " in res.stdout
    assert not marker.exists()
    src = module.read_text()
    assert f"SEARCH = {str(out)!r}" in src


# ------------------------------------------------------------------------ 2. no unpickling
def test_resume_refuses_a_crafted_checkpoint(search_dir, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"version": 1, "strategy": _Evil(f"touch {marker}")}, search_dir / "state.pt")
    with pytest.raises(SearchError, match=r"state\.pt: refused: the file holds Python objects"):
        run_search(config(budget=5), str(search_dir), resume=True, trial_fn=fake_trial, latency_fn=fake_latency)
    assert not marker.exists()


@pytest.mark.parametrize("state, message", [
    ([1, 2], "must be a JSON object"),
    ({"version": 1}, "missing field"),
    ({"version": 2, "strategy": {}, "next_trial": 0, "pending": [], "observed": []}, "version 2 is not supported"),
    ({"version": 1, "strategy": {}, "next_trial": -1, "pending": [], "observed": []}, "next_trial must be in"),
    ({"version": 1, "strategy": {"strategy": "evolution"}, "next_trial": 4, "pending": [], "observed": [0, 1, 2, 3]},
     "strategy state does not fit"),
    ({"version": 1, "strategy": {}, "next_trial": 4, "pending": [{"trial": 9}], "observed": []}, r"pending\[0\]"),
])
def test_resume_rejects_a_malformed_checkpoint(search_dir, state, message):
    torch.save(state, search_dir / "state.pt")
    with pytest.raises(SearchError, match=message):
        run_search(config(budget=5), str(search_dir), resume=True, trial_fn=fake_trial, latency_fn=fake_latency)


def test_dataset_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"images": torch.zeros(4, 8, 8), "labels": _Evil(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="refused: the file holds Python objects"):
        load_dataset(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    # What a dataset legitimately is still loads: dict of tensors, tuple, TensorDataset.
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 2
    torch.save(torch.utils.data.TensorDataset(x, y), tmp_path / "td.pt")
    torch.save((x, y), tmp_path / "tuple.pt")
    for f in ("td.pt", "tuple.pt"):
        assert load_dataset(str(tmp_path / f)).num_classes == 2


# ------------------------------------------------------------------------ 3. hostile JSON
def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("text", [_deep(100_000), '{"normal": ' * 60_000 + "1" + "}" * 60_000])
def test_deeply_nested_genotype(text):
    with pytest.raises(GenotypeError, match="nested too deeply"):
        Genotype.from_json(text)


def test_deeply_nested_genotype_argument(tmp_path):
    text = '{"normal": ' * 60_000 + "1" + "}" * 60_000
    with pytest.raises(GenotypeError, match="--genotype: genotype JSON in JSON text: .*nested too deeply"):
        load_genotype(text, "--genotype")
    (tmp_path / "g.json").write_text(text)
    with pytest.raises(GenotypeError, match="g.json.*nested too deeply"):
        load_genotype(str(tmp_path / "g.json"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: _deep(50_000), "nested too deeply"),
    (lambda d: '{"budget": ' + "9" * 5000 + "}", "invalid JSON"),
    (lambda d: "[1, 2]", "must be a JSON object, got list"),
    (lambda d: json.dumps({**d, "proxy": None}), "proxy: must be a JSON object, got NoneType"),
    (lambda d: json.dumps({**d, "proxy": {**d["proxy"], "learning_rate": 1}}), r"unknown field\(s\) \['learning_rate'\]"),
    (lambda d: json.dumps({**d, "surprise": 1}), r"unknown field\(s\) \['surprise'\]"),
    (lambda d: json.dumps({**d, "budget": 10**30}), r"budget must be in \[1, 1000000\], got 1000000000000"),
    (lambda d: json.dumps({**d, "budget": "5"}), "budget must be an integer, got '5'"),
    (lambda d: json.dumps({**d, "proxy": {**d["proxy"], "epochs": 1.5}}), "proxy: epochs must be an integer"),
    (lambda d: json.dumps({**d, "proxy": {**d["proxy"], "lr": float("nan")}}), "lr must be a finite number"),
    (lambda d: json.dumps({**d, "proxy": {**d["proxy"], "device": "gpu9"}}), "device must be a torch device"),
    (lambda d: json.dumps({**d, "ops": "conv_3x3"}), "ops must be null or a list"),
    (lambda d: json.dumps({**d, "progress": "yes"}), "progress must be true or false"),
])
def test_hostile_config_json(search_dir, edit, message):
    d = json.loads((search_dir / "config.json").read_text())
    (search_dir / "config.json").write_text(edit(d))
    with pytest.raises(SearchError, match=message) as e:
        run_search(config(budget=5), str(search_dir), resume=True, trial_fn=fake_trial, latency_fn=fake_latency)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("line, message", [
    ("5", r"line 2: a journal record must be a JSON object, got 5"),
    ("{}", r"line 2: the record lacks field\(s\) \['trial'"),
    ('{"trial": 1, "genotype": {}, "seed": 1, "reward": 0.5, "accuracy": 0.5, "latency_ms": 1}',
     "line 2: genotype: genotype JSON is missing key"),
    (_deep(100_000), "line 2: the JSON is nested too deeply"),
    ('{"trial": ' + "1" * 5000 + "}", "line 2: invalid JSON"),
    ("\xff\xfe", "line 2 is not UTF-8"),
])
def test_hostile_journal_lines(search_dir, line, message):
    lines = (search_dir / "journal.jsonl").read_bytes().splitlines(keepends=True)
    data = lines[0] + (line.encode("latin-1") if line.startswith("\xff") else line.encode()) + b"\n" + b"".join(lines[1:])
    (search_dir / "journal.jsonl").write_bytes(data)
    with pytest.raises(SearchError, match=message) as e:
        read_journal(str(search_dir))
    assert "journal.jsonl" in str(e.value)


def test_hostile_journal_values(search_dir):
    for field, value, message in [("reward", float("inf"), "reward must be a finite number"),
                                  ("accuracy", "high", "accuracy must be a number"),
                                  ("params", -1, "params must be in"),
                                  ("trial", True, "trial must be an integer")]:
        journal = (search_dir / "journal.jsonl").read_text()
        _rewrite_journal(search_dir, lambda recs: recs[2].update({field: value}))
        with pytest.raises(SearchError, match=f"line 3: {message}"):
            write_report(str(search_dir))
        (search_dir / "journal.jsonl").write_text(journal)
    write_report(str(search_dir))  # the untouched run still reports


def test_duplicate_trial_names_both_lines(search_dir):
    _rewrite_journal(search_dir, lambda recs: recs[3].update(trial=recs[1]["trial"]))
    with pytest.raises(SearchError, match=r"trial 1 appears twice in the journal \(records 2 and 4\)"):
        read_journal(str(search_dir))


def test_hostile_exported_json_and_latency_table(tmp_path, search_dir):
    export(str(search_dir), str(tmp_path / "net.json"))
    doc = json.loads((tmp_path / "net.json").read_text())
    for build, message in [({**doc["build"], "C": "8"}, "build.C must be an integer"),
                           ({**doc["build"], "evil": 1}, r"unknown field\(s\) \['evil'\]"),
                           ({**doc["build"], "N": 10**9}, r"build.N must be in \[1, 1048576\]")]:
        (tmp_path / "bad.json").write_text(json.dumps({**doc, "build": build}))
        with pytest.raises(GenotypeError, match=message):
            load_exported(str(tmp_path / "bad.json"))
    (tmp_path / "deep.json").write_text(_deep(100_000))
    with pytest.raises(GenotypeError, match="nested too deeply"):
        load_exported(str(tmp_path / "deep.json"))
    assert load_exported(str(tmp_path / "net.json")) is not None
    for table, message in [({"entries": {"a": "fast"}}, "must be a number"),
                           ({"entries": []}, "entries must be a JSON object"),
                           ({"entries": {}, "calibration": {"scale": -1, "offset": 0}}, "calibration.scale"),
                           ([], "must be a JSON object")]:
        (tmp_path / "lat.json").write_text(json.dumps(table))
        with pytest.raises(ValueError, match=message):
            LatencyTable("cpu", path=str(tmp_path / "lat.json"))


def test_search_config_from_dict_round_trips_and_is_strict():
    cfg = config()
    assert SearchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match=r"proxy: unknown field\(s\) \['epoch'\]"):
        SearchConfig.from_dict({"proxy": {"epoch": 3}})
    with pytest.raises(ValueError, match="proxy: val_fraction must be in"):
        ProxyConfig.from_dict({"val_fraction": 1.0})


# ------------------------------------------------------------------------ crash safety
_DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import test_nas_runner as t
    from effops.nas import run_search

    def slow_trial(payload):
        time.sleep(0.03)
        return t.fake_trial(payload)

    resume = sys.argv[2] == "resume"
    run_search(t.config(budget=16, strategy=sys.argv[3]), sys.argv[1], resume=resume, trial_fn=slow_trial,
               latency_fn=t.fake_latency, report=False)
""")


@pytest.mark.parametrize("strategy", ["evolution", pytest.param("reinforce", marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_loses_and_repeats_nothing(tmp_path, strategy):
    """The search process is SIGKILLed several times - at random delays and right after a
    journal line appears - and resumed; the result is exactly the uninterrupted search."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, out = tmp_path / "ref", tmp_path / "run"
    subprocess.run([sys.executable, str(driver), str(ref), "new", strategy], check=True, env=env, timeout=300)
    rng = random.Random(1234)
    journal = out / "journal.jsonl"
    started = False
    for kill in range(6):
        n_before = len(journal.read_bytes().splitlines()) if journal.exists() else 0
        proc = subprocess.Popen([sys.executable, str(driver), str(out), "resume" if started else "new", strategy],
                                env=env, stderr=subprocess.PIPE)
        if kill % 2 == 0:  # right after a new journal line is written
            deadline = time.time() + 120
            while (not journal.exists() or len(journal.read_bytes().splitlines()) <= n_before) and proc.poll() is None:
                assert time.time() < deadline
                time.sleep(0.002)
        else:  # at a random moment (start-up, mid-trial, mid-checkpoint)
            time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        started = started or (out / "config.json").exists()
        if journal.exists():
            ids = [json.loads(line)["trial"] for line in journal.read_bytes().splitlines() if line.endswith(b"}")]
            assert len(ids) == len(set(ids)), f"a trial repeated after kill {kill}"
    subprocess.run([sys.executable, str(driver), str(out), "resume" if started else "new", strategy], check=True,
                   env=env, timeout=300)

    def stable(path):
        return [{k: v for k, v in r.items() if k != "finished_at"} for r in read_journal(str(path))]

    assert stable(out) == stable(ref)
