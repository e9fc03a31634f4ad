"""Detection transforms with effdet's training and evaluation semantics (effdet/data/transforms.py).

Boxes are numpy float32 ``[N, 4]`` in ``(y1, x1, y2, x2)`` pixel-edge coordinates throughout (effdet's
loader layout; ``effops.models.anchors`` stores anchors the same way); labels int64 ``[N]``.

* ``RandomFlip``: horizontal flip with probability 0.5, applied first, on the original image
  (x -> width - x for both box edges).
* ``RandomResizePad`` (training): a scale factor ``f ~ U(scale)`` (effdet: (0.1, 2.0)); the image is
  resized by ``s = min(f * H_out / H, f * W_out / W)`` (keeping the aspect ratio) to
  ``(int(H s), int(W s))`` with bilinear or bicubic interpolation (chosen at random), a random
  ``H_out x W_out`` window is cropped where it is larger than the output, and the result is
  pasted at the top left of an output filled with the mean colour. Boxes are scaled, shifted by
  the crop offset, clipped to the pasted content; boxes left with no area are dropped.
* ``ResizePad`` (evaluation): the same with ``f = 1`` and no crop (letterbox at the top left,
  bilinear).
* ``img_scale = 1 / s``: multiply model-input coordinates by it to get original-image
  coordinates. As in effdet one scale serves both axes while the resized size is rounded down,
  so a box may sit up to a pixel beyond the content's far edge.
* ``normalize``: HWC uint8 -> CHW float32 ``(x / 255 - mean) / std`` (ImageNet by default).

Randomness comes from the ``numpy.random.Generator`` passed in (the datasets derive it from
(seed, epoch, index)), never from global state, so an augmented sample can be replayed exactly.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the train / test extras
        raise ImportError("effops.train needs Pillow: pip install 'effops[train]'") from e
    return Image


def _size2(name: str, size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{name}: image_size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def resolve_fill(fill, mean: Sequence[float] = IMAGENET_MEAN) -> Tuple[int, int, int]:
    """``'mean'`` -> the mean colour rounded to 0..255 (effdet's default), an int -> grey, or an RGB
    triple."""
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"transforms: fill must be 'mean', an int or an (r, g, b) triple, got {fill!r}")
        return tuple(int(round(255 * m)) for m in mean)
    if isinstance(fill, (int, np.integer)) and not isinstance(fill, bool):
        return (int(fill),) * 3
    if isinstance(fill, (tuple, list)) and len(fill) == 3:
        return tuple(int(c) for c in fill)
    raise ValueError(f"transforms: fill must be 'mean', an int or an (r, g, b) triple, got {fill!r}")


def clip_boxes_(boxes: np.ndarray, bound: Tuple[int, int]) -> np.ndarray:
    """Clip yxyx ``boxes`` in place to [0, height] x [0, width]."""
    h, w = bound
    np.clip(boxes, 0, np.array([h, w, h, w], dtype=boxes.dtype), out=boxes)
    return boxes


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """yxyx boxes mirrored left-right in an image ``width`` pixels wide (a new array)."""
    out = boxes.copy()
    out[:, 1] = width - boxes[:, 3]
    out[:, 3] = width - boxes[:, 1]
    return out


def yxyx_to_xyxy(boxes):
    """(y1, x1, y2, x2) -> (x1, y1, x2, y2) for numpy arrays or tensors [..., 4]."""
    return boxes[..., [1, 0, 3, 2]]


xyxy_to_yxyx = yxyx_to_xyxy  # the same swap


class RandomFlip:
    """Horizontal flip with probability ``prob`` (effdet: 0.5)."""

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"RandomFlip: prob must be in [0, 1], got {prob!r}")
        self.prob = float(prob)

    def __call__(self, img, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        if rng.random() < self.prob:
            Image = _pil()
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = flip_boxes(boxes, img.size[0])
        return img, boxes, labels


def _resize_crop_pad(img, boxes, labels, out_hw, img_scale, offset, interp, fill):
    Image = _pil()
    width, height = img.size
    sh, sw = max(1, int(height * img_scale)), max(1, int(width * img_scale))
    oy, ox = offset
    img = img.resize((sw, sh), interp)
    if oy or ox or sh > out_hw[0] or sw > out_hw[1]:
        img = img.crop((ox, oy, min(sw, ox + out_hw[1]), min(sh, oy + out_hw[0])))
    canvas = Image.new("RGB", (out_hw[1], out_hw[0]), color=fill)
    canvas.paste(img)  # top left
    boxes = boxes * np.float32(img_scale) - np.array([oy, ox, oy, ox], dtype=np.float32)
    clip_boxes_(boxes, (min(sh, out_hw[0]), min(sw, out_hw[1])))
    keep = (boxes[:, :2] < boxes[:, 2:]).all(axis=1)
    return canvas, boxes[keep], labels[keep], 1.0 / img_scale


class ResizePad:
    """Evaluation: resize keeping the aspect ratio to fit ``image_size``, pad at the bottom / right
    with ``fill`` (effdet's ResizePad)."""

    def __init__(self, image_size, *, interpolation: str = "bilinear", fill=(124, 116, 104)):
        self.image_size = _size2("ResizePad", image_size)
        self.interpolation = _interp(interpolation, allow_random=False)
        self.fill = resolve_fill(fill)

    def __call__(self, img, boxes, labels, rng: Optional[np.random.Generator] = None):
        width, height = img.size
        s = min(self.image_size[0] / height, self.image_size[1] / width)
        return _resize_crop_pad(img, boxes, labels, self.image_size, s, (0, 0), self.interpolation, self.fill)


class RandomResizePad:
    """Training: effdet's RandomResizePad (scale jitter, random crop, pad; see the module docstring)."""

    def __init__(self, image_size, *, scale: Tuple[float, float] = (0.1, 2.0), interpolation: str = "random",
                 fill=(124, 116, 104)):
        self.image_size = _size2("RandomResizePad", image_size)
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1])):
            raise ValueError(f"RandomResizePad: scale must be (min, max) with 0 < min <= max, got {scale!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.interpolation = _interp(interpolation, allow_random=True)
        self.fill = resolve_fill(fill)

    def __call__(self, img, boxes, labels, rng: np.random.Generator):
        f = rng.uniform(*self.scale)
        width, height = img.size
        th, tw = self.image_size
        s = min(f * th / height, f * tw / width)
        sh, sw = max(1, int(height * s)), max(1, int(width * s))
        oy = int(max(0.0, float(sh - th)) * rng.uniform(0, 1))
        ox = int(max(0.0, float(sw - tw)) * rng.uniform(0, 1))
        interp = self.interpolation
        if isinstance(interp, tuple):
            interp = interp[int(rng.integers(0, len(interp)))]
        return _resize_crop_pad(img, boxes, labels, self.image_size, s, (oy, ox), interp, self.fill)


def _interp(name: str, allow_random: bool):
    Image = _pil()
    table = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}
    if name == "random" and allow_random:
        return (Image.BILINEAR, Image.BICUBIC)
    if name not in table:
        raise ValueError(f"transforms: interpolation must be one of {', '.join(table)}"
                         f"{', random' if allow_random else ''}; got {name!r}")
    return table[name]


