"""The ``effops`` command: ``effops info``, ``effops bench``, ``effops search``, ``effops nas ...``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional


def _info(args) -> int:
    import effops

    effops.info()
    return 0


def _bench(args) -> int:
    import torch

    from .bench import FAMILIES
    from .bench.harness import markdown_table, run_cases

    if args.table:
        print(markdown_table(args.results))
        return 0
    families = args.families or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"effops bench: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("effops bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .bench.harness import device_name

    print(f"effops bench on {device_name(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ratio = baseline time / effops time")
    for fam in families:
        mod = importlib.import_module(FAMILIES[fam])
        cases = mod.cases(device, quick=args.quick)
        run_cases(cases, device, target_s=args.time, results_dir=None if args.no_save else args.results)
    if not args.no_save:
        print(f"rows appended to {args.results}/")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="effops", description="effops: fast kernels for efficient conv nets and detectors")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("info", help="version, build and which backend runs each op")
    sp.set_defaults(func=_info)
    sp = sub.add_parser("bench", help="benchmark effops against eager PyTorch, torch.compile and other libraries")
    sp.add_argument("families", nargs="*", help="op families to run (default: all)")
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sp.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the benchmarks)")
    sp.add_argument("--time", type=float, default=1.0, help="seconds of timing per case (default 1)")
    sp.add_argument("--threads", type=int, default=0, help="torch.set_num_threads before running")
    sp.add_argument("--results", default="bench/results", help="folder of the CSV files (default bench/results)")
    sp.add_argument("--no-save", action="store_true", help="do not append rows to the CSV files")
    sp.add_argument("--table", action="store_true", help="print the markdown table of the saved results and exit")
    sp.set_defaults(func=_bench)
    from .nas.cli import add_parsers as _add_nas_parsers

    _add_nas_parsers(sub)  # search, nas {export,report,evaluate,show}
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
