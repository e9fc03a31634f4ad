"""``effops train --teacher MODEL --teacher-weights CKPT``: the detector a student distils from.

The teacher is the EfficientDet variant ``MODEL`` at the student's image size and number of
classes, so that its outputs (class logits and box regressions per level and anchor) line up
with the student's one for one (``compress.distill.detection_kd_parts``). ``CKPT`` is read with
``torch.load(weights_only=True)`` (tensors and plain containers only): an ``effops train``
checkpoint (its EMA weights when it has them; the reduced-model settings it was trained with
are taken from its config, so a tiny teacher from a quick run loads as it was built), or a
state_dict / effdet / timm checkpoint of the variant. The teacher runs in eval mode, frozen.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch.nn as nn


def load_detection_teacher(name: str, weights: str, *, num_classes: int, image_size: int,
                           device: Optional[object] = None) -> nn.Module:
    from ..nas._checks import torch_load_plain
    from ..models.weights import load_weights
    from .checkpoint import FORMAT
    from .loop import _MODEL_OVERRIDES, TrainConfig, build_model

    where = f"--teacher-weights {weights}"
    raw = torch_load_plain(weights, where, ValueError, allowed=[argparse.Namespace])  # as models.weights: timm's
    overrides = {}
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        cfg = raw.get("config") if isinstance(raw.get("config"), dict) else {}
        trained = raw.get("model_name", cfg.get("model"))
        if trained != name:
            raise ValueError(f"{where}: an effops train checkpoint of {trained!r}, not of --teacher {name!r}")
        if raw.get("image_size") not in (None, image_size):
            # the anchors and the head's output sizes follow the image size: the outputs would not line up
            raise ValueError(f"{where}: trained at image size {raw.get('image_size')}, the student trains at "
                             f"{image_size}; distil at the teacher's size or train a teacher at {image_size}")
        overrides = cfg.get("model_overrides") or {}
        if not isinstance(overrides, dict) or set(overrides) - set(_MODEL_OVERRIDES):
            raise ValueError(f"{where}: its config's model_overrides {overrides!r} are not "
                             f"{list(_MODEL_OVERRIDES)}")
    del raw
    teacher = build_model(TrainConfig(out="-", model=name, image_size=image_size, model_overrides=dict(overrides)),
                          num_classes)
    load_weights(teacher, weights)  # strict: a teacher of other classes or widths is refused by name
    teacher.eval().requires_grad_(False)
    return teacher.to(device) if device is not None else teacher


__all__ = ["load_detection_teacher"]
