"""Argument checks and small helpers shared by the op families.

Every public op validates its arguments before any work: wrong types raise
``EffopsTypeError`` (a TypeError), wrong shapes, values, sizes or devices raise
``EffopsInputError`` (a ValueError), and each message names the op and the argument. Both are
also RuntimeErrors: torchvision's ops (and code written against them, e.g. its own tests)
report every bad input as RuntimeError, so ``except RuntimeError`` keeps working when effops
replaces them, and ``except ValueError`` / ``except TypeError`` work too.
The checks look only at metadata (shape, dtype, device), never at tensor values, so they are
free under torch.compile and cause no host synchronisation on CUDA.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.autograd.profiler as _autograd_profiler

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Sizes, strides, paddings and counts the kernels index with must fit int64 arithmetic with room
# to spare: every such argument is bounded here, in Python, so the compiled code never sees a
# value whose products or sums could overflow (and nanobind never sees one >= 2**63).
MAX_SIZE = 2**31 - 1


class EffopsInputError(ValueError, RuntimeError):
    """A bad argument value, shape, size or device (a ValueError, and a RuntimeError as
    torchvision reports bad input)."""


class EffopsTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (a TypeError, and a RuntimeError as torchvision
    reports bad input)."""


def check_tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise EffopsTypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise EffopsTypeError(f"{op}: {name} must have a floating dtype ({allowed}), got {t.dtype}")


def check_integer(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise EffopsTypeError(f"{op}: {name} must have an integer dtype, got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: Sequence[Optional[int]], what: str = "") -> None:
    ok = t.dim() == len(shape) and all(s is None or t.shape[i] == s for i, s in enumerate(shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise EffopsInputError(f"{op}: {name} must have shape {want}{what}, got {list(t.shape)}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise EffopsInputError(
                f"{op}: all tensors must be on one device; {items[0][0]} is on {dev}, {k} is on {v.device}"
            )
    return dev


def check_real(op: str, name: str, v: object, *, allow_nan: bool = True, allow_inf: bool = True,
               allow_bool: bool = False) -> float:
    """A Python (or numpy) real number as a float. allow_bool: accept True/False as 1.0/0.0, as
    torch's schema parser does for a ``float`` argument (torchvision.ops.nms(b, s, True) works)."""
    if (isinstance(v, bool) and not allow_bool) or not isinstance(v, numbers.Real):
        raise EffopsTypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:  # a huge int or Fraction: not representable as a double
        raise EffopsInputError(f"{op}: {name} = {v!r} is out of the float64 range") from None
    if not allow_nan and math.isnan(f):
        raise EffopsInputError(f"{op}: {name} must not be NaN")
    if not allow_inf and math.isinf(f):
        raise EffopsInputError(f"{op}: {name} must be finite, got {f}")
    return f


def check_int(op: str, name: str, v: object, *, minimum: Optional[int] = None,
              maximum: Optional[int] = MAX_SIZE) -> int:
    """An integer argument in [minimum, maximum] (maximum defaults to MAX_SIZE: every integer the
    kernels see is a size or count; pass maximum=None only for values that are never indexed)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise EffopsTypeError(f"{op}: {name} must be an integer, got {type(v).__name__}")
    i = int(v)
    if minimum is not None and i < minimum:
        raise EffopsInputError(f"{op}: {name} must be >= {minimum}, got {i}")
    if maximum is not None and i > maximum:
        raise EffopsInputError(f"{op}: {name} must be <= {maximum}, got {i}")
    return i


def check_choice(op: str, name: str, v: object, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise EffopsInputError(f"{op}: {name} must be one of {list(choices)}, got {v!r}")
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


def profiled(name: str, fn, *args):
    """``fn(*args)``, inside a torch.profiler scope called ``name`` while a profiler is active.

    The eager CPU fast paths call the kernels without the dispatcher, so torch.profiler would
    not see them; they go through here with the custom op's name (``effops::dwsep_conv``...),
    and a profile names them as on the dispatcher path. Without a profiler the cost is this
    call and one read of torch's Python-side flag (set on profiler start and stop): ~0.13 us per
    call measured, against the >= 20 us of the fastest fused call."""
    if _autograd_profiler._is_profiler_enabled:
        with torch.profiler.record_function(name):
            return fn(*args)
    return fn(*args)


#: "effops::<op>" -> (the Python function, its explicit schema), for every op made by custom_op()
#: below (tests/test_op_schemas.py checks each schema against the function's annotations).
OP_SCHEMAS: Dict[str, Tuple[Callable, str]] = {}


def custom_op(name: str, schema: str):
    """``torch.library.custom_op(name, mutates_args=(), schema=schema)``: every effops op states
    its schema explicitly, e.g. ``"(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor"``.

    Why: torch's schema inference reads the annotations, and with ``from __future__ import
    annotations`` they are strings, which torch 2.4-2.5's ``infer_schema`` rejects
    ("unsupported type Tensor" / "Tuple[Tensor, Tensor]"): ``import effops`` failed there. The
    schema must equal what the current torch infers from the annotations (int -> SymInt,
    List[int] -> SymInt[], Optional[Tensor] -> Tensor?, List[Tensor] -> Tensor[], a tuple
    return -> (Tensor, ...)); tests/test_op_schemas.py checks it for every registered op."""
    def register(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=(), schema=schema)(fn)
        OP_SCHEMAS[name] = (fn, schema)
        return op

    return register
