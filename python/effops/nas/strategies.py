"""Search strategies with one ask/tell interface.

    strategy.propose() -> Genotype           # may be called several times before observing
    strategy.observe(genotype, reward)       # reward: higher is better
    state = strategy.state_dict()            # everything, RNG state included
    strategy.load_state_dict(state)          # continues exactly: same next proposals

* ``RandomSearch`` samples the space uniformly.
* ``RegularizedEvolution`` is aging evolution (Real et al., "Regularized Evolution for Image
  Classifier Architecture Search", 2019): the first ``population`` proposals are random;
  afterwards, draw ``sample`` members of the population uniformly with replacement, mutate the
  best of them; each observed child joins the population and the oldest member leaves.
  Paper: P = 100, S = 25.
* ``Reinforce`` is NASNet's controller (Zoph et al. 2018): an LSTM emits the encoding one
  position at a time (each step's input is the embedding of the previous choice), trained
  with REINFORCE, advantage = reward - exponential moving average of past rewards, plus an
  entropy bonus. Updates happen every ``batch_size`` observations; the log-probability of an
  observed genotype is computed under the current controller (in an asynchronous search the
  controller may have moved since the proposal: the usual off-policy approximation).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .space import Genotype, NASNetSpace


def _check_reward(reward: Any) -> float:
    if isinstance(reward, bool) or not isinstance(reward, (int, float, np.floating, np.integer)):
        raise TypeError(f"observe: reward must be a real number, got {type(reward).__name__}")
    r = float(reward)
    if not np.isfinite(r):
        raise ValueError(f"observe: reward must be finite, got {r}")
    return r


def _check_seed(seed: Any, who: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{who}: seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class Strategy:
    """Base class: keeps the best observation; subclasses implement ``propose``."""

    name = "strategy"

    def __init__(self, space: NASNetSpace, seed: int = 0):
        if not isinstance(space, NASNetSpace):
            raise TypeError(f"{type(self).__name__}: space must be a NASNetSpace, got {type(space).__name__}")
        self.space = space
        self.seed = _check_seed(seed, type(self).__name__)
        self.rng = np.random.default_rng(self.seed)
        self.num_proposed = 0
        self.num_observed = 0
        self.best: Optional[Tuple[Genotype, float]] = None

    def propose(self) -> Genotype:
        g = self._propose()
        self.num_proposed += 1
        return g

    def observe(self, genotype: Genotype, reward: float) -> None:
        self.space.validate(genotype)
        r = _check_reward(reward)
        self._observe(genotype, r)
        self.num_observed += 1
        if self.best is None or r > self.best[1]:
            self.best = (genotype, r)

    def _propose(self) -> Genotype:
        raise NotImplementedError

    def _observe(self, genotype: Genotype, reward: float) -> None:
        pass

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "strategy": self.name,
            "space": self.space.to_dict(),
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
            "num_proposed": self.num_proposed,
            "num_observed": self.num_observed,
            "best": None if self.best is None else [self.best[0].to_dict(), self.best[1]],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise ValueError(f"load_state_dict: state is for strategy {state.get('strategy')!r}, not {self.name!r}")
        if state["space"] != self.space.to_dict():
            raise ValueError(f"load_state_dict: state is for space {state['space']}, not {self.space.to_dict()}")
        self.seed = state["seed"]
        self.rng.bit_generator.state = state["rng"]
        self.num_proposed = state["num_proposed"]
        self.num_observed = state["num_observed"]
        b = state["best"]
        self.best = None if b is None else (Genotype.from_dict(b[0]), float(b[1]))


class RandomSearch(Strategy):
    """Uniform samples of the space."""

    name = "random"

    def _propose(self) -> Genotype:
        return self.space.sample(self.rng)


class RegularizedEvolution(Strategy):
    """Aging evolution with a population of ``population`` and tournaments of ``sample``."""

    name = "evolution"

    def __init__(self, space: NASNetSpace, population: int = 100, sample: int = 25, seed: int = 0):
        super().__init__(space, seed)
        for nm, v in (("population", population), ("sample", sample)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"RegularizedEvolution: {nm} must be an integer >= 1, got {v!r}")
        if sample > population:
            raise ValueError(f"RegularizedEvolution: sample ({sample}) must be <= population ({population})")
        self.population_size = int(population)
        self.sample_size = int(sample)
        self.population: List[Tuple[Genotype, float]] = []  # oldest first

    def _propose(self) -> Genotype:
        if self.num_proposed < self.population_size or not self.population:
            return self.space.sample(self.rng)
        idx = self.rng.integers(len(self.population), size=self.sample_size)
        parent = max((self.population[int(i)] for i in idx), key=lambda m: m[1])[0]
        return self.space.mutate(parent, self.rng)

    def _observe(self, genotype: Genotype, reward: float) -> None:
        self.population.append((genotype, reward))
        if len(self.population) > self.population_size:
            self.population.pop(0)  # the oldest dies, however good it is

    def state_dict(self) -> Dict[str, Any]:
        s = super().state_dict()
        s.update(
            population_size=self.population_size,
            sample_size=self.sample_size,
            population=[[g.to_dict(), r] for g, r in self.population],
        )
        return s

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if (state["population_size"], state["sample_size"]) != (self.population_size, self.sample_size):
            raise ValueError(
                f"load_state_dict: state has population={state['population_size']}, sample={state['sample_size']}; "
                f"this strategy has population={self.population_size}, sample={self.sample_size}"
            )
        self.population = [(Genotype.from_dict(g), float(r)) for g, r in state["population"]]


class Controller(nn.Module):
    """An LSTM that emits one choice per position of the space's encoding."""

    def __init__(self, cardinalities: List[int], hidden: int = 64):
        super().__init__()
        self.cardinalities = list(cardinalities)
        offsets = np.concatenate([[0], np.cumsum(self.cardinalities)])[:-1]
        self.offsets = [int(o) + 1 for o in offsets]  # embedding 0 is the start token
        self.embed = nn.Embedding(1 + sum(self.cardinalities), hidden)
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.cardinalities)
        self.hidden = hidden

    def _steps(self, choose):
        """Run the LSTM over all positions; ``choose(i, logits) -> int`` picks position i.
        Returns (codes, sum of log-probs, sum of entropies)."""
        h = torch.zeros(1, self.hidden)
        c = torch.zeros(1, self.hidden)
        token = torch.zeros(1, dtype=torch.long)
        codes, logp, ent = [], torch.zeros(()), torch.zeros(())
        for i, head in enumerate(self.heads):
            h, c = self.lstm(self.embed(token), (h, c))
            logits = head(h)[0]
            log_probs = torch.log_softmax(logits, dim=0)
            a = choose(i, log_probs)
            codes.append(a)
            logp = logp + log_probs[a]
            ent = ent - (log_probs.exp() * log_probs).sum()
            token = torch.tensor([self.offsets[i] + a])
        return codes, logp, ent

    def sample(self, generator: torch.Generator) -> List[int]:
        with torch.no_grad():
            codes, _, _ = self._steps(
                lambda i, lp: int(torch.multinomial(lp.exp(), 1, generator=generator).item())
            )
        return codes

    def log_prob(self, codes: List[int]):
        _, logp, ent = self._steps(lambda i, lp: codes[i])
        return logp, ent


