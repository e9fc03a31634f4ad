"""Post-training static int8 quantization of effops models (``effops.compress.quantize``).

``quantize(model, calibration_data)`` returns a copy of ``model`` (eval mode) with the same module
tree in which every fused block it can quantize is replaced, at the same path, by its int8
counterpart running the ``qconv`` kernels (effops/ops/qconv.py defines the integer arithmetic):

* ``QMBConv`` for inverted residuals and depthwise-separable blocks: effops ``MBConv``,
  ``effops.models`` ``DepthwiseSeparableBlock``, and the blocks ``effops.nn.convert`` fused in
  timm / torchvision models (``FusedTimmBlock``, ``FusedTorchvisionBlock``);
* ``QDWSeparableConv2d`` for ``DWSeparableConv2d`` (post-activation order, no residual);
* ``QConv2d`` for an ``effops.models`` EfficientNet's stem (``conv_stem`` + ``bn1`` + swish) and
  a classifier's head conv (``conv_head`` + ``bn2`` + swish); ``stem=False`` / ``head=False`` keep
  them float32;
* with ``bifpn_and_heads=True``, ``QHeadNet`` for EfficientDet's class and box heads and
  ``QFnode`` for its BiFPN nodes (``_qdet.py``: int8 separable convs, ``q_weighted_fuse`` for
  the fusion; float out).

The recipe: BatchNorm folded into the convs (running statistics), weights per output channel
symmetric int8 (scale max|w| / 127), activations per tensor uint8 with a zero point, calibrated
by an observer on ``calibration_data`` run through the float model (``'minmax'``: the running
min / max; ``'percentile'``: per batch the ``percentile`` and ``100 - percentile`` order
statistics, averaged over batches; both deterministic). Biases are int32 in units of
``s_in * s_w``; multipliers ``s_in * s_w / s_out`` are float32. ReLU / ReLU6 are clamps; SiLU,
hardswish and sigmoid are 256-entry tables from the pre-activation's codes (calibrated on the
pre-activation) to the activation's codes. Squeeze-excite stays float32 on the dequantised
channel means; its gates rescale the codes inside the projection kernel.

Boundaries: a quantized block takes a float tensor (quantised at its calibrated input
parameters) and returns a float tensor (dequantised), so everything that is not quantised -
the pool and classifier, other layers - runs unchanged in float32. Between two quantized blocks
that follow each other in one ``nn.Sequential`` (or across the nested Sequentials of one that the
model runs as a whole, as the stages of a classifier's ``blocks``) and share the calibrated
parameters (the second block's input is the first one's output) the uint8 codes are passed on
directly (``chain_out``): dequantising and quantising again would give the same codes.

The quantized modules keep every parameter in buffers (``state_dict`` / ``load_state_dict``
round-trip) and run under ``torch.compile``. ``model.quantization_report`` lists what was
quantized and what was kept, with the reason.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn._parts import ConvStage, Unsupported, fold_bn, padding_of, se_gate_of
from ..ops.dwsep import apply_act, conv_geometry
from ..ops.qconv import activation_lut, clamp_range
from ._qmodules import QConv2d, QDWSeparableConv2d, QMBConv, QStage, dequantize_tensor, quantize_tensor

OBSERVERS = ("minmax", "percentile")
_LUT_ACTS = ("silu", "hardswish", "sigmoid")
_BIAS_LIMIT = 2 ** 30


# =============================================================================== observers
class Observer:
    """Range of a tensor over the calibration batches (deterministic for a fixed batch order)."""

    def __init__(self, kind: str = "minmax", percentile: float = 99.99):
        self.kind, self.percentile = kind, percentile
        self.lo = self.hi = None
        self.n = 0

    def __call__(self, t: Tensor) -> None:
        t = t.detach().float().reshape(-1)
        if self.kind == "minmax":
            lo, hi = t.min().item(), t.max().item()
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)
            return
        n = t.numel()
        k_hi = min(n, max(1, math.ceil(self.percentile / 100.0 * n)))
        k_lo = max(1, n + 1 - k_hi)
        lo, hi = torch.kthvalue(t, k_lo).values.item(), torch.kthvalue(t, k_hi).values.item()
        self.lo = lo if self.lo is None else self.lo + lo
        self.hi = hi if self.hi is None else self.hi + hi
        self.n += 1

    def qparams(self) -> Tuple[float, int]:
        """(scale, zero point) of uint8 codes covering [min(lo, 0), max(hi, 0)]."""
        if self.lo is None:
            raise RuntimeError("observer saw no data")
        lo, hi = (self.lo, self.hi) if self.kind == "minmax" else (self.lo / self.n, self.hi / self.n)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255.0
        if not math.isfinite(scale) or scale <= 0:
            return 1.0, 0
        return scale, int(min(255, max(0, round(-lo / scale))))


# =============================================================================== block plans
class _Plan:
    """A block in the float model as stages: [expand], dw, [se], project, skip."""

    def __init__(self, expand: Optional[ConvStage], dw: ConvStage, se: Optional[nn.Module], project: ConvStage,
                 skip: bool, kind: str):
        self.expand, self.dw, self.se, self.project, self.skip, self.kind = expand, dw, se, project, skip, kind
        for s in (expand, dw, project):
            if s is not None:
                s.act_name  # raises Unsupported for an activation without an integer form
        if tuple(dw.conv.dilation) != (1, 1):
            raise Unsupported(f"dilation {tuple(dw.conv.dilation)} (the int8 depthwise kernel has dilation 1)")
        if skip and project.act_name != "none":
            raise Unsupported("an activation before the residual add")
        self.padding = padding_of(dw.conv)
        self.se_gate = se_gate_of(se) if se is not None else None
        self.obs: Dict[str, Observer] = {}
        self.residual_used = False


def _plan_of(m: nn.Module, bifpn_and_heads: bool = False) -> Optional[_Plan]:
    from ..models.efficientdet import HeadNet
    from ..models.efficientnet import DepthwiseSeparableBlock
    from ..nn.convert import FusedTimmBlock, FusedTorchvisionBlock
    from ..nn.dwsep import MBConv, DWSeparableConv2d, _WithPadding

    if bifpn_and_heads and isinstance(m, HeadNet):  # EfficientDet's class / box head (_qdet.py)
        from ._qdet import HeadPlan

        return HeadPlan(m)
    from ..nn.bifpn import _Node

    if bifpn_and_heads and isinstance(m, _Node):  # a BiFPN node (_qdet.py)
        from ._qdet import FnodePlan

        return FnodePlan(m)
    if isinstance(m, MBConv):
        expand = ConvStage(m.conv_pw, m.bn1, m._act) if m.conv_pw is not None else None
        return _Plan(expand, ConvStage(_WithPadding(m.conv_dw, m.padding), m.bn2, m._act), m.se,
                     ConvStage(m.conv_pwl, m.bn3, None), m.skip, "QMBConv")
    if isinstance(m, DepthwiseSeparableBlock):
        return _Plan(None, ConvStage(_WithPadding(m.conv_dw, m.padding), m.bn1, m._act), m.se,
                     ConvStage(m.conv_pw, m.bn2, None), m.skip, "QMBConv")
    if isinstance(m, (FusedTimmBlock, FusedTorchvisionBlock)):
        expand, dw, proj = (m._stage(s) for s in m.spec)
        se = m.get_submodule(m.se_name) if m.se_name else None
        return _Plan(expand, dw, se, proj, bool(m.skip), "QMBConv")
    if isinstance(m, DWSeparableConv2d):
        if m.preact:
            raise Unsupported("preact=True (activation on the input: an EfficientDet BiFPN/head layer)")
        dw, pw = m._stages()
        dw.conv = _WithPadding(m.conv_dw, m.padding)
        return _Plan(None, dw, None, pw, False, "QDWSeparableConv2d")
    return None


def _folded(stage: ConvStage) -> Tuple[Tensor, Tensor]:
    """Float64 weight with BN folded in, and the bias."""
    scale, bias = fold_bn(stage.bn, stage.conv.bias)
    w = stage.conv.weight.detach().double()
    if scale is not None:
        w = w * scale.detach().double()[:, None, None, None]
    b = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def _same_pad(x: Tensor, conv, padding) -> Tensor:
    k = conv.weight.shape[2:]
    g = conv_geometry("quantize", x.shape[2:], k, conv.stride, padding, 1)
    t, b, l, r = g.pad
    return F.pad(x, (l, r, t, b))


def _observe(plan: _Plan, x: Tensor, out: Tensor, kind: str, pct: float) -> None:
    """Float forward of the block's stages (BN folded), feeding the observers."""
    def see(name, t):
        if name not in plan.obs:
            plan.obs[name] = Observer(kind, pct)
        plan.obs[name](t)

    see("in", x)
    h = x.float()
    if plan.expand is not None:
        w, b = _folded(plan.expand)
        pre = F.conv2d(h, w.float(), b.float())
        see("e_pre", pre)
        h = apply_act(pre, plan.expand.act_name)
        see("e", h)
    w, b = _folded(plan.dw)
    pre = F.conv2d(_same_pad(h, plan.dw.conv, plan.padding), w.float(), b.float(), plan.dw.conv.stride,
                   groups=w.shape[0])
    see("d_pre", pre)
    d = apply_act(pre, plan.dw.act_name)
    see("d", d)
    if plan.se_gate is not None:
        d = d * plan.se_gate(d.mean((2, 3), keepdim=True))
    w, b = _folded(plan.project)
    p = F.conv2d(d, w.float(), b.float())
    if plan.project.act_name != "none":
        see("p_pre", p)
    see("out", out)


