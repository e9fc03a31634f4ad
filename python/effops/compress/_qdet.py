"""Int8 EfficientDet heads and BiFPN nodes for ``quantize``: ``HeadNet`` -> ``QHeadNet``,
BiFPN ``_Node`` -> ``QFnode``.

A head runs, per level, ``box_class_repeats`` separable convs (depthwise 3x3 without BN or
activation -> pointwise 1x1 -> that level's BN -> swish) and the prediction separable conv
(depthwise -> pointwise with bias). In int8 each (repeat, level) pair and each level's
prediction is one ``QDWSeparableConv2d`` (one ``q_dwsep_conv`` call: the depthwise output is
requantised in the kernel at its own calibrated scale, the level's BN is folded into the
pointwise weights, swish is the activation table), and a level is an ``nn.Sequential`` of them
that passes uint8 codes from one to the next; the prediction's output is dequantised, so the
head returns float class / box maps exactly where the float head did. The depthwise weights
are shared across levels in the float head and quantised once per level here (per output
channel: the same codes; the multipliers differ with each level's scales).

A BiFPN node (``QFnode``): each input quantised at its calibrated parameters (or taken as it
is when it already is uint8 codes), the 1x1 resample conv of an input whose channels differ
(BN folded) as ``q_pw_conv``, the fusion as ``q_weighted_fuse`` - the normalised edge weights
(fixed in inference) times each input's scale over the fused sum's, as Q16 integers
(``qconv_fuse.fuse_multipliers``), with swish as the table from the sum's codes to the
activation's - and the separable conv after it as one ``QDWSeparableConv2d``; the node returns
float. The P6/P7 extra levels' convs and pools stay float.

Calibration: a hook on the head (the node) runs the float stages one by one on its input and
feeds each stage's observers (``quantize._observe``): inputs, resample conv outputs, the fused
sum, depthwise outputs, pre-activations and outputs.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn._parts import ConvStage, sepconv_forward
from ..nn.dwsep import _WithPadding
from ..ops.qconv import pack_pw
from ._qmodules import Refreshing, quantize_tensor


class QHeadNet(nn.Module):
    """Int8 EfficientDet class / box head: ``levels[l]`` is level l's chain of int8 separable
    convs (repeats, then the prediction)."""

    def __init__(self, levels: List[nn.Sequential]):
        super().__init__()
        self.levels = nn.ModuleList(levels)

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        if len(x) != len(self.levels):
            raise ValueError(f"QHeadNet: expected {len(self.levels)} feature levels, got {len(x)}")
        return [seq(t) for seq, t in zip(self.levels, x)]


class HeadPlan:
    """The plans of a HeadNet's stages and how to observe and build them (used by quantize)."""

    kind = "QHeadNet"

    def __init__(self, head: nn.Module):
        from .quantize import _Plan

        self.head = head
        self.residual_used = False
        self.obs = {}  # "in" once a calibration batch has run (quantize's "was it run" test)
        self.stages: List[List[tuple]] = []  # per level: (plan, float forward of that stage)
        for level in range(head.num_levels):
            row = []
            for r, conv in enumerate(head.conv_rep):
                dw = ConvStage(_WithPadding(conv.conv_dw, conv.padding), None, None)
                pw = ConvStage(conv.conv_pw, head.bn_rep[r][level].bn, head._act)
                row.append((_Plan(None, dw, None, pw, False, "QDWSeparableConv2d"),
                            lambda t, dw=dw, pw=pw: sepconv_forward(t, dw, pw)))
            p = head.predict
            if p.preact or p.bn_dw is not None or p.bn_pw is not None:
                from ..nn._parts import Unsupported

                raise Unsupported("a prediction conv with BatchNorm or preact (not EfficientDet's)")
            dw = ConvStage(_WithPadding(p.conv_dw, p.padding), None, p._act)
            pw = ConvStage(p.conv_pw, None, p._pw_act)
            row.append((_Plan(None, dw, None, pw, False, "QDWSeparableConv2d"), p))
            self.stages.append(row)

    def observe(self, x, out, kind: str, percentile: float) -> None:
        from .quantize import _observe

        for level, row in enumerate(self.stages):
            t = x[level]
            for plan, fn in row:
                out = fn(t)
                _observe(plan, t, out, kind, percentile)
                t = out
        self.obs["in"] = True

    def build(self) -> nn.Module:
        from .quantize import _build

        return QHeadNet([nn.Sequential(*[_build(plan) for plan, _ in row]) for row in self.stages])




