"""Objectives: what a search maximises, and the accuracy/latency Pareto front.

* ``accuracy``: the held-out accuracy.
* ``mnas``: MnasNet's soft-constrained reward (Tan et al., "MnasNet: Platform-Aware Neural
  Architecture Search for Mobile", 2019, eq. 2 with alpha = beta = w):
  ``ACC(m) * (LAT(m) / T) ** w`` with ``w = -0.07`` and a target latency ``T``: a model twice
  as slow as the target pays ~4.7% of its accuracy, one twice as fast gains ~5%.
* ``pareto_front``: the candidates no other candidate beats on both accuracy (higher) and
  latency (lower).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

MNAS_W = -0.07


def mnas_reward(accuracy: float, latency_ms: float, target_ms: float, w: float = MNAS_W) -> float:
    if not target_ms > 0:
        raise ValueError(f"mnas_reward: target latency must be > 0 ms, got {target_ms}")
    if not latency_ms > 0:
        raise ValueError(f"mnas_reward: latency must be > 0 ms, got {latency_ms}")
    return float(accuracy) * (float(latency_ms) / float(target_ms)) ** w


class Objective:
    """``objective(metrics) -> reward`` where metrics has ``accuracy`` and ``latency_ms``."""

    def __init__(self, name: str = "accuracy", target_latency_ms: Optional[float] = None, w: float = MNAS_W):
        if name not in ("accuracy", "mnas"):
            raise ValueError(f"objective must be 'accuracy' or 'mnas', got {name!r}")
        if name == "mnas":
            if target_latency_ms is None:
                raise ValueError("objective 'mnas' needs a target latency (--target-latency MS)")
            if not (isinstance(target_latency_ms, (int, float)) and math.isfinite(target_latency_ms)
                    and target_latency_ms > 0):
                raise ValueError(f"target latency must be a finite number > 0 ms, got {target_latency_ms!r}")
        self.name = name
        self.target_latency_ms = target_latency_ms
        self.w = w

    def __call__(self, metrics: Dict[str, float]) -> float:
        if self.name == "accuracy":
            return float(metrics["accuracy"])
        return mnas_reward(metrics["accuracy"], metrics["latency_ms"], self.target_latency_ms, self.w)

    def describe(self) -> str:
        if self.name == "accuracy":
            return "accuracy"
        return f"ACC * (LAT / {self.target_latency_ms:g} ms) ^ {self.w:g}"


def pareto_front(points: Sequence[Dict[str, float]], acc_key: str = "accuracy",
                 lat_key: str = "latency_ms") -> List[int]:
    """Indices of the non-dominated points, by increasing latency. A point is dominated when
    another is at least as accurate and at least as fast, and strictly better in one. Of
    identical points, the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][lat_key], -points[i][acc_key], i))
    front: List[int] = []
    best_acc = -math.inf
    for i in order:
        if points[i][acc_key] > best_acc:
            front.append(i)
            best_acc = points[i][acc_key]
    return front
