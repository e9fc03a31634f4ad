"""Model compression on the fused kernels: structured pruning (``prune``), int8 post-training
quantization (``quantize``) and knowledge distillation (``DistillationLoss``,
``DetectionDistillationLoss``)."""

from .distill import DetectionDistillationLoss, DistillationLoss, detection_kd_loss, kd_loss
from .quantize import QDWSeparableConv2d, QMBConv, quantize
from .prune import CRITERIA, GroupReport, PruneReport, count_macs, count_params, prune, shrink_to

__all__ = ["prune", "PruneReport", "GroupReport", "count_macs", "count_params", "shrink_to", "CRITERIA",
           "quantize", "QMBConv", "QDWSeparableConv2d",
           "DistillationLoss", "DetectionDistillationLoss", "kd_loss", "detection_kd_loss"]
