"""The NAS subcommands of ``effops``: ``search`` and ``nas {export,report,evaluate,show}``.

``effops/cli.py`` calls ``add_parsers``; the handlers import the search machinery lazily.
"""

from __future__ import annotations

import argparse
import os
import sys

# Flag -> (section, SearchConfig / ProxyConfig field). A flag left out is None (not given).
_SEARCH_FIELDS = {
    "strategy": ("top", "strategy"), "budget": ("top", "budget"), "workers": ("top", "workers"),
    "backend": ("top", "backend"), "objective": ("top", "objective"),
    "target_latency": ("top", "target_latency_ms"), "seed": ("top", "seed"),
    "population": ("top", "population"), "sample": ("top", "sample"), "ops": ("top", "ops"),
    "ray_address": ("top", "ray_address"),
    "data": ("proxy", "data"), "image_size": ("proxy", "image_size"), "val_fraction": ("proxy", "val_fraction"),
    "max_samples": ("proxy", "max_samples"), "channels": ("proxy", "channels"), "cells": ("proxy", "cells"),
    "epochs": ("proxy", "epochs"), "batch_size": ("proxy", "batch_size"), "lr": ("proxy", "lr"),
    "threads": ("proxy", "threads"), "device": ("proxy", "device"),
    "latency_threads": ("proxy", "latency_threads"),
    "teacher": ("proxy", "teacher"), "teacher_weights": ("proxy", "teacher_weights"),
    "kd_temperature": ("proxy", "kd_temperature"), "kd_alpha": ("proxy", "kd_alpha"),
}


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _op_list(s: str):
    from .space import OPS

    ops = [o.strip() for o in s.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op {unknown[0]!r}; choose from {', '.join(OPS)}")
    if not ops:
        raise argparse.ArgumentTypeError("needs at least one op")
    return ops


def add_parsers(sub) -> None:
    sp = sub.add_parser(
        "search", help="search for a NASNet cell (accuracy / hardware-aware), crash-safe and resumable",
        description="Architecture search in the NASNet cell space. Every finished trial is journaled in "
                    "--out before it counts; --resume continues a killed search without losing or repeating "
                    "a trial. Settings not given take their defaults (or, with --resume, the saved values).",
    )
    sp.add_argument("--out", required=True, metavar="DIR", help="the search directory (journal, checkpoint, report)")
    sp.add_argument("--resume", action="store_true", help="continue the search in --out")
    sp.add_argument("--strategy", choices=["evolution", "reinforce", "random"], help="default evolution")
    sp.add_argument("--budget", type=_positive_int, metavar="N", help="trials to finish (default 20)")
    sp.add_argument("--epochs", type=_positive_int, metavar="E", help="proxy-training epochs per trial (default 2)")
    sp.add_argument("--workers", type=_positive_int, metavar="W", help="trials at once (default 1)")
    sp.add_argument("--backend", choices=["local", "ray"], help="local process pool (default) or Ray tasks")
    sp.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    sp.add_argument("--objective", choices=["accuracy", "mnas"], help="default accuracy")
    sp.add_argument("--target-latency", type=_positive_float, metavar="MS",
                    help="target T of the mnas objective ACC*(LAT/T)^-0.07, milliseconds")
    sp.add_argument("--seed", type=int, help="seed of the strategy and the trials (default 0)")
    sp.add_argument("--population", type=_positive_int, help="evolution: population size (default 100)")
    sp.add_argument("--sample", type=_positive_int, help="evolution: tournament size (default 25)")
    sp.add_argument("--ops", type=_op_list, metavar="OP,OP,...", help="restrict the space to these ops")
    sp.add_argument("--data", metavar="digits|PATH", help="'digits' (default), an image folder or a .pt/.npz file")
    sp.add_argument("--image-size", type=_positive_int, help="resize images (default: 16 for digits, 32 for folders)")
    sp.add_argument("--val-fraction", type=float, help="held-out fraction per class (default 0.2)")
    sp.add_argument("--max-samples", type=_positive_int, help="use at most this many images")
    sp.add_argument("--channels", type=_positive_int, metavar="C", help="proxy network filters (default 8)")
    sp.add_argument("--cells", type=_positive_int, metavar="N", help="proxy network normal cells per stage (default 1)")
    sp.add_argument("--batch-size", type=_positive_int, help="default 64")
    sp.add_argument("--lr", type=_positive_float, help="default 0.1")
    sp.add_argument("--threads", type=_positive_int, help="torch threads per trial (default: cores / workers)")
    sp.add_argument("--device", help="device for training and latency (default cpu)")
    sp.add_argument("--latency-threads", type=_positive_int, help="torch threads when timing latency (default 1)")
    sp.add_argument("--teacher", metavar="MODEL", help="distil every candidate from this effops.models classifier "
                    "(e.g. efficientnet_b0; needs --teacher-weights)")
    sp.add_argument("--teacher-weights", metavar="CKPT", help="the teacher's weights for --data (a state_dict or "
                    "checkpoint, e.g. effops prune's base.pt; read weights-only)")
    sp.add_argument("--kd-temperature", type=_positive_float, help="distillation temperature T (default 4)")
    sp.add_argument("--kd-alpha", type=float, help="weight of the soft term, in [0, 1] (default 0.9)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=_search)

    nas = sub.add_parser("nas", help="NAS utilities: export, report, evaluate, show")
    nsub = nas.add_subparsers(dest="nas_cmd", required=True)
    p = nsub.add_parser("export", help="write the found network for retraining (.py module or .json)")
    p.add_argument("dir", help="a search directory")
    p.add_argument("--out", required=True, help="model.py or model.json")
    p.add_argument("--rank", type=_positive_int, default=1, help="export the rank-th best trial (default 1)")
    p.add_argument("--trial", type=int, help="export this trial id instead")
    p.set_defaults(func=_export)
    p = nsub.add_parser("report", help="(re)write the report of a search directory")
    p.add_argument("dir")
    p.set_defaults(func=_report)
    p = nsub.add_parser("evaluate", help="train a genotype with a search's proxy settings (for comparisons)")
    p.add_argument("dir", help="a search directory (its data, proxy settings and latency table are used)")
    p.add_argument("--genotype", required=True,
                   help="'best', 'trial:ID', a name (nasnet-a, baseline), a JSON file or JSON text")
    p.add_argument("--channels", type=_positive_int, help="C (default: the search's)")
    p.add_argument("--match-latency", metavar="best|trial:ID|GENOTYPE|MS",
                   help="choose C so the table latency is closest to this trial's, this genotype's at the "
                        "search's C, or MS milliseconds")
    p.add_argument("--data-seed", type=int, help="held-out split seed (default: the search's; another seed "
                   "avoids judging the found cell on the split that selected it)")
    p.add_argument("--epochs", type=_positive_int, help="default: the search's")
    p.add_argument("--seeds", type=_positive_int, default=1, help="train with seeds 0..K-1 (default 1)")
    p.set_defaults(func=_evaluate)
    p = nsub.add_parser("show", help="print a genotype and the size of its network")
    p.add_argument("genotype", help="a name (nasnet-a, baseline), a JSON file or JSON text")
    p.add_argument("--channels", type=_positive_int, default=44)
    p.add_argument("--cells", type=_positive_int, default=4)
    p.add_argument("--classes", type=_positive_int, default=1000)
    p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    p.set_defaults(func=_show)


def _fail(cmd: str, e: BaseException) -> int:
    print(f"effops {cmd}: error: {e}", file=sys.stderr)
    return 2


def _search(args) -> int:
    from .data import DataError
    from .evaluate import ProxyConfig
    from .runner import RESUMABLE_CHANGES, SearchConfig, SearchError, read_config, run_search
    from .space import GenotypeError

    given = {flag: getattr(args, flag) for flag in _SEARCH_FIELDS if getattr(args, flag) is not None}
    try:
        if args.resume:
            base = read_config(args.out).to_dict()
        else:
            base = SearchConfig(proxy=ProxyConfig(epochs=2)).to_dict()
            workers = given.get("workers", 1)
            base["proxy"]["threads"] = max(1, (os.cpu_count() or 1) // workers)
        for flag, value in given.items():
            section, name = _SEARCH_FIELDS[flag]
            target = base if section == "top" else base["proxy"]
            if args.resume and name not in RESUMABLE_CHANGES and target[name] != value:
                raise SearchError(
                    f"--resume: --{flag.replace('_', '-')} {value} differs from the saved search's "
                    f"{target[name]!r}; only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES if k != 'progress')} "
                    "may change"
                )
            target[name] = value
        base["progress"] = not args.no_progress
        config = SearchConfig.from_dict(base)
        if config.proxy.teacher is not None:  # a teacher that does not load fails here, not in every trial
            from ..compress.distill import load_teacher

            ds = config.proxy.dataset()
            load_teacher(config.proxy.teacher, config.proxy.teacher_weights, num_classes=ds.num_classes,
                         in_chans=ds.in_channels, where="--teacher")
        records = run_search(config, args.out, resume=args.resume)
    except (ValueError, SearchError, DataError, GenotypeError) as e:
        return _fail("search", e)
    except KeyboardInterrupt:
        print(f"\neffops search: interrupted; continue with: effops search --out {args.out} --resume", file=sys.stderr)
        return 130
    best = max(records, key=lambda r: (r["reward"], -r["trial"]))
    print(f"effops search: {len(records)} trials in {args.out}; best trial {best['trial']}: "
          f"accuracy {best['accuracy']:.4f}, latency {best['latency_ms']:.3f} ms, reward {best['reward']:.4f}")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _export(args) -> int:
    from .report import export
    from .runner import SearchError

    try:
        doc = export(args.dir, args.out, rank=args.rank, trial=args.trial)
    except (ValueError, SearchError) as e:
        return _fail("nas export", e)
    print(f"wrote {args.out}: trial {doc['trial']} (accuracy {doc['metrics']['accuracy']:.4f}, "
          f"latency {doc['metrics']['latency_ms']:.3f} ms)")
    return 0


def _report(args) -> int:
    from .report import write_report
    from .runner import SearchError

    try:
        s = write_report(args.dir)
    except (ValueError, SearchError) as e:
        return _fail("nas report", e)
    print(f"wrote {os.path.join(args.dir, 'report.md')} ({s['trials']} trials)")
    return 0


def _trial_record(records, spec: str):
    if spec == "best":
        return max(records, key=lambda r: (r["reward"], -r["trial"]))
    if spec.startswith("trial:"):
        tid = int(spec.split(":", 1)[1])
        for r in records:
            if r["trial"] == tid:
                return r
        raise ValueError(f"trial {tid} is not in the journal")
    return None


def _evaluate(args) -> int:
    import dataclasses
    import statistics

    from .data import DataError
    from .evaluate import LatencyTable, TableLatency, match_channels, measure_latencies, proxy_train
    from .network import count_params
    from .runner import LATENCY_TABLE, SearchError, read_config, read_journal
    from .space import Genotype, GenotypeError, load_genotype

    try:
        config = read_config(args.dir)
        records = read_journal(args.dir)
        rec = _trial_record(records, args.genotype)
        g = Genotype.from_dict(rec["genotype"]) if rec else load_genotype(args.genotype, "--genotype")
        proxy = config.proxy
        if args.epochs:
            proxy.epochs = args.epochs
        if args.data_seed is not None:
            proxy.data_seed = args.data_seed
        table = LatencyTable(proxy.device, path=os.path.join(args.dir, LATENCY_TABLE), threads=proxy.latency_threads)
        lat = TableLatency(table, proxy)
        shape = proxy.input_shape(1)

        def timed(*models, rounds=40):  # whole forward passes, timed interleaved
            return measure_latencies(list(models), shape, proxy.device, rounds, proxy.latency_threads)

        channels = args.channels or proxy.channels
        ref_model, ref_name = None, None
        if args.match_latency:
            ref = _trial_record(records, args.match_latency)
            if ref is not None:
                ref_model, ref_name = proxy.build(Genotype.from_dict(ref["genotype"])), args.match_latency
            else:
                try:
                    target_ms = float(args.match_latency)
                except ValueError:
                    ref_model = proxy.build(load_genotype(args.match_latency, "--match-latency"))
                    ref_name = args.match_latency
            if ref_model is not None:
                # Match the latency ratio to the reference, both timed together (robust to drift).
                def ratio(c):
                    a, b = timed(proxy.build(g, c), ref_model)
                    return a / b

                channels, _ = match_channels(ratio, 1.0, channels)
            else:
                channels, _ = match_channels(lambda c: timed(proxy.build(g, c))[0], target_ms, channels)
            print(f"--match-latency {args.match_latency}: C = {channels}", flush=True)
        trained = dataclasses.replace(proxy, channels=channels)
        accs = []
        for seed in range(args.seeds):
            r = proxy_train(g, trained, seed)
            accs.append(r["accuracy"])
            print(f"seed {seed}: accuracy {r['accuracy']:.4f} ({r['train_seconds']:.1f} s)", flush=True)
        model = proxy.build(g, channels)
        table_ms = lat(g, channels)
        if ref_model is not None:
            direct_ms, ref_ms = timed(model, ref_model, rounds=200)
            direct_note = f"{direct_ms:.3f} ms (whole forward; {ref_name}: {ref_ms:.3f} ms, timed interleaved)"
        else:
            direct_note = f"{timed(model, rounds=200)[0]:.3f} ms (whole forward)"
    except (ValueError, SearchError, DataError, GenotypeError) as e:
        return _fail("nas evaluate", e)
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"genotype: {args.genotype}\n{g}")
    print(f"C={channels} N={proxy.cells} epochs={proxy.epochs}: accuracy {statistics.mean(accs):.4f} "
          f"+- {sd:.4f} over {len(accs)} seed(s); latency {direct_note}, {table_ms:.3f} ms (table estimate); "
          f"{count_params(model):,} params; {r['flops'] / 1e6:.2f} MFLOPs")
    return 0


def _show(args) -> int:
    from .network import build, count_params
    from .space import GenotypeError, load_genotype

    try:
        g = load_genotype(args.genotype, "genotype")
        model = build(g, args.channels, args.cells, args.classes, stem=args.stem)
    except (ValueError, GenotypeError) as e:
        return _fail("nas show", e)
    print(g)
    print(f"C={args.channels} N={args.cells} classes={args.classes} stem={args.stem}: "
          f"{count_params(model):,} parameters")
    return 0
