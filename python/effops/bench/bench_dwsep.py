"""Benchmark cases of the depthwise-separable family: the fused op against the same block in
eager PyTorch (channels_last and NCHW) and under torch.compile, on EfficientDet-D0's BiFPN/head
shapes and MobileNetV2's block shapes; the MBConv split (dw_conv_act, pw_conv) on EfficientNet-B0's
squeeze-excite block shapes; and whole timm models before and after convert()."""

from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn as nn

from ..nn import DWSeparableConv2d, convert
from .harness import EFFOPS, Case, inference

CL = torch.channels_last


def _randomize_bn(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.copy_(torch.rand(b.num_features, generator=g) - 0.5)
            b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
    return m


class EagerSepConv(nn.Module):
    """What effdet's BiFPN node conv is in eager PyTorch: swish -> dw 3x3 -> pw 1x1 (bias) -> BN."""

    def __init__(self, c: int, co: int):
        super().__init__()
        self.act = nn.SiLU()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, co, 1, bias=True)
        self.bn = nn.BatchNorm2d(co)

    def forward(self, x):
        return self.bn(self.pw(self.dw(self.act(x))))


class EagerMBConvTail(nn.Module):
    """MobileNetV2 block after the expansion: dw 3x3 -> BN -> ReLU6 -> pw 1x1 -> BN (+ input)."""

    def __init__(self, c: int, co: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, stride, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(c, co, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(co)
        self.skip = stride == 1 and c == co

    def forward(self, x, res=None):
        y = self.bn2(self.pw(self.act(self.bn1(self.dw(x)))))
        return y + res if res is not None else y


def _fused_from(eager: nn.Module, preact: bool) -> DWSeparableConv2d:
    """The effops module with the eager block's weights (shared)."""
    c, co = eager.dw.in_channels, eager.pw.out_channels
    m = DWSeparableConv2d(c, co, 3, stride=eager.dw.stride[0], padding=1,
                          act="silu" if preact else "relu6", preact=preact, dw_norm=not preact,
                          bias=eager.pw.bias is not None)
    m.conv_dw.weight, m.conv_pw.weight = eager.dw.weight, eager.pw.weight
    if eager.pw.bias is not None:
        m.conv_pw.bias = eager.pw.bias
    if not preact:
        m.bn_dw = eager.bn1
        m.bn_pw = eager.bn2
    else:
        m.bn_pw = eager.bn
    return m.eval()


def _check(outs):
    ref = outs["eager (channels_last)"]
    for k, v in outs.items():
        err = ((v.float() - ref.float()).abs().max() / (ref.float().abs().max() + 1e-12)).item()
        if err > 1e-4:
            return f"{k}: relative error {err:.2e}"
    return None


def _block_case(name: str, eager: nn.Module, fused: nn.Module, x: torch.Tensor, res, compile_: bool,
                bytes_moved: int) -> Case:
    eager = eager.eval()
    eager_cl = copy.deepcopy(eager).to(memory_format=CL)
    x_cl = x.contiguous(memory_format=CL)
    r_cl = None if res is None else res.contiguous(memory_format=CL)
    impls = {
        EFFOPS: lambda: fused(x_cl, r_cl) if res is not None else fused(x_cl),
        "eager (channels_last)": lambda: eager_cl(x_cl, r_cl) if res is not None else eager_cl(x_cl),
        "eager (NCHW)": lambda: eager(x, res) if res is not None else eager(x),
    }
    if compile_:
        compiled = torch.compile(eager_cl, dynamic=False)
        impls["torch.compile"] = lambda: compiled(x_cl, r_cl) if res is not None else compiled(x_cl)
    return Case("dwsep_conv", name, "fp32", inference(impls), _check, bytes_moved=bytes_moved)


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    if device.type != "cpu":
        return gpu_cases(device, quick)
    out: List[Case] = []
    g = torch.Generator().manual_seed(0)
    compile_ = not quick
    batch = 2 if quick else 8
    # EfficientDet-D0 BiFPN / head separable convs: 64 channels, P3 (64x64) .. P7 (4x4)
    for s in (64, 32, 16, 8, 4):
        eager = _randomize_bn(EagerSepConv(64, 64), s)
        x = torch.randn(batch, 64, s, s, generator=g)
        fused = _fused_from(eager, preact=True)
        out.append(_block_case(f"D0 BiFPN 64ch {s}x{s} b{batch}", eager, fused, x, None, compile_,
                               2 * x.numel() * 4))
    # MobileNetV2 (224x224) inverted residual tails: expanded channels -> projection
    shapes = [(32, 16, 112, 1), (96, 24, 112, 2), (144, 24, 56, 1), (192, 32, 28, 1), (384, 64, 14, 1),
              (576, 96, 14, 1), (960, 160, 7, 1)]
    for c, co, hw, stride in shapes:
        if quick and hw > 56:
            hw //= 4
        eager = _randomize_bn(EagerMBConvTail(c, co, stride), c)
        x = torch.randn(batch, c, hw, hw, generator=g)
        ho = (hw + stride - 1) // stride
        res = torch.randn(batch, co, ho, ho, generator=g) if stride == 1 else None
        fused = _fused_from(eager, preact=False)
        nbytes = 4 * (x.numel() + 2 * batch * co * ho * ho if res is not None else x.numel() + batch * co * ho * ho)
        out.append(_block_case(f"MobileNetV2 {c}->{co} {hw}x{hw} s{stride} b{batch}", eager, fused, x, res, compile_,
                               nbytes))
    out.extend(se_split_cases(g, batch, quick, compile_))
    out.extend(model_cases(quick, compile_))
    return out


class EagerDWSE(nn.Module):
    """EfficientNet's depthwise stage with the squeeze-excite pool: depthwise + BN + SiLU, mean."""

    def __init__(self, c: int, k: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.nn.functional.silu(self.bn(self.dw(x)))
        return y, y.mean((2, 3))


class EagerSEProject(nn.Module):
    """EfficientNet's projection after squeeze-excite: y * gate -> 1x1 conv -> BN (+ residual)."""

    def __init__(self, c: int, co: int):
        super().__init__()
        self.pw = nn.Conv2d(c, co, 1, bias=False)
        self.bn = nn.BatchNorm2d(co)

    def forward(self, y, gate, res):
        return self.bn(self.pw(y * gate[:, :, None, None])) + res


def _check_pair(outs):
    """_check on each output of the implementations that return (y, means)."""
    for i in range(2):
        err = _check({k: v[i] for k, v in outs.items()})
        if err:
            return err
    return None


def se_split_cases(g, batch: int, quick: bool, compile_: bool) -> List[Case]:
    """dw_conv_act (depthwise + BN + act + SE pool in one pass) and pw_conv (SE scale applied while
    loading, 1x1 conv, BN, residual) on EfficientNet-B0 stage shapes (224x224 input)."""
    from ..ops import dw_conv_act, pw_conv
    from ..nn._parts import fold_bn

    out: List[Case] = []
    for c, k, hw, stride in [(96, 3, 112, 2), (144, 5, 56, 2), (240, 3, 28, 2), (672, 5, 14, 1)]:
        if quick and hw > 28:
            hw //= 4
        eager = _randomize_bn(EagerDWSE(c, k, stride), c).eval()
        eager_cl = copy.deepcopy(eager).to(memory_format=CL)
        x = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=CL)
        s, b = fold_bn(eager.bn, None)
        s, b = s.detach(), b.detach()
        w = eager.dw.weight.detach()
        impls = {EFFOPS: lambda x=x, w=w, s=s, b=b, k=k, st=stride: dw_conv_act(x, w, stride=st, padding=k // 2,
                                                                                 scale=s, bias=b, act="silu"),
                 "eager (channels_last)": lambda m=eager_cl, x=x: m(x)}
        if compile_:
            cc = torch.compile(eager_cl, dynamic=False)
            impls["torch.compile"] = lambda cc=cc, x=x: cc(x)
        ho = (hw + stride - 1) // stride
        out.append(Case("dw_conv_act", f"EfficientNet-B0 {c}ch k{k} {hw}x{hw} s{stride} b{batch}", "fp32",
                        inference(impls), _check_pair, bytes_moved=4 * (x.numel() + batch * c * ho * ho)))
    for c, co, hw in [(144, 24, 56), (240, 40, 28), (480, 80, 14), (1152, 192, 7)]:
        if quick and hw > 28:
            hw //= 4
        eager = _randomize_bn(EagerSEProject(c, co), co).eval()
        eager_cl = copy.deepcopy(eager).to(memory_format=CL)
        y = torch.randn(batch, c, hw, hw, generator=g).contiguous(memory_format=CL)
        gate = torch.rand(batch, c, generator=g)
        res = torch.randn(batch, co, hw, hw, generator=g).contiguous(memory_format=CL)
        s, b = fold_bn(eager.bn, None)
        s, b = s.detach(), b.detach()
        w = eager.pw.weight.detach()
        impls = {EFFOPS: lambda y=y, w=w, gate=gate, s=s, b=b, res=res: pw_conv(y, w, channel_scale=gate, scale=s,
                                                                                bias=b, residual=res),
                 "eager (channels_last)": lambda m=eager_cl, y=y, gate=gate, res=res: m(y, gate, res)}
        if compile_:
            cc = torch.compile(eager_cl, dynamic=False)
            impls["torch.compile"] = lambda cc=cc, y=y, gate=gate, res=res: cc(y, gate, res)
        out.append(Case("pw_conv", f"EfficientNet-B0 SE project {c}->{co} {hw}x{hw} b{batch}", "fp32",
                        inference(impls), _check, bytes_moved=4 * (y.numel() + 2 * batch * co * hw * hw)))
    return out


def model_cases(quick: bool, compile_: bool) -> List[Case]:
    try:
        import timm
    except ImportError:
        return []
    out = []
    batch, size = (2, 96) if quick else (8, 224)
    for name in ("efficientnet_b0", "mobilenetv2_100"):
        torch.manual_seed(0)
        model = _randomize_bn(timm.create_model(name), 1).eval().to(memory_format=CL)
        fused = convert(copy.deepcopy(model))
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=CL)
        impls = {EFFOPS: lambda f=fused: f(x), "eager (channels_last)": lambda m=model: m(x)}
        if compile_:
            c = torch.compile(model, dynamic=False)
            impls["torch.compile"] = lambda c=c: c(x)
        out.append(Case("model", f"timm {name} b{batch} {size}x{size} (convert)", "fp32", inference(impls), _check))
    return out


def gpu_cases(device: torch.device, quick: bool) -> List[Case]:
    """bf16 channels_last forward and backward against eager cuDNN, on the same shapes."""
    out: List[Case] = []
    dt = torch.bfloat16
    for s in (64, 32, 16, 8, 4):
        eager = _randomize_bn(EagerSepConv(64, 64), s).to(device, dt).eval().to(memory_format=CL)
        fused = _fused_from(eager, preact=True)
        x = torch.randn(8, 64, s, s, device=device, dtype=dt).contiguous(memory_format=CL)
        out.append(Case("dwsep_conv", f"D0 BiFPN 64ch {s}x{s} b8", "bf16",
                        inference({EFFOPS: lambda f=fused, x=x: f(x), "eager (channels_last)": lambda e=eager, x=x: e(x)}),
                        _check_bf16, bytes_moved=2 * x.numel() * 2))
        xg = x.detach().clone().requires_grad_(True)

        def train_step(m, xg=xg):
            y = m(xg)
            y.backward(torch.ones_like(y))
            return xg.grad

        out.append(Case("dwsep_conv fwd+bwd", f"D0 BiFPN 64ch {s}x{s} b8", "bf16",
                        {EFFOPS: lambda f=fused: train_step(f), "eager (channels_last)": lambda e=eager: train_step(e)},
                        None))
    return out


def _check_bf16(outs):
    ref = outs["eager (channels_last)"].float()
    err = ((outs[EFFOPS].float() - ref).abs().max() / (ref.abs().max() + 1e-12)).item()
    return None if err < 3e-2 else f"relative error {err:.2e}"
