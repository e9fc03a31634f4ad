"""Where the time of a converted network goes, per op (``effops bench models --profile MODEL``).

torch.profiler records every op torch dispatches, and effops's own ops by name on every path:
the dispatcher path (``effops::dwsep_conv`` ... as custom ops) and the eager CPU fast path, which
calls the kernels directly and opens a ``record_function`` scope of the same name while a
profiler is active (ops/_common.py ``profiled``). The table gives each op's *self* time (time
inside the op, not inside ops it called), so the rows add up; what no op accounts for (Python
between the ops, module calls) is its own row."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class OpTime:
    name: str
    calls: float  # per forward call
    ms: float  # self time per forward call
    pct: float  # of the wall time per forward call


@dataclass
class Profile:
    title: str
    wall_ms: float  # per forward call, under the profiler
    ops: List[OpTime]


def profile_ops(fn, reps: int = 5, title: str = "") -> Profile:
    """Self CPU time per op of ``fn()`` (called twice first to warm up, then ``reps`` times)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        wall = (time.perf_counter() - t0) / reps * 1e3
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / reps
        if ms > 0:
            ops.append(OpTime(e.key, e.count / reps, ms, 100 * ms / wall))
    ops.sort(key=lambda o: -o.ms)
    rest = wall - sum(o.ms for o in ops)
    ops.append(OpTime("(not inside any op: Python, module calls)", 0, max(rest, 0.0), 100 * max(rest, 0.0) / wall))
    return Profile(title, wall, ops)


def profile_model(spec, *, batch: int = 8, threads: int = 1, dtype: str = "fp32", reps: int = 5) -> Profile:
    """The per-op profile of ``effops.nn.convert`` of the model (channels_last, inference)."""
    from ..nn import convert
    from .bench_models import CL, _input, _torch_call, build_original

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = convert(build_original(spec)).to(memory_format=CL)
        x = _input(spec, batch).contiguous(memory_format=CL)
        title = f"effops.nn.convert({spec.title}), b{batch}, {threads} thread{'s' if threads > 1 else ''}, {dtype}"
        return profile_ops(_torch_call(model, x, dtype), reps, title)
    finally:
        torch.set_num_threads(saved)


def format_profile(p: Profile, top: int = 15) -> str:
    """A markdown table: op, calls, total ms, % (the top ops, then the rest summed)."""
    lines = [f"{p.title}: {p.wall_ms:.1f} ms per call under the profiler", "",
             "| op | calls | total ms | % |", "|---|---|---|---|"]
    ops, unattributed = p.ops[:-1], p.ops[-1:]
    shown, rest = ops[:top], ops[top:]
    if len(rest) == 1:
        shown, rest = ops, []
    for o in shown:
        calls = f"{o.calls:g}" if o.calls else ""
        lines.append(f"| {o.name} | {calls} | {o.ms:.2f} | {o.pct:.1f} |")
    if rest:
        ms = sum(o.ms for o in rest)
        lines.append(f"| ({len(rest)} other ops) | {sum(o.calls for o in rest):g} | {ms:.2f} | {100 * ms / p.wall_ms:.1f} |")
    for o in unattributed:
        lines.append(f"| {o.name} | | {o.ms:.2f} | {o.pct:.1f} |")
    return "\n".join(lines)
