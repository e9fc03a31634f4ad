"""Argument checks and small helpers shared by the op families.

Every public op validates its arguments before any work: wrong types raise TypeError, wrong
shapes, values or devices raise ValueError, and each message names the op and the argument.
The checks look only at metadata (shape, dtype, device), never at tensor values, so they are
free under torch.compile and cause no host synchronisation on CUDA.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have a floating dtype ({allowed}), got {t.dtype}")


def check_integer(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must have an integer dtype, got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: Sequence[Optional[int]], what: str = "") -> None:
    ok = t.dim() == len(shape) and all(s is None or t.shape[i] == s for i, s in enumerate(shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}{what}, got {list(t.shape)}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(
                f"{op}: all tensors must be on one device; {items[0][0]} is on {dev}, {k} is on {v.device}"
            )
    return dev


def check_real(op: str, name: str, v: object, *, allow_nan: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    f = float(v)
    if not allow_nan and math.isnan(f):
        raise ValueError(f"{op}: {name} must not be NaN")
    return f


def check_int(op: str, name: str, v: object, *, minimum: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an integer, got {type(v).__name__}")
    i = int(v)
    if minimum is not None and i < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {i}")
    return i


def check_choice(op: str, name: str, v: object, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {v!r}")
    return v


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in float32, or float64 for float64 inputs (fp16/bf16 are widened)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float32_at_most(t: float) -> float:
    """The largest float32 <= t: for float32 v, ``v > t`` (t a double) iff ``v > float32_at_most(t)``."""
    if math.isnan(t):
        return t
    with np.errstate(over="ignore"):
        f = np.float32(t)
    if float(f) > t:
        f = np.nextafter(f, np.float32(-np.inf), dtype=np.float32)
    return float(f)
