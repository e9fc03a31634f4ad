"""COCO-format detection data: ``CocoDetection``, ``collate_detections``, ``build_loader``.

A sample is ``(image, target)``: ``image`` float32 ``[3, S, S]`` (effdet's training / evaluation
transforms, ImageNet-normalised; see ``transforms.py``) and ``target`` a dict

* ``boxes``: float32 ``[G, 4]`` in the model input's pixels, ``(y1, x1, y2, x2)`` by default
  (effdet's loader layout; ``box_format="xyxy"`` gives ``(x1, y1, x2, y2)``);
* ``labels``: int64 ``[G]``, contiguous ``1..K`` in the order of the file's ``categories``
  (effdet's ``cat_id_to_label``, label offset 1; effdet's AnchorLabeler subtracts 1, so class
  index = label - 1), or the raw category ids with ``cat_ids_as_labels=True`` (what the
  COCO-pretrained 90-class models predict);
* ``img_id`` (the COCO image id), ``img_scale`` (original pixels per model pixel: multiply
  predicted boxes by it), ``img_size`` (original ``(height, width)``).

Annotations follow effdet's CocoParser: ``ignore`` and crowd annotations are not targets,
boxes narrower or lower than 1 pixel are skipped, images smaller than ``min_img_size`` (32) are
left out, images without annotations are kept unless ``ignore_empty``. Annotation files are
untrusted: they are checked field by field before pycocotools indexes them, and an error names
the file, the entry and the field. Image files are read with Pillow; a missing one is reported
when the dataset is built, an unreadable one or one whose size differs from the file's
``width`` / ``height`` when it is read.

Augmentation randomness is a function of ``(seed, epoch, index)`` only (``set_epoch``), so an
image gets the same augmentation whichever worker or DDP rank loads it, and a resumed run replays
the same samples.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .transforms import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, yxyx_to_xyxy

BOX_FORMATS = ("yxyx", "xyxy")


# ------------------------------------------------------------------------------ annotation files
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _field(name: str, where: str, entry: dict, key: str, check, what: str, required: bool = True):
    if key not in entry:
        if required:
            raise ValueError(f"{name}: {where} has no {key!r} field")
        return None
    v = entry[key]
    if not check(v):
        raise ValueError(f"{name}: {where}: {key!r} must be {what}, got {v!r:.80}")
    return v


def _safe_relpath(s) -> bool:
    if not isinstance(s, str) or not s or "\x00" in s or "\\" in s:
        return False
    p = PurePosixPath(s)
    return not p.is_absolute() and ".." not in p.parts


def load_coco_json(path) -> dict:
    """Read and check a COCO instances file; returns it with ``iscrowd`` and ``area`` filled in
    where missing (COCOeval reads both). Raises FileNotFoundError / ValueError naming the file and
    the offending entry and field."""
    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise FileNotFoundError(f"annotations: no such file {name!r}")
    try:
        data = json.loads(p.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: not a valid JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}: the top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{name}: {key!r} must be a list (COCO instances format), got "
                             f"{'nothing' if key not in data else type(data[key]).__name__}")
    image_ids, cat_ids, ann_ids = set(), set(), set()
    for i, im in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            raise ValueError(f"{name}: {where} must be an object, got {type(im).__name__}")
        iid = _field(name, where, im, "id", _is_int, "an int")
        if iid in image_ids:
            raise ValueError(f"{name}: {where}: duplicate image id {iid}")
        image_ids.add(iid)
        _field(name, where, im, "file_name", _safe_relpath, "a relative path inside the image folder (no '..')")
        for k in ("width", "height"):
            _field(name, where, im, k, lambda v: _is_int(v) and v > 0, "a positive int")
    for i, c in enumerate(data["categories"]):
        where = f"categories[{i}]"
        if not isinstance(c, dict):
            raise ValueError(f"{name}: {where} must be an object, got {type(c).__name__}")
        cid = _field(name, where, c, "id", _is_int, "an int")
        if cid in cat_ids:
            raise ValueError(f"{name}: {where}: duplicate category id {cid}")
        cat_ids.add(cid)
        _field(name, where, c, "name", lambda v: isinstance(v, str), "a string", required=False)
    anns = []
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(a, dict):
            raise ValueError(f"{name}: {where} must be an object, got {type(a).__name__}")
        aid = _field(name, where, a, "id", _is_int, "an int")
        where = f"annotations[{i}] (id {aid})"
        if aid in ann_ids:
            raise ValueError(f"{name}: {where}: duplicate annotation id")
        ann_ids.add(aid)
        _field(name, where, a, "image_id", lambda v: _is_int(v) and v in image_ids, "the id of an entry of 'images'")
        _field(name, where, a, "category_id", lambda v: _is_int(v) and v in cat_ids,
               "the id of an entry of 'categories'")
        bbox = _field(name, where, a, "bbox", lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_num, v)),
                      "[x, y, width, height] (4 finite numbers)")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{name}: {where}: 'bbox' has a negative width or height: {bbox}")
        crowd = _field(name, where, a, "iscrowd", lambda v: v in (0, 1), "0 or 1", required=False)
        area = _field(name, where, a, "area", lambda v: _is_num(v) and v >= 0, "a number >= 0", required=False)
        _field(name, where, a, "ignore", lambda v: v in (0, 1), "0 or 1 (or a bool)", required=False)
        a = dict(a, iscrowd=int(crowd or 0), area=float(bbox[2] * bbox[3] if area is None else area))
        anns.append(a)
    return dict(data, annotations=anns)


def coco_from_dict(data: dict):
    """A pycocotools ``COCO`` index of an already checked instances dict (quietly)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # pragma: no cover - pycocotools is in the train / test extras
        raise ImportError("effops.train needs pycocotools: pip install 'effops[train]'") from e
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ------------------------------------------------------------------------------ the dataset
class CocoDetection(Dataset):
    """A COCO-format detection dataset (see the module docstring).

    Args:
        images_dir: the folder the ``file_name`` entries are relative to.
        ann_file: the COCO instances JSON.
        image_size: model input size (int or (H, W)).
        train: effdet's training augmentation (flip, scale jitter ``scale``, crop, pad) or its
            evaluation transform (resize keeping the aspect ratio, pad).
        box_format: ``"yxyx"`` (default, effdet's) or ``"xyxy"`` for ``target["boxes"]``.
        cat_ids_as_labels: labels are the category ids instead of ``1..K``.
        seed: augmentation seed (with the epoch and the index).
        check_files: check at construction that every image file exists.
    """

    def __init__(self, images_dir, ann_file, *, image_size, train: bool, box_format: str = "yxyx",
                 cat_ids_as_labels: bool = False, min_img_size: int = 32, ignore_empty: bool = False,
                 scale: Tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5, fill="mean",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, seed: int = 0,
                 check_files: bool = True):
        if box_format not in BOX_FORMATS:
            raise ValueError(f"CocoDetection: box_format must be one of {BOX_FORMATS}, got {box_format!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"CocoDetection: seed must be an int >= 0, got {seed!r}")
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"CocoDetection: images_dir {str(self.images_dir)!r} is not a folder")
        self.ann_file = Path(ann_file)
        self.train, self.box_format, self.seed, self.epoch = bool(train), box_format, int(seed), 0
        self.transform = DetectionTransform(image_size, train=train, scale=scale, flip_prob=flip_prob, fill=fill,
                                            mean=mean, std=std)
        self.image_size = self.transform.image_size
        data = load_coco_json(self.ann_file)
        self.coco = coco_from_dict(data)
        self.cat_ids = [c["id"] for c in data["categories"]]
        self.cat_names = [str(c.get("name", c["id"])) for c in data["categories"]]
        if cat_ids_as_labels:
            if any(c < 1 for c in self.cat_ids):
                raise ValueError(f"CocoDetection: cat_ids_as_labels needs category ids >= 1 ({self.ann_file} has "
                                 f"{min(self.cat_ids)})")
            self.cat_id_to_label = {c: c for c in self.cat_ids}
        else:
            self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {v: k for k, v in self.cat_id_to_label.items()}
        self.num_classes = max(self.cat_id_to_label.values(), default=0)
        self._parse(data, int(min_img_size), bool(ignore_empty))
        if check_files:
            missing = [info["file_name"] for info in self.img_infos
                       if not (self.images_dir / info["file_name"]).is_file()]
            if missing:
                raise FileNotFoundError(f"CocoDetection: {len(missing)} image(s) listed in {self.ann_file} are missing "
                                        f"from {self.images_dir}: {', '.join(missing[:5])}"
                                        f"{', ...' if len(missing) > 5 else ''}")

    def _parse(self, data: dict, min_img_size: int, ignore_empty: bool) -> None:
        per_image: Dict[int, list] = {}
        for a in data["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
        self.img_ids: List[int] = []
        self.img_infos: List[dict] = []
        self._gt: List[Tuple[np.ndarray, np.ndarray]] = []
        small = 0
        for info in sorted(data["images"], key=lambda im: im["id"]):
            anns = per_image.get(info["id"], [])
            if min(info["width"], info["height"]) < min_img_size:
                small += 1
                continue
            if ignore_empty and not anns:
                continue
            boxes, labels = [], []
            for a in anns:
                x, y, w, h = a["bbox"]
                if a.get("ignore", 0) or a["iscrowd"] or w < 1 or h < 1:
                    continue
                boxes.append([y, x, y + h, x + w])
                labels.append(self.cat_id_to_label[a["category_id"]])
            self.img_ids.append(info["id"])
            self.img_infos.append(info)
            self._gt.append((np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)))
        if small:
            warnings.warn(f"CocoDetection: {small} image(s) in {self.ann_file} smaller than "
                          f"min_img_size={min_img_size} are left out (as effdet does)", stacklevel=3)
        if not self.img_ids:
            raise ValueError(f"CocoDetection: {self.ann_file} has no usable images")

    def __len__(self) -> int:
        return len(self.img_ids)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the augmentation draws for (call before iterating a new DataLoader over it)."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"CocoDetection.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def gt(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The training targets of image ``index`` in original pixels: (yxyx boxes, labels)."""
        boxes, labels = self._gt[index]
        return boxes.copy(), labels.copy()

    def load_image(self, index: int):
        from PIL import Image, UnidentifiedImageError

        info = self.img_infos[index]
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"CocoDetection: image file {str(path)!r} (image id {info['id']}) is "
                                    f"missing") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"CocoDetection: cannot read image {str(path)!r} (image id {info['id']}): {e}") from None
        if img.size != (info["width"], info["height"]):
            raise ValueError(f"CocoDetection: image {str(path)!r} is {img.size[0]} x {img.size[1]} but {self.ann_file} "
                             f"says width {info['width']}, height {info['height']}")
        return img

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"CocoDetection: index {index} out of range for {len(self)} images")
        img = self.load_image(index)
        boxes, labels = self.gt(index)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        x, boxes, labels, img_scale = self.transform(img, boxes, labels, rng)
        if self.box_format == "xyxy":
            boxes = yxyx_to_xyxy(boxes)
        info = self.img_infos[index]
        target = dict(boxes=torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
                      labels=torch.from_numpy(labels), img_id=int(info["id"]), img_scale=float(img_scale),
                      img_size=(int(info["height"]), int(info["width"])))
        return torch.from_numpy(x), target


# ------------------------------------------------------------------------------ batching
def collate_detections(batch, pad_to: Optional[int] = None) -> dict:
    """Samples -> a batch dict: ``images`` [B, 3, S, S] float32; ``boxes`` [B, G, 4] float32 and
    ``labels`` [B, G] int64 padded with -1 rows, G = the most boxes in the batch (at least 1) or
    ``pad_to`` (images with more are truncated to it, as effdet truncates at 100); ``img_id``
    int64 [B], ``img_scale`` float32 [B], ``img_size`` int64 [B, 2] (original height, width)."""
    if not batch:
        raise ValueError("collate_detections: empty batch")
    imgs = [b[0] for b in batch]
    if all(isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad for x in imgs):
        # one single-threaded copy: torch.stack's OpenMP copy stalls when the cores are oversubscribed
        # (loader workers + training threads), at no gain for a memory copy this size
        images = torch.from_numpy(np.stack([x.numpy() for x in imgs]))
    else:
        images = torch.stack(imgs)
    counts = [int(b[1]["labels"].shape[0]) for b in batch]
    G = max(1, max(counts)) if pad_to is None else int(pad_to)
    if G < 1:
        raise ValueError(f"collate_detections: pad_to must be >= 1, got {pad_to!r}")
    B = len(batch)
    boxes = torch.full((B, G, 4), -1.0, dtype=torch.float32)
    labels = torch.full((B, G), -1, dtype=torch.int64)
    for i, (_, t) in enumerate(batch):
        n = min(counts[i], G)
        boxes[i, :n] = t["boxes"][:n]
        labels[i, :n] = t["labels"][:n]
    return dict(images=images, boxes=boxes, labels=labels,
                img_id=torch.tensor([t["img_id"] for _, t in batch], dtype=torch.int64),
                img_scale=torch.tensor([t["img_scale"] for _, t in batch], dtype=torch.float32),
                img_size=torch.tensor([t["img_size"] for _, t in batch], dtype=torch.int64).view(B, 2))


class _SkipSampler(Sampler):
    """The indices of ``sampler`` without the first ``skip`` (resuming inside an epoch)."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding / resizing workers must not oversubscribe the training threads


def _nonneg_int(name: str, v, lo: int = 0) -> int:
    if not _is_int(v) or v < lo:
        raise ValueError(f"build_loader: {name} must be an int >= {lo}, got {v!r}")
    return int(v)


def build_loader(dataset, batch_size: int, *, train: bool, workers: int = 0, sampler=None, seed: int = 0,
                 epoch: int = 0, skip_batches: int = 0, drop_last: Optional[bool] = None, pad_to: Optional[int] = None,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader of ``collate_detections`` batches in an order fixed by ``(seed, epoch)``.

    The order is that of ``torch.utils.data.DistributedSampler(shuffle=train, seed=seed)`` at
    ``epoch``: with ``sampler=None`` one is made for this process's rank and world size when
    ``torch.distributed`` is initialised (DDP), else for one replica (so N processes at batch B / N
    see, step by step, the images one process sees at batch B). A sampler passed in gets
    ``set_epoch(epoch)`` when it has it. ``skip_batches``: start after that many batches (resume
    inside an epoch). The dataset's augmentation epoch is set too (``dataset.set_epoch``); worker
    processes are not persistent, so build a new loader (or call ``set_loader_epoch``) per epoch.
    ``drop_last`` defaults to ``train``.
    """
    batch_size = _nonneg_int("batch_size", batch_size, 1)
    workers = _nonneg_int("workers", workers)
    seed, epoch = _nonneg_int("seed", seed), _nonneg_int("epoch", epoch)
    skip_batches = _nonneg_int("skip_batches", skip_batches)
    if sampler is None:
        from torch.utils.data.distributed import DistributedSampler

        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            replicas, rank = dist.get_world_size(), dist.get_rank()
        else:
            replicas, rank = 1, 0
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=bool(train), seed=seed)
    if skip_batches:
        sampler = _SkipSampler(sampler, skip_batches * batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=partial(collate_detections, pad_to=pad_to),
                        drop_last=bool(train) if drop_last is None else bool(drop_last), pin_memory=pin_memory,
                        worker_init_fn=_worker_init if workers else None, persistent_workers=False)
    set_loader_epoch(loader, epoch)
    return loader


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Point ``loader``'s sampler and dataset at ``epoch`` (before iterating it again)."""
    epoch = _nonneg_int("epoch", epoch)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


# ------------------------------------------------------------------------------ named data
def resolve_data(data, split: str = "val", *, shapes_options: Optional[dict] = None) -> Tuple[Path, Path]:
    """(images folder, annotation file) of ``split`` in ``data``: ``"shapes"`` (generated on first
    use, with ``shapes_options`` for ``ensure_shapes``) or a COCO folder laid out as
    ``DIR/annotations/instances_<split>.json`` + ``DIR/<split>/`` (or ``DIR/images/<split>/``)."""
    if not isinstance(split, str) or not split or not _safe_relpath(split) or "/" in split:
        raise ValueError(f"data: split must be a plain name such as 'train' or 'val', got {split!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data: must be 'shapes' or a folder path, got {type(data).__name__}")
    if str(data) == "shapes":
        from .shapes import ensure_shapes

        root = ensure_shapes(**(shapes_options or {}))
        if split not in ("train", "val"):
            raise ValueError(f"data: the shapes set has splits 'train' and 'val', got {split!r}")
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"data: {str(root)!r} is neither 'shapes' nor a folder")
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"data: no annotation file {str(ann)!r} (a COCO folder has "
                                f"annotations/instances_<split>.json and <split>/ or images/<split>/)")
    for images in (root / split, root / "images" / split):
        if images.is_dir():
            return images, ann
    raise FileNotFoundError(f"data: no image folder for split {split!r}: looked for {str(root / split)!r} and "
                            f"{str(root / 'images' / split)!r}")


def make_dataset(data, split: str, *, image_size, train: bool, shapes_options: Optional[dict] = None,
                 **kw) -> CocoDetection:
    """``CocoDetection`` of ``split`` of ``data`` (see ``resolve_data``); ``kw`` go to CocoDetection."""
    images, ann = resolve_data(data, split, shapes_options=shapes_options)
    return CocoDetection(images, ann, image_size=image_size, train=train, **kw)


__all__ = ["CocoDetection", "collate_detections", "build_loader", "set_loader_epoch", "resolve_data", "make_dataset",
           "load_coco_json", "coco_from_dict", "BOX_FORMATS"]
