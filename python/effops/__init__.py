"""effops: fast kernels for efficient conv nets and detectors (CPU C++, CUDA, Triton).

    import effops
    keep = effops.ops.nms(boxes, scores, 0.5)   # drop-in for torchvision.ops.nms
    effops.info()                              # version, build, backends per op
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._compat import check_torch as _check_torch

_check_torch()  # a clear ImportError on a torch older than effops supports, before any op registers

from . import _backend, nn, ops  # noqa: E402
from ._backend import (amx, detected_isa, isa, set_amx, set_isa, set_vnni, use_amx, use_backend, use_isa,
                       use_vnni)
from ._memory import malloc_reuse, reuse_freed_memory  # noqa: E402


def __getattr__(name: str):
    # effops.models / effops.nas / effops.onnx load on first use (they pull in more than the ops need).
    if name in ("models", "nas", "onnx"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'effops' has no attribute {name!r}")


def _onnx_availability() -> str:
    from .onnx import availability

    return availability()


def info(print_table: bool = True) -> dict:
    """Version, build information and which backend can run each op on this machine.

    Returns a dict; with ``print_table`` (default) also prints it as a table.
    """
    import torch

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    result = {
        "version": __version__,
        "build": _backend.build_info(),
        "backends": {str(d): _backend.availability(d) for d in devices},
        "onnx": _onnx_availability(),
    }
    if print_table:
        print(format_info(result))
    return result


def format_info(result: dict) -> str:
    lines = [f"effops {result['version']}"]
    for k, v in result["build"].items():
        lines.append(f"  {k:8s} {v}")
    if "onnx" in result:
        lines.append(f"  {'onnx':8s} {result['onnx']}")
    for dev, table in result["backends"].items():
        lines.append(f"backends for {dev} tensors (yes = usable; no = why not):")
        lines.append(f"  {'op':16s} " + " ".join(f"{b:10s}" for b in _backend.BACKENDS))
        notes = {}
        for op, row in table.items():
            cells = []
            for b in _backend.BACKENDS:
                why = row[b]
                if why is None:
                    cells.append("yes")
                elif why == "not implemented":
                    cells.append("-")
                else:
                    ref = notes.setdefault(why, len(notes) + 1)
                    cells.append(f"no[{ref}]")
            lines.append(f"  {op:16s} " + " ".join(f"{c:10s}" for c in cells))
        for why, ref in notes.items():
            lines.append(f"  [{ref}] {why}")
    return "\n".join(lines)


__all__ = ["ops", "nn", "info", "use_backend", "set_isa", "use_isa", "isa", "detected_isa", "amx", "set_amx", "use_amx",
           "set_vnni", "use_vnni", "reuse_freed_memory", "malloc_reuse", "__version__"]
