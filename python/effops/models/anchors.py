"""EfficientDet / RetinaNet anchors and box decoding.

Anchors (effdet's ``Anchors`` semantics, from the TPU RetinaNet implementation): for each level l
in ``min_level..max_level`` with feature size ``(fh, fw)`` (repeated ceil halving of the image
size), stride ``(H / fh, W / fw)``; for each octave ``o in 0..num_scales-1`` and aspect ratio
``(ax, ay)``, the base size is ``anchor_scale * stride * 2 ** (o / num_scales)`` and the half
extents ``base * ax / 2`` and ``base * ay / 2``, centred at ``stride / 2 + i * stride``. Rows are
ordered level, then feature position (row-major), then (octave, aspect) - the order of the head
outputs after ``permute(0, 2, 3, 1)`` - and stored ``(y1, x1, y2, x2)`` as effdet stores them.
Computed in float64 and rounded to float32 once, as effdet does (so the values are identical).

Decoding (``FasterRcnnBoxCoder`` without scale factors): with anchor centre ``(yc_a, xc_a)``
and size ``(ha, wa)`` and the regression ``(ty, tx, th, tw)``::

    w = exp(tw) * wa,  h = exp(th) * ha,  yc = ty * ha + yc_a,  xc = tx * wa + xc_a
    box = (xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)          (x1, y1, x2, y2)

in effdet's operation order, so float32 results are bit-identical to effdet's.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_ASPECT_RATIOS: Tuple[Tuple[float, float], ...] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


def feature_sizes(image_size: Tuple[int, int], max_level: int) -> List[Tuple[int, int]]:
    """Sizes of P0..P{max_level}: P0 is the image, each level the ceil half of the previous one."""
    sizes = [(int(image_size[0]), int(image_size[1]))]
    for _ in range(max_level):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


def _aspect_pairs(aspect_ratios) -> List[Tuple[float, float]]:
    out = []
    for a in aspect_ratios:
        if isinstance(a, (tuple, list)):
            if len(a) != 2:
                raise ValueError(f"anchors: aspect ratio {a!r} must be a number or an (x, y) pair")
            out.append((float(a[0]), float(a[1])))
        else:  # a w/h ratio r -> (sqrt r, 1 / sqrt r), as effdet
            x = float(a) ** 0.5
            out.append((x, 1.0 / x))
    return out


def _generate(image_size: Tuple[int, int], min_level: int, max_level: int, num_scales: int,
              aspect_ratios: Tuple[Tuple[float, float], ...], anchor_scale: float) -> Tensor:
    H, W = image_size
    sizes = feature_sizes(image_size, max_level)
    cpu = dict(dtype=torch.float64, device="cpu")  # explicit: a torch.device('meta') context must not apply
    levels = []
    for level in range(min_level, max_level + 1):
        fh, fw = sizes[level]
        sy, sx = H / float(fh), W / float(fw)
        # centres: stride / 2 + i * stride (effdet: np.arange(stride / 2, size, stride))
        y = torch.arange(fh, **cpu) * sy + sy / 2
        x = torch.arange(fw, **cpu) * sx + sx / 2
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        yv, xv = yv.reshape(-1, 1), xv.reshape(-1, 1)
        half_y, half_x = [], []
        for octave in range(num_scales):
            mult = 2 ** (octave / float(num_scales))
            for ax, ay in aspect_ratios:
                half_x.append(anchor_scale * sx * mult * ax / 2.0)
                half_y.append(anchor_scale * sy * mult * ay / 2.0)
        hy = torch.tensor(half_y, **cpu)[None, :]
        hx = torch.tensor(half_x, **cpu)[None, :]
        boxes = torch.stack([yv - hy, xv - hx, yv + hy, xv + hx], dim=-1)  # [fh*fw, A, 4]
        levels.append(boxes.reshape(-1, 4))
    return torch.cat(levels, 0).to(torch.float32)


_CACHE: Dict[tuple, Tensor] = {}
_LOCK = threading.Lock()


def generate_anchors(image_size: Sequence[int], *, min_level: int = 3, max_level: int = 7, num_scales: int = 3,
                     aspect_ratios=DEFAULT_ASPECT_RATIOS, anchor_scale: float = 4.0,
                     device=None) -> Tensor:
    """Anchors ``[N, 4]`` float32 ``(y1, x1, y2, x2)`` in input-image pixels (effdet's layout).

    Generated once per (configuration, image size, device) and cached; the returned tensor is
    shared, do not modify it in place.
    """
    if len(image_size) != 2 or any(int(s) <= 0 for s in image_size):
        raise ValueError(f"generate_anchors: image_size must be two positive ints (H, W), got {image_size!r}")
    if not 0 <= min_level <= max_level:
        raise ValueError(f"generate_anchors: need 0 <= min_level <= max_level, got {min_level}, {max_level}")
    if num_scales < 1:
        raise ValueError(f"generate_anchors: num_scales must be >= 1, got {num_scales}")
    ar = tuple(_aspect_pairs(aspect_ratios))
    size = (int(image_size[0]), int(image_size[1]))
    dev = torch.device("cpu") if device is None else torch.device(device)
    key = (size, int(min_level), int(max_level), int(num_scales), ar, float(anchor_scale), dev)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    cpu_key = key[:-1] + (torch.device("cpu"),)
    with _LOCK:
        base = _CACHE.get(cpu_key)
    if base is None:
        base = _generate(size, key[1], key[2], key[3], ar, key[5])
    out = base if dev.type == "cpu" else base.to(dev)
    with _LOCK:
        _CACHE.setdefault(cpu_key, base)
        return _CACHE.setdefault(key, out)


def anchors_per_location(num_scales: int = 3, aspect_ratios=DEFAULT_ASPECT_RATIOS) -> int:
    return int(num_scales) * len(aspect_ratios)


def decode_boxes(rel_codes: Tensor, anchors_yxyx: Tensor) -> Tensor:
    """Decode ``(ty, tx, th, tw)`` regressions ``[..., 4]`` against anchors ``[..., 4]`` ``(y1, x1,
    y2, x2)`` (broadcasting) into ``(x1, y1, x2, y2)`` boxes, float32 (FasterRcnnBoxCoder, no
    scale factors; effdet's ``decode_box_outputs(..., output_xyxy=True)``)."""
    if rel_codes.shape[-1] != 4 or anchors_yxyx.shape[-1] != 4:
        raise ValueError(f"decode_boxes: rel_codes and anchors need a last dimension of 4, got "
                         f"{list(rel_codes.shape)} and {list(anchors_yxyx.shape)}")
    a = anchors_yxyx
    yc_a = (a[..., 0] + a[..., 2]) / 2
    xc_a = (a[..., 1] + a[..., 3]) / 2
    ha = a[..., 2] - a[..., 0]
    wa = a[..., 3] - a[..., 1]
    ty, tx, th, tw = rel_codes.float().unbind(-1)
    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    yc = ty * ha + yc_a
    xc = tx * wa + xc_a
    return torch.stack([xc - w / 2.0, yc - h / 2.0, xc + w / 2.0, yc + h / 2.0], dim=-1)


__all__ = ["generate_anchors", "decode_boxes", "feature_sizes", "anchors_per_location", "DEFAULT_ASPECT_RATIOS"]
