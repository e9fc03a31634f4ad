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
    # Per-variant agreement (whole-network cases): outputs -> label -> error against the case's
    # reference; a variant above ``tolerance`` is refused (not timed, listed in ``refused``).
    errors: Optional[Callable[[Dict[str, object]], Dict[str, float]]] = None
    tolerance: float = 0.0
    fixed: Dict[str, float] = field(default_factory=dict)  # label -> seconds not timed here (floors, cold starts)
    flops: Optional[int] = None  # FLOPs of one call (for GFLOP/s)
    measured_errors: Dict[str, float] = field(default_factory=dict)
    refused: Dict[str, str] = field(default_factory=dict)  # label -> why it was not timed


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = value.strip()
                if len(info) == 3:
                    break
    except OSError:
        pass
    name = info.get("model name", name)
    # Virtual machines often report a generic model name ("AMD EPYC", "Intel(R) Xeon(R)
    # Processor": no model number) for CPUs of very different generations (Zen 1, Zen 4 and Zen 5
    # VMs all said "AMD EPYC"): such a name gets the CPU's family and model numbers, and one without
    # AVX-512 (other kernels run) its ISA level, so each kind of machine has a results file of its own.
    from .._backend import detected_isa  # "baseline" without the compiled module

    cpuid = ""
    if not re.search(r"\d", name) and "cpu family" in info and "model" in info:
        cpuid = f"family {info['cpu family']} model {info['model']}, "
    level = detected_isa()
    return f"{name} ({cpuid}{'' if level == 'avx512' else level + ', '}{os.cpu_count()} cpus)"


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
    """Measured copy bandwidth (GB/s, bytes read + written) of a large tensor copy, at the
    current thread count on the CPU."""
    key = f"{device} {torch.get_num_threads()}" if device.type == "cpu" else str(device)
    if key not in _COPY_GBPS:
        n = 64 * 2**20 // 4 if device.type == "cpu" else 512 * 2**20 // 4
        a = torch.rand(n, device=device)
        b = torch.empty_like(a)
        t = time_interleaved({"copy": lambda: b.copy_(a)}, device, target_s=0.3, min_reps=5)["copy"]
        _COPY_GBPS[key] = 2 * a.numel() * 4 / t / 1e9
    return _COPY_GBPS[key]


_PEAK_GFLOPS: Dict[str, float] = {}


def fma_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Measured peak GFLOP/s (2 per multiply-add) in ``dtype`` at the current thread count on the
    CPU: the best call of the better of two dense kernels, a large square matmul (MKL / cuBLAS)
    and a large 3x3 channels_last convolution (oneDNN / cuDNN) - on AMD CPUs MKL's sgemm takes its
    AVX2 path and reaches about half of what oneDNN's convolution does. A lower bound of the
    hardware's peak (a faster kernel elsewhere can exceed it), measured once per process."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = f"{device} {dtype} {threads}"
    if key not in _PEAK_GFLOPS:
        cpu = device.type == "cpu"
        n = 1024 if cpu else 8192
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c, hw = (256, 56) if cpu else (512, 128)
        x = torch.randn(max(1, threads) if cpu else 32, c, hw, hw, device=device).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        work = {"mm": (lambda: torch.mm(a, b), 2 * n ** 3),
                "conv": (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * x.shape[0] * c * c * 9 * hw * hw)}
        best = 0.0
        with torch.no_grad():
            for fn, flops in work.values():
                fn()
                for _ in range(10):
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    best = max(best, flops / (time.perf_counter() - t0) / 1e9)
        _PEAK_GFLOPS[key] = best
    return _PEAK_GFLOPS[key]


def _agreeing(case: Case, outs: Dict[str, object]) -> Dict[str, Callable[[], object]]:
    """The implementations to time: all of them, or (with case.errors) those whose error against
    the reference is within case.tolerance; the others are refused and recorded."""
    if case.errors is None:
        if case.check is not None:
            err = case.check(outs)
            if err:
                raise AssertionError(f"{case.op}/{case.name}: implementations disagree: {err}")
        return dict(case.impls)
    case.measured_errors = dict(case.errors(outs))
    keep = {}
    for label, fn in case.impls.items():
        err = case.measured_errors.get(label, 0.0)
        if not err <= case.tolerance:  # NaN is refused too
            case.refused[label] = f"max relative error {err:.2e} > tolerance {case.tolerance:.0e}"
        else:
            keep[label] = fn
    return keep


def run_cases(cases: Sequence[Case], device: torch.device, *, target_s: float = 1.0,
              results_dir: Optional[str] = None, log=print, formatter=None) -> List[Dict[str, object]]:
    """Check, time and record each case. ``ratio`` = time / effops' time, empty when effops' own
    implementation was refused; ``formatter(case, rows)`` gives the line logged per case."""
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
        impls = _agreeing(case, outs)
        del outs
        case.results = time_interleaved(impls, device, target_s=target_s) if impls else {}
        if case.bytes_moved:
            bw = copy_bandwidth(device)  # cached per device and thread count
        ref = case.results.get(EFFOPS, case.fixed.get(EFFOPS))
        n0 = len(rows)
        for label, t in list(case.results.items()) + [(k, v) for k, v in case.fixed.items() if k not in case.results]:
            gbps = case.bytes_moved / t / 1e9 if case.bytes_moved else None
            rows.append({
                "op": case.op, "case": case.name, "backend": label, "dtype": case.dtype,
                "median_ms": round(t * 1e3, 4), "ratio": "" if ref is None else round(t / ref, 3),
                "gbps": "" if gbps is None else round(gbps, 2),
                "pct_of_copy": "" if gbps is None else round(100 * gbps / bw, 1),
                "device": dev_name, "threads": torch.get_num_threads() if device.type == "cpu" else "",
                "effops": effops.__version__, "torch": torch.__version__, "torchvision": tv, "date": date,
            })
        log((formatter or format_case)(case, rows[n0:]))
    if results_dir is not None:
        append_rows(rows, Path(results_dir) / f"{device_slug(device)}.csv")
    return rows


def format_case(case: Case, rows: List[Dict[str, object]]) -> str:
    parts = [f"{case.op:15s} {case.name:34s} {case.dtype:5s}"]
    for r in rows:
        cell = f"{r['backend']} {r['median_ms']:.3f} ms"
        if r["backend"] != EFFOPS and r["ratio"] != "":
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
    """The README table: the latest run of each (op, case, backend) per device file, one row per
    case. Whole-network rows (ops 'model inference', 'model train step', 'model cold start') have
    tables of their own (bench/models_report.py)."""
    out = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if not r["op"].startswith("model ")]
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
