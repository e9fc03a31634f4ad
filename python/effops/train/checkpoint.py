"""Training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain containers only (numbers, strings, lists, tuples,
dicts): the model and EMA state_dicts, the optimizer's, the LR schedule's and the GradScaler's
states, every process's RNG states (torch, CUDA, numpy, ``random``, converted to tensors and
ints), and where the run is (epoch, batch position within it, global step). It is replaced with
``atomic_write`` (temp file, fsync, rename, fsync of the folder), so a kill at any moment leaves
the previous checkpoint or the new one. The model weights sit under ``model`` and the EMA weights
under ``model_ema``, so ``effops.models.load_weights`` / ``effops detect --weights`` read the
checkpoint as it is (EMA weights preferred).

Nothing read is trusted: a file that is not a torch file, holds other objects, lacks fields or
has fields of the wrong type raises ``CheckpointError`` naming the file and the field.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional

import torch

from ..nas._checks import atomic_write, torch_load_plain

FORMAT = "effops-train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not an effops training checkpoint, or does not fit."""


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


_REQUIRED = {"epoch": int, "position": int, "step": int, "config": dict, "model": dict, "optimizer": dict,
             "scheduler": dict, "rng": list, "world_size": int}


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path``, checked for its format and the types of its fields."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    obj = torch_load_plain(path, f"checkpoint {path!r}", CheckpointError)
    where = f"checkpoint {path!r}"
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an effops training checkpoint (no format tag {FORMAT!r}); "
                              f"to start from a model's weights use --weights instead of --resume")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{where}: format version {obj.get('version')!r}, this effops reads {VERSION}")
    for key, typ in _REQUIRED.items():
        v = obj.get(key)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise CheckpointError(f"{where}: field {key!r} must be a {typ.__name__}, got "
                                  f"{'nothing' if v is None else type(v).__name__}")
        if typ is int and v < 0:
            raise CheckpointError(f"{where}: field {key!r} must be >= 0, got {v}")
    for key in ("model", "model_ema"):
        sd = obj.get(key)
        if sd is None and key == "model_ema":
            continue
        if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                         for k, v in sd.items()):
            raise CheckpointError(f"{where}: field {key!r} must be a non-empty state_dict (names -> tensors)")
    return obj


def load_model_state(model: torch.nn.Module, sd: Dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(sd)`` with a CheckpointError naming what differs."""
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k} {list(sd[k].shape)} vs {list(target[k].shape)}" for k in sd
              if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shapes differ (file vs model)", shapes)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}")
        raise CheckpointError(f"{where}: does not fit the model ({'; '.join(parts)}); was it written for another "
                              f"model, image size or number of classes?")
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """This process's generator states as tensors and plain numbers."""
    import numpy as np

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    st: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(list(mt), dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: Any, where: str) -> None:
    """Restore what ``rng_state`` returned (checked: a malformed entry raises CheckpointError)."""
    import numpy as np

    try:
        t = st["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError("torch state must be a uint8 tensor")
        py = st["python"]
        mt = py["state"]
        if not isinstance(mt, torch.Tensor) or mt.dtype != torch.int64 or mt.dim() != 1:
            raise TypeError("python state must be an int64 vector")
        gauss = py["gauss"]
        npy = st["numpy"]
        keys = npy["keys"]
        if not isinstance(keys, torch.Tensor) or keys.dim() != 1:
            raise TypeError("numpy keys must be a vector")
        torch.set_rng_state(t)
        random.setstate((int(py["version"]), tuple(int(v) for v in mt.tolist()),
                         None if gauss is None else float(gauss)))
        np.random.set_state((str(npy["name"]), keys.numpy().astype(np.uint32), int(npy["pos"]),
                             int(npy["has_gauss"]), float(npy["cached"])))
        cuda = st.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(cuda))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{where}: malformed RNG state ({type(e).__name__}: {str(e)[:200]})") from None


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every process's RNG state (rank order); a one-element list when not distributed."""
    from .distributed import world

    mine = rng_state()
    _, n = world()
    if n == 1:
        return [mine]
    import torch.distributed as dist

    out: List[Optional[Dict[str, Any]]] = [None] * n
    dist.all_gather_object(out, mine)  # between our own processes only: nothing read from a file
    return out  # type: ignore[return-value]


__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_state", "rng_state", "set_rng_state",
           "gather_rng_states", "FORMAT", "VERSION"]
