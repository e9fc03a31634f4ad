"""Loading local checkpoint files into effops models (nothing is downloaded).

Accepted: ``.pth`` / ``.pt`` / ``.bin`` (read with ``torch.load(weights_only=True)``: tensors and
plain containers only, never arbitrary pickled objects) and ``.safetensors`` (needs the
``safetensors`` package). The file may hold a bare state_dict or a training checkpoint wrapping
it in ``state_dict`` / ``model`` (timm, effdet and most trainers); EMA weights
(``state_dict_ema`` / ``model_ema`` / ``ema``) are preferred when present. ``module.`` (DataParallel /
DDP / timm's ModelEma) and ``_orig_mod.`` (torch.compile) prefixes are stripped.

Models can declare, for clearer errors and to load partial checkpoints:
``classifier_weight_key`` (e.g. ``"classifier.weight"``) and ``classifier_outputs_per_class``
(rows of that weight per class, e.g. 9 anchors) - a shape mismatch there is reported as a
num_classes mismatch; ``checkpoint_ignore_prefixes`` - checkpoint entries under these prefixes
that the model does not have are dropped (a classifier checkpoint loading into a backbone).
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPERS_EMA = ("state_dict_ema", "model_ema", "ema")  # "ema": effops train checkpoints
_WRAPPERS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def _path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"weights must be a path (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights: no such file {str(p)!r} (effops loads local files only; nothing is "
                                f"downloaded)")
    return p


def _load_file(p: Path):
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"weights: reading {p.name} needs the safetensors package (pip install safetensors)") from e
        return load_file(str(p), device="cpu")
    if suffix in _TORCH_SUFFIXES:
        try:  # timm's training checkpoints carry their argparse.Namespace: plain data, allowed
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"weights: {p.name} holds Python objects other than tensors and plain containers "
                             f"({first}); effops reads checkpoints with torch.load(weights_only=True) only - "
                             f"re-save it with torch.save(model.state_dict(), path)") from e
    raise ValueError(f"weights: {p.name} has an unsupported extension {p.suffix!r}; use .pth, .pt, .bin or "
                     f".safetensors")


def _unwrap(obj, name: str) -> Tuple[dict, str]:
    """The state_dict inside a checkpoint, and where it was found (e.g. 'state_dict_ema')."""
    where = []
    for _ in range(3):  # {'model': {'state_dict': ...}} and similar nestings
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for key in _WRAPPERS_EMA + _WRAPPERS:
            v = obj.get(key)
            if isinstance(v, dict) and v:
                obj = v
                where.append(key)
                break
        else:
            break
    if not isinstance(obj, dict):
        raise ValueError(f"weights: {name} holds a {type(obj).__name__}, not a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise ValueError(f"weights: {name} has no state_dict (a dict of tensors"
                         f"{', or one under ' + ', '.join(map(repr, _WRAPPERS_EMA + _WRAPPERS))}); "
                         f"found {'nothing' if not obj else 'non-tensor entries ' + ', '.join(map(repr, bad[:8]))}")
    return obj, ".".join(where)


def _strip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def read_checkpoint(path) -> Dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file (EMA weights when present), prefixes stripped."""
    p = _path(path)
    sd, _ = _unwrap(_load_file(p), p.name)
    return _strip(sd)


def _listing(keys: List[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_weights(model: nn.Module, path, *, strict: bool = True):
    """Load the checkpoint at ``path`` into ``model`` (see the module docstring for the formats).

    With ``strict`` (default) every parameter and buffer must be present with the model's shape
    and nothing else may be in the file; otherwise a ValueError names the missing, unexpected and
    mismatched entries (a classifier of another size is reported as a num_classes mismatch).
    ``strict=False`` loads what matches and returns torch's (missing_keys, unexpected_keys).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_weights: model must be an nn.Module, got {type(model).__name__}")
    p = _path(path)
    sd = read_checkpoint(p)
    target = model.state_dict()
    ignore = tuple(getattr(model, "checkpoint_ignore_prefixes", ()))
    if ignore:
        sd = {k: v for k, v in sd.items() if k in target or not k.startswith(ignore)}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]

    ckey = getattr(model, "classifier_weight_key", None)
    per = int(getattr(model, "classifier_outputs_per_class", 1))
    classes_differ = ckey in mismatched and sd[ckey].shape[0] != target[ckey].shape[0]
    if ckey is not None and (classes_differ or ckey in unexpected or ckey in missing):
        theirs = f"{sd[ckey].shape[0] // per} classes ({ckey} {list(sd[ckey].shape)})" if ckey in sd else "no classifier"
        ours = (f"{target[ckey].shape[0] // per} classes ({ckey} {list(target[ckey].shape)})" if ckey in target
                else "no classifier (num_classes=0)")
        hint = f"pass num_classes={sd[ckey].shape[0] // per}" if ckey in sd else "pass num_classes=0"
        if strict or classes_differ:
            raise ValueError(f"load_weights: {p.name} has a classifier for {theirs}, the model has {ours}: {hint}, "
                             f"or load with strict=False after reset_classifier")
    if mismatched:
        raise ValueError("load_weights: shapes differ between " + p.name + " and the model: " + _listing(
            [f"{k} {list(sd[k].shape)} vs {list(target[k].shape)}" for k in mismatched]))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the file: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected in the file: {_listing(unexpected)}")
        raise ValueError(f"load_weights: {p.name} does not match {type(model).__name__} "
                         f"({getattr(model, 'model_name', '')}): " + "; ".join(parts))
    return model.load_state_dict(sd, strict=strict)


__all__ = ["load_weights", "read_checkpoint"]
