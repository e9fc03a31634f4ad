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


# --------------------------------------------------------------------------- depthwise-separable
from effops.triton import dwsep as tdw  # noqa: E402

_GEO = {"SH": 2, "SW": 2, "DH": 1, "DW": 1, "KH": 3, "KW": 3}
DWSEP_KERNELS = [
    (tdw._dwsep_kernel,
     {"x_ptr": "*{f}", "taps_ptr": "*fp32", "pw_ptr": "*fp32", "dws_ptr": "*fp32", "dwb_ptr": "*fp32",
      "pws_ptr": "*fp32", "pwb_ptr": "*fp32", "res_ptr": "*{f}", "out_ptr": "*{f}", "NP": "i32", "H": "i32",
      "W": "i32", "C": "i32", "Ho": "i32", "Wo": "i32", "Co": "i32", "PT": "i32", "PL": "i32",
      **{k: "constexpr" for k in ("SH", "SW", "DH", "DW", "KH", "KW", "ACT", "PW_ACT", "PREACT", "HAS_DWS",
                                  "HAS_DWB", "HAS_PWS", "HAS_PWB", "HAS_RES", "F32_DOT", "BLOCK_P", "BLOCK_C",
                                  "BLOCK_CO")}},
     dict(_GEO, ACT=3, PW_ACT=0, PREACT=True, HAS_DWS=False, HAS_DWB=False, HAS_PWS=True, HAS_PWB=True,
          HAS_RES=True, BLOCK_P=64, BLOCK_C=32, BLOCK_CO=64)),
    (tdw._dw_kernel,
     {"x_ptr": "*{f}", "taps_ptr": "*fp32", "s_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*{f}", "part_ptr": "*fp32",
      "H": "i32", "W": "i32", "C": "i32", "Ho": "i32", "Wo": "i32", "PT": "i32", "PL": "i32",
      **{k: "constexpr" for k in ("SH", "SW", "DH", "DW", "KH", "KW", "ACT", "HAS_S", "HAS_B", "BLOCK_P", "BLOCK_C")}},
     dict(_GEO, ACT=4, HAS_S=True, HAS_B=True, BLOCK_P=64, BLOCK_C=32)),
    (tdw._pw_kernel,
     {"a_ptr": "*{f}", "w_ptr": "*fp32", "cs_ptr": "*{f}", "s_ptr": "*fp32", "b_ptr": "*fp32", "res_ptr": "*{f}",
      "out_ptr": "*{f}", "M": "i32", "HW": "i32", "C": "i32", "Co": "i32",
      **{k: "constexpr" for k in ("ACT", "HAS_CS", "HAS_S", "HAS_B", "HAS_RES", "F32_DOT", "BLOCK_M", "BLOCK_K",
                                  "BLOCK_N")}},
     dict(ACT=3, HAS_CS=True, HAS_S=True, HAS_B=True, HAS_RES=True, BLOCK_M=64, BLOCK_K=32, BLOCK_N=64)),
    (tdw._dw_bwd_input_kernel,
     {"gd_ptr": "*fp32", "taps_ptr": "*fp32", "ga_ptr": "*fp32", "H": "i32", "W": "i32", "C": "i32", "Ho": "i32",
      "Wo": "i32", "PT": "i32", "PL": "i32",
      **{k: "constexpr" for k in ("SH", "SW", "DH", "DW", "KH", "KW", "BLOCK_P", "BLOCK_C")}},
     dict(_GEO, BLOCK_P=64, BLOCK_C=32)),
    (tdw._dw_bwd_weight_kernel,
     {"a_ptr": "*fp32", "gd_ptr": "*fp32", "part_ptr": "*fp32", "NP": "i32", "H": "i32", "W": "i32", "C": "i32",
      "Ho": "i32", "Wo": "i32", "PT": "i32", "PL": "i32",
      **{k: "constexpr" for k in ("SH", "SW", "DH", "DW", "KH", "KW", "BLOCK_P", "BLOCK_C")}},
     dict(_GEO, BLOCK_P=64, BLOCK_C=32)),
]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kernel", DWSEP_KERNELS, ids=lambda k: k[0].fn.__name__)
def test_dwsep_kernels_compile(kernel, dtype, arch):
    fn, sig, consts = kernel
    consts = dict(consts)
    if "F32_DOT" in sig:
        consts["F32_DOT"] = dtype == "fp32"
    ptx = compile_ptx(fn, sig, consts, dtype, arch)
    assert ".entry" in ptx
    if fn is tdw._dwsep_kernel and dtype == "bf16" and arch == 90:
        assert re.search(r"mma|wgmma", ptx), "bf16 dot should use tensor cores"