# =============================================================================== BiFPN nodes
class QFnode(Refreshing):
    """Int8 BiFPN node (module docstring). Buffers: per input its (scale, zero point) and, where
    it has one, its resample conv (int8 weights, int32 bias, multipliers, output scale / zero
    point); the fusion's Q16 multipliers, epilogue and table; the separable conv as ``after``."""

    def __init__(self, offsets: Sequence[int], modes: Sequence[str], out_size, in_qparams, resample, mults, fuse_cfg,
                 lut: Optional[Tensor], after: nn.Module):
        super().__init__()
        from ..ops.qconv_fuse import MODE_CODES

        self.offsets, self.modes, self.out_size = list(offsets), list(modes), tuple(int(v) for v in out_size)
        self._modes = [MODE_CODES[m] for m in self.modes]
        self.register_buffer("in_scale", torch.tensor([q[0] for q in in_qparams], dtype=torch.float64))
        self.register_buffer("in_zp", torch.tensor([q[1] for q in in_qparams], dtype=torch.int64))
        self._convs = []
        for i, st in enumerate(resample):
            if st is None:
                continue
            self._convs.append(i)
            self.register_buffer(f"res{i}_weight", st.weight.clone())
            self.register_buffer(f"res{i}_bias", st.bias.clone())
            self.register_buffer(f"res{i}_mult", st.mult.clone())
            self.register_buffer(f"res{i}_out", torch.tensor([st.scale, st.ozp], dtype=torch.float64))
        self.register_buffer("fuse_mults", torch.tensor(list(mults), dtype=torch.int64))
        self.register_buffer("fuse_cfg", torch.tensor(list(fuse_cfg), dtype=torch.int64))  # out_zp, qmin, qmax
        self.register_buffer("fuse_lut", None if lut is None else lut.clone())
        self.after = after
        self._refresh()

    def _refresh(self) -> None:
        self._in = [(float(s), int(z)) for s, z in zip(self.in_scale.tolist(), self.in_zp.tolist())]
        self._res = {i: (int(getattr(self, f"res{i}_out")[1]), pack_pw(getattr(self, f"res{i}_weight"),
                                                                      getattr(self, f"res{i}_bias"), self._in[i][1]))
                     for i in self._convs}
        self._mults = [int(v) for v in self.fuse_mults.tolist()]
        self._fuse = tuple(int(v) for v in self.fuse_cfg.tolist())

    def forward(self, xs: List[Tensor]) -> Tensor:
        codes, zps = [], []
        for i, o in enumerate(self.offsets):
            x = xs[o]
            s, z = self._in[i]
            c = x if x.dtype == torch.uint8 else quantize_tensor(x, s, z)
            if i in self._res:
                ozp, packed = self._res[i]
                c = torch.ops.effops.q_pw_conv(c, getattr(self, f"res{i}_weight"), getattr(self, f"res{i}_bias"),
                                               getattr(self, f"res{i}_mult"), None, None, None, z, ozp, 0, 255, 0, 1.0,
                                               packed)
                z = ozp
            codes.append(c)
            zps.append(z)
        out_zp, qmin, qmax = self._fuse
        fused = torch.ops.effops.q_weighted_fuse(codes, zps, self._mults, self._modes, list(self.out_size), out_zp,
                                                 qmin, qmax, self.fuse_lut)
        return self.after(fused)

    def extra_repr(self) -> str:
        return f"offsets={self.offsets}, modes={self.modes}, out_size={self.out_size}, resample_convs={self._convs}"


