"""Packaging rules that are easy to lose in an edit: non-editable builds get their own build
directory (two installs of one checkout at once never share a ninja tree), editable builds stay
incremental, and CI installs and smoke-tests the built wheel."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
if not os.path.exists(PYPROJECT):
    pytest.skip("not a source checkout", allow_module_level=True)


def _skbuild():
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["tool"]["scikit-build"]


def test_only_editable_builds_use_a_fixed_build_dir():
    sk = _skbuild()
    assert "build-dir" not in sk, "a fixed build-dir makes concurrent non-editable builds share one ninja tree"
    editable = [o for o in sk.get("overrides", []) if o.get("if", {}).get("state") == "editable"]
    assert editable and editable[0].get("build-dir") == "build/{wheel_tag}"


def test_settings_per_state():
    reader = pytest.importorskip("scikit_build_core.settings.skbuild_read_settings")
    with open(PYPROJECT, "rb") as f:
        pp = tomllib.load(f)
    got = {}
    for state in ("wheel", "editable"):
        r = reader.SettingsReader(pp, {}, state=state)
        got[state] = r.settings.build_dir
    assert got == {"wheel": "", "editable": "build/{wheel_tag}"}


def test_ci_installs_and_smoke_tests_the_wheel():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        run = f.read()
    assert re.search(r"^EFFOPS_WHEEL_CUDA=.* bash \.ci/build-wheel ", run, re.M)
    assert re.search(r"^bash \.ci/wheel-smoke ", run, re.M)
    for script in ("build-wheel", "wheel-smoke", "torch-matrix", "gpu"):
        path = os.path.join(ROOT, ".ci", script)
        assert os.access(path, os.X_OK), f".ci/{script} must be executable"
