"""Detector post- and pre-processing: ``Detections``, ``postprocess`` (effdet's DetBenchPredict
semantics on the fused NMS) and ``letterbox`` (effdet's eval transforms: resize keeping the aspect
ratio, pad, normalise).

Post-processing, as effdet's ``_post_process`` + ``generate_detections`` define it: the k = 5000
best (anchor, class) logits of each image, their boxes decoded against the anchors, sigmoid
scores, per-class NMS at IoU 0.5, the 100 best kept, class ids + 1 (1-based, effdet's convention:
for the COCO models they are the COCO category ids), padded with zeros. How it is computed here:

* top-k without materialising anything of size anchors x classes beyond the logits themselves:
  the k best elements lie in at most k anchors, and those anchors are among the k anchors with the
  largest per-anchor maximum logit (an anchor outside them has k anchors whose maxima are >= its
  own maximum, so k elements at least as large as any of its elements). So: max over classes per
  anchor, top-k anchors, gather their k x C logits, top-k of those. Exact, ties included: both
  top-k's give equal values at the k-th place to the lower index (``_topk_lower_index``; the
  choice of torch.topk is unspecified and differs between devices and from ONNX's TopK), the
  anchors are kept in anchor order, and with one tie rule the two stages select exactly the K
  best pairs by (logit desc, flat index n * C + c asc).
* sigmoid and decoding only for the kept candidates; per-class NMS by ``effops.ops.multiclass_nms``
  on a [B, k anchors, C] score table that holds the candidates' scores and -1 elsewhere (score
  threshold -0.5: exactly the candidates), so every shape is fixed: no host synchronisation on
  CUDA and one graph under ``torch.compile(fullgraph=True)``.
* equal scores then go to the lower anchor, then the lower class (multiclass_nms's flat-index
  order): the same detections on every backend, compiled, and in the ONNX export.
* in eager inference on the CPU the selection is one C++ pass (``_candidates_cpu``; csrc/nms/
  topk.cpp): the per-anchor maxima straight from the per-level head outputs (no concatenation),
  the k best anchors, then only those of their logits that reach the smallest of the k maxima are
  ranked, by the same total order: D0 (random weights) 10.5 -> 4.5 ms for the 5000 of 4.4M logits,
  one thread (post-processing 10.6 -> 6 ms). Under torch.compile / export / other devices the
  torch ops above run (same result, tested).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _backend
from ..ops._common import profiled
from ..ops.nms import multiclass_nms
from .anchors import decode_boxes


class Detections(NamedTuple):
    """Per-image detections, padded: row b holds ``num_detections[b]`` valid entries first (score
    descending), then padding (boxes 0, scores 0, classes 0)."""

    boxes: Tensor  # [B, M, 4] float32 (x1, y1, x2, y2) in pixels
    scores: Tensor  # [B, M] float32, sigmoid of the class logit
    classes: Tensor  # [B, M] int64, 1-based class ids (0 = padding)
    num_detections: Tensor  # [B] int64


def flatten_levels(outputs: Sequence[Tensor], per_anchor: int) -> Tensor:
    """Per-level head outputs [B, A * per_anchor, H, W] -> [B, sum(H * W * A), per_anchor] in
    effdet's order (level, y, x, anchor). A view per level when the outputs are channels_last."""
    B = outputs[0].shape[0]
    flat = [o.permute(0, 2, 3, 1).reshape(B, -1, per_anchor) for o in outputs]
    return flat[0] if len(flat) == 1 else torch.cat(flat, 1)