# =============================================================================== building
def _quant_weight(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Per output channel symmetric int8: (codes, scales float64 [Co])."""
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / s.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127).to(torch.int8)
    return q, s


def _stage(stage: ConvStage, plan: _Plan, s_in: float, pre: Optional[str], post: str) -> QStage:
    """The int8 form of one conv stage: input scale s_in, output observed as `post` (and the
    pre-activation as `pre` when the activation is a table)."""
    w, b = _folded(stage)
    q, sw = _quant_weight(w)
    bias = torch.round(b / (s_in * sw)).clamp(-_BIAS_LIMIT, _BIAS_LIMIT).to(torch.int32)
    s_out, zp_out = plan.obs[post].qparams()
    act = stage.act_name
    if act in _LUT_ACTS:
        s_pre, zp_pre = plan.obs[pre].qparams()
        mult = (s_in * sw / s_pre).to(torch.float32)
        lut = activation_lut(act, s_pre, zp_pre, s_out, zp_out)
        return QStage(q, bias, mult, lut, zp_pre, 0, 255, s_out, zp_out)
    qmin, qmax = clamp_range(act, s_out, zp_out)
    return QStage(q, bias, (s_in * sw / s_out).to(torch.float32), None, zp_out, qmin, qmax, s_out, zp_out)


def _build(plan: _Plan) -> nn.Module:
    s_in, zp_in = plan.obs["in"].qparams()
    expand = None
    s, zp = s_in, zp_in
    if plan.expand is not None:
        expand = _stage(plan.expand, plan, s, "e_pre", "e")
        s, zp = expand.scale, expand.zp
    dw = _stage(plan.dw, plan, s, "d_pre", "d")
    project = _stage(plan.project, plan, dw.scale, "p_pre", "out")
    stride = tuple(plan.dw.conv.stride)
    if plan.kind == "QDWSeparableConv2d":
        return QDWSeparableConv2d(s_in, zp_in, dw, project, stride, plan.padding)
    se = copy.deepcopy(plan.se) if plan.se is not None else None
    return QMBConv(s_in, zp_in, expand, dw, se, project, plan.skip, stride, plan.padding)


class _ConvPlan:
    """One dense conv stage of an ``effops.models`` EfficientNet: the stem (conv_stem + bn1 +
    swish, observed on the trunk's input) or the classifier's head conv (conv_head + bn2 + swish,
    observed on the output of ``blocks``); built as ``QConv2d``."""

    kind = "QConv2d"

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, act: nn.Module, padding):
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or getattr(conv, "padding_mode", "zeros") != "zeros":
            raise Unsupported("not a plain dense conv (groups 1, dilation 1, zero padding)")
        self.stage = ConvStage(conv, bn, act)
        self.act = self.stage.act_name  # raises Unsupported for an activation without an integer form
        self.padding = padding
        self.obs: Dict[str, Observer] = {}

    def observe(self, x: Tensor, kind: str, pct: float) -> None:
        def see(name, t):
            if name not in self.obs:
                self.obs[name] = Observer(kind, pct)
            self.obs[name](t)

        see("in", x)
        conv = self.stage.conv
        w, b = _folded(self.stage)
        pre = F.conv2d(_same_pad(x.float(), conv, self.padding), w.float(), b.float(), conv.stride)
        if self.act in _LUT_ACTS:
            see("pre", pre)
        see("out", apply_act(pre, self.act))

    def build(self, out: Optional[Observer] = None) -> nn.Module:
        """out: the observer of the next block's input, whose parameters the codes then take."""
        if out is not None:
            self.obs["out"] = out
        s_in, zp_in = self.obs["in"].qparams()
        return QConv2d(s_in, zp_in, _stage(self.stage, self, s_in, "pre", "out"), tuple(self.stage.conv.stride),
                       self.padding)


def _conv_plans(model: nn.Module, stem: bool, head: bool, report: List[Tuple[str, str, str]]):
    """[(path, trunk module, 'stem' | 'head', plan)] for the effops.models EfficientNet trunks in model."""
    from ..models.efficientnet import EfficientNet, _Trunk

    out = []
    for path, m in model.named_modules():
        if not isinstance(m, _Trunk):
            continue
        parts = []
        if stem and isinstance(m.conv_stem, nn.Conv2d):
            parts.append(("stem", "conv_stem", m.conv_stem, m.bn1, "same" if m.padding == "same" else tuple(m.conv_stem.padding)))
        if head and isinstance(m, EfficientNet) and isinstance(m.conv_head, nn.Conv2d):
            parts.append(("head", "conv_head", m.conv_head, m.bn2, (0, 0)))
        for kind, attr, conv, bn, padding in parts:
            name = f"{path}.{attr}" if path else attr
            try:
                out.append((name, m, kind, _ConvPlan(conv, bn, m._act, padding)))
            except Unsupported as e:
                report.append((name, "kept", str(e)))
    return out


# =============================================================================== calibration data
def _first_conv(model: nn.Module) -> Optional[nn.Conv2d]:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _batches(calibration_data, batch_size: int, in_channels: Optional[int]) -> List[Tensor]:
    if isinstance(calibration_data, Tensor):
        data = [calibration_data[i:i + batch_size] for i in range(0, calibration_data.shape[0], batch_size)] \
            if calibration_data.dim() == 4 else [calibration_data]
    elif isinstance(calibration_data, (str, bytes)) or not isinstance(calibration_data, Iterable):
        raise TypeError(f"quantize: calibration_data must be a tensor [N, C, H, W] or an iterable of tensors / "
                        f"(input, target) pairs, got {type(calibration_data).__name__}")
    else:
        data = [b[0] if isinstance(b, (tuple, list)) and b else b for b in calibration_data]
    if not data:
        raise ValueError("quantize: calibration_data is empty")
    for i, b in enumerate(data):
        if not isinstance(b, Tensor):
            raise TypeError(f"quantize: calibration_data batch {i} is a {type(b).__name__}, not a tensor")
        if not b.dtype.is_floating_point:
            raise TypeError(f"quantize: calibration_data batch {i} must be floating point, got {b.dtype}")
        if b.dim() != 4 or (in_channels is not None and b.shape[1] != in_channels) or b.shape[0] == 0:
            want = f"[N, {in_channels}, H, W]" if in_channels is not None else "[N, C, H, W]"
            raise ValueError(f"quantize: calibration_data batch {i} must have shape {want} (N >= 1), "
                             f"got {list(b.shape)}")
        if not torch.isfinite(b).all():
            raise ValueError(f"quantize: calibration_data batch {i} contains NaN or inf")
    return data


# =============================================================================== entry point
def quantize(model: nn.Module, calibration_data, *, activation: str = "per_tensor", observer: str = "minmax",
             percentile: float = 99.99, batch_size: int = 32, inplace: bool = False,
             bifpn_and_heads: bool = False, stem: bool = True, head: bool = True) -> nn.Module:
    """Post-training static int8 quantization (module docstring). ``calibration_data``: a float
    tensor [N, C, H, W] (split into ``batch_size`` batches), or an iterable of such tensors or of
    (input, target) pairs (a DataLoader). Returns the quantized model (a copy unless
    ``inplace``), in eval mode, with ``quantization_report`` [(path, 'quantized' | 'kept', why)].
    ``bifpn_and_heads``: also EfficientDet's BiFPN nodes and class / box heads (``_qdet.py``; off by
    default: exact, but on the CPU today slower than their float32 kernels - tf_efficientdet_d0 at
    512, one thread: BiFPN 10.8 vs 4.6 ms at batch 1, 112 vs 40 ms at batch 8, the heads 1.2-1.4x
    slower, mostly boundary quantise / dequantise and the small per-node calls). ``stem`` /
    ``head``: an effops.models EfficientNet's stem (conv_stem + bn1 + swish, its codes passed to the
    first block) and a classifier's head conv (conv_head + bn2 + swish; float32 features out, the
    pool and classifier stay float32) become ``QConv2d``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: model must be an nn.Module, got {type(model).__name__}")
    if activation != "per_tensor":
        raise ValueError(f"quantize: activation must be 'per_tensor' (per-tensor uint8 activations; the int8 "
                         f"kernels take one zero point per tensor), got {activation!r}")
    if observer not in OBSERVERS:
        raise ValueError(f"quantize: observer must be one of {list(OBSERVERS)}, got {observer!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 50.0 < percentile <= 100.0:
        raise ValueError(f"quantize: percentile must be a number in (50, 100], got {percentile!r}")
    if not isinstance(bifpn_and_heads, bool):
        raise TypeError(f"quantize: bifpn_and_heads must be True or False, got {type(bifpn_and_heads).__name__}")
    for flag, v in (("stem", stem), ("head", head)):
        if not isinstance(v, bool):
            raise TypeError(f"quantize: {flag} must be True or False, got {type(v).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"quantize: batch_size must be an integer >= 1, got {batch_size!r}")
    conv = _first_conv(model)
    batches = _batches(calibration_data, batch_size, conv.in_channels if conv is not None else None)
    q = model if inplace else copy.deepcopy(model)
    q.eval()
    plans: Dict[str, _Plan] = {}
    report: List[Tuple[str, str, str]] = []
    for name, m in q.named_modules():
        if any(name.startswith(p + ".") for p in plans):
            continue
        try:
            plan = _plan_of(m, bifpn_and_heads)
        except Unsupported as e:
            report.append((name, "kept", f"{type(m).__name__}: {e}"))
            continue
        if plan is not None:
            plans[name] = plan
    if not plans:
        raise ValueError("quantize: the model has no block the int8 kernels implement (effops MBConv, "
                         "DWSeparableConv2d, DepthwiseSeparableBlock, or blocks fused by effops.nn.convert)")

    convs = _conv_plans(q, stem, head, report)
    hooks = []
    for _, trunk, kind, cp in convs:
        see = lambda t, cp=cp: cp.observe(t, observer, float(percentile))  # noqa: E731
        if kind == "stem":
            hooks.append(trunk.register_forward_pre_hook(lambda mod, args, see=see: see(args[0])))
        else:
            hooks.append(trunk.blocks.register_forward_hook(lambda mod, args, out, see=see: see(out)))
    for name, plan in plans.items():
        def hook(mod, args, kwargs, out, plan=plan):
            if hasattr(plan, "observe"):  # a composite (an EfficientDet head): observes its own stages
                plan.observe(args[0], out, observer, float(percentile))
                return
            if len(args) > 1 or kwargs.get("residual") is not None:
                plan.residual_used = True
            _observe(plan, args[0], out, observer, float(percentile))
        hooks.append(q.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    called = set()  # the plain Sequentials run as a whole (their children back to back, nothing in between)
    for m in q.modules():
        if _plain_sequential(m):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))))
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                try:
                    q(b)
                except (RuntimeError, ValueError, TypeError) as e:
                    raise ValueError(f"quantize: the model failed on calibration_data batch {i} "
                                     f"(shape {list(b.shape)}): {e}") from e
    finally:
        for h in hooks:
            h.remove()

    built: Dict[str, nn.Module] = {}
    for name, plan in plans.items():
        if plan.residual_used:
            report.append((name, "kept", "called with a residual (added after the activation in float)"))
        elif "in" not in plan.obs:
            report.append((name, "kept", "not run by the calibration data"))
        else:
            built[name] = plan.build() if hasattr(plan, "build") else _build(plan)
            report.append((name, "quantized", plan.kind))
    for name, new in built.items():
        if name:
            parent, _, child = name.rpartition(".")
            setattr(q.get_submodule(parent) if parent else q, child, new)
    if "" in built:  # the model itself is one block
        q = built[""]
    for name, trunk, kind, cp in convs:  # the BN stays in the tree, unused (folded into the codes)
        if "in" not in cp.obs:
            report.append((name, "kept", "not run by the calibration data"))
            continue
        first = trunk.blocks[0][0] if kind == "stem" and len(trunk.blocks) and len(trunk.blocks[0]) else None
        path = next((p for p, m in q.named_modules() if m is first), None) if first is not None else None
        chain = path in plans and path in built and "in" in plans[path].obs
        conv = cp.build(plans[path].obs["in"] if chain else None)
        if chain:  # the stem's codes are the first block's input codes
            conv.set_chain_out(True)
        setattr(trunk, name.rpartition(".")[2], conv)
        bn = "bn1" if kind == "stem" else "bn2"
        report.append((name, "quantized", f"QConv2d ({name.rpartition('.')[2]} + {bn} + {cp.act})"))
    _chain(q, called)
    q.quantization_report = sorted(report)
    return q


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _run_order(seq: nn.Sequential) -> List[nn.Module]:
    """The modules a plain Sequential runs one after the other, nested plain Sequentials opened."""
    out: List[nn.Module] = []
    for m in seq.children():
        out.extend(_run_order(m) if _plain_sequential(m) else [m])
    return out


def _chain(model: nn.Module, called=frozenset()) -> None:
    """Consecutive quantized blocks with matching parameters pass uint8 codes: the children of one
    Sequential, and across the nested Sequentials of one that ran as a whole during calibration
    (``called``: ids of plain Sequentials; e.g. the stages of ``blocks`` in a classifier). A
    Sequential whose children a model iterates itself (a features backbone that keeps every
    stage's output) is not opened."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = _run_order(seq) if id(seq) in called else list(seq.children())
        for a, b in zip(kids, kids[1:]):
            if (isinstance(a, (QMBConv, QDWSeparableConv2d)) and isinstance(b, (QMBConv, QDWSeparableConv2d))
                    and a.out_qparams() == b.in_qparams()):
                a.set_chain_out(True)


__all__ = ["quantize", "Observer", "OBSERVERS", "QMBConv", "QDWSeparableConv2d", "QConv2d", "quantize_tensor",
           "dequantize_tensor"]
