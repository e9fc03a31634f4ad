"""``effops eval --model NAME --weights CKPT --data shapes|DIR [--split val] [--image-size S] ...``.

COCO box mAP (pycocotools COCOeval) of a detector checkpoint on a split of the ``shapes`` set or of a
COCO folder (``DIR/annotations/instances_<split>.json`` + images in ``DIR/<split>/`` or
``DIR/images/<split>/``). The checkpoint is a plain state_dict or a training checkpoint (its
EMA weights - ``model_ema`` / ``ema`` / ``state_dict_ema`` - are preferred over ``model``; see
``effops.models.weights``), read with ``torch.load(weights_only=True)`` or safetensors.
``num_classes`` comes from the checkpoint's class head. An ``effops train`` checkpoint also gives
the defaults of ``--model`` (its ``model_name``), ``--image-size`` (its ``image_size``) and
``--data`` (its config's data, with the shapes options it was trained with), and a reduced model
(``model_overrides`` in its config) is rebuilt as trained; otherwise the variant's defaults.
Prints the 12 COCO statistics; ``--out FILE`` writes them (and what was evaluated) as JSON,
``--detections FILE`` the COCO result list.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

_AMP = {"off": None, "bf16": "bfloat16", "fp16": "float16"}


def add_parser(sub) -> None:
    sp = sub.add_parser("eval", help="COCO mAP of a detector checkpoint on a COCO folder or the shapes set")
    sp.add_argument("--model", default=None, help="model name (default: the checkpoint's, else tf_efficientdet_d0)")
    sp.add_argument("--weights", required=True, help="checkpoint (.pth/.pt/.safetensors: state_dict or training "
                    "checkpoint; its 'ema' weights are preferred)")
    sp.add_argument("--data", default=None, help="'shapes' (generated on first use) or a COCO folder: "
                    "DIR/annotations/instances_<split>.json + DIR/<split>/ or DIR/images/<split>/ "
                    "(default: the training run's data, else shapes)")
    sp.add_argument("--split", default="val", help="split to evaluate (default val)")
    sp.add_argument("--image-size", type=int, default=None,
                    help="model input size (default: the checkpoint's image_size, else the variant's)")
    sp.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    sp.add_argument("--workers", type=int, default=0, help="data loading processes (default 0)")
    sp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sp.add_argument("--amp", default="off", choices=list(_AMP), help="autocast dtype (default off)")
    sp.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    sp.add_argument("--score-threshold", type=float, default=0.001, help="lowest score kept (default 0.001)")
    sp.add_argument("--cat-ids-as-labels", action="store_true",
                    help="the model's classes are the category ids (COCO-pretrained 90-class models), not 1..K")
    sp.add_argument("--out", default=None, help="write the metrics as JSON to this file")
    sp.add_argument("--detections", default=None, help="write the detections (COCO result format) to this file")
    sp.set_defaults(func=run)


def _err(msg: str) -> int:
    print(f"effops eval: {msg}", file=sys.stderr)
    return 2


def checkpoint_meta(path) -> dict:
    """What an ``effops train`` checkpoint records about its run (top-level ``image_size``,
    ``model_name``, ``config``: the TrainConfig as a dict); {} for a bare state_dict, a
    safetensors file or anything unreadable (the weights loading reports what is wrong)."""
    p = Path(path)
    if p.suffix.lower() not in (".pth", ".pt", ".bin") or not p.is_file():
        return {}
    import pickle

    import torch

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError):
        return {}
    if not isinstance(obj, dict):
        return {}
    meta = {}
    size = obj.get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        meta["image_size"] = size
    if isinstance(obj.get("model_name"), str):
        meta["model_name"] = obj["model_name"]
    if isinstance(obj.get("config"), dict):
        meta["config"] = obj["config"]
    return meta


def _build_model(name: str, nc: Optional[int], size: int, meta: dict):
    """The detector as trained: a run with ``model_overrides`` (a reduced EfficientDet) is rebuilt by
    the training loop's ``build_model`` from the checkpoint's config; else ``create_model``."""
    from ..models import create_model

    over = (meta.get("config") or {}).get("model_overrides") or {}
    if not over:
        return create_model(name, num_classes=nc, image_size=size)
    import dataclasses

    from .loop import TrainConfig, build_model

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = dict((k, v) for k, v in meta["config"].items() if k in known)
    cfg.update(model=name, image_size=size)
    cfg.setdefault("out", ".")  # a required field that building the model does not read
    return build_model(TrainConfig(**cfg), nc if nc is not None else 90)


def _head_classes(weights: str, model_name: str) -> Optional[int]:
    from ..models.efficientdet import EfficientDet, get_config
    from ..models.weights import read_checkpoint

    w = read_checkpoint(weights).get(EfficientDet.classifier_weight_key)
    per = get_config(model_name).num_anchors
    return int(w.shape[0]) // per if w is not None and w.shape[0] % per == 0 else None


def _write_json(path: str, obj) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, p)


def run(args) -> int:
    import torch

    from ..models.efficientdet import VARIANTS
    from ..models.weights import load_weights
    from .data import CocoDetection, resolve_data
    from .evaluate import evaluate, format_metrics

    for name in ("batch_size", "image_size", "max_images"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return _err(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.workers < 0:
        return _err(f"--workers must be >= 0, got {args.workers}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return _err(f"--device {args.device} but torch sees no CUDA device")
    if not Path(args.weights).is_file():
        return _err(f"--weights {args.weights}: no such file")
    meta = checkpoint_meta(args.weights)
    config = meta.get("config") or {}
    name = args.model or meta.get("model_name") or "tf_efficientdet_d0"
    if name not in VARIANTS:
        return _err(f"--model must be one of {', '.join(VARIANTS)}, got {name!r}")
    data = args.data or config.get("data") or "shapes"
    # the shapes set as trained (its options) when evaluating the run's own data
    shapes_options = (config.get("data_options") or None) if str(data) == str(config.get("data")) else None
    try:
        images, ann = resolve_data(data, args.split, shapes_options=shapes_options)
    except (OSError, ValueError, TypeError) as e:
        return _err(f"cannot read --data {data} --split {args.split}: {e}")
    try:
        nc = _head_classes(args.weights, name)
        size = args.image_size or meta.get("image_size") or VARIANTS[name].image_size[0]
        model = _build_model(name, nc, size, meta)
        load_weights(model, args.weights)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as e:
        return _err(f"cannot build {name} from {args.weights}: {e}")
    try:
        ds = CocoDetection(images, ann, image_size=model.image_size, train=False,
                           cat_ids_as_labels=args.cat_ids_as_labels, mean=model.config.mean, std=model.config.std)
    except (OSError, ValueError, TypeError) as e:
        return _err(f"cannot read --data {data} --split {args.split}: {e}")
    if model.num_classes < ds.num_classes:
        return _err(f"{args.weights} has a {model.num_classes}-class head but {ds.ann_file} has labels up to "
                    f"{ds.num_classes}")
    model = model.to(args.device)
    amp = getattr(torch, _AMP[args.amp]) if _AMP[args.amp] else None
    try:
        res = evaluate(model, ds, device=args.device, batch_size=args.batch_size, workers=args.workers,
                       max_images=args.max_images, score_threshold=args.score_threshold, amp=amp, progress=True)
    except (OSError, ValueError) as e:
        return _err(str(e))
    dets = res.pop("detections")
    print(f"{name} ({args.weights}) on {ds.ann_file}: {res['num_images']} images, {len(dets)} detections, "
          f"{res['seconds']:.1f} s, input {model.image_size[0]}x{model.image_size[1]}")
    print("COCO box metrics (%, n/a: no ground truth in that size range)")
    print(format_metrics(res))
    if args.out:
        _write_json(args.out, dict(res, model=name, weights=str(args.weights), data=str(data), split=args.split,
                                   ann_file=str(ds.ann_file), image_size=list(model.image_size),
                                   num_classes=model.num_classes, num_detections=len(dets)))
    if args.detections:
        _write_json(args.detections, dets)
    return 0


__all__ = ["add_parser", "run", "checkpoint_meta"]
