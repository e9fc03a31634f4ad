"""``import effops`` under a torch older than the supported minimum fails at once with an
ImportError naming the minimum (simulated by replacing torch.__version__ before the import)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from effops._compat import TORCH_MIN, check_torch, parse_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_with_torch_version(version: str) -> subprocess.CompletedProcess:
    code = f"import torch; torch.__version__ = {version!r}; import effops"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_old_torch_import_error_names_the_minimum():
    r = _import_with_torch_version("2.3.1+cpu")
    assert r.returncode != 0
    need = ".".join(map(str, TORCH_MIN))
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: effops needs torch >= " + need), r.stderr
    assert "torch 2.3.1+cpu is installed" in last


def test_supported_versions_import():
    need = ".".join(map(str, TORCH_MIN))
    r = _import_with_torch_version(need + ".0")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("v,want", [("2.4.0", (2, 4)), ("2.15.0a0+git1234", (2, 15)), ("2.5.1+cu121", (2, 5)),
                                    ("10.0", (10, 0))])
def test_parse_version(v, want):
    assert parse_version(v) == want


def test_check_torch_bounds():
    check_torch(f"{TORCH_MIN[0]}.{TORCH_MIN[1]}.0")
    check_torch("3.0.0")
    with pytest.raises(ImportError, match="needs torch >="):
        check_torch(f"{TORCH_MIN[0]}.{TORCH_MIN[1] - 1}.9")
    with pytest.raises(ImportError, match="cannot read the torch version"):
        check_torch("nightly")


def test_pyproject_bound_is_the_minimum():
    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.exists(path):
        pytest.skip("not a source checkout")
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", open(path).read(), re.M | re.S).group(1)
    m = re.search(r'"torch>=(\d+)\.(\d+)', deps)
    assert m, deps
    assert (int(m.group(1)), int(m.group(2))) == TORCH_MIN
