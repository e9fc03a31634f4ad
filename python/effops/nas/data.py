"""Datasets for proxy training: scikit-learn's digits (embedded default), an image folder, or
a tensor file, split into a training and a held-out part.

``data`` is ``"digits"``, a directory laid out as torchvision's ``ImageFolder``
(``root/<class>/<image>``), or a file: ``.pt``/``.pth`` (``torch.save`` of a dict with
``images``/``x`` and ``labels``/``y``, a tuple ``(images, labels)`` or a ``TensorDataset``) or
``.npz`` (arrays ``images``/``x`` and ``labels``/``y``). Images are ``[N, C, H, W]`` or
``[N, H, W]`` (float, or uint8 scaled to [0, 1]); labels are integers ``0..K-1``. Everything is
held in memory (proxy datasets are small; ``max_samples`` caps big ones).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import torch_load_plain


class DataError(ValueError):
    """A dataset that cannot be read or has the wrong layout; the message names ``data``."""


@dataclass
class Dataset:
    train_x: torch.Tensor  # [n, C, H, W] float32, normalised with the training statistics
    train_y: torch.Tensor  # [n] int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    name: str

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the nas extra installs it
        raise DataError(
            "data: 'digits' needs scikit-learn (pip install 'effops[nas]'), or pass a path to your own data"
        ) from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # 1797 x 1 x 8 x 8, values 0..16
    return x, torch.tensor(d.target, dtype=torch.long)


def _image_folder(path: str, image_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from torchvision import datasets, transforms
    except ImportError as e:  # pragma: no cover
        raise DataError(f"data: reading the image folder {path!r} needs torchvision") from e
    try:
        ds = datasets.ImageFolder(
            path, transform=transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
        )
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data: cannot read the image folder {path!r}: {e}") from None
    xs, ys = [], []
    for i in range(len(ds)):
        try:
            x, y = ds[i]
        except OSError as e:
            raise DataError(f"data: cannot read image {ds.samples[i][0]!r}: {e}") from None
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _pick(d, keys, path, what):
    for k in keys:
        if k in d:
            return d[k]
    raise DataError(f"data: {path!r} has no {what} (looked for keys {list(keys)}; found {sorted(map(str, d))})")


def _tensor_file(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                obj = {k: torch.from_numpy(z[k]) for k in z.files}
        except Exception as e:  # noqa: BLE001 - a file can be unreadable in many ways; all mean "unreadable"
            raise DataError(f"data: cannot read {path!r}: {type(e).__name__}: {str(e)[:300]}") from None
    else:
        # Tensors, containers and numbers only (plus TensorDataset, a plain holder of tensors).
        obj = torch_load_plain(path, f"data: {path!r}", DataError, allowed=[torch.utils.data.TensorDataset])
    if isinstance(obj, torch.utils.data.TensorDataset):
        obj = obj.tensors
    if isinstance(obj, dict):
        x = _pick(obj, ("images", "x", "data", "inputs"), path, "images")
        y = _pick(obj, ("labels", "y", "targets"), path, "labels")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise DataError(
            f"data: {path!r} holds a {type(obj).__name__}; expected a dict with images/labels, "
            "a tuple (images, labels) or a TensorDataset"
        )
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise DataError(f"data: images in {path!r} must be [N, C, H, W] or [N, H, W], got shape {list(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"data: labels in {path!r} must be [N] with N = {x.shape[0]}, got shape {list(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"data: labels in {path!r} must be integers, got {y.dtype}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x, y.long()


def load_dataset(
    data: str = "digits",
    image_size: Optional[int] = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_samples: Optional[int] = None,
) -> Dataset:
    """Load ``data`` and split it: a stratified held-out part of ``val_fraction`` per class,
    chosen by ``seed``. ``image_size`` resizes (bilinear); default 16 for digits (the 8x8
    images upsampled), 32 for image folders, the stored size for tensor files."""
    if not isinstance(data, str) or not data:
        raise DataError(f"data must be 'digits' or a path, got {data!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4):
        raise ValueError(f"image_size must be an integer >= 4, got {image_size!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 2):
        raise ValueError(f"max_samples must be an integer >= 2, got {max_samples!r}")
    return _load_cached(data, image_size, float(val_fraction), int(seed), max_samples)


@functools.lru_cache(maxsize=4)
def _load_cached(data, image_size, val_fraction, seed, max_samples) -> Dataset:
    if data == "digits":
        x, y = _digits()
        image_size = image_size or 16
    else:
        if not os.path.exists(data):
            raise DataError(f"data: {data!r} does not exist (give 'digits', an image folder or a .pt/.npz file)")
        if not os.access(data, os.R_OK):
            raise DataError(f"data: {data!r} is not readable (permission denied)")
        if os.path.isdir(data):
            x, y = _image_folder(data, image_size or 32)
        elif data.endswith((".pt", ".pth", ".npz")):
            x, y = _tensor_file(data)
        else:
            raise DataError(f"data: {data!r} is neither a directory nor a .pt/.pth/.npz file")
    if len(y) < 2:
        raise DataError(f"data: {data!r} has {len(y)} samples; at least 2 are needed")
    if int(y.min()) < 0:
        raise DataError(f"data: labels in {data!r} must be >= 0, got {int(y.min())}")
    g = np.random.default_rng(seed)
    if max_samples is not None and len(y) > max_samples:
        keep = np.sort(g.permutation(len(y))[:max_samples])
        x, y = x[keep], y[keep]
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    num_classes = int(y.max()) + 1
    # Stratified split: val_fraction of each class (at least one sample when the class has two).
    val_idx = []
    for c in range(num_classes):
        idx = np.flatnonzero(y.numpy() == c)
        g.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_idx.extend(idx[:n_val].tolist())
    val_mask = np.zeros(len(y), dtype=bool)
    val_mask[val_idx] = True
    if val_mask.all() or not val_mask.any():
        raise DataError(f"data: {data!r} is too small to hold out a validation split")
    tx, ty = x[~val_mask], y[~val_mask]
    vx, vy = x[val_mask], y[val_mask]
    mean = tx.mean(dim=(0, 2, 3), keepdim=True)
    std = tx.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    name = "digits" if data == "digits" else os.path.basename(os.path.normpath(data))
    return Dataset((tx - mean) / std, ty, (vx - mean) / std, vy, num_classes, name)
