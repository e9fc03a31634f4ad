"""Benchmark cases of the BiFPN family: weighted_fuse on EfficientDet-D0's node shapes against
effdet's own FpnCombine (+ the activation that follows it) in eager PyTorch and under
torch.compile; and the whole D0 BiFPN against effdet's BiFpn."""

from __future__ import annotations

import os
from typing import List

import torch
import torch.nn as nn

from ..nn import BiFPN
from ..ops import weighted_fuse
from .harness import EFFOPS, Case, inference

CL = torch.channels_last


def _check(outs):
    ref = outs["effdet (eager)"]
    ref = [ref] if isinstance(ref, torch.Tensor) else ref
    for k, v in outs.items():
        v = [v] if isinstance(v, torch.Tensor) else v
        for a, b in zip(v, ref):
            err = ((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)).item()
            if err > 1e-4:
                return f"{k}: relative error {err:.2e}"
    return None


def _combine(sizes, offsets, out_size):
    from effdet.efficientdet import FpnCombine

    info = [dict(num_chs=64, size=s) for s in sizes]
    return FpnCombine(info, 64, offsets, out_size, pad_type="same", weight_method="fastattn").eval()


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    try:
        import effdet  # noqa: F401
    except ImportError:
        return []
    dt = torch.float32 if device.type == "cpu" else torch.bfloat16
    dname = "fp32" if dt == torch.float32 else "bf16"
    batch = 2 if quick else 8
    compile_ = not quick and device.type == "cpu"
    out: List[Case] = []
    g = torch.Generator().manual_seed(0)
    act = nn.SiLU()
    for s in (64, 32, 16, 8, 4):
        shapes = [("top-down", [(s, s), (s // 2, s // 2)], ["identity", "nearest"])] if s > 4 else []
        if s < 64:
            shapes.append(("bottom-up", [(s, s), (s, s), (2 * s, 2 * s)], ["identity", "identity", "maxpool"]))
        for kind, sizes, modes in shapes:
            comb = _combine(sizes, tuple(range(len(sizes))), (s, s)).to(device)
            comb.edge_weights.data.uniform_(0.2, 1.5, generator=torch.Generator().manual_seed(s))
            xs = [torch.randn(batch, 64, *hw, generator=g).to(device, dt).contiguous(memory_format=CL) for hw in sizes]
            w = comb.edge_weights.detach()
            impls = {
                EFFOPS: lambda xs=xs, w=w, modes=modes: weighted_fuse(xs, w, resample=modes),
                "effdet (eager)": lambda xs=xs, comb=comb: act(comb(xs)),
            }
            if compile_:
                cc = torch.compile(lambda xs, comb=comb: act(comb(xs)), dynamic=False)
                impls["torch.compile"] = lambda xs=xs, cc=cc: cc(xs)
            nbytes = (sum(x.numel() for x in xs) + batch * 64 * s * s) * xs[0].element_size()
            out.append(Case("weighted_fuse", f"D0 {kind} {len(sizes)} inputs 64ch {s}x{s} b{batch}", dname,
                            inference(impls), _check, bytes_moved=nbytes))
    out.extend(_bifpn_cases(device, dt, dname, quick, compile_))
    return out


def _bifpn_cases(device, dt, dname, quick, compile_) -> List[Case]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from effdet import create_model

    torch.manual_seed(0)
    size = 256 if quick else 512
    m = create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False, image_size=(size, size))
    fpn = m.fpn.eval().to(device, dt).to(memory_format=CL)
    for mod in fpn.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
    mine = BiFPN([40, 112, 320], 64, 3, (size, size), pad_type="same").eval()
    mine.load_state_dict(m.fpn.state_dict())
    mine = mine.to(device, dt).to(memory_format=CL)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, c, size // 2 ** lvl, size // 2 ** lvl, generator=g).to(device, dt).contiguous(memory_format=CL)
             for c, lvl in ((40, 3), (112, 4), (320, 5))]
    impls = {EFFOPS: lambda: mine(list(feats)), "effdet (eager)": lambda: fpn(list(feats))}
    if compile_:
        cf = torch.compile(fpn, dynamic=False)
        impls["torch.compile"] = lambda: cf(list(feats))
    return [Case("bifpn", f"D0 BiFPN 3 layers b2 {size}x{size}", dname, inference(impls), _check)]
