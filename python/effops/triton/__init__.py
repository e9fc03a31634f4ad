"""Triton kernels, one module per op family. Imported lazily by effops.ops (Triton is optional)."""
