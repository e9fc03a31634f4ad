"""What a user of an installed effops meets first: ``effops --version``, ``effops info`` without the
compiled CPU module, where ``effops bench`` writes by default, and ``effops bench --help``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import effops
from effops import _backend, cli
from effops.bench import FAMILIES


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"effops {effops.__version__} (torch ")


def test_bench_help_lists_families_and_environment(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    tail = out.split("families:", 1)[1]
    for fam in list(FAMILIES) + ["models"]:
        assert fam in tail.split("results:")[0], fam
    for var in ("EFFOPS_BACKEND", "EFFOPS_CUDA", "EFFOPS_NATIVE", "EFFOPS_PARALLEL", "EFFOPS_ISA"):
        assert var + "=" in out, var


def _fake_checkout(path):
    (path / "csrc").mkdir(parents=True)
    (path / "pyproject.toml").write_text('[project]\nname = "effops"\n')


def test_bench_results_default_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(_backend, "source_checkout", lambda: None)  # as for an installed wheel
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cli._default_results() == str(tmp_path / "cache" / "effops" / "bench" / "results")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli._default_results() == str(tmp_path / "home" / ".cache" / "effops" / "bench" / "results")
    # A directory that merely has a pyproject.toml of another project is not a checkout.
    (tmp_path / "csrc").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert cli._default_results().startswith(str(tmp_path / "home"))


def test_bench_results_default_in_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(_backend, "source_checkout", lambda: None)
    _fake_checkout(tmp_path / "co")
    monkeypatch.chdir(tmp_path / "co")
    assert cli._default_results() == str(tmp_path / "co" / "bench" / "results")
    root = _backend.__file__.rsplit(os.sep, 3)[0]
    monkeypatch.setattr(_backend, "source_checkout", lambda: root)  # effops runs from a checkout
    monkeypatch.chdir(tmp_path)
    assert cli._default_results() == os.path.join(root, "bench", "results")


def test_bench_writes_to_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_default_results", lambda: str(tmp_path / "rows"))
    assert cli.main(["bench", "nms", "--quick", "--time", "0.01", "--threads", "1"]) == 0
    assert list((tmp_path / "rows").glob("*.csv"))


def _copy_without_compiled_modules(dst):
    src = os.path.dirname(effops.__file__)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_C.*", "_cuda.*", "__pycache__"))


_RUN_INFO = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('_editable')]\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "import effops, effops.cli\n"
    "assert effops.__file__.startswith(sys.argv[1]), effops.__file__\n"
    "effops.cli.main(['info'])\n"
)


def _info_without_c(path_entry) -> str:
    r = subprocess.run([sys.executable, "-c", _RUN_INFO, str(path_entry)], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_info_without_the_compiled_module_installed(tmp_path):
    _copy_without_compiled_modules(tmp_path / "site" / "effops")
    out = _info_without_c(tmp_path / "site")
    assert "effops was installed without its compiled CPU module (effops._C)" in out
    assert "circular import" not in out
    assert "pip install --force-reinstall effops-*.whl" in out and "pip install ./effops" in out


def test_info_without_the_compiled_module_in_a_checkout(tmp_path):
    _fake_checkout(tmp_path / "co")
    _copy_without_compiled_modules(tmp_path / "co" / "python" / "effops")
    out = _info_without_c(tmp_path / "co" / "python")
    assert "effops was installed without its compiled CPU module (effops._C)" in out
    assert f"cd {tmp_path / 'co'} && pip install -e ." in out
