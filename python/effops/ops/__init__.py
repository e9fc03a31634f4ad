"""Public functional ops. Each family lives in its own module: effops/ops/<family>.py."""

from ._common import EffopsInputError, EffopsTypeError
from .bifpn import weighted_fuse
from .dwsep import dw_conv_act, dwsep_conv, pw_conv
from .losses import box_loss, match_anchors, sigmoid_focal_loss, split_levels
from .nms import MultiClassNMSResult, batched_nms, matrix_nms, multiclass_nms, nms, soft_nms

__all__ = [
    "nms", "batched_nms", "multiclass_nms", "soft_nms", "matrix_nms", "MultiClassNMSResult",
    "dwsep_conv", "dw_conv_act", "pw_conv", "weighted_fuse", "EffopsInputError", "EffopsTypeError",
    "sigmoid_focal_loss", "box_loss", "match_anchors", "split_levels",
]
