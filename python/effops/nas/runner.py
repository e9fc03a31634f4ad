"""The search loop: strategy <-> workers, with a journal that survives any crash.

``run_search(config, out_dir)`` proposes genotypes with the strategy, trains them on a local
process pool (or inline with one worker, or as Ray tasks), measures their latency in this
process from a latency table, scores them with the objective and tells the strategy.

Crash safety. Files in ``out_dir``:

* ``config.json``     the search's settings (a resumed search reads them back).
* ``journal.jsonl``   one JSON line per finished trial. A trial counts only once its line is
                      written and fsync'ed, and only then does the strategy observe it.
* ``state.pt``        checkpoint: strategy state, next trial id, the trials proposed but not
                      yet observed ("pending"), the ids observed. Written atomically (temp
                      file + rename) after every proposal and every observation, and before a
                      proposal is handed to a worker.
* ``latency_table.json`` the latency table (so a resumed search prices ops identically).

On ``resume``: trials in the journal that the checkpoint has not observed yet (the run died
between the two writes) are observed now, in journal order; the other pending trials are run
again (they never finished, so nothing is repeated); then the loop continues from the saved
strategy state. With one worker the resumed search is exactly the uninterrupted one.
A genotype proposed again after it finished is not retrained: its journal line is reused
(trial seeds are derived from the genotype, so retraining would give the same numbers).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ._checks import (MAX_SEED, _short, atomic_write, check_float, check_int, check_keys, check_str, parse_json,
                      read_json, torch_load_plain)
from .evaluate import LatencyTable, ProxyConfig, TableLatency, run_trial
from .objective import Objective
from .space import Genotype, GenotypeError, NASNetSpace
from .strategies import STRATEGIES, Strategy, make_strategy

JOURNAL = "journal.jsonl"
STATE = "state.pt"
CONFIG = "config.json"
LATENCY_TABLE = "latency_table.json"

# Settings a resumed search may change; every other setting must match the saved one.
RESUMABLE_CHANGES = ("budget", "workers", "backend", "ray_address", "progress")
#: The largest budget (and population / sample) a search accepts.
MAX_BUDGET = 1_000_000


class SearchError(RuntimeError):
    """A search that cannot start or continue (bad out dir, inconsistent files)."""


class TrialError(SearchError):
    """A trial raised in its worker. The search stops; ``--resume`` runs the trial again."""

    def __init__(self, trial: Dict[str, Any], error: BaseException):
        self.trial = trial
        self.error = error
        super().__init__(
            f"trial {trial['trial']} failed: {type(error).__name__}: {error}; fix the cause, then continue "
            "with --resume (finished trials are kept; this one runs again)"
        )


@dataclass
class SearchConfig:
    strategy: str = "evolution"
    budget: int = 20
    workers: int = 1
    backend: str = "local"  # local | ray
    objective: str = "accuracy"  # accuracy | mnas
    target_latency_ms: Optional[float] = None
    seed: int = 0
    population: int = 100  # evolution
    sample: int = 25  # evolution
    num_blocks: int = 5
    ops: Optional[List[str]] = None  # None: all 13 NASNet ops
    ray_address: Optional[str] = None
    progress: bool = True
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def __post_init__(self):
        if isinstance(self.proxy, dict):
            self.proxy = ProxyConfig.from_dict(self.proxy)
        if isinstance(self.ops, tuple):
            self.ops = list(self.ops)
        self.validate()

    def validate(self, where: str = "search settings") -> None:
        E = ValueError
        if not isinstance(self.proxy, ProxyConfig):
            raise E(f"{where}: proxy must be a JSON object of proxy settings, got {_short(self.proxy)}")
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise E(f"{where}: strategy must be one of {list(STRATEGIES)}, got {_short(self.strategy)}")
        check_int(self.budget, "budget", where, E, lo=1, hi=MAX_BUDGET)
        check_int(self.workers, "workers", where, E, lo=1, hi=4096)
        if self.backend not in ("local", "ray"):
            raise E(f"{where}: backend must be 'local' or 'ray', got {_short(self.backend)}")
        check_int(self.seed, "seed", where, E, hi=MAX_SEED)
        check_int(self.population, "population", where, E, lo=1, hi=MAX_BUDGET)
        check_int(self.sample, "sample", where, E, lo=1, hi=MAX_BUDGET)
        check_int(self.num_blocks, "num_blocks", where, E, lo=1, hi=64)
        if self.objective not in ("accuracy", "mnas"):
            raise E(f"{where}: objective must be 'accuracy' or 'mnas', got {_short(self.objective)}")
        check_float(self.target_latency_ms, "target_latency_ms", where, E, lo=0.0, lo_open=True, optional=True)
        if self.ops is not None and (not isinstance(self.ops, (list, tuple)) or len(self.ops) > 64
                                     or not all(isinstance(o, str) for o in self.ops)):
            raise E(f"{where}: ops must be null or a list of op names, got {_short(self.ops)}")
        check_str(self.ray_address, "ray_address", where, E, optional=True)
        if not isinstance(self.progress, bool):
            raise E(f"{where}: progress must be true or false, got {_short(self.progress)}")
        self.make_objective()  # checks objective / target_latency_ms
        self.make_space()  # checks num_blocks / ops

    def make_space(self) -> NASNetSpace:
        return NASNetSpace(self.num_blocks, self.ops)

    def make_objective(self) -> Objective:
        return Objective(self.objective, self.target_latency_ms)

    def make_strategy(self) -> Strategy:
        kw = {"population": self.population, "sample": self.sample} if self.strategy == "evolution" else {}
        return make_strategy(self.strategy, self.make_space(), self.seed, **kw)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["proxy"] = self.proxy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "search settings") -> "SearchConfig":
        """Strict: ``d`` must be a dict of known fields (``proxy`` a dict of proxy settings) with
        valid values; anything else is a ``ValueError`` naming ``where`` and the field."""
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, where, ValueError)
        cfg = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            setattr(cfg, f.name, d.get(f.name, default))
        cfg.proxy = ProxyConfig.from_dict(d["proxy"], f"{where}: proxy") if "proxy" in d else ProxyConfig()
        cfg.validate(where)
        return cfg


# =============================================================================== files
def check_record(r: Any, where: str) -> Dict[str, Any]:
    """A journal record read from a file: the fields the search and the report use must be
    there with the right types (anything else a trial function returned is kept as is)."""
    E = SearchError
    if not isinstance(r, dict):
        raise E(f"{where}: a journal record must be a JSON object, got {_short(r)}")
    missing = [k for k in ("trial", "genotype", "seed", "reward", "accuracy", "latency_ms") if k not in r]
    if missing:
        raise E(f"{where}: the record lacks field(s) {missing}")
    check_int(r["trial"], "trial", where, E)
    check_int(r["seed"], "seed", where, E, hi=MAX_SEED)
    check_float(r["reward"], "reward", where, E)
    check_float(r["accuracy"], "accuracy", where, E)
    check_float(r["latency_ms"], "latency_ms", where, E, lo=0.0)
    for k in ("params", "flops"):
        if k in r:
            check_int(r[k], k, where, E, hi=2**62)
    check_int(r.get("reused_from"), "reused_from", where, E, optional=True)
    try:
        Genotype.from_dict(r["genotype"])
    except GenotypeError as e:
        raise E(f"{where}: genotype: {e}") from None
    return r


class Journal:
    """Append-only JSON lines; a line is durable (fsync) before ``append`` returns."""

    def __init__(self, path: str):
        self.path = path
        self.records: List[Dict[str, Any]] = self._read()

    def _read(self) -> List[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        records, good = [], 0
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last and not line:
                break
            if last:  # no newline: the run died while writing this line; it never counted
                with open(self.path, "r+b") as f:
                    f.truncate(good)
                break
            where = f"{self.path}: line {i + 1}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise SearchError(f"{where} is not UTF-8 text; the journal is corrupt") from None
            records.append(check_record(parse_json(text, where, SearchError), where))
            good += len(line) + 1
        seen: Dict[int, int] = {}
        for i, r in enumerate(records):
            if r["trial"] in seen:
                raise SearchError(f"{self.path}: trial {r['trial']} appears twice in the journal "
                                  f"(records {seen[r['trial']] + 1} and {i + 1})")
            seen[r["trial"]] = i
        return records

    def append(self, record: Dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


def read_journal(out_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(out_dir, JOURNAL)
    if not os.path.exists(path):
        raise SearchError(f"{out_dir!r} holds no search journal ({JOURNAL}); run `effops search --out {out_dir}` first")
    return Journal(path).records


def read_config(out_dir: str) -> SearchConfig:
    path = os.path.join(out_dir, CONFIG)
    if not os.path.exists(path):
        raise SearchError(f"{out_dir!r} holds no search ({CONFIG} is missing)")
    d = read_json(path, "search settings", SearchError)
    try:
        return SearchConfig.from_dict(d, where=path)
    except (ValueError, TypeError) as e:
        raise SearchError(f"cannot read the search settings: {e}") from None


def trial_seed(run_seed: int, genotype: Genotype) -> int:
    h = hashlib.sha256(f"{run_seed}:{genotype.to_json()}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# =============================================================================== backends
class _InlineBackend:
    """One worker: trials run in this process, in submission order."""

    def __init__(self, trial_fn):
        self.trial_fn = trial_fn
        self.queue: List[Dict[str, Any]] = []

    def submit(self, trial: Dict[str, Any], payload: Dict[str, Any]) -> None:
        self.queue.append((trial, payload))

    def wait(self) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        trial, payload = self.queue.pop(0)
        try:
            return trial, self.trial_fn(payload)
        except Exception as e:
            raise TrialError(trial, e) from e

    def close(self) -> None:
        self.queue.clear()


class _PoolBackend:
    """A process pool on this machine (spawned processes: no state leaks from this one)."""

    def __init__(self, trial_fn, workers: int):
        self.trial_fn = trial_fn
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self.futures: Dict[cf.Future, Dict[str, Any]] = {}

    def submit(self, trial, payload) -> None:
        self.futures[self.pool.submit(self.trial_fn, payload)] = trial

    def wait(self):
        done, _ = cf.wait(list(self.futures), return_when=cf.FIRST_COMPLETED)
        fut = min(done, key=lambda f: self.futures[f]["trial"])
        trial = self.futures.pop(fut)
        try:
            return trial, fut.result()
        except Exception as e:  # the worker's exception, or BrokenProcessPool if it died
            raise TrialError(trial, e) from e

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


class _RayBackend:
    """Trials as Ray tasks on a local or existing Ray cluster (``ray_address``; default: the
    cluster ``ray.init()`` finds - RAY_ADDRESS or a new local instance). effops must be
    installed where the tasks run."""

    def __init__(self, trial_fn, workers: int, address: Optional[str], cpus_per_trial: int):
        try:
            import ray
        except ImportError:
            raise SearchError("backend 'ray' needs Ray: pip install 'effops[ray]'") from None
        self.ray = ray
        self.owns = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self.owns = True
        self.task = ray.remote(num_cpus=cpus_per_trial, max_retries=0)(trial_fn)
        self.refs: Dict[Any, Dict[str, Any]] = {}

    def submit(self, trial, payload) -> None:
        self.refs[self.task.remote(payload)] = trial

    def wait(self):
        done, _ = self.ray.wait(list(self.refs), num_returns=1)
        ref = done[0]
        trial = self.refs.pop(ref)
        try:
            return trial, self.ray.get(ref)
        except Exception as e:
            raise TrialError(trial, e) from e

    def close(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self.owns:
            self.ray.shutdown()


def _make_backend(config: SearchConfig, trial_fn):
    if config.backend == "ray":
        return _RayBackend(trial_fn, config.workers, config.ray_address, config.proxy.threads)
    if config.workers == 1:
        return _InlineBackend(trial_fn)
    return _PoolBackend(trial_fn, config.workers)


# =============================================================================== progress
class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="search", unit="trial", file=sys.stderr)
            except ImportError:  # pragma: no cover - the nas extra installs tqdm
                self.bar = None
        self.n, self.total = initial, total

    def update(self, record: Dict[str, Any], best: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(acc=f"{record['accuracy']:.3f}", lat=f"{record['latency_ms']:.2f}ms",
                                 best=f"{best:.4f}", refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"trial {self.n}/{self.total}: accuracy {record['accuracy']:.3f}, "
                  f"latency {record['latency_ms']:.2f} ms, reward {record['reward']:.4f}, best {best:.4f}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# =============================================================================== the loop
class Search:
    """One search in ``out_dir``; ``run()`` runs it to its budget. See the module docstring."""

    def __init__(
        self,
        config: SearchConfig,
        out_dir: str,
        resume: bool = False,
        trial_fn: Callable[[Dict[str, Any]], Dict[str, Any]] = run_trial,
        latency_fn: Optional[Callable[[Genotype], float]] = None,
    ):
        self.out_dir = out_dir
        self.trial_fn = trial_fn
        os.makedirs(out_dir, exist_ok=True)
        cfg_path = os.path.join(out_dir, CONFIG)
        if resume:
            saved = read_config(out_dir)
            new, old = config.to_dict(), saved.to_dict()
            diff = [k for k in old if k not in RESUMABLE_CHANGES and old[k] != new.get(k)]
            if diff:
                detail = ", ".join(f"{k}: saved {old[k]!r}, given {new.get(k)!r}" for k in diff)
                raise SearchError(f"--resume: the settings differ from the saved search in {out_dir!r} ({detail})")
        elif os.path.exists(cfg_path) or os.path.exists(os.path.join(out_dir, JOURNAL)):
            raise SearchError(
                f"{out_dir!r} already holds a search; pass --resume to continue it, or choose another --out"
            )
        self.config = config
        ds = config.proxy.dataset()  # bad data fails here, before anything is written
        info = {"name": ds.name, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
                "image_size": ds.image_size, "train": len(ds.train_y), "val": len(ds.val_y)}
        atomic_write(os.path.join(out_dir, "dataset.json"), lambda f: f.write(json.dumps(info, indent=2)), "w")
        atomic_write(cfg_path, lambda f: f.write(json.dumps(config.to_dict(), indent=2)), "w")
        self.space = config.make_space()
        self.objective = config.make_objective()
        self.journal = Journal(os.path.join(out_dir, JOURNAL))
        self.strategy = config.make_strategy()
        self.next_trial = 0
        self.pending: List[Dict[str, Any]] = []
        self.observed: List[int] = []
        state_path = os.path.join(out_dir, STATE)
        if resume and os.path.exists(state_path):
            self._load_state(state_path)
        elif self.journal.records:
            raise SearchError(f"{out_dir!r}: the journal has trials but the checkpoint {STATE} is missing")
        self._recover()
        self._latency_fn = latency_fn
        self.latency_table: Optional[LatencyTable] = None

    # ------------------------------------------------------------ checkpoint
    def _save_state(self) -> None:
        state = {
            "version": 1,
            "strategy": self.strategy.state_dict(),
            "next_trial": self.next_trial,
            "pending": self.pending,
            "observed": self.observed,
        }
        atomic_write(os.path.join(self.out_dir, STATE), lambda f: torch.save(state, f))

    def _load_state(self, path: str) -> None:
        # The checkpoint holds only dicts, lists, numbers, strings and tensors: loaded with
        # weights_only, a crafted state.pt cannot run code here; anything else is refused.
        state = torch_load_plain(path, f"checkpoint {path}", SearchError)
        where = f"{path}"
        check_keys(state, {"version", "strategy", "next_trial", "pending", "observed"}, where, SearchError,
                   required=("version", "strategy", "next_trial", "pending", "observed"))
        if state["version"] != 1:
            raise SearchError(f"{where}: checkpoint version {_short(state['version'])} is not supported (expected 1)")
        next_trial = check_int(state["next_trial"], "next_trial", where, SearchError)
        pending, observed = state["pending"], state["observed"]
        if not isinstance(pending, list) or not isinstance(observed, list):
            raise SearchError(f"{where}: pending and observed must be lists")
        for i, t in enumerate(pending):
            w = f"{where}: pending[{i}]"
            check_keys(t, {"trial", "genotype", "seed"}, w, SearchError, required=("trial", "genotype", "seed"))
            check_int(t["trial"], "trial", w, SearchError, hi=max(next_trial - 1, 0))
            check_int(t["seed"], "seed", w, SearchError, hi=MAX_SEED)
            try:
                Genotype.from_dict(t["genotype"])
            except GenotypeError as e:
                raise SearchError(f"{w}: genotype: {e}") from None
        for i, t in enumerate(observed):
            check_int(t, f"observed[{i}]", where, SearchError)
        try:
            self.strategy.load_state_dict(state["strategy"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            raise SearchError(f"{where}: the strategy state does not fit this search "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
        self.next_trial = next_trial
        self.pending = list(pending)
        self.observed = list(observed)

    def _recover(self) -> None:
        """Observe journaled trials the checkpoint missed; drop pending ones over budget."""
        seen = set(self.observed)
        pending_ids = {t["trial"] for t in self.pending}
        changed = False
        for r in self.journal.records:
            if r["trial"] in seen:
                continue
            if r["trial"] not in pending_ids:
                raise SearchError(
                    f"{self.out_dir!r}: journal trial {r['trial']} is neither observed nor pending in the "
                    "checkpoint; the files do not belong together"
                )
            self._observe(r)
            changed = True
        room = self.config.budget - len(self.journal.records)
        if len(self.pending) > max(room, 0):
            self.pending = sorted(self.pending, key=lambda t: t["trial"])[: max(room, 0)]
            changed = True
        if changed or not os.path.exists(os.path.join(self.out_dir, STATE)):
            self._save_state()

    def _observe(self, record: Dict[str, Any]) -> None:
        self.strategy.observe(Genotype.from_dict(record["genotype"]), record["reward"])
        self.pending = [t for t in self.pending if t["trial"] != record["trial"]]
        self.observed.append(record["trial"])

    # ------------------------------------------------------------ latency
    def _ensure_latency(self) -> None:
        """Load the run's latency table and time what it lacks, before any worker starts
        competing for the cores (a no-op with a user-supplied latency_fn)."""
        if self._latency_fn is None:
            self.latency_table = LatencyTable(self.config.proxy.device, path=os.path.join(self.out_dir, LATENCY_TABLE),
                                              threads=self.config.proxy.latency_threads)
            self.latency_table.warm(self.space, self.config.proxy)
            self._latency_fn = TableLatency(self.latency_table, self.config.proxy)

    def latency(self, genotype: Genotype) -> float:
        self._ensure_latency()
        return float(self._latency_fn(genotype))

    # ------------------------------------------------------------ run
    def _payload(self, trial: Dict[str, Any]) -> Dict[str, Any]:
        return {"genotype": trial["genotype"], "proxy": self.config.proxy.to_dict(), "seed": trial["seed"]}

    def _finish(self, trial: Dict[str, Any], metrics: Dict[str, Any], reused_from: Optional[int] = None) -> Dict[str, Any]:
        g = Genotype.from_dict(trial["genotype"])
        # numpy / torch scalars from a custom trial_fn become plain numbers for the JSON journal.
        record = {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for k, v in metrics.items()}
        for k in ("trial", "genotype", "seed", "reward", "reused_from", "finished_at"):
            record.pop(k, None)
        record["latency_ms"] = self.latency(g) if "latency_ms" not in record else record["latency_ms"]
        record.update(trial=trial["trial"], genotype=trial["genotype"], seed=trial["seed"],
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if reused_from is not None:
            record["reused_from"] = reused_from
        record["reward"] = float(self.objective(record))
        self.journal.append(record)  # durable: from here on the trial counts
        self._observe(record)
        self._save_state()
        return record

    def run(self) -> List[Dict[str, Any]]:
        cfg = self.config
        self._ensure_latency()
        done_by_key = {json.dumps(r["genotype"], sort_keys=True): r for r in self.journal.records}
        progress = _Progress(cfg.budget, len(self.journal.records), cfg.progress)
        best = max((r["reward"] for r in self.journal.records), default=float("-inf"))
        backend = _make_backend(cfg, self.trial_fn) if len(self.journal.records) < cfg.budget else None
        inflight = 0
        try:
            for trial in sorted(self.pending, key=lambda t: t["trial"]):  # unfinished before the crash
                backend.submit(trial, self._payload(trial))
                inflight += 1
            while len(self.journal.records) < cfg.budget:
                while inflight < cfg.workers and len(self.journal.records) + inflight < cfg.budget:
                    g = self.strategy.propose()
                    trial = {"trial": self.next_trial, "genotype": g.to_dict(), "seed": trial_seed(cfg.seed, g)}
                    self.next_trial += 1
                    self.pending.append(trial)
                    self._save_state()  # the proposal is durable before anyone works on it
                    key = json.dumps(trial["genotype"], sort_keys=True)
                    if key in done_by_key:
                        prev = done_by_key[key]
                        record = self._finish(trial, prev, reused_from=prev["trial"])
                        best = max(best, record["reward"])
                        progress.update(record, best)
                        continue
                    backend.submit(trial, self._payload(trial))
                    inflight += 1
                if inflight == 0:
                    continue
                trial, metrics = backend.wait()
                inflight -= 1
                record = self._finish(trial, metrics)
                done_by_key.setdefault(json.dumps(record["genotype"], sort_keys=True), record)
                best = max(best, record["reward"])
                progress.update(record, best)
        finally:
            progress.close()
            if backend is not None:
                backend.close()
        return self.journal.records


def run_search(
    config: SearchConfig,
    out_dir: str,
    resume: bool = False,
    trial_fn: Callable[[Dict[str, Any]], Dict[str, Any]] = run_trial,
    latency_fn: Optional[Callable[[Genotype], float]] = None,
    report: bool = True,
) -> List[Dict[str, Any]]:
    """Run (or, with ``resume``, continue) a search in ``out_dir``; returns the journal records.
    ``trial_fn(payload) -> metrics`` trains one candidate (default: proxy training; must be
    picklable for the process pool and Ray); ``latency_fn(genotype) -> ms`` prices one
    (default: the latency table). With ``report``, writes the report when the budget is spent."""
    search = Search(config, out_dir, resume=resume, trial_fn=trial_fn, latency_fn=latency_fn)
    records = search.run()
    if report:
        from .report import write_report

        write_report(out_dir)
    return records
