"""Every Triton kernel compiles for real GPU targets, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels in numpy and accepts programs the compiler
rejects, so CI also compiles each kernel to PTX for Ampere and Hopper. For the NMS kernels it
checks what exactness relies on: IEEE division and no fused multiply-add in the IoU.
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from effops.triton import nms as tnms  # noqa: E402

# (kernel, signature, constexprs, options) for each compiled configuration.
NMS_KERNELS = [
    (tnms._nms_mask_kernel,
     {"boxes_ptr": "*{f}", "seg_end_ptr": "*i32", "counts_ptr": "*i32", "thr_ptr": "*{f}", "mask_ptr": "*i64",
      "K": "i32", "W": "i32"}, {}),
    (tnms._nms_reduce_kernel,
     {"mask_ptr": "*i64", "seg_end_ptr": "*i32", "counts_ptr": "*i32", "removed_ptr": "*i64", "keep_ptr": "*i8",
      "K": "i32", "W": "i32", "BLOCK_W": "constexpr"}, {"BLOCK_W": 32}),
    (tnms._matrix_kernel,
     {"boxes_ptr": "*{f}", "seg_start_ptr": "*i32", "cmax_ptr": "*fp64", "out_ptr": "*fp64", "n": "i32",
      "sigma_ptr": "*fp64", "KERNEL": "constexpr", "PASS": "constexpr", "BLOCK": "constexpr"},
     {"KERNEL": 1, "PASS": 1, "BLOCK": 32}),
    (tnms._soft_nms_kernel,
     {"boxes_ptr": "*{f}", "work_ptr": "*{f}", "keep_ptr": "*i64", "out_ptr": "*{f}", "count_ptr": "*i64",
      "n": "i32", "par_ptr": "*fp64", "METHOD": "constexpr", "BLOCK": "constexpr"},
     {"METHOD": 1, "BLOCK": 1024}),
]


def compile_ptx(fn, signature, constexprs, dtype, arch):
    sig = {k: v.format(f=dtype) for k, v in signature.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False}).asm["ptx"]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("kernel", NMS_KERNELS, ids=lambda k: k[0].fn.__name__ if hasattr(k[0], "fn") else str(k))
def test_nms_kernels_compile(kernel, dtype, arch):
    fn, sig, consts = kernel
    ptx = compile_ptx(fn, sig, consts, dtype, arch)
    assert ".entry" in ptx
    if fn is tnms._nms_mask_kernel and dtype == "fp32":
        # exactness: IEEE-rounded division, no approximate division, no fma contraction
        assert re.search(r"div\.rn\.f32", ptx)
        assert not re.search(r"div\.(full|approx)\.f32", ptx)
        assert not re.search(r"fma\.rn\.f32", ptx)
