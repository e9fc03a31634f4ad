"""Public functional ops. Each family lives in its own module: effops/ops/<family>.py."""

from ._common import EffopsInputError, EffopsTypeError
from .bifpn import weighted_fuse
from .dwsep import dw_conv_act, dwsep_conv, pw_conv
from .losses import box_loss, match_anchors, sigmoid_focal_loss, split_levels
from .nms import MultiClassNMSResult, batched_nms, matrix_nms, multiclass_nms, nms, soft_nms
from .norm import batch_norm_act

__all__ = [
    "nms", "batched_nms", "multiclass_nms", "soft_nms", "matrix_nms", "MultiClassNMSResult",
    "dwsep_conv", "dw_conv_act", "pw_conv", "weighted_fuse", "EffopsInputError", "EffopsTypeError",
    "sigmoid_focal_loss", "box_loss", "match_anchors", "split_levels", "batch_norm_act",
    "q_dw_conv_act", "q_pw_conv", "q_dwsep_conv", "q_weighted_fuse",
]

# The int8 family (qconv) loads on first use: ``import effops`` does not register its ops.
_LAZY = {"q_dw_conv_act": "qconv", "q_pw_conv": "qconv", "q_dwsep_conv": "qconv", "q_weighted_fuse": "qconv_fuse"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
