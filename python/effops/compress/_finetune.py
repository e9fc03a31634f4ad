"""A small classification training loop for pruning fine-tunes and the distillation study
(SGD with Nesterov momentum, cosine learning rate, optional distillation from a teacher, BatchNorm
statistics re-estimated at the end), and held-out evaluation. ``effops train`` is the full loop;
this one only needs in-memory tensors (``effops.nas.data.Dataset``)."""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill import DistillationLoss


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> Dict[str, float]:
    """Held-out accuracy (in [0, 1]) and mean cross-entropy."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            out = model(x[i:i + batch_size])
            loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    return {"accuracy": correct / len(y), "loss": loss / len(y)}


def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 64, max_samples: int = 1024) -> None:
    from ..nas.evaluate import _recalibrate_bn

    _recalibrate_bn(model, x, batch_size, max_samples)


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 0.05,
             batch_size: int = 64, seed: int = 0, weight_decay: float = 5e-5, momentum: float = 0.9,
             teacher: Optional[nn.Module] = None, temperature: float = 4.0, alpha: float = 0.9,
             start_epoch: int = 0, optimizer_state: Optional[dict] = None,
             on_epoch: Optional[Callable[[int, dict, float], None]] = None) -> Dict[str, float]:
    """Train ``model`` in place for ``epochs`` epochs (from ``start_epoch``: resuming restores the
    optimizer and the schedule); with ``teacher``, the loss is ``DistillationLoss``.
    ``on_epoch(epoch, optimizer_state, train_loss)`` is called after each epoch (checkpoints)."""
    if epochs <= start_epoch:
        return {"train_loss": float("nan")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                          nesterov=True, weight_decay=weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    n = len(y)
    steps = math.ceil(n / batch_size)
    total = epochs * steps

    def lr_at(step: int) -> float:
        return 0.5 * lr * (1 + math.cos(math.pi * step / total))

    kd = DistillationLoss(teacher, temperature=temperature, alpha=alpha) if teacher is not None else None
    model.train()
    loss_avg = float("nan")
    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=gen)
        tot, cnt = 0.0, 0
        for k, i in enumerate(range(0, n, batch_size)):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + k)
            xb, yb = x[idx], y[idx]
            out = model(xb)
            loss = kd(out, yb, inputs=xb) if kd is not None else F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        loss_avg = tot / max(cnt, 1)
        if epoch == epochs - 1:
            recalibrate_bn(model, x, batch_size)
        if on_epoch is not None:
            on_epoch(epoch, opt.state_dict(), loss_avg)
    return {"train_loss": loss_avg}
