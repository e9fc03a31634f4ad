"""Learning-rate schedule (linear warmup + cosine decay) and the exponential moving average of the
weights, both as plain state (numbers and tensors) so a checkpoint restores them exactly.

Schedule (per optimizer step ``t``, total ``T``, warmup ``W``; effdet's train.py with timm's
cosine scheduler, stepped per update instead of per epoch)::

    lr(t) = base * (warmup_factor + (1 - warmup_factor) * t / W)              t <  W
    lr(t) = min_lr + (base - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2  t >= W

EMA (TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``, which EfficientDet uses):
after update ``n`` (1-based) every floating parameter and buffer becomes
``ema = d * ema + (1 - d) * w`` with ``d = min(decay, (1 + n) / (10 + n))``, so a short run is not
dominated by the random initial weights; integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List

import torch
import torch.nn as nn


class WarmupCosine:
    """The learning rate of every param group as a function of the optimizer step.

    Args:
        optimizer: its param groups' current ``lr`` are taken as the base rates.
        total_steps: steps of the whole run (the cosine reaches ``min_lr`` there).
        warmup_steps: linear warmup length (0: none).
        warmup_factor: the warmup's starting fraction of the base rate.
        min_lr_ratio: the final rate as a fraction of the base rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, *,
                 warmup_factor: float = 0.001, min_lr_ratio: float = 0.0):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"WarmupCosine: total_steps must be a positive int, got {total_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"WarmupCosine: warmup_steps must be an int in [0, total_steps={total_steps}], "
                             f"got {warmup_steps!r}")
        if not 0.0 <= float(warmup_factor) <= 1.0:
            raise ValueError(f"WarmupCosine: warmup_factor must be in [0, 1], got {warmup_factor!r}")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"WarmupCosine: min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_factor = float(warmup_factor)
        self.min_lr_ratio = float(min_lr_ratio)
        self.base_lrs: List[float] = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def factor(self, t: int) -> float:
        """The rate at step ``t`` as a fraction of the base rate."""
        if t < self.warmup_steps:
            return self.warmup_factor + (1.0 - self.warmup_factor) * t / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (t - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self) -> None:
        """Advance one optimizer step (call after ``optimizer.step()``)."""
        self.step_count += 1
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> Dict:
        return {"step": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "warmup_factor": self.warmup_factor, "min_lr_ratio": self.min_lr_ratio,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Dict) -> None:
        """Restore the step; the schedule's shape must be the one this object was built with."""
        if not isinstance(state, dict):
            raise ValueError(f"WarmupCosine.load_state_dict: expected a dict, got {type(state).__name__}")
        for key in ("total_steps", "warmup_steps"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"WarmupCosine.load_state_dict: the checkpoint's {key} is {state.get(key)!r}, "
                                 f"this run's is {getattr(self, key)} (epochs, batch size or warmup changed)")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.total_steps:
            raise ValueError(f"WarmupCosine.load_state_dict: step must be an int in [0, {self.total_steps}], "
                             f"got {step!r}")
        base = state.get("base_lrs")
        if not isinstance(base, list) or len(base) != len(self.base_lrs) or \
                any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in base):
            raise ValueError(f"WarmupCosine.load_state_dict: base_lrs must be a list of {len(self.base_lrs)} numbers")
        self.base_lrs = [float(b) for b in base]
        self.step_count = step
        self._apply()


class ModelEma:
    """An exponential moving average of a model's weights, kept in a copy of the model (eval mode,
    no gradients) that can be evaluated and saved as it is.

    Args:
        model: the model to average (unwrapped: not a DDP wrapper).
        decay: the EMA decay (EfficientDet: 0.9998).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"ModelEma: decay must be a float in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = self.current_decay()
        src = model.state_dict()
        for name, e in self.module.state_dict().items():
            w = src[name]
            if e.is_floating_point():
                e.lerp_(w.to(e.dtype), 1.0 - d)
            else:
                e.copy_(w)

    def state_dict(self) -> Dict:
        return {"num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: Dict) -> None:
        n = state.get("num_updates") if isinstance(state, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ModelEma.load_state_dict: num_updates must be a non-negative int, got {n!r}")
        self.num_updates = n


__all__ = ["WarmupCosine", "ModelEma"]
