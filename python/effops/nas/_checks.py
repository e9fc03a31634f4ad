"""Reading untrusted run files: JSON parsing and field checks with errors that name the file,
the line and the field.

Everything a search directory holds (config.json, journal.jsonl, dataset.json, state.pt,
latency_table.json, exported genotypes) may come from someone else - a shared folder, another
machine of a Ray cluster. Nothing read from it is ever executed or unpickled into arbitrary
objects, and every value is checked for its type and range before it is used.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Optional, Sequence, Type

#: Upper bound for counts read from files (budget, trial ids, epochs, ...): large enough for any
#: real search, small enough that arithmetic on them stays exact and cheap.
MAX_COUNT = 10**9
#: Upper bound for seeds (they seed numpy / torch generators, which take 64-bit values).
MAX_SEED = 2**63 - 1


def parse_json(text: Any, where: str, error: Type[Exception]) -> Any:
    """``json.loads`` that turns every failure into ``error`` naming ``where``: syntax errors,
    nesting too deep for the parser (RecursionError), integers too long to convert."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where}: the JSON is nested too deeply to be a valid file") from None
    except ValueError as e:  # JSONDecodeError, and int('9' * 5000)'s digit limit
        raise error(f"{where}: invalid JSON: {e}") from None


def read_json(path: str, what: str, error: Type[Exception], max_bytes: int = 64 << 20) -> Any:
    """The parsed JSON of file ``path`` (``what`` names it in errors)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{what} {path!r}: cannot read: {e}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {path!r}: larger than {max_bytes >> 20} MiB; not a file effops wrote")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path!r}: not UTF-8 text: {e}") from None
    return parse_json(text, f"{what} {path!r}", error)


def check_int(v: Any, name: str, where: str, error: Type[Exception], lo: int = 0,
              hi: int = MAX_COUNT, optional: bool = False) -> Optional[int]:
    """``v`` as an int in [lo, hi] (bools are not ints here); ``optional`` admits None."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise error(f"{where}: {name} must be an integer, got {_short(v)}")
    if not lo <= v <= hi:
        raise error(f"{where}: {name} must be in [{lo}, {hi}], got {_short(v)}")
    return int(v)


def check_float(v: Any, name: str, where: str, error: Type[Exception], lo: float = -math.inf,
                hi: float = math.inf, optional: bool = False, lo_open: bool = False) -> Optional[float]:
    """``v`` as a finite float in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise error(f"{where}: {name} must be a number, got {_short(v)}")
    f = float(v)
    if not math.isfinite(f) or f < lo or f > hi or (lo_open and f == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise error(f"{where}: {name} must be a finite number in {interval}, got {_short(v)}")
    return f


def check_str(v: Any, name: str, where: str, error: Type[Exception], max_len: int = 4096,
              optional: bool = False) -> Optional[str]:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise error(f"{where}: {name} must be a string, got {_short(v)}")
    if len(v) > max_len:
        raise error(f"{where}: {name} is longer than {max_len} characters")
    return v


def check_keys(d: Any, allowed, where: str, error: Type[Exception], required=()) -> dict:
    """``d`` as a dict whose keys are all in ``allowed`` and include ``required``."""
    if not isinstance(d, dict):
        raise error(f"{where}: must be a JSON object, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise error(f"{where}: unknown field(s) {unknown[:10]}; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise error(f"{where}: missing field(s) {missing}")
    return d


def _short(v: Any, limit: int = 80) -> str:
    """repr(v) cut to ``limit`` characters (a hostile value can be megabytes long; an int of
    5000 digits cannot even be printed)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 200:
        return f"an integer of {v.bit_length()} bits"
    try:
        r = repr(v)
    except (ValueError, RecursionError):
        return f"a {type(v).__name__}"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Replace ``path`` so that a crash at any moment leaves the old or the new file, never a
    torn one: write a temp file, fsync it, rename it over ``path``, fsync the directory."""
    tmp = path + ".tmp"  # one writer per file; a leftover from a crash is overwritten
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def torch_load_plain(path: str, where: str, error: Type[Exception], allowed: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, containers, numbers and strings only
    (plus the classes in ``allowed``), so a crafted file cannot run code. A file that holds
    other objects is refused, a file that is not a torch file is reported as unreadable; the
    errors name ``where`` (and never suggest ``weights_only=False``)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message wraps the cause in advice to retry with weights_only=False; keep the cause.
        lines = [ln.strip() for ln in str(e).replace("WeightsUnpickler error:", "\n").splitlines()]
        causes = [ln for ln in lines if ln and not ln.startswith(("Weights only load failed", "(1)", "(2)",
                                                                   "Check the documentation", "Please file"))]
        detail = (causes[0] if causes else "unknown format")[:200]
        if "global" in str(e).lower():
            raise error(f"{where}: refused: the file holds Python objects other than tensors, lists, dicts, "
                        f"numbers and strings, and effops does not unpickle arbitrary objects (they can run "
                        f"code): {detail}") from None
        raise error(f"{where}: cannot read: not a valid torch file ({detail})") from None
    except Exception as e:  # noqa: BLE001 - a file can be unreadable in many ways; all mean "unreadable"
        raise error(f"{where}: cannot read: {type(e).__name__}: {str(e)[:300]}") from None
