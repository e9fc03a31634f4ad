"""Evaluating a candidate: proxy training (accuracy), parameters, FLOPs and latency.

* ``proxy_train(genotype, config, seed)`` trains the network of ``genotype`` for a few epochs
  on the training split of ``config.data`` and reports the held-out accuracy.
* ``count_flops`` counts 2 x multiply-adds of convolutions and matrix products of one forward
  pass per image (``torch.utils.flop_counter``; pooling, additions and BN are not counted).
* ``LatencyTable`` is a latency lookup table: every module that has a cost (an op, a cell
  input's preprocessing, the stem, the head) is timed once per configuration - its
  ``latency_spec`` (kind, op name, channels, stride) plus its input shape (batch, channels,
  H, W) - on the table's device, with effops's modules, and cached (also on disk). A
  candidate's latency is ``scale * sum + offset`` over the entries of the modules its forward
  pass runs. The plain sum leaves out the additions and concatenations between ops and the Python overhead of the
  network's own forward, and ops timed alone run hotter than inside a network, so the table
  is calibrated against whole networks timed directly (``LatencyTable.calibrate``);
  ``measure_latency`` times a whole forward pass directly when that matters (the README
  comparison matches latencies that way). Timing takes, per entry, the minimum over
  ``repeats`` runs of the mean time per call (the minimum is the least disturbed by other
  work on the machine). Latency is single-threaded by default (``latency_threads``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, load_dataset
from .network import build, count_params
from .ops import module_from_spec
from ._checks import MAX_COUNT, MAX_SEED, _short, check_float, check_int, check_keys, check_str, read_json
from ._checks import atomic_write
from .space import Block, Cell, Genotype, NASNetSpace


@dataclass
class ProxyConfig:
    """How candidates are built and trained (everything but the genotype and the seed)."""

    data: str = "digits"
    image_size: Optional[int] = None
    val_fraction: float = 0.2
    max_samples: Optional[int] = None
    data_seed: int = 0
    channels: int = 8  # C: filters of the first stage
    cells: int = 1  # N: normal cells per stage
    stem_multiplier: int = 3
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 3e-4
    threads: int = 1  # torch threads per trial
    device: str = "cpu"
    latency_threads: int = 1  # torch threads when timing ops (1: MnasNet's single-core latency)
    # distillation: candidates learn from this effops.models classifier's soft targets as well
    # (compress.distill.kd_loss: kd_alpha * T^2 KL + (1 - kd_alpha) * CE)
    teacher: Optional[str] = None
    teacher_weights: Optional[str] = None
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "proxy") -> None:
        """Every field's type and range (a config read from a file is checked the same way)."""
        E = ValueError
        for name, lo, hi in (("channels", 2, 4096), ("cells", 1, 64), ("stem_multiplier", 1, 64),
                             ("epochs", 1, 100_000), ("batch_size", 1, 1 << 20), ("threads", 1, 4096),
                             ("latency_threads", 1, 4096)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise E(f"{where}: {name} must be an integer in [{lo}, {hi}], got {_short(v)}")
        check_str(self.data, "data", where, E)
        if not self.data:
            raise E(f"{where}: data must be 'digits' or a path, got ''")
        check_int(self.image_size, "image_size", where, E, lo=4, hi=4096, optional=True)
        check_int(self.max_samples, "max_samples", where, E, lo=2, hi=MAX_COUNT, optional=True)
        check_int(self.data_seed, "data_seed", where, E, hi=MAX_SEED)
        check_float(self.val_fraction, "val_fraction", where, E, lo=0.0, hi=1.0, lo_open=True)
        if self.val_fraction >= 1.0:
            raise E(f"{where}: val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check_float(self.lr, "lr", where, E, lo=0.0, hi=1e6, lo_open=True)
        check_float(self.momentum, "momentum", where, E, lo=0.0, hi=1.0)
        check_float(self.weight_decay, "weight_decay", where, E, lo=0.0, hi=1e6)
        check_str(self.teacher, "teacher", where, E, max_len=256, optional=True)
        check_str(self.teacher_weights, "teacher_weights", where, E, optional=True)
        if (self.teacher is None) != (self.teacher_weights is None) or self.teacher == "" or self.teacher_weights == "":
            raise E(f"{where}: distillation needs both teacher (--teacher MODEL) and teacher_weights "
                    f"(--teacher-weights CKPT), got {_short(self.teacher)} and {_short(self.teacher_weights)}")
        check_float(self.kd_temperature, "kd_temperature", where, E, lo=0.0, hi=1e3, lo_open=True)
        check_float(self.kd_alpha, "kd_alpha", where, E, lo=0.0, hi=1.0)
        check_str(self.device, "device", where, E, max_len=64)
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise E(f"{where}: device must be a torch device name such as 'cpu' or 'cuda:0', "
                    f"got {_short(self.device)}") from None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "proxy") -> "ProxyConfig":
        """Strict: ``d`` must be a dict of known fields with valid values (``ValueError``
        naming ``where`` and the field otherwise)."""
        names = {f.name for f in fields(cls)}
        check_keys(d, names, where, ValueError)
        try:
            cfg = cls.__new__(cls)
            for f in fields(cls):
                setattr(cfg, f.name, d.get(f.name, f.default))
            cfg.validate(where)
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None
        return cfg

    def dataset(self) -> Dataset:
        return load_dataset(self.data, self.image_size, self.val_fraction, self.data_seed, self.max_samples)

    def build(self, genotype: Genotype, channels: Optional[int] = None) -> nn.Module:
        ds = self.dataset()
        return build(genotype, channels or self.channels, self.cells, ds.num_classes, stem="cifar",
                     in_channels=ds.in_channels, stem_multiplier=self.stem_multiplier)

    def input_shape(self, batch: int = 1) -> Tuple[int, int, int, int]:
        ds = self.dataset()
        return (batch, ds.in_channels, ds.image_size, ds.image_size)


def count_flops(model: nn.Module, input_shape: Tuple[int, ...]) -> int:
    """FLOPs of one forward pass per image (2 x multiply-adds of convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(input_shape, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops()) // input_shape[0]


def proxy_train(genotype: Genotype, config: ProxyConfig, seed: int = 0) -> Dict[str, Any]:
    """Train the candidate for ``config.epochs`` epochs (SGD with Nesterov momentum, cosine
    learning rate, label smoothing 0.1), re-estimate its BatchNorm statistics, and evaluate it
    on the held-out split. With ``config.teacher``, the loss is ``compress.distill.kd_loss`` of the
    teacher's logits on the same images (computed once: the proxy does not augment).

    Returns accuracy (held-out, in [0, 1]), val_loss, train_loss (last epoch), params, flops
    and train_seconds. Deterministic for a given seed, thread count and machine."""
    ds = config.dataset()
    device = torch.device(config.device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = config.build(genotype).to(device)
    params = count_params(model)
    flops = count_flops(model, (1, ds.in_channels, ds.image_size, ds.image_size))
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                          weight_decay=config.weight_decay)
    n = len(ds.train_y)
    steps_per_epoch = math.ceil(n / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    tx, ty = ds.train_x.to(device), ds.train_y.to(device)
    soft = _teacher_logits(config, ds, tx)
    if soft is not None:
        from ..compress.distill import kd_loss
    t0 = time.perf_counter()
    train_loss = float("nan")
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        total, count = 0.0, 0
        for i in range(0, n, config.batch_size):
            idx = perm[i:i + config.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            if soft is None:
                loss = F.cross_entropy(model(tx[idx]), ty[idx], label_smoothing=0.1)
            else:
                loss = kd_loss(model(tx[idx]), soft[idx], ty[idx], temperature=config.kd_temperature,
                               alpha=config.kd_alpha, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        train_loss = total / max(count, 1)
    _recalibrate_bn(model, tx, config.batch_size)
    train_seconds = time.perf_counter() - t0
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(ds.val_y), 256):
            x, y = ds.val_x[i:i + 256].to(device), ds.val_y[i:i + 256].to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
    nv = len(ds.val_y)
    return {
        "accuracy": correct / nv,
        "val_loss": loss_sum / nv,
        "train_loss": train_loss,
        "params": params,
        "flops": flops,
        "train_seconds": round(train_seconds, 3),
    }


def _teacher_logits(config: ProxyConfig, ds: Dataset, tx: torch.Tensor) -> Optional[torch.Tensor]:
    """The teacher's logits on every training image (eval mode, batches of 256), or None."""
    if config.teacher is None:
        return None
    from ..compress.distill import load_teacher

    with torch.random.fork_rng(devices=[]):  # building it draws init values: the trial's seed stays in charge
        teacher = load_teacher(config.teacher, config.teacher_weights, num_classes=ds.num_classes,
                               in_chans=ds.in_channels, where="proxy teacher").to(tx.device)
    with torch.no_grad():
        return torch.cat([teacher(tx[i:i + 256]).float() for i in range(0, len(tx), 256)])


def _recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int, max_samples: int = 1024) -> None:
    """Re-estimate BatchNorm statistics with the final weights (a cumulative average over up to
    ``max_samples`` training images). After a few epochs the running averages still mix in
    statistics of much earlier weights, which makes short proxy runs look far worse than they
    are (at 1 epoch, chance-level held-out accuracy at a training loss well below chance)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for i in range(0, min(len(x), max_samples), batch_size):
            if len(x[i:i + batch_size]) >= 2:
                model(x[i:i + batch_size])
    for m, mom in zip(bns, saved):
        m.momentum = mom


def run_trial(payload: Dict[str, Any]) -> Dict[str, Any]:
    """Worker entry point (picklable): ``{"genotype", "proxy", "seed"}`` -> proxy_train's dict,
    plus the host and process id that ran it."""
    import socket

    config = ProxyConfig.from_dict(payload["proxy"])
    torch.set_num_threads(config.threads)
    result = proxy_train(Genotype.from_dict(payload["genotype"]), config, payload["seed"])
    result.update(host=socket.gethostname(), pid=os.getpid())
    return result


# =============================================================================== latency
@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads, then restore the previous count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], device: torch.device, repeats: int = 5, min_time_s: float = 0.002) -> float:
    """Milliseconds per call: the minimum over ``repeats`` runs of the mean of n calls, n
    chosen so that one run lasts about ``min_time_s``."""
    fn()
    fn()  # warm-up (allocator, lazy init)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, min(1000, int(min_time_s / one)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def measure_latency(model: nn.Module, input_shape: Tuple[int, ...], device="cpu", repeats: int = 10,
                    min_time_s: float = 0.02, threads: int = 1) -> float:
    """A whole forward pass in eval mode with ``threads`` torch threads, timed directly (ms)."""
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.randn(input_shape, device=device)
    with torch_threads(threads), torch.no_grad():
        return time_callable(lambda: model(x), device, repeats, min_time_s)


def measure_latencies(models: List[nn.Module], input_shape: Tuple[int, ...], device="cpu", rounds: int = 100,
                      threads: int = 1) -> List[float]:
    """Whole-forward latencies (ms) of several models, timed interleaved: each round calls
    every model once; each model's latency is its fastest call. Interleaving exposes all
    models to the same machine conditions, so their ratio is trustworthy even where absolute
    times drift with other work on the machine."""
    device = torch.device(device)
    models = [m.to(device).eval() for m in models]
    x = torch.randn(input_shape, device=device)
    best = [float("inf")] * len(models)
    with torch_threads(threads), torch.no_grad():
        for m in models:  # warm-up
            m(x)
            m(x)
        for _ in range(rounds):
            for i, m in enumerate(models):
                _sync(device)
                t0 = time.perf_counter()
                m(x)
                _sync(device)
                best[i] = min(best[i], time.perf_counter() - t0)
    return [b * 1e3 for b in best]


def _costly_modules(model: nn.Module) -> List[nn.Module]:
    """Modules with a latency_spec, outermost only (a tagged module is timed as a whole)."""
    out, prefixes = [], []
    for name, m in model.named_modules():
        if getattr(m, "latency_spec", None) is None:
            continue
        if any(name.startswith(p + ".") for p in prefixes):
            continue
        prefixes.append(name)
        out.append(m)
    return out


def trace_latency_keys(model: nn.Module, input_shape: Tuple[int, ...]) -> List[Tuple[Tuple, Tuple[int, ...]]]:
    """(spec, input shape) of every costly module one forward pass runs, in execution order."""
    calls: List[Tuple[Tuple, Tuple[int, ...]]] = []
    handles = []
    for m in _costly_modules(model):
        def hook(mod, args, _spec=m.latency_spec):
            calls.append((tuple(_spec), tuple(args[0].shape)))
        handles.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        # One thread: a batch-1 shape trace gains nothing from more, and on a busy machine
        # every multi-threaded op would wait for a second core.
        with torch_threads(1), torch.no_grad():
            model(torch.zeros(input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


class LatencyTable:
    """Per-configuration latency cache (see the module docstring). ``path``: a JSON file the
    table is loaded from (if it exists) and saved to after new measurements. ``threads``:
    torch threads while timing; the default 1 is the single-core latency MnasNet optimises,
    and it is also the setting least disturbed by other work on the machine (with more threads,
    every op waits for the slowest core's scheduling).

    Calibration. An op timed alone, over and over, runs hotter than inside a network (warm
    caches and allocator, no other ops in between): on a 2-core EPYC the plain sum of entries
    was 30-50% below the whole forward pass of random NASNet cells at C=8. ``calibrate`` times
    whole networks directly (the warm-up probes plus random members of the space) and fits
    ``latency = scale * sum + offset`` by least squares; ``estimate`` applies it when present
    (mean error on random cells ~10% instead of ~35%). The fit belongs to one network family
    (channels, cells, input size); far from it (e.g. much wider nets) it extrapolates.
    """

    def __init__(self, device="cpu", repeats: int = 5, min_time_s: float = 0.002, path: Optional[str] = None,
                 threads: int = 1):
        self.device = torch.device(device)
        self.repeats = repeats
        self.min_time_s = min_time_s
        self.threads = threads
        self.path = path
        self.entries: Dict[str, float] = {}
        self.calibration: Optional[Dict[str, float]] = None
        self.measurements = 0  # how many entries this object has timed (cache misses)
        self._dirty = False
        if path and os.path.exists(path):
            self.load(path)

    def key(self, spec: Tuple, shape: Tuple[int, ...]) -> str:
        return json.dumps([list(spec), list(shape), self.device.type, self.threads])

    def lookup(self, spec: Tuple, shape: Tuple[int, ...]) -> float:
        k = self.key(spec, shape)
        if k not in self.entries:
            self.entries[k] = self._measure(spec, shape)
            self.measurements += 1
            self._dirty = True
        return self.entries[k]

    def _measure(self, spec: Tuple, shape: Tuple[int, ...]) -> float:
        torch.manual_seed(0)
        m = module_from_spec(spec).to(self.device).eval()
        x = torch.randn(shape, device=self.device)
        with torch_threads(self.threads), torch.no_grad():
            return time_callable(lambda: m(x), self.device, self.repeats, self.min_time_s)

    def _save_if_dirty(self) -> None:
        if self._dirty and self.path:
            self.save(self.path)
        self._dirty = False

    def table_sum(self, model: nn.Module, input_shape: Tuple[int, ...]) -> float:
        """Milliseconds: the plain sum of the table entries of the model's costly modules."""
        total = sum(self.lookup(spec, shape) for spec, shape in trace_latency_keys(model, input_shape))
        self._save_if_dirty()
        return total

    def estimate(self, model: nn.Module, input_shape: Tuple[int, ...]) -> float:
        """Milliseconds: the calibrated sum (the plain sum when not calibrated)."""
        total = self.table_sum(model, input_shape)
        if self.calibration is None:
            return total
        return self.calibration["scale"] * total + self.calibration["offset"]

    def warm(self, space: NASNetSpace, config: "ProxyConfig", calibrate: bool = True) -> int:
        """Time, up front, every configuration a member of ``space`` can use under ``config``
        (so that a search's latencies are all measured before the workers start and compete
        for the cores), then calibrate if the table is not yet. Returns the number of new
        entries."""
        before = self.measurements
        shape = config.input_shape(1)
        for g in _probe_genotypes(space):
            for spec, s in trace_latency_keys(config.build(g), shape):
                self.lookup(spec, s)
        self._save_if_dirty()
        if calibrate and self.calibration is None:
            self.calibrate(space, config)
        return self.measurements - before

    def calibrate(self, space: NASNetSpace, config: "ProxyConfig", random_networks: int = 16) -> Dict[str, float]:
        """Fit ``whole forward = scale * table sum + offset`` on directly timed networks: the
        warm-up probes and ``random_networks`` random members of ``space`` (seed 0)."""
        shape = config.input_shape(1)
        rng = __import__("numpy").random.default_rng(0)
        nets = list(_probe_genotypes(space)) + [space.sample(rng) for _ in range(random_networks)]
        sums, direct = [], []
        for g in nets:
            model = config.build(g).to(self.device)
            sums.append(self.table_sum(model, shape))
            direct.append(measure_latency(model, shape, self.device, repeats=self.repeats,
                                          min_time_s=5 * self.min_time_s, threads=self.threads))
        n = len(sums)
        mx, my = sum(sums) / n, sum(direct) / n
        var = sum((x - mx) ** 2 for x in sums)
        scale = sum((x - mx) * (y - my) for x, y in zip(sums, direct)) / var if var > 0 else my / max(mx, 1e-9)
        if not scale > 0:  # a degenerate fit (e.g. timing noise on a tiny space): proportional instead
            scale = my / max(mx, 1e-9)
        offset = my - scale * mx
        err = sum(abs(scale * x + offset - y) / y for x, y in zip(sums, direct)) / n
        self.calibration = {"scale": scale, "offset": offset, "networks": n, "mean_rel_error": err,
                            "channels": config.channels, "cells": config.cells, "input": list(shape)}
        if self.path:
            self.save(self.path)
        return self.calibration

    def save(self, path: str) -> None:
        doc = {"device": self.device.type, "threads": self.threads, "calibration": self.calibration,
               "entries": self.entries}
        atomic_write(path, lambda f: json.dump(doc, f, indent=0), "w")

    def load(self, path: str) -> None:
        where = f"latency table {path!r}"
        d = read_json(path, "latency table", ValueError)
        check_keys(d, {"device", "threads", "calibration", "entries"}, where, ValueError, required=("entries",))
        entries = d["entries"]
        if not isinstance(entries, dict):
            raise ValueError(f"{where}: entries must be a JSON object, got {type(entries).__name__}")
        for k, v in entries.items():
            check_float(v, f"entry {_short(k)}", where, ValueError, lo=0.0)
        calibration = d.get("calibration")
        if calibration is not None:
            check_keys(calibration, {"scale", "offset", "networks", "mean_rel_error", "channels", "cells", "input"},
                       f"{where} calibration", ValueError, required=("scale", "offset"))
            check_float(calibration["scale"], "calibration.scale", where, ValueError, lo=0.0, lo_open=True)
            check_float(calibration["offset"], "calibration.offset", where, ValueError)
        self.entries.update({str(k): float(v) for k, v in entries.items()})
        if calibration is not None:
            self.calibration = calibration


def _probe_genotypes(space: NASNetSpace) -> Iterable[Genotype]:
    """Genotypes that together use every (module, shape) configuration of the space: per op,
    a cell applying it to both inputs (stride 2 in reduction cells) and to a block output
    (stride 1); per pair (unused blocks in the normal cell, in the reduction cell), a chain
    that leaves exactly that many outputs to concatenate (the preprocessing and head widths)."""
    B = space.num_blocks

    def op_cell(op: str) -> Cell:
        blocks = [Block(0, op, 1, op)] + [Block(2, op, 1, op) for _ in range(1, B)]
        return Cell(tuple(blocks))

    for op in space.ops:
        yield Genotype(op_cell(op), op_cell(op))

    op = space.ops[0]

    def chain(m: int) -> Cell:
        # Blocks 0..B-m-1 each feed the next block; the last m blocks are unused. Block 0
        # reads both cell inputs, so both preprocessings exist.
        return Cell(tuple(Block(1 + i if i <= B - m else 0, op, 0, op) for i in range(B)))

    for m_n in range(1, B + 1):
        for m_r in range(1, B + 1):
            yield Genotype(chain(m_n), chain(m_r))


class TableLatency:
    """``latency(genotype) -> ms`` through a ``LatencyTable`` for networks built by ``config``."""

    def __init__(self, table: LatencyTable, config: ProxyConfig):
        self.table = table
        self.config = config

    def __call__(self, genotype: Genotype, channels: Optional[int] = None) -> float:
        return self.table.estimate(self.config.build(genotype, channels), self.config.input_shape(1))


def match_channels(latency_of: Callable[[int], float], target_ms: float, start: int, c_min: int = 2,
                   c_max: int = 512) -> Tuple[int, float]:
    """The largest channel count C in [c_min, c_max] whose latency ``latency_of(C)`` is at
    most ``target_ms`` (``c_min`` if none is): the widest network that is no slower than the
    target. Latency is taken to grow with C (a doubling bracket, then bisection).
    Returns (C, latency)."""
    cache: Dict[int, float] = {}

    def lat(c: int) -> float:
        if c not in cache:
            cache[c] = latency_of(c)
        return cache[c]

    lo = hi = min(max(start, c_min), c_max)
    if lat(lo) <= target_ms:
        while hi < c_max and lat(hi) <= target_ms:
            lo, hi = hi, min(2 * hi, c_max)
        if lat(hi) <= target_ms:
            return hi, lat(hi)
    else:
        while lo > c_min and lat(lo) > target_ms:
            hi, lo = lo, max(lo // 2, c_min)
        if lat(lo) > target_ms:
            return lo, lat(lo)
    # Now lat(lo) <= target < lat(hi).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if lat(mid) <= target_ms:
            lo = mid
        else:
            hi = mid
    return lo, lat(lo)