def _topk_lower_index(x: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest entries of each row of x, equal values at the k-th place
    going to the lower index (ONNX TopK's rule), in no particular order. Fixed shapes (no host
    synchronisation); about 3x one torch.topk."""
    kth = x.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = x > kth
    tied = x == kth
    room = k - above.sum(dim=1, keepdim=True)  # how many of the tied values are in the k
    take = above | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row
    return take.to(x.dtype).topk(k, dim=1, sorted=False).indices


def _candidates_cpu(cls_outputs: Sequence[Tensor], C: int, K: int, N: int):
    """(top_anchor [B, Ka] ascending, pos [B, K] into the [Ka * C] rows of those anchors and the
    logits there, best first) by the C++ selection, or None where the torch path must run
    (tracing, compiling, another device, a dispatch mode, autograd, no compiled module, a forced
    backend)."""
    o = cls_outputs[0]
    if (torch.compiler.is_compiling() or _backend._C is None or not hasattr(_backend._C, "topk_candidates")
            or _backend.forced_backend() not in (None, "cpu") or _get_current_dispatch_mode() is not None
            or any(type(t) is not torch.Tensor or t.device.type != "cpu" or t.requires_grad for t in cls_outputs)):
        return None
    B = o.shape[0]
    levels = [t.permute(0, 2, 3, 1).reshape(B, -1, C).float().contiguous() for t in cls_outputs]
    if sum(t.shape[1] for t in levels) != N:
        return None  # the torch path names the mismatch
    Ka = min(K, N)
    top_anchor = torch.empty(B, Ka, dtype=torch.int64)
    pos = torch.empty(B, K, dtype=torch.int64)
    vals = torch.empty(B, K, dtype=torch.float32)
    profiled("effops::topk_candidates", _backend._C.topk_candidates, levels, K, top_anchor, pos, vals,
             max(1, torch.get_num_threads()))
    return top_anchor, pos, vals


def _candidates_torch(logits: Tensor, K: int):
    """_candidates_cpu's selection in torch ops, from the flattened logits [B, N, C] (pos in no
    particular order)."""
    B, N, C = logits.shape
    Ka = min(K, N)
    # the Ka anchors whose best class logit is largest hold the K best (anchor, class) logits
    # in anchor order (multiclass_nms breaks score ties by position): ties to the lower anchor
    top_anchor = _topk_lower_index(logits.amax(dim=2), Ka).sort(dim=1).values  # [B, Ka]
    rows = (top_anchor + torch.arange(B, device=logits.device)[:, None] * N).reshape(-1)
    sub = logits.reshape(B * N, C).index_select(0, rows).view(B, Ka * C)
    pos = _topk_lower_index(sub, K)
    return top_anchor, pos, sub.gather(1, pos)


def postprocess(cls_outputs: Sequence[Tensor], box_outputs: Sequence[Tensor], anchors: Tensor, *, num_classes: int,
                max_detection_points: int = 5000, iou_threshold: float = 0.5, max_det_per_image: int = 100,
                clip_size: Optional[Tensor] = None, box_scale: Optional[Tensor] = None) -> Detections:
    """Detections from EfficientDet head outputs (see the module docstring).

    Args:
        cls_outputs / box_outputs: per-level [B, A*C, H, W] / [B, A*4, H, W] (P3..P7).
        anchors: [N, 4] (y1, x1, y2, x2), N = sum over levels of H*W*A.
        clip_size: optional [B, 2] (height, width) in input pixels: boxes are clipped to
            [0, width] x [0, height] before NMS (effdet with img_info).
        box_scale: optional [B]: boxes are multiplied by it after NMS (back to original pixels).
    """
    C = int(num_classes)
    rel = flatten_levels(box_outputs, 4)  # [B, N, 4]
    B, N, _ = rel.shape
    if anchors.shape != (N, 4):
        raise ValueError(f"postprocess: anchors must be [{N}, 4] for these outputs, got {list(anchors.shape)}")
    K = min(int(max_detection_points), N * C)
    Ka = min(K, N)
    dev = rel.device
    fast = _candidates_cpu(cls_outputs, C, K, N) if K > 0 else None
    if fast is not None:
        top_anchor, pos, vals = fast
    else:
        logits = flatten_levels(cls_outputs, C).float()  # [B, N, C]
        if logits.shape[:2] != (B, N):
            raise ValueError(f"postprocess: class outputs hold {logits.shape[1]} anchors, box outputs {N}")
        top_anchor, pos, vals = _candidates_torch(logits, K)
    rows = (top_anchor + torch.arange(B, device=dev)[:, None] * N).reshape(-1)
    scores = torch.full((B, Ka * C), -1.0, dtype=torch.float32, device=dev).scatter_(
        1, pos, torch.sigmoid(vals)).view(B, Ka, C)
    codes = rel.reshape(B * N, 4).index_select(0, rows).view(B, Ka, 4)
    boxes = decode_boxes(codes, anchors.index_select(0, top_anchor.reshape(-1)).view(B, Ka, 4))
    if clip_size is not None:  # effdet: clamp(min=0), then min(width, height) per coordinate
        lim = clip_size.to(device=dev, dtype=boxes.dtype).flip(-1).repeat(1, 2)[:, None, :]  # (w, h, w, h)
        boxes = torch.minimum(boxes.clamp(min=0), lim)
    res = multiclass_nms(boxes, scores, float(iou_threshold), -0.5, int(max_det_per_image))
    out_boxes = res.boxes
    if box_scale is not None:
        out_boxes = out_boxes * box_scale.to(device=dev, dtype=out_boxes.dtype)[:, None, None]
    return Detections(out_boxes, res.scores, res.classes + 1, res.num_detections)


# ------------------------------------------------------------------------------ preprocessing
def _as_chw(op: str, img, i: int) -> Tensor:
    """One HWC image (numpy array or tensor; uint8) -> uint8 CHW tensor with 3 channels."""
    if not isinstance(img, Tensor):
        try:
            import numpy as np
        except ImportError as e:  # pragma: no cover - numpy is a dependency of torch's from_numpy
            raise TypeError(f"{op}: images[{i}] must be a numpy array or a tensor") from e
        if not isinstance(img, np.ndarray):
            raise TypeError(f"{op}: images[{i}] must be an HWC uint8 numpy array or tensor, got {type(img).__name__}")
        if img.dtype != np.uint8:
            raise TypeError(f"{op}: images[{i}] must have dtype uint8, got {img.dtype}")
        img = np.ascontiguousarray(img)
        img = torch.from_numpy(img if img.flags.writeable else img.copy())
    if img.dtype != torch.uint8:
        raise TypeError(f"{op}: images[{i}] must have dtype uint8 (HWC), got {img.dtype}")
    if img.dim() == 2:
        img = img[:, :, None]
    if img.dim() != 3 or img.shape[2] not in (1, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{op}: images[{i}] must be H x W x 3 (or H x W grayscale), got shape {list(img.shape)}")
    img = img.permute(2, 0, 1)
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def _resize_pad(x: Tensor, size: Tuple[int, int], fill: Tensor, round_u8: bool) -> Tuple[Tensor, float]:
    """x [B, 3, H, W] float in 0..255 -> [B, 3, S, S] letterboxed at the top left, and the scale."""
    H, W = x.shape[-2:]
    scale = min(size[0] / H, size[1] / W)
    sh, sw = max(1, int(H * scale)), max(1, int(W * scale))
    if (sh, sw) != (H, W):
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
        if round_u8:  # uint8 inputs: PIL resizes to uint8 in effdet's pipeline
            x = x.round().clamp(0, 255)
    out = fill.view(1, 3, 1, 1).expand(x.shape[0], 3, size[0], size[1]).clone()
    out[:, :, :sh, :sw] = x
    return out, scale


_CONSTANTS: dict = {}


def _constants(mean: tuple, std: tuple, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """mean * 255, std * 255 and effdet's fill colour (the mean, rounded) on ``device``, made once."""
    key = (mean, std, device)
    hit = _CONSTANTS.get(key)
    if hit is None:
        vals = [[m * 255 for m in mean], [s * 255 for s in std], [float(int(round(255 * m))) for m in mean]]
        hit = _CONSTANTS.setdefault(key, tuple(torch.tensor(v, dtype=torch.float32).to(device) for v in vals))
    return hit