def normalize(img, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """PIL RGB image -> CHW float32 array ``(x / 255 - mean) / std``."""
    x = np.asarray(img, dtype=np.float32)
    m = np.asarray(mean, dtype=np.float32) * 255.0
    s = np.asarray(std, dtype=np.float32) * 255.0
    return np.ascontiguousarray(((x - m) / s).transpose(2, 0, 1))


class DetectionTransform:
    """effdet's training (``train=True``: flip, RandomResizePad) or evaluation (ResizePad) pipeline,
    then ``normalize``. ``__call__(img, boxes_yxyx, labels, rng) -> (CHW float32, boxes, labels,
    img_scale)``."""

    def __init__(self, image_size, *, train: bool, scale: Tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5,
                 interpolation: Optional[str] = None, fill="mean", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.image_size = _size2("DetectionTransform", image_size)
        self.train = bool(train)
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ValueError(f"DetectionTransform: mean and std must be 3 numbers (std > 0), got {mean!r}, {std!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        fill_rgb = resolve_fill(fill, self.mean)
        if self.train:
            self.flip = RandomFlip(flip_prob)
            self.resize = RandomResizePad(self.image_size, scale=scale, interpolation=interpolation or "random",
                                          fill=fill_rgb)
        else:
            self.flip = None
            self.resize = ResizePad(self.image_size, interpolation=interpolation or "bilinear", fill=fill_rgb)

    def __call__(self, img, boxes: np.ndarray, labels: np.ndarray, rng: Optional[np.random.Generator] = None):
        if self.train:
            if rng is None:
                raise ValueError("DetectionTransform: a training transform needs rng (a numpy Generator)")
            img, boxes, labels = self.flip(img, boxes, labels, rng)
        img, boxes, labels, img_scale = self.resize(img, boxes, labels, rng)
        return normalize(img, self.mean, self.std), boxes, labels, img_scale


__all__ = ["DetectionTransform", "RandomFlip", "RandomResizePad", "ResizePad", "normalize", "resolve_fill",
           "flip_boxes", "clip_boxes_", "yxyx_to_xyxy", "xyxy_to_yxyx", "IMAGENET_MEAN", "IMAGENET_STD"]
