"""The README stays true: its Python examples run, and its test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_readme_python_example_runs(i, capsys):
    exec(compile(python_blocks()[i], f"README.md[python block {i}]", "exec"), {})


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert any("effops bench" in b for b in bash), "main job command missing"
    assert "<!-- test-command -->" in text and any("pytest" in b for b in bash), "test command missing"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "test-command" in ci, ".ci/run must take the test command from the README"
