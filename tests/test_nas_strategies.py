"""effops.nas strategies: ask/tell, exact state round-trips, and better than random search."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from effops.nas import (
    Genotype,
    GenotypeError,
    NASNetSpace,
    RandomSearch,
    RegularizedEvolution,
    Reinforce,
    make_strategy,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPACE = NASNetSpace()


def synthetic_objective(seed: int):
    """Reward = fraction of encoding positions equal to a hidden target encoding: cheap, with
    one optimum, and random search's best of n samples is far below it."""
    rng = np.random.default_rng(1000 + seed)
    target = np.array([int(rng.integers(n)) for n in SPACE.cardinalities()])

    def reward(g: Genotype) -> float:
        return float(np.mean(np.array(SPACE.encode(g)) == target))

    return reward


def best_found(strategy, reward, budget: int) -> float:
    best = -1.0
    for _ in range(budget):
        g = strategy.propose()
        r = reward(g)
        strategy.observe(g, r)
        best = max(best, r)
    return best


MAKERS = {
    "random": lambda seed: RandomSearch(SPACE, seed=seed),
    "evolution": lambda seed: RegularizedEvolution(SPACE, population=20, sample=5, seed=seed),
    "evolution-paper": lambda seed: RegularizedEvolution(SPACE, population=100, sample=25, seed=seed),
    "reinforce": lambda seed: Reinforce(SPACE, seed=seed),
    "reinforce-batched": lambda seed: Reinforce(SPACE, seed=seed, batch_size=3),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_round_trip_gives_identical_next_proposals(name):
    reward = synthetic_objective(0)
    a = MAKERS[name](seed=3)
    # Enough history to be past evolution's random phase (population 20), and two proposals
    # in flight (asked, not yet told), as in a parallel search.
    best_found(a, reward, 24)
    in_flight = [a.propose(), a.propose()]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # through bytes, as the runner's checkpoint does
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = MAKERS[name](seed=99)  # a different seed: everything must come from the state
    b.load_state_dict(state)
    for g in in_flight:
        for s in (a, b):
            s.observe(g, reward(g))
    seq_a, seq_b = [], []
    for _ in range(15):
        ga, gb = a.propose(), b.propose()
        seq_a.append(ga)
        seq_b.append(gb)
        a.observe(ga, reward(ga))
        b.observe(gb, reward(gb))
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1
    assert a.best == b.best and a.num_observed == b.num_observed == 24 + 2 + 15


def test_load_state_dict_rejects_mismatches():
    evo = RegularizedEvolution(SPACE, population=20, sample=5, seed=0)
    with pytest.raises(ValueError, match="state is for strategy 'random', not 'evolution'"):
        evo.load_state_dict(RandomSearch(SPACE).state_dict())
    with pytest.raises(ValueError, match="population=100, sample=25"):
        evo.load_state_dict(RegularizedEvolution(SPACE, seed=0).state_dict())
    other = RandomSearch(NASNetSpace(num_blocks=3))
    with pytest.raises(ValueError, match="state is for space"):
        RandomSearch(SPACE).load_state_dict(other.state_dict())


def test_aging_evolution_mechanics():
    evo = RegularizedEvolution(SPACE, population=5, sample=2, seed=0)
    gs = [evo.propose() for _ in range(5)]  # random phase
    for i, g in enumerate(gs):
        evo.observe(g, float(i))
    child = evo.propose()
    # The child is one mutation away from a population member.
    enc = np.array(SPACE.encode(child))
    assert min(int((enc != np.array(SPACE.encode(g))).sum()) for g in gs) <= 1
    evo.observe(child, 100.0)
    assert len(evo.population) == 5
    assert evo.population[0][0] == gs[1]  # the oldest (gs[0]) died
    assert evo.population[-1] == (child, 100.0)
    for _ in range(5):
        g = evo.propose()
        evo.observe(g, 0.0)
    assert all(g != child for g, _ in evo.population)  # even the best member ages out


def test_observe_checks_its_arguments():
    rs = RandomSearch(SPACE)
    g = rs.propose()
    with pytest.raises(ValueError, match="reward must be finite"):
        rs.observe(g, float("nan"))
    with pytest.raises(TypeError, match="reward must be a real number"):
        rs.observe(g, "0.5")
    with pytest.raises(GenotypeError, match="excludes"):
        RandomSearch(NASNetSpace(ops=["identity"])).observe(g, 0.5)
    with pytest.raises(ValueError, match="sample \\(30\\) must be <= population \\(10\\)"):
        RegularizedEvolution(SPACE, population=10, sample=30)
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_strategy("annealing", SPACE)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        Reinforce(SPACE, seed=-1)


def test_reinforce_learns_the_rewarded_choice():
    """The controller's greedy-path probability of a rewarded op rises with REINFORCE."""
    space = NASNetSpace(num_blocks=1, ops=["identity", "conv_3x3", "max_pool_3x3"])
    rl = Reinforce(space, seed=0, lr=0.05)
    first = rl.probabilities()[1][1].item()  # position 1: op_a of the normal cell's block 0
    for _ in range(150):
        g = rl.propose()
        rl.observe(g, 1.0 if g.normal.blocks[0].op_a == "conv_3x3" else 0.0)
    last = rl.probabilities()[1][1].item()
    assert first < 0.5 and last > 0.9


def _mean_best(name: str, budget: int, seeds) -> float:
    return float(np.mean([best_found(MAKERS[name](seed), synthetic_objective(seed), budget) for seed in seeds]))


def test_evolution_beats_random_search_at_equal_budget():
    seeds = range(6)
    rand = _mean_best("random", 300, seeds)
    evo = _mean_best("evolution", 300, seeds)
    paper = _mean_best("evolution-paper", 300, seeds)  # P=100, S=25
    print(f"\nbest reward, mean of 6 seeds, budget 300: random {rand:.3f}, evolution(20,5) {evo:.3f}, "
          f"evolution(100,25) {paper:.3f}")
    assert evo > rand + 0.1
    assert paper > rand + 0.08


def test_reinforce_beats_random_search_at_equal_budget():
    seeds = range(4)
    rand = _mean_best("random", 120, seeds)
    rl = _mean_best("reinforce", 120, seeds)
    print(f"\nbest reward, mean of 4 seeds, budget 120: random {rand:.3f}, reinforce {rl:.3f}")
    assert rl > rand + 0.1
