"""Model compression on the fused kernels: structured pruning (``prune``) and knowledge
distillation (``DistillationLoss``, ``DetectionDistillationLoss``)."""

from .distill import DetectionDistillationLoss, DistillationLoss, detection_kd_loss, kd_loss
from .prune import CRITERIA, GroupReport, PruneReport, count_macs, count_params, prune, shrink_to

__all__ = ["prune", "PruneReport", "GroupReport", "count_macs", "count_params", "shrink_to", "CRITERIA",
           "DistillationLoss", "DetectionDistillationLoss", "kd_loss", "detection_kd_loss"]
