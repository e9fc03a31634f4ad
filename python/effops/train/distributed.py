"""Distributed data parallel pieces: process-group set-up from torchrun's environment and a
BatchNorm that synchronises batch statistics across processes on any device (gloo on the CPU
included). The data order across processes is ``train.data.build_loader``'s (DistributedSampler).

Why an own SyncBatchNorm: ``torch.nn.SyncBatchNorm`` refuses CPU tensors ("expected input tensor
to be on GPU"), so it cannot run the gloo/CPU case, and it is not a ``BatchNorm2d`` subclass, so
code that checks ``isinstance(m, nn.BatchNorm2d)`` (effops's converter, BN folding) would stop
recognising it. effops's fused modules call their BatchNorm submodules as modules in training
mode (``ConvStage.post``) and read weight / bias / running statistics in eval mode (folding), so
replacing every ``nn.BatchNorm2d`` by ``SyncBatchNorm2d`` (a subclass: same parameters, buffers and
state_dict keys) synchronises all of them, the heads' per-level BNs and the BiFPN's included.

Training-mode statistics over all processes (n = global count of values per channel)::

    mean = allreduce(sum x) / n,   var = allreduce(sum (x - mean)^2) / n   (two passes, fp32)

with ``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradients, so
the gradient is that of the loss summed over processes. Running statistics are updated with the
unbiased variance ``var * n / (n - 1)`` as ``nn.BatchNorm2d`` does.
"""

from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


def world() -> Tuple[int, int]:
    """(rank, world size): (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device_type: str) -> Tuple[int, int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    gloo for the CPU, nccl for CUDA. Returns (rank, world size, local rank); (0, 1, 0) when the
    environment names no group (a plain single process)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    if not dist.is_available():
        raise RuntimeError("effops train: WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over processes (no gradient); the tensor itself when not distributed."""
    if world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of the global batch (all
    processes of ``process_group``); in eval mode, or in a single process, it is BatchNorm2d."""

    process_group = None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D401
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) <= 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        xf = x.float()
        c = xf.shape[1]
        local_n = xf.numel() // max(1, c)
        s = torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), float(local_n))])
        s = all_reduce(s, group=group)
        n = s[-1]
        mean = s[:-1] / n
        centred = xf - mean.view(1, c, 1, 1)
        var = all_reduce(centred.square().sum((0, 2, 3)), group=group) / n
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.float().view(1, c, 1, 1) + self.bias.float().view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / (n - 1.0).clamp(min=1.0))  # tensors: no host sync
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y.to(x.dtype)  # elementwise ops keep x's memory format (channels_last stays)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by a ``SyncBatchNorm2d`` with the
    same parameters and buffers; returns ``module`` (or the replacement when it is itself a BN)."""
    if type(module) is nn.BatchNorm2d:
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=module.running_mean.device
                              if module.running_mean is not None else None)
        new.process_group = process_group
        with torch.no_grad():
            if module.affine:
                new.weight = module.weight
                new.bias = module.bias
            if module.track_running_stats:
                new.running_mean = module.running_mean
                new.running_var = module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module


__all__ = ["world", "init_from_env", "all_reduce_sum", "SyncBatchNorm2d", "convert_sync_batchnorm"]
