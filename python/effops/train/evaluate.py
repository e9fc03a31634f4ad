"""COCO box mAP of a detector on a ``CocoDetection`` split, scored by pycocotools' COCOeval.

``evaluate(model, data)`` runs ``model.detect(images)`` (effops's EfficientDet, or any module with
a ``detect`` returning ``effops.models.Detections``: boxes ``(x1, y1, x2, y2)`` in model-input
pixels, 1-based class labels) on the evaluation transform's batches (resize keeping the aspect
ratio, pad at the bottom / right), maps boxes back to the original image with the recorded
``img_scale`` and clips them to the image (effdet clips before its NMS, in input pixels; clipping
after it differs only for boxes that cross the border and overlap), maps labels back to the
file's category ids, keeps detections scoring at least ``score_threshold`` (effdet: 0.001), writes
them in COCO result format and scores them with COCOeval on exactly the images evaluated. No
detections at all is a valid result: every AP is then 0 (or -1 where the split has no ground
truth, as COCOeval reports).
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, SequentialSampler, Subset

from .data import CocoDetection, build_loader, coco_from_dict

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_metrics(coco_gt, detections: List[dict], img_ids: Optional[Sequence[int]] = None, *,
                 verbose: bool = False) -> Dict[str, float]:
    """COCOeval ``bbox`` statistics of ``detections`` (COCO result dicts: image_id, category_id,
    bbox [x, y, w, h], score) against the pycocotools ``COCO`` index ``coco_gt``, restricted to
    ``img_ids`` (default: every image of ``coco_gt``). ``verbose`` prints COCOeval's table."""
    try:
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # pragma: no cover - pycocotools is in the train / test extras
        raise ImportError("effops.train needs pycocotools: pip install 'effops[train]'") from e
    known = set(coco_gt.getImgIds())
    ids = sorted(known) if img_ids is None else sorted(set(int(i) for i in img_ids))
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"coco_metrics: image ids not in the ground truth: {unknown[:5]}")
    cats = set(coco_gt.getCatIds())
    for k, d in enumerate(detections):
        if d.get("image_id") not in known or d.get("category_id") not in cats:
            raise ValueError(f"coco_metrics: detections[{k}] names image {d.get('image_id')!r} / category "
                             f"{d.get('category_id')!r}, not in the ground truth")
    # loadRes, minus its failure on an empty list: the same fields (area, id, iscrowd) it adds
    anns = []
    for k, d in enumerate(detections):
        x, y, w, h = (float(v) for v in d["bbox"])
        anns.append(dict(image_id=int(d["image_id"]), category_id=int(d["category_id"]), bbox=[x, y, w, h],
                         score=float(d["score"]), area=w * h, id=k + 1, iscrowd=0))
    res = coco_from_dict(dict(images=list(coco_gt.dataset["images"]), categories=list(coco_gt.dataset["categories"]),
                              annotations=anns))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev = COCOeval(coco_gt, res, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:  # the summary table, without COCOeval's progress lines
        print("\n".join(ln for ln in out.getvalue().splitlines() if ln.lstrip().startswith("Average")))
    return {n: float(v) for n, v in zip(METRIC_NAMES, ev.stats)}


def _dataset_of(data):
    ds = data.dataset if isinstance(data, DataLoader) else data
    base, indices = ds, None
    if isinstance(ds, Subset):
        base, indices = ds.dataset, list(ds.indices)
    if not isinstance(base, CocoDetection):
        raise TypeError(f"evaluate: data must be a CocoDetection (or a Subset / DataLoader of one), got "
                        f"{type(base).__name__}")
    if base.train:
        raise ValueError("evaluate: the dataset has the training transform (train=True); build it with train=False")
    return ds, base, indices


@torch.no_grad()
def predict_coco(model, loader, label_to_cat_id: Dict[int, int], *, device, score_threshold: float = 0.001,
                 amp: Optional[torch.dtype] = None, progress: bool = False):
    """COCO result dicts of ``model.detect`` on ``loader``'s batches, and the image ids seen."""
    dev = torch.device(device)
    results, seen = [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", unit="batch")
    for batch in it:
        x = batch["images"].to(dev, non_blocking=True)
        ctx = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            det = model.detect(x)
        boxes = det.boxes.detach().float().cpu() * batch["img_scale"][:, None, None]
        size = batch["img_size"].to(boxes.dtype)  # (height, width)
        lim = size.flip(-1).repeat(1, 2)[:, None, :]  # (w, h, w, h)
        boxes = torch.minimum(boxes.clamp(min=0), lim)
        scores, classes = det.scores.detach().float().cpu(), det.classes.detach().cpu()
        nums = det.num_detections.detach().cpu()
        for b, img_id in enumerate(batch["img_id"].tolist()):
            seen.append(img_id)
            n = int(nums[b])
            for (x1, y1, x2, y2), s, c in zip(boxes[b, :n].tolist(), scores[b, :n].tolist(), classes[b, :n].tolist()):
                cat = label_to_cat_id.get(int(c))
                if s < score_threshold or cat is None:
                    continue
                results.append(dict(image_id=img_id, category_id=cat, score=round(s, 5),
                                    bbox=[round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]))
    return results, seen


def evaluate(model, data, *, device="cpu", batch_size: int = 8, workers: int = 0, max_images: Optional[int] = None,
             score_threshold: float = 0.001, amp: Optional[torch.dtype] = None, progress: bool = False,
             verbose: bool = False) -> dict:
    """COCO mAP of ``model`` on ``data`` (a ``CocoDetection`` built with ``train=False``, a Subset
    of one, or a DataLoader of ``collate_detections`` batches over one).

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
    "ARl"}`` (COCOeval's 12 statistics, fractions in [0, 1]; -1 where undefined) plus
    ``detections`` (the COCO result list), ``num_images`` and ``seconds``. ``max_images``: the
    first that many images only. ``amp``: autocast dtype (e.g. torch.bfloat16). The model is put
    in eval mode and restored afterwards.
    """
    if not callable(getattr(model, "detect", None)):
        raise TypeError(f"evaluate: model must have a detect(images) method returning Detections (effops's "
                        f"EfficientDet), got {type(model).__name__}")
    ds, base, indices = _dataset_of(data)
    size = getattr(model, "image_size", None)
    if size is not None and tuple(size) != tuple(base.image_size):
        raise ValueError(f"evaluate: the model takes {tuple(size)} inputs, the dataset makes {tuple(base.image_size)}; "
                         f"build the dataset with image_size={tuple(size)}")
    nc = getattr(model, "num_classes", None)
    if isinstance(nc, int) and nc < base.num_classes:
        raise ValueError(f"evaluate: the model has {nc} classes, {base.ann_file} labels go up to {base.num_classes}")
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ValueError(f"evaluate: score_threshold must be in [0, 1], got {score_threshold!r}")
    if isinstance(data, DataLoader):
        if max_images is not None:
            raise ValueError("evaluate: max_images applies to a dataset, not to a DataLoader")
        loader = data
    else:
        if max_images is not None:
            if not isinstance(max_images, int) or isinstance(max_images, bool) or max_images < 1:
                raise ValueError(f"evaluate: max_images must be a positive int, got {max_images!r}")
            ds = Subset(ds, list(range(min(max_images, len(ds)))))
        # every image once, in order, also on one rank of a DDP job (no DistributedSampler sharding)
        loader = build_loader(ds, batch_size, train=False, workers=workers, drop_last=False,
                              sampler=SequentialSampler(ds))
    was_training = model.training if hasattr(model, "training") else False
    if hasattr(model, "eval"):
        model.eval()
    t0 = time.perf_counter()
    try:
        dets, seen = predict_coco(model, loader, base.label_to_cat_id, device=device, score_threshold=score_threshold,
                                  amp=amp, progress=progress)
    finally:
        if was_training:
            model.train()
    metrics = coco_metrics(base.coco, dets, seen, verbose=verbose)
    return dict(metrics, detections=dets, num_images=len(set(seen)), seconds=time.perf_counter() - t0)


def format_metrics(metrics: Dict[str, float]) -> str:
    """A two-row table of the 12 COCO statistics (percent)."""
    names = [n for n in METRIC_NAMES if n in metrics]
    head = " ".join(f"{n:>6}" for n in names)
    row = " ".join(f"{100 * metrics[n]:6.2f}" if metrics[n] >= 0 else f"{'n/a':>6}" for n in names)
    return head + "\n" + row


__all__ = ["evaluate", "coco_metrics", "predict_coco", "format_metrics", "METRIC_NAMES"]
