"""``effops classify IMAGE... --model efficientnet_b0 --weights PATH``: print the top-5 classes.

Images are read with Pillow, converted to RGB, resized (shorter side to image_size / crop_pct,
bicubic), centre-cropped to image_size and normalised with the ImageNet mean/std (timm's eval
transform; crop_pct 0.875). ``num_classes`` is taken from the checkpoint's classifier. An
unreadable image is reported on stderr and skipped; the exit status is 1 when any failed.
``--labels FILE``: class names, one per line (line i names class i).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_PCT = 0.875


def add_parser(sub) -> None:
    sp = sub.add_parser("classify", help="classify images with an EfficientNet checkpoint (prints the top-5)")
    sp.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    sp.add_argument("--model", default="efficientnet_b0", help="model name (default efficientnet_b0)")
    sp.add_argument("--weights", required=True, help="checkpoint file (.pth/.pt/.safetensors; timm or effops)")
    sp.add_argument("--labels", default=None, help="class names, one per line")
    sp.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    sp.add_argument("--image-size", type=int, default=None, help="input size (default: the variant's resolution)")
    sp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sp.set_defaults(func=run)


def _err(msg: str) -> None:
    print(f"effops classify: {msg}", file=sys.stderr)


def preprocess(path: Path, size: int):
    """[1, 3, size, size] float tensor of the image at ``path`` (raises OSError if unreadable)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        short = int(round(size / CROP_PCT))
        scale = short / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.float32) / 255.0
    x = torch.from_numpy(a).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x[None]


def read_labels(path: Optional[str]) -> List[str]:
    if path is None:
        return []
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]


def run(args) -> int:
    import torch

    from . import create_model, list_models
    from .weights import load_weights, read_checkpoint

    if args.top < 1:
        _err(f"--top must be >= 1, got {args.top}")
        return 2
    if args.model not in list_models("*efficientnet_*"):
        _err(f"unknown classification model {args.model!r}; choose from {', '.join(list_models('*efficientnet_*'))}")
        return 2
    try:
        labels = read_labels(args.labels)
        sd = read_checkpoint(args.weights)
        w = sd.get("classifier.weight")
        model = create_model(args.model, num_classes=int(w.shape[0]) if w is not None else 1000,
                             image_size=args.image_size)
        load_weights(model, args.weights)
        model = model.eval().to(args.device)
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as e:
        _err(str(e))
        return 2
    failed = 0
    for name in args.images:
        try:
            x = preprocess(Path(name), model.image_size)
        except (OSError, ValueError, SyntaxError) as e:  # Pillow: UnidentifiedImageError is an OSError
            _err(f"{name}: cannot read the image ({e})")
            failed += 1
            continue
        with torch.no_grad():
            probs = model(x.to(args.device)).float().softmax(-1)[0]
        top = probs.topk(min(args.top, probs.numel()))
        print(name)
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            label = f"  {labels[i]}" if i < len(labels) and labels[i] else ""
            print(f"  {i:5d}  {p:.4f}{label}")
    return 1 if failed else 0