class FnodePlan:
    """A BiFPN ``_Node``'s stages, observers and int8 build (used by quantize)."""

    kind = "QFnode"

    def __init__(self, node: nn.Module):
        from ..nn._parts import Unsupported
        from .quantize import _LUT_ACTS, _Plan

        if node.act not in _LUT_ACTS + ("relu", "relu6", "none"):
            raise Unsupported(f"BiFPN activation {node.act!r} has no integer form")
        self.node = node
        self.residual_used = False
        self.obs = {}
        self.resample = [r.stage() for r in node.combine.resample.values()]
        self.modes = [r.mode for r in node.combine.resample.values()]
        c = node.after_combine.conv
        self.after = _Plan(None, ConvStage(c.conv_dw, None, None), None, ConvStage(c.conv_pw, c.bn, None), False,
                           "QDWSeparableConv2d")

    def _see(self, name, t, kind, percentile):
        from .quantize import Observer

        if name not in self.obs:
            self.obs[name] = Observer(kind, percentile)
        self.obs[name](t)

    def observe(self, xs, out, kind: str, percentile: float) -> None:
        from ..ops.bifpn import weighted_fuse
        from ..ops.dwsep import apply_act
        from .quantize import _folded, _observe

        node, inputs = self.node, []
        for i, (o, st) in enumerate(zip(node.offsets, self.resample)):
            x = xs[o].float()
            self._see(f"in{i}", x, kind, percentile)
            if st is not None:
                w, b = _folded(st)
                x = F.conv2d(x, w.float(), b.float())
                self._see(f"res{i}", x, kind, percentile)
            inputs.append(x)
        pre = weighted_fuse(inputs, node.combine.edge_weights, resample=self.modes, method=node.combine.weight_method,
                            act=None, out_size=node.out_size)
        self._see("pre", pre, kind, percentile)
        _observe(self.after, apply_act(pre, node.act), out, kind, percentile)
        self.obs.setdefault("in", self.obs["in0"])  # quantize's "was it run" test

    def build(self) -> nn.Module:
        from ..ops.bifpn import normalize_weights
        from ..ops.qconv import activation_lut, clamp_range
        from ..ops.qconv_fuse import fuse_multipliers
        from .quantize import _LUT_ACTS, _build, _stage

        node = self.node
        after = _build(self.after)
        s_act, zp_act = after.in_qparams()
        in_qp = [self.obs[f"in{i}"].qparams() for i in range(len(self.resample))]
        resample, scales = [], []
        for i, st in enumerate(self.resample):
            if st is None:
                resample.append(None)
                scales.append(in_qp[i][0])
                continue
            q = _stage(st, SimpleNamespace(obs={"out": self.obs[f"res{i}"]}), in_qp[i][0], None, "out")
            resample.append(q)
            scales.append(q.scale)
        ew = node.combine.edge_weights
        wn = normalize_weights(None if ew is None else ew.detach(), node.combine.weight_method, len(self.resample),
                               1e-4, "cpu").tolist()  # weighted_fuse's default eps, as fnode_forward calls it
        if node.act in _LUT_ACTS:
            s_pre, zp_pre = self.obs["pre"].qparams()
            lut = activation_lut(node.act, s_pre, zp_pre, s_act, zp_act)
            mults, cfg = fuse_multipliers(wn, scales, s_pre), (zp_pre, 0, 255)
        else:
            lut = None
            mults, cfg = fuse_multipliers(wn, scales, s_act), (zp_act, *clamp_range(node.act, s_act, zp_act))
        return QFnode(node.offsets, self.modes, node.out_size, in_qp, resample, mults, cfg, lut, after)


__all__ = ["QHeadNet", "HeadPlan", "QFnode", "FnodePlan"]
