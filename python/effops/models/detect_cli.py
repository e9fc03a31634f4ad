"""``effops detect IMAGE_OR_DIR... --model tf_efficientdet_d0 --weights PATH --out DIR``.

Writes ``DIR/detections.json`` (COCO result format: image_id, category_id, bbox [x, y, w, h],
score; plus file_name) and ``DIR/<image stem>.png``, the image with its boxes drawn. Images are
read with Pillow; an unreadable file is reported and skipped (exit status 1 when any failed).
``num_classes`` is taken from the checkpoint's class head. ``--labels FILE``: class names, one per
line (line i names class id i, effdet's 1-based ids) or a JSON list / object {id: name}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def add_parser(sub) -> None:
    sp = sub.add_parser("detect", help="detect objects in images with an EfficientDet checkpoint")
    sp.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    sp.add_argument("--model", default="tf_efficientdet_d0", help="model name (default tf_efficientdet_d0)")
    sp.add_argument("--weights", required=True, help="checkpoint file (.pth/.pt/.safetensors; effdet or effops)")
    sp.add_argument("--threshold", type=float, default=0.3, help="minimum score written (default 0.3)")
    sp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sp.add_argument("--out", required=True, help="output folder (detections.json and annotated PNGs)")
    sp.add_argument("--labels", default=None, help="class names file (one per line, or JSON)")
    sp.add_argument("--image-size", type=int, default=None, help="model input size (default: the variant's)")
    sp.set_defaults(func=run)


def _err(msg: str) -> None:
    print(f"effops detect: {msg}", file=sys.stderr)


def collect_images(inputs: List[str]) -> Tuple[List[Path], List[str]]:
    """Files to read (folders expanded to their image files, sorted) and errors for inputs that
    are neither."""
    files, errors = [], []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(f"{s}: folder has no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append(f"{s}: no such file or folder")
    return files, errors


def read_labels(path: Optional[str]) -> Dict[int, str]:
    if path is None:
        return {}
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")):
        obj = json.loads(text)
        if isinstance(obj, list):
            return {i + 1: str(n) for i, n in enumerate(obj)}
        return {int(k): str(v) for k, v in obj.items()}
    return {i + 1: line.strip() for i, line in enumerate(text.splitlines()) if line.strip()}


def _num_classes_of(weights: str, model_name: str) -> Optional[int]:
    """Classes of the checkpoint's class head (rows of class_net.predict.conv_pw.weight / anchors)."""
    from .efficientdet import EfficientDet, get_config
    from .weights import read_checkpoint

    sd = read_checkpoint(weights)
    w = sd.get(EfficientDet.classifier_weight_key)
    if w is None or model_name not in _detector_names():
        return None
    per = get_config(model_name).num_anchors
    return int(w.shape[0]) // per if w.shape[0] % per == 0 else None


def _detector_names() -> List[str]:
    from .efficientdet import VARIANTS

    return list(VARIANTS)


def _image_id(path: Path, index: int) -> int:
    return int(path.stem) if path.stem.isdigit() else index


def _draw(img, boxes, scores, classes, labels: Dict[int, str], out: Path) -> None:
    from PIL import ImageDraw

    img = img.copy()
    d = ImageDraw.Draw(img)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
    for (x1, y1, x2, y2), s, c in zip(boxes, scores, classes):
        col = palette[int(c) % len(palette)]
        d.rectangle([x1, y1, x2, y2], outline=col, width=2)
        text = f"{labels.get(int(c), int(c))} {s:.2f}"
        tb = d.textbbox((x1, y1), text)
        ty = max(0.0, y1 - (tb[3] - tb[1]) - 2)
        d.rectangle([x1, ty, x1 + (tb[2] - tb[0]) + 4, ty + (tb[3] - tb[1]) + 2], fill=col)
        d.text((x1 + 2, ty), text, fill=(255, 255, 255))
    img.save(out, format="PNG")


def run(args) -> int:
    try:
        import numpy as np
        from PIL import Image, UnidentifiedImageError
        from tqdm import tqdm
    except ImportError as e:
        _err(f"needs Pillow and tqdm ({e.name} is not installed): pip install pillow tqdm")
        return 2
    import torch

    from . import create_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _err(f"--device {args.device} but torch sees no CUDA device")
        return 2
    if args.model not in _detector_names():
        _err(f"--model must be one of {', '.join(_detector_names())}, got {args.model!r}")
        return 2
    try:
        labels = read_labels(args.labels)
    except (OSError, ValueError) as e:
        _err(f"cannot read --labels {args.labels}: {e}")
        return 2
    files, errors = collect_images(args.inputs)
    for e in errors:
        _err(e)
    if not files:
        _err("no images to read")
        return 2
    try:
        nc = _num_classes_of(args.weights, args.model)
        model = create_model(args.model, num_classes=nc, image_size=args.image_size, weights=args.weights)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        _err(f"cannot build {args.model} from {args.weights}: {e}")
        return 2
    model = model.to(args.device).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, failed, written = [], len(errors), set()
    with torch.inference_mode():
        for i, path in enumerate(tqdm(files, desc="detect", unit="img")):
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError) as e:
                tqdm.write(f"effops detect: cannot read {path}: {e}", file=sys.stderr)
                failed += 1
                continue
            det = model.predict([np.asarray(img)])
            n = int(det.num_detections[0])
            boxes = det.boxes[0, :n].cpu().tolist()
            scores = det.scores[0, :n].cpu().tolist()
            classes = det.classes[0, :n].cpu().tolist()
            keep = [j for j in range(n) if scores[j] >= args.threshold]
            image_id = _image_id(path, i)
            for j in keep:
                x1, y1, x2, y2 = boxes[j]
                results.append(dict(image_id=image_id, category_id=int(classes[j]),
                                    bbox=[round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                    score=round(scores[j], 5), file_name=path.name))
            name = path.stem
            while name in written:
                name += "_"
            written.add(name)
            _draw(img, [boxes[j] for j in keep], [scores[j] for j in keep], [classes[j] for j in keep], labels,
                  out / f"{name}.png")
    tmp = out / "detections.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "detections.json")
    print(f"{len(files) - (failed - len(errors))} images, {len(results)} detections (score >= {args.threshold}) "
          f"-> {out / 'detections.json'}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


__all__ = ["add_parser", "run", "collect_images", "read_labels"]
