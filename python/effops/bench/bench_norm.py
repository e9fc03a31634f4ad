"""Benchmark cases of the norm family: batch_norm_act (training-mode BatchNorm + activation) on
EfficientNet-B0's training shapes (batch 8 at 224: the expand / depthwise outputs), forward +
backward, against PyTorch's BatchNorm2d + SiLU(inplace) in eager mode and under torch.compile."""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..ops import batch_norm_act
from .harness import EFFOPS, Case

CL = torch.channels_last


def _check(outs):
    ref = outs["torch (eager)"]
    for k, v in outs.items():
        for a, b in zip(v, ref):
            err = ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)).item()
            if err > 2e-4:
                return f"{k}: relative error {err:.2e}"
    return None


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    batch = 2 if quick else 8
    shapes = [(32, 112), (96, 112), (144, 56), (240, 28), (672, 14)] if not quick else [(32, 28), (96, 14)]
    out: List[Case] = []
    g = torch.Generator().manual_seed(0)
    for dname, dt in (("fp32", torch.float32),) if device.type == "cpu" else (("bf16", torch.bfloat16),):
        for C, s in shapes:
            x = torch.randn(batch, C, s, s, generator=g).to(device, dt).contiguous(memory_format=CL)
            gy = torch.randn(batch, C, s, s, generator=g).to(device, dt).contiguous(memory_format=CL)
            bn = nn.BatchNorm2d(C).to(device).train()
            act = nn.SiLU(inplace=True)
            xa = x.clone().requires_grad_()

            def ours(xa=xa, bn=bn, gy=gy):
                y = batch_norm_act(xa, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps, act="silu")
                gx, gw = torch.autograd.grad(y, (xa, bn.weight), gy)
                return y.detach(), gx, gw

            def eager(xa=xa, bn=bn, act=act, gy=gy):
                y = act(bn(xa))
                gx, gw = torch.autograd.grad(y, (xa, bn.weight), gy)
                return y.detach(), gx, gw

            impls = {EFFOPS: ours, "torch (eager)": eager}
            if not quick and device.type == "cpu":
                cf = torch.compile(lambda t, bn=bn, act=act: act(bn(t)), dynamic=False)

                def compiled(xa=xa, bn=bn, gy=gy, cf=cf):
                    y = cf(xa)
                    gx, gw = torch.autograd.grad(y, (xa, bn.weight), gy)
                    return y.detach(), gx, gw

                impls["torch.compile"] = compiled
            # compulsory traffic: x read + y written forward; dy, x read + dx written backward
            nbytes = 5 * x.numel() * x.element_size()
            out.append(Case("batch_norm_act", f"B0 train BN+SiLU fwd+bwd {C}ch {s}x{s} b{batch}", dname, impls,
                            _check, bytes_moved=nbytes))
    return out
