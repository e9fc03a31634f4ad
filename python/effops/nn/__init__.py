"""Thin modules on the fused kernels, and ``convert(model)`` for models users already have."""

from .bifpn import BiFPN, BiFPNLayer, FusedFnode, bifpn_nodes
from .convert import ConvertReport, FusedSeparableConv2d, FusedTimmBlock, FusedTorchvisionBlock, convert
from .dwsep import DWSeparableConv2d, MBConv, SqueezeExcite

__all__ = [
    "DWSeparableConv2d", "MBConv", "SqueezeExcite", "convert", "ConvertReport", "BiFPN", "BiFPNLayer",
    "FusedFnode", "bifpn_nodes",
    "FusedTimmBlock", "FusedTorchvisionBlock", "FusedSeparableConv2d",
]
