"""Benchmark cases of the int8 convolutions (qconv) on EfficientNet-B0's MBConv shapes: effops
int8 against effops float32 (the same op) and against PyTorch's own x86 int8 kernels (torch.ao
quantized conv, oneDNN/fbgemm) on the same shapes; and whole networks: effops's quantized
efficientnet_b0 against effops float32, torch.ao's FX static int8 of timm's efficientnet_b0 (x86
backend) and ONNX Runtime's static int8 of the same timm model (QDQ, when onnxruntime is there).

The int8 cases time the kernels on uint8 codes (a chained block's input and output), the float
cases on float32 channels_last tensors. Agreement is checked per case against the integer
reference (effops int8) and between float outputs (the float cases)."""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import List

import torch
import torch.nn as nn

from ..ops import dwsep as D
from ..ops import qconv as Q
from .harness import EFFOPS, Case, inference

CL = torch.channels_last
# EfficientNet-B0's inverted residuals (one per stage): in, expanded, out, kernel, stride, input size
B0_BLOCKS = [
    (16, 96, 24, 3, 2, 112), (24, 144, 24, 3, 1, 56), (24, 144, 40, 5, 2, 56), (40, 240, 80, 3, 2, 28),
    (80, 480, 80, 3, 1, 14), (112, 672, 192, 5, 2, 14), (192, 1152, 192, 5, 1, 7),
]


def _codes(g, *shape):
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).contiguous(memory_format=CL)


def _ao_conv(w: torch.Tensor, groups: int, padding: int, stride: int):
    """A torch.ao quantized Conv2d (x86 engine) with per-channel int8 weights ``w``."""
    import torch.ao.nn.quantized as nnq

    co, ci, k = w.shape[0], w.shape[1] * groups, w.shape[2]
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated (still the x86 int8 path)
        warnings.simplefilter("ignore")
        conv = nnq.Conv2d(ci, co, k, stride=stride, padding=padding, groups=groups)
    scales = torch.full((co,), 0.01, dtype=torch.float64)
    qw = torch._make_per_channel_quantized_tensor(w.to(torch.int8), scales, torch.zeros(co, dtype=torch.int64), 0)
    conv.set_weight_bias(qw, None)
    conv.scale, conv.zero_point = 0.05, 128
    return conv


