"""Training detectors: data (COCO folders, the generated ``shapes`` set), transforms, COCO evaluation, the
training loop (``train(TrainConfig(...))``, ``effops train``)."""

from .data import (BOX_FORMATS, CocoDetection, build_loader, collate_detections, make_dataset, resolve_data,
                   set_loader_epoch)
from .evaluate import coco_metrics, evaluate, format_metrics
from .loop import TrainConfig, TrainError, train
from .shapes import CLASSES as SHAPES_CLASSES
from .shapes import ensure_shapes
from .transforms import DetectionTransform

__all__ = ["BOX_FORMATS", "CocoDetection", "build_loader", "collate_detections", "make_dataset", "resolve_data",
           "set_loader_epoch", "coco_metrics", "evaluate", "format_metrics", "SHAPES_CLASSES", "ensure_shapes",
           "DetectionTransform", "TrainConfig", "TrainError", "train"]
