"""Backend adapters of the detection losses (effops/ops/losses.py): argument layout for the
compiled kernels (outputs and workspaces allocated here with torch), one function per op that
runs it on the cpu, cuda or triton backend."""

from __future__ import annotations

BACKENDS = ("reference",)