# --------------------------------------------------------------------------- BiFPN fusion
from effops.triton import bifpn as tbf  # noqa: E402

_INPUTS = {f"{p}{i}": t for i in range(4) for p, t in (("x", "*{f}"), ("H", "i32"), ("W", "i32"), ("s", "fp32"))}


def _input_sig():
    sig = {}
    for i in range(4):
        sig.update({f"x{i}": "*{f}", f"H{i}": "i32", f"W{i}": "i32", f"s{i}h": "fp32", f"s{i}w": "fp32",
                    f"p{i}t": "i32", f"p{i}l": "i32"})
    return sig


_MODES = dict(K=3, M0=0, M1=1, M2=2, M3=0, ACT=3, BLOCK_P=64, BLOCK_C=64)
BIFPN_KERNELS = [
    (tbf._fuse_kernel, {"out_ptr": "*{f}", "w_ptr": "*fp32", "NP": "i32", "C": "i32", "Ho": "i32", "Wo": "i32",
                        **_input_sig(), **{k: "constexpr" for k in _MODES}}, _MODES),
    (tbf._fuse_bwd1_kernel, {"g_ptr": "*fp32", "gpre_ptr": "*fp32", "part_ptr": "*fp32", "w_ptr": "*fp32",
                             "NP": "i32", "C": "i32", "Ho": "i32", "Wo": "i32", **_input_sig(),
                             **{k: "constexpr" for k in _MODES}}, _MODES),
    (tbf._gather_kernel, {"gpre_ptr": "*fp32", "x_ptr": "*{f}", "gx_ptr": "*fp32", "w_ptr": "*fp32", "IDX": "i32",
                          "NPI": "i32", "C": "i32", "H": "i32", "W": "i32", "Ho": "i32", "Wo": "i32", "sh": "fp32",
                          "sw": "fp32", "pt": "i32", "pl": "i32", "RH": "i32", "RW": "i32", "MODE": "constexpr",
                          "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}, dict(MODE=2, BLOCK_P=64, BLOCK_C=64)),
]


@pytest.mark.parametrize("arch", [90])  # these are large (3 inputs x 9 pool taps): one target keeps CI quick
@pytest.mark.parametrize("dtype", ["bf16"])
@pytest.mark.parametrize("kernel", BIFPN_KERNELS, ids=lambda k: k[0].fn.__name__)
def test_bifpn_kernels_compile(kernel, dtype, arch):
    fn, sig, consts = kernel
    assert ".entry" in compile_ptx(fn, sig, consts, dtype, arch)


# --------------------------------------------------------------------------- training BatchNorm + act
from effops.triton import norm as tnorm  # noqa: E402

_BN = {"BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}
NORM_KERNELS = [
    (tnorm._stats_kernel, {"x_ptr": "*{f}", "shift_ptr": "*fp32", "part_ptr": "*fp32", "HW": "i32", "C": "i32", **_BN},
     dict(BLOCK_P=64, BLOCK_C=64)),
    (tnorm._apply_kernel, {"x_ptr": "*{f}", "a_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*{f}", "part_ptr": "*fp32",
                           "HW": "i32", "C": "i32", "ACT": "constexpr", "POOL": "constexpr", **_BN},
     dict(ACT=3, POOL=True, BLOCK_P=64, BLOCK_C=64)),
    (tnorm._bstats_kernel, {"gy_ptr": "*{f}", "x_ptr": "*{f}", "a_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32",
                            "gp_ptr": "*fp32", "part_ptr": "*fp32", "HW": "i32", "C": "i32", "ACT": "constexpr",
                            "HAS_GP": "constexpr", **_BN}, dict(ACT=2, HAS_GP=True, BLOCK_P=64, BLOCK_C=64)),
    (tnorm._bapply_kernel, {"gy_ptr": "*{f}", "x_ptr": "*{f}", "a_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32",
                            "gp_ptr": "*fp32", "p_ptr": "*fp32", "q_ptr": "*fp32", "gx_ptr": "*{f}", "HW": "i32",
                            "C": "i32", "ACT": "constexpr", "HAS_GP": "constexpr", **_BN},
     dict(ACT=3, HAS_GP=False, BLOCK_P=64, BLOCK_C=64)),
]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", NORM_KERNELS, ids=lambda k: k[0].fn.__name__)
def test_norm_kernels_compile(kernel, dtype, arch):
    fn, sig, consts = kernel
    assert ".entry" in compile_ptx(fn, sig, consts, dtype, arch)
