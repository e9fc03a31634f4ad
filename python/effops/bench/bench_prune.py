"""Benchmark cases of structured pruning: timm's EfficientNet-B0 with half of every channel group
removed by ``effops.compress.prune`` (running on the fused blocks) against the unpruned model
(eager timm and effops-converted) and against Torch-Pruning's result for the same amount and
criterion (eager, and converted to effops's blocks), when ``torch_pruning`` is installed.

The pruned models compute other functions than the unpruned one by design; the check verifies
what must agree: each converted model against its eager source, and every output's shape."""

from __future__ import annotations

import copy
from typing import List

import torch

from .harness import EFFOPS, Case, inference


def _randomize_bn(model: torch.nn.Module) -> None:
    """Trained-looking BN statistics (so BN-scale ranking is not a tie of ones)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)


def _check(outs):
    ref = outs["timm (eager)"]
    for k, v in outs.items():
        if v.shape != ref.shape or not torch.isfinite(v).all():
            return f"{k}: output {list(v.shape)} (finite: {bool(torch.isfinite(v).all())})"
    for fused, eager in (("effops (unpruned)", "timm (eager)"), ("torch-pruning + effops", "torch-pruning (eager)")):
        if fused in outs and eager in outs:
            err = float((outs[fused] - outs[eager]).abs().max() / outs[eager].abs().max().clamp_min(1e-12))
            if err > 1e-3:
                return f"{fused}: relative error {err:.2e} against {eager}"
    return None


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    if device.type != "cpu":
        return []
    try:
        import timm
    except ImportError:
        return []
    from ..compress import prune
    from ..nn import convert

    size = 64 if quick else 224
    base = timm.create_model("efficientnet_b0", num_classes=1000).eval()
    _randomize_bn(base)
    x_ex = torch.randn(1, 3, size, size)
    pruned, rep = prune(convert(copy.deepcopy(base)), amount=0.5, criterion="bn_scale", example_input=x_ex)
    cl = torch.channels_last  # eager models get their faster layout (the converted blocks take either)
    models = {EFFOPS: pruned.eval(), "effops (unpruned)": convert(copy.deepcopy(base)).eval(),
              "timm (eager)": copy.deepcopy(base).to(memory_format=cl)}
    try:
        import torch_pruning as tp

        tpm = copy.deepcopy(base)
        tp.pruner.MetaPruner(tpm, x_ex, importance=tp.importance.BNScaleImportance(), pruning_ratio=0.5,
                             ignored_layers=[tpm.classifier], global_pruning=False).step()
        models["torch-pruning + effops"] = convert(copy.deepcopy(tpm)).eval()
        models["torch-pruning (eager)"] = tpm.eval().to(memory_format=cl)
    except ImportError:
        pass
    out = []
    for batch in ((1,) if quick else (1, 8)):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).contiguous(
            memory_format=torch.channels_last)
        impls = {k: (lambda m=m, x=x: m(x)) for k, m in models.items()}
        out.append(Case("prune", f"efficientnet_b0 50% {size}px b{batch}", "fp32", inference(impls), check=_check,
                        note=f"MACs x{rep.macs_ratio:.2f}, params x{rep.params_ratio:.2f}"))
    return out
