"""effops.reuse_freed_memory: glibc's malloc keeps freed memory (process-wide, so in a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import effops


def test_reuse_freed_memory_in_a_fresh_process():
    code = ("import effops, ctypes\n"
            "assert effops.malloc_reuse() is None\n"
            "ok = effops.reuse_freed_memory(16 << 20, 64 << 20)\n"
            "print(ok, effops.malloc_reuse())\n"
            "import torch\n"
            "for _ in range(3):\n"
            "    x = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)\n"  # 8 MB: from the heap now
            "    assert int(x.sum()) == 8 << 20\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert out.stdout.strip() == f"True ({16 << 20}, {64 << 20})", out.stdout
    else:
        assert out.stdout.strip() == "False None", out.stdout


@pytest.mark.parametrize("kw,msg", [(dict(mmap_threshold=0), "mmap_threshold must be an int"),
                                    (dict(trim_threshold=-5), "trim_threshold must be an int"),
                                    (dict(mmap_threshold=1.5), "mmap_threshold must be an int"),
                                    (dict(mmap_threshold=True), "mmap_threshold must be an int"),
                                    (dict(mmap_threshold=64 << 20), "<= 32 MiB")])
def test_bad_thresholds_are_errors(kw, msg):
    before = effops.malloc_reuse()
    with pytest.raises(ValueError, match=msg):
        effops.reuse_freed_memory(**kw)
    assert effops.malloc_reuse() == before  # nothing applied
