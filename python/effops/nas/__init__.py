"""effops.nas: NASNet-style architecture search.

    from effops.nas import NASNetSpace, RegularizedEvolution, build, NASNET_A
    space = NASNetSpace()
    strategy = RegularizedEvolution(space, population=100, sample=25, seed=0)
    g = strategy.propose(); strategy.observe(g, reward)
    net = build(NASNET_A, C=44, N=4, num_classes=1000, stem="imagenet")   # NASNet-A mobile

Searches with crash-safe journals run from ``effops search`` or ``run_search`` (runner.py).
"""

from .data import DataError, Dataset, load_dataset
from .evaluate import (
    LatencyTable,
    ProxyConfig,
    TableLatency,
    count_flops,
    measure_latency,
    proxy_train,
)
from .network import NASNetwork, build, count_params
from .objective import MNAS_W, Objective, mnas_reward, pareto_front
from .report import draw_genotype, export, load_exported, plot_pareto, write_report
from .runner import SearchConfig, SearchError, TrialError, read_journal, run_search
from .space import (
    HANDMADE_BASELINE,
    NAMED_GENOTYPES,
    NASNET_A,
    OPS,
    Block,
    Cell,
    Genotype,
    GenotypeError,
    NASNetSpace,
    genotype_without_concat,
)
from .strategies import RandomSearch, RegularizedEvolution, Reinforce, Strategy, make_strategy

__all__ = [
    "OPS", "Block", "Cell", "Genotype", "GenotypeError", "NASNetSpace", "NASNET_A", "HANDMADE_BASELINE",
    "NAMED_GENOTYPES", "genotype_without_concat",
    "build", "NASNetwork", "count_params",
    "Strategy", "RandomSearch", "RegularizedEvolution", "Reinforce", "make_strategy",
    "DataError", "Dataset", "load_dataset",
    "ProxyConfig", "proxy_train", "count_flops", "LatencyTable", "TableLatency", "measure_latency",
    "Objective", "mnas_reward", "MNAS_W", "pareto_front",
    "SearchConfig", "SearchError", "TrialError", "run_search", "read_journal",
    "write_report", "plot_pareto", "draw_genotype", "export", "load_exported",
]