def letterbox(images, image_size: Tuple[int, int], mean: Sequence[float], std: Sequence[float], *,
              device: torch.device, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor, Tensor]:
    """effdet's eval preprocessing: resize keeping the aspect ratio so the image fits
    ``image_size`` (bilinear, antialiased), paste at the top left on the mean colour, normalise.

    ``images``: a uint8 tensor [B, 3, H, W] (0..255), a float tensor [B, 3, H, W] (0..1), or a
    list of HWC uint8 arrays of any sizes. Returns (batch [B, 3, S, S], scale [B] = original /
    model pixels, size [B, 2] = original (height, width)).
    """
    op = "predict"
    mean_t, std_t, fill = _constants(tuple(mean), tuple(std), torch.device(device))
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{op}: an image tensor must be [B, 3, H, W], got shape {list(images.shape)}")
        if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            raise ValueError(f"{op}: images is empty (shape {list(images.shape)})")
        if images.dtype == torch.uint8:
            x, round_u8 = images.to(device=device, dtype=torch.float32), True
        elif images.is_floating_point():
            x, round_u8 = images.to(device=device, dtype=torch.float32) * 255.0, False
        else:
            raise TypeError(f"{op}: an image tensor must be uint8 (0..255) or float (0..1), got {images.dtype}")
        H, W = x.shape[-2:]
        batch, scale = _resize_pad(x, image_size, fill, round_u8)
        B = x.shape[0]
        scales = torch.full((B,), 1.0 / scale, device=device)  # fills: no host-to-device copies
        sizes = torch.stack([torch.full((B,), float(H), device=device), torch.full((B,), float(W), device=device)], 1)
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{op}: images is an empty list")
        outs: List[Tensor] = []
        sc, sz = [], []
        for i, img in enumerate(images):
            chw = _as_chw(op, img, i).to(device=device, dtype=torch.float32)
            b, s = _resize_pad(chw[None], image_size, fill, True)
            outs.append(b)
            sc.append(1.0 / s)
            sz.append(list(chw.shape[-2:]))
        batch = torch.cat(outs, 0)
        scales = torch.tensor(sc, device=device, dtype=torch.float32)
        sizes = torch.tensor(sz, device=device, dtype=torch.float32)
    else:
        raise TypeError(f"{op}: images must be a [B, 3, H, W] tensor or a list of HWC uint8 arrays, "
                        f"got {type(images).__name__}")
    batch = ((batch - mean_t.view(1, 3, 1, 1)) / std_t.view(1, 3, 1, 1)).to(dtype)
    return batch.contiguous(memory_format=torch.channels_last), scales, sizes


__all__ = ["Detections", "postprocess", "letterbox", "flatten_levels"]
