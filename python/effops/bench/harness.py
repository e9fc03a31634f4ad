"""The one benchmark harness: times implementations side by side, checks they agree first,
prints a table and appends rows to ``bench/results/<device>.csv``.

A benchmark module (``bench_<family>.py``) only declares ``Case`` objects. Each case has the
effops implementation and the baselines users would otherwise run (eager PyTorch, torch.compile,
torchvision/timm/effdet), all timed in the same process, interleaved, with the median reported.
``ratio`` = baseline time / effops time: how many times faster effops is (effops' own row: 1).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

EFFOPS = "effops"

COLUMNS = [
    "op", "case", "backend", "dtype", "median_ms", "ratio", "gbps", "pct_of_copy",
    "device", "threads", "effops", "torch", "torchvision", "date",
]


@dataclass
class Case:
    op: str
    name: str
    dtype: str
    impls: Dict[str, Callable[[], object]]  # label -> zero-argument callable; EFFOPS must be one
    check: Optional[Callable[[Dict[str, object]], Optional[str]]] = None  # outputs -> error or None
    bytes_moved: Optional[int] = None  # the fewest bytes that must move (for GB/s)
    note: str = ""
    results: Dict[str, float] = field(default_factory=dict)  # label -> median seconds


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus)"


def device_slug(device: torch.device) -> str:
    base = "gpu-" if device.type == "cuda" else "cpu-"
    return base + re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, *, target_s: float,
                     min_reps: int = 3, max_reps: int = 200) -> Dict[str, float]:
    """Median seconds per call of each function, measured in one run.

    Rounds visit every function in turn (so slow drifts of a shared machine hit all alike);
    in each round a function runs a short batch of back-to-back calls and the first call of a
    batch is not recorded, so each is timed warm - not right after another function has
    flushed the caches (which would favour whichever function is slowest)."""
    est: Dict[str, float] = {}
    for k, fn in fns.items():
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        est[k] = time.perf_counter() - t0
    times: Dict[str, List[float]] = {k: [] for k in fns}
    rounds = 5
    per_batch = target_s / rounds / max(1, len(fns))
    for _ in range(rounds):
        for k, fn in fns.items():
            batch = int(min(max_reps // rounds + 1, max(2, per_batch / max(est[k], 1e-6))))
            if est[k] > target_s and len(times[k]) >= min_reps:
                continue  # a very slow baseline: enough samples
            for i in range(batch):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if i > 0 or batch == 1:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


_COPY_GBPS: Dict[str, float] = {}


def inference(impls: Dict[str, Callable[[], object]]) -> Dict[str, Callable[[], object]]:
    """The same implementations, each run under torch.inference_mode() (forward-pass cases)."""
    def wrap(fn):
        def run():
            with torch.inference_mode():
                return fn()
        return run
    return {k: wrap(f) for k, f in impls.items()}


def copy_bandwidth(device: torch.device) -> float:
    """Measured copy bandwidth (GB/s, bytes read + written) of a large tensor copy."""
    key = str(device)
    if key not in _COPY_GBPS:
        n = 64 * 2**20 // 4 if device.type == "cpu" else 512 * 2**20 // 4
        a = torch.rand(n, device=device)
        b = torch.empty_like(a)
        t = time_interleaved({"copy": lambda: b.copy_(a)}, device, target_s=0.3, min_reps=5)["copy"]
        _COPY_GBPS[key] = 2 * a.numel() * 4 / t / 1e9
    return _COPY_GBPS[key]


def run_cases(cases: Sequence[Case], device: torch.device, *, target_s: float = 1.0,
              results_dir: Optional[str] = None, log=print) -> List[Dict[str, object]]:
    import effops

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = ""
    rows: List[Dict[str, object]] = []
    dev_name = device_name(device)
    date = _dt.date.today().isoformat()
    bw = None
    for case in cases:
        outs = {k: fn() for k, fn in case.impls.items()}
        if case.check is not None:
            err = case.check(outs)
            if err:
                raise AssertionError(f"{case.op}/{case.name}: implementations disagree: {err}")
        case.results = time_interleaved(case.impls, device, target_s=target_s)
        if case.bytes_moved and bw is None:
            bw = copy_bandwidth(device)
        ref = case.results[EFFOPS]
        for label, t in case.results.items():
            gbps = case.bytes_moved / t / 1e9 if case.bytes_moved else None
            rows.append({
                "op": case.op, "case": case.name, "backend": label, "dtype": case.dtype,
                "median_ms": round(t * 1e3, 4), "ratio": round(t / ref, 3),
                "gbps": "" if gbps is None else round(gbps, 2),
                "pct_of_copy": "" if gbps is None else round(100 * gbps / bw, 1),
                "device": dev_name, "threads": torch.get_num_threads() if device.type == "cpu" else "",
                "effops": effops.__version__, "torch": torch.__version__, "torchvision": tv, "date": date,
            })
        log(format_case(case, rows[-len(case.results):]))
    if results_dir is not None:
        append_rows(rows, Path(results_dir) / f"{device_slug(device)}.csv")
    return rows


def format_case(case: Case, rows: List[Dict[str, object]]) -> str:
    parts = [f"{case.op:15s} {case.name:34s} {case.dtype:5s}"]
    for r in rows:
        cell = f"{r['backend']} {r['median_ms']:.3f} ms"
        if r["backend"] != EFFOPS:
            cell += f" (effops x{r['ratio']:.1f})"
        if r["gbps"] != "":
            cell += f" {r['gbps']} GB/s"
        parts.append(cell)
    return " | ".join(parts)


def append_rows(rows: List[Dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)


def markdown_table(results_dir: str) -> str:
    """The README table: the latest run of each (op, case, backend) per device file, one row per case."""
    out = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        latest: Dict[tuple, Dict[str, str]] = {}
        for r in rows:
            latest[(r["op"], r["case"], r["dtype"], r["backend"])] = r
        cases: Dict[tuple, Dict[str, Dict[str, str]]] = {}
        for (op, case, dtype, backend), r in latest.items():
            cases.setdefault((op, case, dtype), {})[backend] = r
        out.append(f"**{rows[-1]['device']}** (torch {rows[-1]['torch']}, {rows[-1]['date']})\n")
        out.append("| op | case | dtype | effops ms | effops GB/s (% of copy) | baselines: ms (effops speed-up) |")
        out.append("|---|---|---|---|---|---|")
        for (op, case, dtype), by in cases.items():
            eff = by.get(EFFOPS)
            if eff is None:
                continue
            bw = f"{float(eff['gbps']):.1f} ({float(eff['pct_of_copy']):.0f}%)" if eff.get("gbps") else ""
            base = "; ".join(f"{backend} {float(r['median_ms']):.3f} ({float(r['ratio']):.1f}x)"
                             for backend, r in by.items() if backend != EFFOPS)
            out.append(f"| {op} | {case} | {dtype} | {float(eff['median_ms']):.3f} | {bw} | {base} |")
        ratios: Dict[tuple, List[float]] = {}
        for (op, case, dtype), by in cases.items():
            if EFFOPS in by:
                for backend, r in by.items():
                    if backend != EFFOPS:
                        ratios.setdefault((op, dtype, backend), []).append(float(r["ratio"]))
        means = [f"{op} ({dtype}) vs {backend}: {math.exp(sum(map(math.log, v)) / len(v)):.2f}x over {len(v)} cases"
                 for (op, dtype, backend), v in ratios.items() if len(v) > 1]
        if means:
            out.append("\nGeometric mean speed-ups: " + "; ".join(means) + ".")
        out.append("")
    return "\n".join(out)
