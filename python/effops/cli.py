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


def _default_results() -> str:
    """Where ``effops bench`` appends rows without --results: bench/results of the effops source
    checkout it runs from (or of the current directory when that is one), else the user's cache
    (``$XDG_CACHE_HOME/effops/bench/results``), never a folder relative to an arbitrary cwd."""
    import os

    from ._backend import source_checkout

    root = source_checkout()
    if root is None and os.path.isfile("pyproject.toml") and os.path.isdir("csrc"):
        with open("pyproject.toml") as f:
            root = os.getcwd() if 'name = "effops"' in f.read() else None
    if root is not None:
        return os.path.join(root, "bench", "results")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "effops", "bench", "results")


def _bench_epilog() -> str:
    from .bench import DEFAULT, ON_REQUEST

    return (
        f"families: {', '.join(DEFAULT)} (op benchmarks; all of them by default); {', '.join(ON_REQUEST)} and\n"
        "  models (whole networks) take minutes and run only when named\n"
        "results: rows are appended to bench/results/<device>.csv of the source checkout effops runs from\n"
        "  (or that is the current directory), else to $XDG_CACHE_HOME/effops/bench/results (~/.cache/...);\n"
        "  --results DIR chooses\n"
        "environment:\n"
        "  EFFOPS_BACKEND=cpu|cuda|triton|reference  run every op on that backend (default: auto)\n"
        "  EFFOPS_ISA=baseline|avx2|avx512           cap the CPU kernels' SIMD level (default: the CPU's best)\n"
        "  EFFOPS_PARALLEL=auto|openmp|pool          threads of the CPU kernels (auto: torch's OpenMP threads)\n"
        "  EFFOPS_CUDA=AUTO|ON|OFF                   at build time: compile the CUDA kernels (AUTO: when nvcc\n"
        "                                            is found and a GPU is visible)\n"
        "  EFFOPS_NATIVE=ON|OFF                      at build time: -march=native (local builds only)\n"
    )


def _bench(args) -> int:
    import torch

    if args.results is None:
        args.results = _default_results()

    from .bench import DEFAULT, FAMILIES
    from .bench.harness import markdown_table, run_cases

    if args.table:
        if "models" in (args.families or []):
            from .bench.models_report import models_table

            print(models_table(args.results))
        elif "compress" in (args.families or []):
            from .bench.bench_compress import compress_table

            print(compress_table(args.results))
        else:
            print(markdown_table(args.results))
        return 0
    families = args.families or list(DEFAULT)
    unknown = [f for f in families if f not in FAMILIES and f != "models"]
    if unknown:
        print(f"effops bench: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}, models",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("effops bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    from .bench.harness import device_name

    if "models" in families or args.profile:  # whole networks: their own options (bench_models.from_args)
        from .bench.bench_models import from_args

        rc = from_args(args)
        families = [f for f in families if f != "models"]
        if rc or not families or args.profile:
            return rc
    saved = torch.get_num_threads()
    for threads in args.threads or [saved]:
        torch.set_num_threads(threads)
        print(f"effops bench on {device_name(device)}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; ratio = baseline time / effops time")
        for fam in families:
            mod = importlib.import_module(FAMILIES[fam])
            cases = mod.cases(device, quick=args.quick)
            run_cases(cases, device, target_s=args.time, results_dir=None if args.no_save else args.results)
            if hasattr(mod, "after_run"):  # a family with a table of its own (compress)
                mod.after_run(cases, device, None if args.no_save else args.results)
    torch.set_num_threads(saved)
    if not args.no_save:
        print(f"rows appended to {args.results}/")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    from . import __version__

    p = argparse.ArgumentParser(prog="effops", description="effops: fast kernels for efficient conv nets and detectors")
    p.add_argument("--version", action="version", version=f"effops {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("info", help="version, build and which backend runs each op")
    sp.set_defaults(func=_info)
    sp = sub.add_parser("bench", help="benchmark effops against eager PyTorch, torch.compile and other libraries",
                        epilog=_bench_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("families", nargs="*", help="op families to run (default: all but prune, train and compress), or 'models': whole networks "
                    "(run only when named; options --models --batch --dtype --train --cold --profile)")
    sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sp.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the benchmarks)")
    sp.add_argument("--time", type=float, default=1.0, help="seconds of timing per case (default 1)")
    sp.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts to run at, each in turn (default: torch's; models: 1 2)")
    sp.add_argument("--models", nargs="+", default=None, help="models: which networks (default: all of them)")
    sp.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="models: batch sizes (default 1 8)")
    sp.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="models: fp32 and/or bf16 (autocast) (default both)")
    sp.add_argument("--train", action="store_true", help="models: also a training step per model (batch 8)")
    sp.add_argument("--train-only", action="store_true",
                    help="models: only the training step rows (no inference rows; implies --train)")
    sp.add_argument("--cold", action="store_true", help="models: also time to first result (fresh compile cache)")
    sp.add_argument("--default-malloc", action="store_true",
                    help="models: leave glibc's malloc thresholds as they are (default: freed memory is kept for "
                         "reuse, effops.reuse_freed_memory(), for every variant alike)")
    sp.add_argument("--profile", metavar="MODEL", default=None,
                    help="models: print where a converted MODEL's time goes, per op (torch.profiler), and exit")
    sp.add_argument("--results", default=None,
                    help="folder of the CSV files (default: see 'results' below)")
    sp.add_argument("--no-save", action="store_true", help="do not append rows to the CSV files")
    sp.add_argument("--table", action="store_true", help="print the markdown table of the saved results and exit")
    sp.set_defaults(func=_bench)
    from .nas.cli import add_parsers as _add_nas_parsers

    _add_nas_parsers(sub)  # search, nas {export,report,evaluate,show}
    from .models.classify_cli import add_parser as _add_classify_parser

    _add_classify_parser(sub)  # classify IMAGE... --model --weights (top-5)
    from .models.detect_cli import add_parser as _add_detect_parser

    _add_detect_parser(sub)  # detect IMAGE_OR_DIR... --model --weights --out
    from .train.train_cli import add_parser as _add_train_parser

    _add_train_parser(sub)  # train --model --data shapes|DIR --epochs --batch-size --out [--resume] (DDP via torchrun)
    from .train.eval_cli import add_parser as _add_eval_parser

    _add_eval_parser(sub)  # eval --model --weights --data shapes|DIR (COCO mAP)
    from .compress.prune_cli import add_parser as _add_prune_parser

    _add_prune_parser(sub)  # prune --model [--weights] --amount --steps --epochs [--teacher] --out [--resume]
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
