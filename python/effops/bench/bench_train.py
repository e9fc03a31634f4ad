"""Benchmark case of the training loop's step: one EfficientDet-D0 training step (forward, anchor
labelling, loss, backward, AdamW) at batch 4, 512x512, 90 classes, fp32 and bf16 autocast.

* effops: ``effops.models`` tf_efficientdet_d0 + ``DetectionLoss.from_gt`` (``match_anchors`` and
  the fused losses on the device) - the step ``effops train`` runs;
* effdet DetBenchTrain: effdet's model and bench with its AnchorLabeler in the step (the per-image
  Python loop), as ``create_model(..., bench_task='train', bench_labeler=True)``;
* effdet (labels precomputed): the same bench given the labels (effdet's own train.py labels in
  the loader workers, off the step) - the network and loss alone.

The effops model is loaded with the effdet model's state_dict (same parameter names) and stochastic
depth is off in both, so the first step's losses must agree (checked) before anything is timed.
"""

from __future__ import annotations

import os
from typing import List

import torch

from .harness import EFFOPS, Case


def _gt(batch: int, size: int, classes: int, g: torch.Generator):
    G = 8
    yx = torch.rand(batch, G, 2, generator=g) * (size * 0.7)
    hw = 16 + torch.rand(batch, G, 2, generator=g) * size * 0.3
    boxes = torch.cat([yx, (yx + hw).clamp(max=size)], -1)
    cls = torch.randint(1, classes + 1, (batch, G), generator=g).float()
    if batch > 1:
        boxes[1, 5:] = -1  # padded rows
        cls[1, 5:] = -1
    return boxes, cls


def _cases(device: torch.device, quick: bool) -> List[Case]:
    import effdet

    from ..models import DetectionLoss, create_model

    batch, size = (2, 128) if quick else (4, 512)  # batch 2: BN in training mode needs 2 values at P7 (1x1)
    C = 90
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    boxes, cls = (t.to(device) for t in _gt(batch, size, C, g))
    out: List[Case] = []
    for dname in (("fp32",) if quick else ("fp32", "bf16")):
        amp = dname == "bf16"
        torch.manual_seed(0)
        bench = effdet.create_model("tf_efficientdet_d0", bench_task="train", num_classes=C, image_size=(size, size),
                                    pretrained=False, pretrained_backbone=False, bench_labeler=True).to(device).train()
        for m in bench.modules():  # stochastic depth off in both: random masks would make the losses differ
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
        ours = create_model("tf_efficientdet_d0", num_classes=C, image_size=size, drop_path_rate=0.0)
        ours.load_state_dict(bench.model.state_dict())
        ours = ours.to(device).train()
        loss_fn = DetectionLoss(C)
        opt_d = torch.optim.AdamW(bench.parameters(), lr=1e-4)
        opt_e = torch.optim.AdamW(ours.parameters(), lr=1e-4)
        cls_l, box_l, npos = bench.anchor_labeler.batch_label_anchors(boxes, cls)
        pre = {f"label_cls_{l}": t for l, t in enumerate(cls_l)}
        pre.update({f"label_bbox_{l}": t for l, t in enumerate(box_l)}, label_num_positives=npos)

        def ctx(amp=amp):
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

        def effops_step(ours=ours, opt=opt_e, loss_fn=loss_fn, ctx=ctx):
            with ctx():
                c, b = ours(x)
            total, _, _ = loss_fn.from_gt(c, b, ours.anchor_boxes, boxes, cls)
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(total.detach())

        def effdet_step(bench=bench, opt=opt_d, ctx=ctx, target=None):
            labeler = bench.anchor_labeler
            if target is not None:
                bench.anchor_labeler = None  # the bench then reads the labels from the target
            try:
                with ctx():
                    res = bench(x, target if target is not None else {"bbox": boxes, "cls": cls})
            finally:
                bench.anchor_labeler = labeler
            res["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(res["loss"].detach())

        impls = {EFFOPS: effops_step, "effdet DetBenchTrain": effdet_step,
                 "effdet (labels precomputed)": lambda f=effdet_step, pre=pre: f(target=pre)}

        def check(outs, tol=1e-3 if dname == "fp32" else 5e-2):
            # run_cases calls each implementation once before timing: from the same weights the
            # effops step and effdet's first step must give the same loss
            ref = outs["effdet DetBenchTrain"]
            err = abs(outs[EFFOPS] - ref) / max(abs(ref), 1e-12)
            return None if err <= tol else f"effops loss {outs[EFFOPS]} vs effdet's {ref} (relative {err:.2e})"

        out.append(Case("train_step", f"tf_efficientdet_d0 b{batch} {size}x{size} {C} classes AdamW", dname, impls,
                        check, note="effops: from_gt (match_anchors + fused losses); effdet: DetBenchTrain"))
    return out


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import effdet  # noqa: F401
    except ImportError:
        return []
    return _cases(device, quick)


__all__ = ["cases"]
