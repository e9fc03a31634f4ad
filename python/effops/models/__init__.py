"""effops's own models on the fused kernels: ``create_model(name, ...)`` and ``list_models()``.

Names are timm's / effdet's (``efficientnet_b0`` ... ``tf_efficientnet_b7``, ...), parameter names
too, so their state_dicts load strictly; ``weights=PATH`` loads a local checkpoint file.
Each model file registers its names with ``register_model`` when imported below.
"""

from __future__ import annotations

from ._registry import create_model, list_models, register_model
from . import efficientnet  # noqa: E402  (registers efficientnet_b*, tf_efficientnet_b*)
from .efficientnet import EfficientNet, EfficientNetFeatures, efficientnet_features  # noqa: E402
from .weights import load_weights, read_checkpoint  # noqa: E402
from . import efficientdet  # noqa: E402  (registers efficientdet_d0/d1, tf_efficientdet_d0 ... d7)
from .efficientdet import EfficientDet, EfficientDetConfig  # noqa: E402
from .detection import Detections  # noqa: E402
from .loss import DetectionLoss  # noqa: E402

__all__ = ["create_model", "list_models", "register_model", "load_weights", "read_checkpoint", "EfficientNet",
           "EfficientNetFeatures", "efficientnet_features", "EfficientDet", "EfficientDetConfig", "Detections",
           "DetectionLoss"]
