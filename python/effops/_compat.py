"""The oldest torch effops runs on, checked at ``import effops`` before anything registers ops.

``TORCH_MIN`` is what .ci/torch-matrix proves (the wheel's smoke suite under that torch and the
newest); pyproject.toml's ``torch>=`` bound says the same. Older torches lack the custom-op API
(torch.library.custom_op, register_fake, register_autograd) the ops are built on, and would fail
with an obscure error deep inside the registration."""

from __future__ import annotations

import re
from typing import Optional, Tuple

TORCH_MIN: Tuple[int, int] = (2, 4)


def parse_version(version: str) -> Tuple[int, int]:
    """(major, minor) of a torch version string ('2.5.1+cu121', '2.15.0a0+git...')."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if m is None:
        raise ImportError(f"effops: cannot read the torch version {version!r}")
    return int(m.group(1)), int(m.group(2))


def check_torch(version: Optional[str] = None) -> None:
    """Raise ImportError naming the minimum when ``version`` (default: the installed torch's) is
    older than TORCH_MIN."""
    if version is None:
        import torch

        version = torch.__version__
    if parse_version(version) < TORCH_MIN:
        need = ".".join(map(str, TORCH_MIN))
        raise ImportError(
            f"effops needs torch >= {need}, but torch {version} is installed: "
            f"pip install 'torch>={need}' (torch.library.custom_op and register_fake first appeared in {need})")
