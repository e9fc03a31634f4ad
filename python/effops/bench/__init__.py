"""Benchmarks: one harness (harness.py) and one module of cases per op family (bench_<family>.py).
Run them with ``effops bench <family> ...``; see ``effops bench --help``."""

FAMILIES = {
    "nms": "effops.bench.bench_nms",
    "dwsep": "effops.bench.bench_dwsep",
    "bifpn": "effops.bench.bench_bifpn",
    "losses": "effops.bench.bench_losses",
    "norm": "effops.bench.bench_norm",
    "prune": "effops.bench.bench_prune",
    "qconv": "effops.bench.bench_qconv",
    "train": "effops.bench.bench_train",  # a whole D0 training step vs effdet's DetBenchTrain (minutes at 512)
    "compress": "effops.bench.bench_compress",  # the README's compression table: trains, prunes, quantizes (~15 min)
}

# Families that take minutes (whole training steps, pruning studies): run only when named, so that
# `effops bench` (the README's main job) stays the op benchmarks of a minute or two.
ON_REQUEST = ("prune", "train", "compress")
DEFAULT = tuple(f for f in FAMILIES if f not in ON_REQUEST)
