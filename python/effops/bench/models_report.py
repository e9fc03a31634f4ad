"""Reports of the whole-network benchmark (bench_models): the per-case table printed while it
runs, and the README's markdown tables made from the recorded rows."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .harness import EFFOPS, Case

def format_model_case(case: Case, rows: List[Dict[str, object]], first: Optional[Dict[str, float]] = None,
                      notes: Sequence[str] = ()) -> str:
    """A table per case: every variant with its time, effops' speed-up over it, GFLOP/s, its
    distance to both floors, its error against the reference and its time to first result."""
    by = {r["backend"]: r for r in rows}
    floors = {k: float(by[k]["median_ms"]) for k in ("compute floor", "traffic floor") if k in by}
    lines = [f"\n{case.op} | {case.name} | {case.dtype} | {case.note}",
             f"  {'variant':24s} {'median ms':>10s} {'effops x':>9s} {'GFLOP/s':>8s} {'x compute':>9s} "
             f"{'x traffic':>9s} {'max rel err':>11s} {'first s':>8s}"]
    for label, r in by.items():
        if label in floors:
            continue
        ms = float(r["median_ms"])
        speed = f"{ms / float(by[EFFOPS]['median_ms']):.2f}" if EFFOPS in by else ""
        gf = f"{case.flops / (ms * 1e6):.1f}" if case.flops else ""
        xc = f"{ms / floors['compute floor']:.1f}" if "compute floor" in floors else ""
        xt = f"{ms / floors['traffic floor']:.1f}" if "traffic floor" in floors else ""
        err = case.measured_errors.get(label)
        fs = "" if not first or label not in first else f"{first[label]:.2f}"
        lines.append(f"  {label:24s} {ms:10.2f} {speed:>9s} {gf:>8s} {xc:>9s} {xt:>9s} "
                     f"{'' if err is None else f'{err:.1e}':>11s} {fs:>8s}")
    lines.append("  floors: " + ", ".join(f"{k} {v:.2f} ms" for k, v in floors.items()))
    for label, why in case.refused.items():
        lines.append(f"  REFUSED {label}: outputs disagree with eager (NCHW), {why}")
    for n in notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


_COLUMNS = ["eager (NCHW)", "eager (channels_last)", "torch.compile", "torch.compile (effops)", "onnxruntime",
            "openvino", "effops.models"]


def models_table(results_dir: str) -> str:
    """Markdown tables of the latest whole-network rows of each device file: inference (each
    baseline's ms and effops' speed-up over it, effops' distance to both floors), the training
    step, and time to first result."""
    out = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r["op"].startswith("model ")]  # not bench_dwsep's 'model'
        if not rows:
            continue
        latest: Dict[tuple, Dict[str, Dict[str, str]]] = {}
        for r in rows:
            latest.setdefault((r["op"], r["case"], r["dtype"]), {})[r["backend"]] = r
        dates = sorted({r["date"] for by in latest.values() for r in by.values()})
        span = dates[0] if len(dates) == 1 else f"rows of {dates[0]} to {dates[-1]}: each row is one interleaved run"
        out.append(f"**{rows[-1]['device']}** (torch {rows[-1]['torch']}, {span}); cells: ms "
                   f"(effops' speed-up over it)\n")
        for op, title in (("model inference", "inference"), ("model train step", "training step"),
                          ("model cold start", "time to first result, s")):
            cases = {k: v for k, v in latest.items() if k[0] == op and EFFOPS in v}
            if not cases:
                continue
            cols = [c for c in _COLUMNS if any(c in v for v in cases.values())]
            floors = [f for f in ("compute floor", "traffic floor") if any(f in v for v in cases.values())]
            scale, unit = (1e-3, "s") if op == "model cold start" else (1.0, "ms")
            out.append(f"| {title}: model, batch, threads | dtype | run | effops {unit} | "
                       + " | ".join(cols) + "".join(f" | effops / {f}" for f in floors) + " |")
            out.append("|---" * (4 + len(cols) + len(floors)) + "|")
            for (_, case, dtype), by in cases.items():
                eff = float(by[EFFOPS]["median_ms"])
                cells = [f"{float(by[c]['median_ms']) * scale:.{1 if scale == 1 else 2}f} ({float(by[c]['ratio']):.2f}x)"
                         if c in by else "-" for c in cols]
                cells += [f"{eff / float(by[f]['median_ms']):.1f}x" if f in by else "-" for f in floors]
                out.append(f"| {case} | {dtype} | {by[EFFOPS]['date']} | {eff * scale:.{1 if scale == 1 else 2}f} | "
                           + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)