def _ao_input(codes: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._make_per_tensor_quantized_tensor(codes, 0.05, 128)


def op_cases(quick: bool) -> List[Case]:
    out: List[Case] = []
    g = torch.Generator().manual_seed(0)
    torch.backends.quantized.engine = "x86"
    for block in (B0_BLOCKS[3:5] if quick else B0_BLOCKS):
        out += _block_cases(g, *block)
    return out + _boundary_cases(g, 64 if quick else 224)


def _boundary_cases(g, size: int) -> List[Case]:
    """The ops around the blocks of a quantized EfficientNet-B0 (batch 1): the int8 stem
    (q_conv2d, 3x3 stride 2, 3 -> 32 with the swish table), quantising the float input
    (quantize_tensor), and a block's SE gates from its channel sums (q_se_gates, 1152 channels)."""
    import torch.nn.functional as F

    from ..compress._qmodules import quantize_tensor

    out: List[Case] = []
    x8 = _codes(g, 1, 3, size, size)
    ws = torch.randint(-127, 128, (32, 3, 3, 3), generator=g, dtype=torch.int8)
    bs = torch.randint(-999, 999, (32,), generator=g, dtype=torch.int32)
    ms = torch.full((32,), 0.003)
    lut = Q.activation_lut("silu", 0.05, 128, 0.04, 10)
    geo = D.conv_geometry("bench", (size, size), (3, 3), 2, "same", 1)
    stride, pad = list(geo.stride), list(geo.pad)
    wp = Q.patch_weight(ws)
    packed = Q.pack_pw(wp, bs, 128)
    xf = (x8.float() / 64 - 2).contiguous(memory_format=CL)
    wf = (ws.float() / 100).contiguous(memory_format=CL)
    ao = _ao_conv(ws, 1, 1, 2)
    ax = _ao_input(x8)
    impls = {
        EFFOPS: lambda: Q.conv2d_patched(x8, wp, (3, 3), bs, ms, lut, stride, pad, 128, 100, 0, 255, packed),
        "effops fp32 (conv + swish)": lambda: F.silu(F.conv2d(F.pad(xf, (pad[2], pad[3], pad[0], pad[1])), wf,
                                                              None, 2), inplace=True),
        "torch.ao x86 int8": lambda: ao(ax),
    }
    out.append(Case("q_conv2d", f"stem b0 3>32 k3s2 {size}x{size}", "int8", inference(impls),
                    check=_check_codes(lambda: Q.q_conv2d_reference(x8, ws, bs, ms, lut, stride, pad, 128, 100,
                                                                     0, 255))))
    impls = {
        EFFOPS: lambda: quantize_tensor(xf, 0.03, 120),
        "torch ops": lambda: torch.div(xf, 0.03).round_().add_(120).clamp_(0, 255).to(torch.uint8),
    }
    out.append(Case("quantize_tensor", f"image b0 1x3x{size}x{size}", "fp32->uint8", inference(impls),
                    check=lambda o: None if torch.equal(o[EFFOPS], o["torch ops"]) else "codes differ"))
    C, R = 1152, 48
    sums = torch.randint(0, 255 * 49, (1, C), generator=g, dtype=torch.int32)
    w1, b1 = torch.randn(R, C, generator=g) * 0.05, torch.randn(R, generator=g)
    w2, b2 = torch.randn(C, R, generator=g) * 0.2, torch.randn(C, generator=g)
    args = (sums, 49, 17, 0.02, w1, b1, Q.ACTIVATIONS.index("silu"), w2, b2, Q.SE_GATES["sigmoid"])
    impls = {
        EFFOPS: lambda: Q._se_impl("cpu", *args),
        "torch ops": lambda: Q.q_se_gates_reference(*args),
    }
    out.append(Case("q_se_gates", f"SE b0 {C}>{R} 7x7", "fp32", inference(impls),
                    check=lambda o: None if torch.allclose(o[EFFOPS], o["torch ops"], rtol=1e-5, atol=1e-6)
                    else "gates differ"))
    return out


def _block_cases(g, cin, mid, cout, k, s, hw) -> List[Case]:
    """The three int8 ops of one MBConv shape (a function per shape: the timed closures bind its
    tensors, not the loop's last ones)."""
    out: List[Case] = []
    x8 = _codes(g, 1, cin, hw, hw)
    h8 = _codes(g, 1, mid, hw, hw)
    we = torch.randint(-127, 128, (mid, cin, 1, 1), generator=g, dtype=torch.int8)
    wd = torch.randint(-127, 128, (mid, 1, k, k), generator=g, dtype=torch.int8)
    wp = torch.randint(-127, 128, (cout, mid, 1, 1), generator=g, dtype=torch.int8)
    be, bd, bp = (torch.randint(-999, 999, (c,), generator=g, dtype=torch.int32) for c in (mid, mid, cout))
    me, md, mp = (torch.full((c,), 0.003) for c in (mid, mid, cout))
    lut = Q.activation_lut("silu", 0.05, 128, 0.04, 10)
    geo = D.conv_geometry("bench", (hw, hw), (k, k), s, "same", 1)
    stride, pad = list(geo.stride), list(geo.pad)
    xf, hf = x8.float() / 64 - 2, h8.float() / 64 - 2
    wef, wdf, wpf = we.float() / 100, wd.float() / 100, wp.float() / 100
    ones_mid = torch.ones(mid)
    pe, pp = Q.pack_pw(we, be, 128), Q.pack_pw(wp, bp, 120)  # as the quantized modules hold them
    ao_pw = _ao_conv(we, 1, 0, 1)
    ao_dw = _ao_conv(wd, mid, k // 2, s)
    ao_pj = _ao_conv(wp, 1, 0, 1)
    ax, ah = _ao_input(x8), _ao_input(h8)
    tag = f"b0 {cin}>{mid}>{cout} k{k}s{s} {hw}x{hw}"

    impls = {
        EFFOPS: lambda: torch.ops.effops.q_pw_conv(x8, we, be, me, lut, None, None, 128, 100, 0, 255, 0, 1.0, pe),
        "effops fp32": lambda: D.pw_conv(xf, wef, scale=ones_mid, bias=ones_mid, act="silu"),
        "torch.ao x86 int8": lambda: ao_pw(ax),
    }
    out.append(Case("q_pw_conv", f"expand {tag}", "int8", inference(impls),
                    check=_check_codes(lambda: Q.q_pw_conv_reference(x8, we, be, me, lut, None, None, 128, 100,
                                                                     0, 255))))
    impls = {
        EFFOPS: lambda: torch.ops.effops.q_dw_conv_act(h8, wd, bd, md, lut, stride, pad, 128, 100, 0, 255),
        "effops fp32": lambda: D.dw_conv_act(hf, wdf, stride=s, padding="same", scale=ones_mid, bias=ones_mid,
                                             act="silu"),
        "torch.ao x86 int8": lambda: ao_dw(ah),
    }
    out.append(Case("q_dw_conv_act", f"depthwise {tag}", "int8", inference(impls),
                    check=_check_codes(lambda: Q.q_dw_conv_act_reference(h8, wd, bd, md, lut, stride, pad, 128,
                                                                         100, 0, 255)[0], index=0)))
    impls = {
        EFFOPS: lambda: torch.ops.effops.q_dwsep_conv(h8, wd, bd, md, lut, wp, bp, mp, None, None, stride, pad,
                                                      128, 100, 0, 255, 90, 120, 0, 255, 0, 1.0, pp),
        "effops fp32": lambda: D.dwsep_conv(hf, wdf, wpf, stride=s, padding="same", act="silu"),
        "torch.ao x86 int8": lambda: ao_pj(ao_dw(ah)),
    }
    out.append(Case("q_dwsep_conv", f"dw+project {tag}", "int8", inference(impls),
                    check=_check_codes(lambda: Q.q_dwsep_conv_reference(
                        h8, wd, bd, md, lut, wp, bp, mp, None, None, stride, pad, 128, 100, 0, 255, 90, 120, 0, 255))))
    return out


def _check_codes(reference, index=None):
    def check(outs):
        got = outs[EFFOPS] if index is None else outs[EFFOPS][index]
        ref = reference()
        return None if torch.equal(got, ref) else "effops int8 differs from the integer reference"
    return check


# ------------------------------------------------------------------------------ whole networks
def _calibration(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _ao_fx(model: nn.Module, calib: torch.Tensor, example: torch.Tensor):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            for i in range(0, calib.shape[0], 8):
                p(calib[i:i + 8])
        return convert_fx(p)


def _onnx_int8(model: nn.Module, calib: torch.Tensor, example: torch.Tensor, folder: str, dynamic_hw: bool = False):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, int8 = (os.path.join(folder, n) for n in ("m.onnx", "m_pre.onnx", "m_int8.onnx"))
    torch.onnx.export(model, (example,), fp32, input_names=["x"], output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"} if dynamic_hw else {0: "n"}}, dynamo=False)
    quant_pre_process(fp32, pre)  # ORT's recommended optimisation pass (BN folding, constants as initializers)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": calib[i:i + 8].numpy()} for i in range(0, calib.shape[0], 8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(pre, int8, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(int8, opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def model_cases(quick: bool) -> List[Case]:
    size = 128 if quick else 224
    calib = _calibration(16 if quick else 32, size)
    return [_model_case(batch, size, calib) for batch in ((1,) if quick else (1, 8))]


def _model_case(batch: int, size: int, calib: torch.Tensor) -> Case:
    import timm

    from ..compress.quantize import quantize
    from ..models import create_model

    x = _calibration(batch, size)[:batch].contiguous(memory_format=CL)
    torch.manual_seed(0)
    fp32 = create_model("efficientnet_b0").eval()
    q = quantize(fp32, calib, batch_size=8)
    tm = timm.create_model("efficientnet_b0", pretrained=False).eval()
    tm.load_state_dict(fp32.state_dict(), strict=False)
    impls = {EFFOPS: lambda: q(x), "effops fp32": lambda: fp32(x)}
    try:
        ao = _ao_fx(tm, calib, x)
        impls["torch.ao x86 int8 (timm)"] = lambda: ao(x)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        print(f"bench qconv: torch.ao FX int8 unavailable: {type(e).__name__}: {e}")
    try:
        ort_fn = _onnx_int8(tm, calib, x, tempfile.mkdtemp(prefix="effops-bench-onnx-"))
        impls["onnxruntime int8 (timm)"] = lambda: ort_fn(x)
    except Exception as e:  # noqa: BLE001
        print(f"bench qconv: onnxruntime static int8 unavailable: {type(e).__name__}: {e}")
    return Case("qconv model", f"efficientnet_b0 int8 b{batch} {size}px", "int8", inference(impls))


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    if device.type != "cpu":
        return []
    # --quick (the smoke test of every family): two MBConv shapes, no whole networks (those export
    # and calibrate three int8 models: a minute here)
    return op_cases(quick) + ([] if quick else model_cases(quick))