class Reinforce(Strategy):
    """NASNet's LSTM controller trained with REINFORCE and a moving-average baseline."""

    name = "reinforce"

    def __init__(
        self,
        space: NASNetSpace,
        seed: int = 0,
        hidden: int = 64,
        lr: float = 0.005,
        baseline_decay: float = 0.9,
        entropy_weight: float = 1e-4,
        batch_size: int = 1,
    ):
        super().__init__(space, seed)
        if not lr > 0:
            raise ValueError(f"Reinforce: lr must be > 0, got {lr}")
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"Reinforce: baseline_decay must be in [0, 1), got {baseline_decay}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Reinforce: batch_size must be an integer >= 1, got {batch_size!r}")
        self.hparams = dict(hidden=hidden, lr=lr, baseline_decay=baseline_decay,
                            entropy_weight=entropy_weight, batch_size=batch_size)
        # Parameters are initialised from the seed, independently of the global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.controller = Controller(space.cardinalities(), hidden)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.baseline: Optional[float] = None
        self.buffer: List[Tuple[List[int], float]] = []  # observations awaiting an update

    def _propose(self) -> Genotype:
        return self.space.decode(self.controller.sample(self.generator))

    def _observe(self, genotype: Genotype, reward: float) -> None:
        codes = self.space.encode(genotype)
        if self.baseline is None:
            self.baseline = reward
        advantage = reward - self.baseline
        self.baseline = self.hparams["baseline_decay"] * self.baseline + (1 - self.hparams["baseline_decay"]) * reward
        self.buffer.append((codes, advantage))
        if len(self.buffer) >= self.hparams["batch_size"]:
            self._update()

    def _update(self) -> None:
        self.optimizer.zero_grad()
        loss = torch.zeros(())
        for codes, adv in self.buffer:
            logp, ent = self.controller.log_prob(codes)
            loss = loss - adv * logp - self.hparams["entropy_weight"] * ent
        (loss / len(self.buffer)).backward()
        self.optimizer.step()
        self.buffer = []

    def probabilities(self) -> List[torch.Tensor]:
        """The controller's greedy-path distribution per position (for inspection)."""
        with torch.no_grad():
            probs: List[torch.Tensor] = []

            def greedy(i, lp):
                probs.append(lp.exp())
                return int(lp.argmax())

            self.controller._steps(greedy)
        return probs

    def state_dict(self) -> Dict[str, Any]:
        s = super().state_dict()
        s.update(
            hparams=dict(self.hparams),
            controller=self.controller.state_dict(),
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            baseline=self.baseline,
            buffer=[[list(c), a] for c, a in self.buffer],
        )
        return s

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["hparams"] != self.hparams:
            raise ValueError(f"load_state_dict: state has hparams {state['hparams']}, this strategy {self.hparams}")
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.baseline = state["baseline"]
        self.buffer = [(list(c), float(a)) for c, a in state["buffer"]]


STRATEGIES = {"random": RandomSearch, "evolution": RegularizedEvolution, "reinforce": Reinforce}


def make_strategy(name: str, space: NASNetSpace, seed: int = 0, **kwargs) -> Strategy:
    """``name`` in random | evolution | reinforce; kwargs go to the strategy's constructor."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name](space, seed=seed, **kwargs)
