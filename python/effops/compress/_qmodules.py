"""The int8 modules ``effops.compress.quantize`` puts in place of fused float blocks.

Every number a module needs is a buffer (weights int8, biases int32, multipliers float32,
activation tables uint8, and the scales / zero points / clamp bounds), so ``state_dict`` /
``load_state_dict`` round-trip a quantized model. The kernels take zero points and clamp
bounds as Python ints: those are read from the buffers once, at construction and after every
``load_state_dict`` (never per call), which keeps ``forward`` free of host reads under
``torch.compile``.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.dlpack import to_dlpack as _to_dlpack

from .. import _backend
from ..nn._parts import _global_hooks, se_gate_of
from ..ops import qconv as _qc
from ..ops._common import profiled
from ..ops.dwsep import conv_geometry
from ..ops.qconv import pack_pw


def _q_call(op: str, impl, *args, scratch: Optional[str] = None):
    """torch.ops.effops.<op>(*args); in eager on the CPU backend the kernel itself (``impl``, the
    op's CPU body) without the dispatcher (~15 us of a custom-op call, x3 per block: ~0.7 ms of
    int8 efficientnet_b0 at batch 1), under the op's profiler name. ``scratch``: the output is a
    block's internal intermediate (never returned): on that path it goes into this thread's reused
    buffer of that name (_Scratch)."""
    x = args[0]
    if not torch.compiler.is_compiling() and x.device.type == "cpu" and _backend.select(op, x.device) == "cpu":
        if scratch is None:
            return profiled(f"effops::{op}", impl, "cpu", *args)
        return profiled(f"effops::{op}", functools.partial(impl, out=_SCRATCH.get(scratch, _out_shape(op, args))),
                        "cpu", *args)
    return getattr(torch.ops.effops, op)(*args)


def _out_shape(op: str, args) -> Tuple[int, int, int, int]:
    x, w = args[0], args[1]
    N, _, H, W = x.shape
    if op == "q_pw_conv":
        return N, w.shape[0], H, W
    return (N, x.shape[1], *_qc._out_hw(x, w.shape[2:], args[5], args[6]))  # q_dw_conv_act: stride, pad


class _Scratch(threading.local):
    """Per thread, one reused uint8 buffer per name for the intermediates inside a quantized block
    (the expanded map, the depthwise output): a fresh multi-MB tensor per call costs its page
    faults each time (int8 efficientnet_b0 at batch 8, one thread, Zen 4: 1.6 of 24.8 ms). Up to
    ``LIMIT`` bytes each (larger ones are allocated per call); ``release()`` frees them."""

    LIMIT = 64 << 20

    def __init__(self):
        self.bufs = {}

    def get(self, name: str, shape: Tuple[int, int, int, int]) -> Optional[Tensor]:
        N, C, H, W = shape
        n = N * C * H * W
        if n > self.LIMIT:
            return None
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, dtype=torch.uint8)
        return buf[:n].view(N, H, W, C).permute(0, 3, 1, 2)

    def release(self) -> None:
        self.bufs.clear()


_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's reused intermediate buffers of the quantized blocks (they are made
    again, at the sizes needed, by the next call)."""
    C = _c_module()
    _SCRATCH.release()
    if C is not None and hasattr(C, "q_release_scratch"):
        C.q_release_scratch()


def _c_module():
    """effops._C itself (not _backend's DLPack wrapper: the plan class and its methods take
    capsules the caller makes), or None without it."""
    return getattr(_backend._C, "_module", None) if _backend._C is not None else None


#: QMBConv runs through its C++ plan where it can (False: always op by op; the tests compare the two).
_PLANS = True


def _dense_flat(t: Tensor) -> Optional[Tensor]:
    """t's storage as a 1-d view when t is contiguous or channels_last (else None)."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return None


def quantize_tensor(x: Tensor, scale: float, zp: int) -> Tensor:
    """uint8 codes clamp(round_half_even(x / scale) + zp, 0, 255), the division in float32 (the
    memory format is kept). These run at every float/int8 boundary: on the CPU in eager, float32
    contiguous or channels_last, one pass of the C++ kernel (``_C.q_quantize``, the same codes;
    five torch ops with float32 temporaries otherwise - 3.4 of 28 ms of int8 efficientnet_b0 at
    batch 8 on its stem output)."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and _backend._C is not None):
        flat = _dense_flat(x)
        if flat is not None:
            out = torch.empty_like(x, dtype=torch.uint8)
            profiled("effops::quantize_tensor", _backend._C.q_quantize, flat, _dense_flat(out), float(scale), int(zp),
                     max(1, torch.get_num_threads()))
            return out
    return torch.div(x, scale).round_().add_(zp).clamp_(0, 255).to(torch.uint8)


def dequantize_tensor(q: Tensor, scale: float, zp: int) -> Tensor:
    """float32 scale * (q - zp)."""
    return q.to(torch.float32).sub_(zp).mul_(scale)


@dataclass
class QStage:
    """One int8 conv stage: codes, int32 bias, float32 multipliers, optional activation table;
    the epilogue's zero point and clamp (zp is the pre-activation's when lut is set), and the
    scale / zero point of the codes it writes."""

    weight: Tensor
    bias: Tensor
    mult: Tensor
    lut: Optional[Tensor]
    zp: int
    qmin: int
    qmax: int
    scale: float
    ozp: int


class Refreshing(nn.Module):
    """A module whose Python-side copies of its buffers (ints read once, packed weights) are
    rebuilt by ``_refresh()`` after ``.to()`` / ``.cuda()`` (repack for the new device) and after
    ``load_state_dict``."""

    def _refresh(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()


class _QBlock(Refreshing):
    _stages: Tuple[str, ...] = ()

    def _init(self, in_scale: float, in_zp: int, stages, stride, padding) -> None:
        self.register_buffer("in_scale", torch.tensor(float(in_scale), dtype=torch.float64))
        self.register_buffer("in_zp", torch.tensor(int(in_zp), dtype=torch.int64))
        self.register_buffer("chain_out", torch.tensor(False))
        names = []
        for name, st in stages:
            if st is None:
                continue
            names.append(name)
            self.register_buffer(f"{name}_weight", st.weight.clone())
            self.register_buffer(f"{name}_bias", st.bias.clone())
            self.register_buffer(f"{name}_mult", st.mult.clone())
            self.register_buffer(f"{name}_lut", None if st.lut is None else st.lut.clone())
            self.register_buffer(f"{name}_cfg", torch.tensor([st.zp, st.qmin, st.qmax, st.ozp], dtype=torch.int64))
            self.register_buffer(f"{name}_scale", torch.tensor(float(st.scale), dtype=torch.float64))
        self._stages = tuple(names)
        self.stride = tuple(int(s) for s in stride)
        self.padding = padding
        self._refresh()

    def _refresh(self) -> None:
        self._in = (float(self.in_scale), int(self.in_zp))
        self._chain = bool(self.chain_out)
        self._cfg = {n: tuple(int(v) for v in getattr(self, f"{n}_cfg").tolist()) + (float(getattr(self, f"{n}_scale")),)
                     for n in self._stages}
        # the pointwise weights packed once for the CPU kernels (not state: rebuilt from the buffers)
        x_zp = {"expand": self._in[1], "project": self._cfg["dw"][3]}
        self._packed = {n: pack_pw(getattr(self, f"{n}_weight"), getattr(self, f"{n}_bias"), x_zp[n])
                        for n in ("expand", "project") if n in self._cfg}

    def in_qparams(self) -> Tuple[float, int]:
        return self._in

    def out_qparams(self) -> Tuple[float, int]:
        c = self._cfg["project"]
        return c[4], c[3]

    def set_chain_out(self, on: bool) -> None:
        """Return uint8 codes (at out_qparams) instead of float: for a next block whose input
        parameters are these."""
        self.chain_out.fill_(bool(on))
        self._refresh()

    def _codes_in(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            return x
        if not x.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}: x must be a float tensor or the uint8 codes of the previous "
                            f"block, got {x.dtype}")
        return quantize_tensor(x, *self._in)

    def _out(self, q: Tensor) -> Tensor:
        if self._chain:
            return q
        scale, zp = self.out_qparams()
        return dequantize_tensor(q, scale, zp)

    def _geometry(self, x: Tensor) -> Tuple[list, list]:
        g = conv_geometry(type(self).__name__, x.shape[2:], self.dw_weight.shape[2:], self.stride, self.padding, 1)
        return list(g.stride), list(g.pad)

    def _dwsep(self, h: Tensor, h_zp: int, residual: Optional[Tensor]) -> Tensor:
        stride, pad = self._geometry(h)
        d, p = self._cfg["dw"], self._cfg["project"]
        res_mult = self._in[0] / p[4]
        return _q_call(
            "q_dwsep_conv", _qc._dwsep_impl,
            h, self.dw_weight, self.dw_bias, self.dw_mult, self.dw_lut, self.project_weight, self.project_bias,
            self.project_mult, self.project_lut, residual, stride, pad, h_zp, d[0], d[1], d[2], d[3], p[0], p[1],
            p[2], self._in[1], res_mult, self._packed["project"])

    def extra_repr(self) -> str:
        w = self.dw_weight
        return (f"channels={w.shape[0]}, out_channels={self.project_weight.shape[0]}, kernel_size={w.shape[2]}, "
                f"stride={self.stride[0]}, in=(scale={self._in[0]:.4g}, zp={self._in[1]}), "
                f"out=(scale={self.out_qparams()[0]:.4g}, zp={self.out_qparams()[1]}), chain_out={self._chain}")


def _se_args(se: Optional[nn.Module]):
    """(w1, b1, act code, w2, b2, gate code) of an SE the q_se_gates op runs (float32 1x1 convs,
    an activation it has, a sigmoid / hard sigmoid gate; the parameters themselves, as views),
    else None (the SE module's own forward then)."""
    from ..nn._plan import _gate_code, _se_parts
    from ..nn._parts import Unsupported, act_of
    from ..ops.dwsep import ACT_CODES

    if se is None:
        return None
    try:
        r, a, e, g = _se_parts(se)
        act = ACT_CODES[act_of(a)]
    except Unsupported:
        return None
    if any(t is not None and t.dtype != torch.float32 for t in (r.weight, r.bias, e.weight, e.bias)):
        return None
    d = (lambda t: None if t is None else t.detach())
    return d(r.weight).flatten(1), d(r.bias), act, d(e.weight).flatten(1), d(e.bias), _gate_code(g)


def _se_hooked(mods) -> bool:
    """Hooks on the SE or its parts (or global ones): the SE's own modules run, so they fire."""
    return _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in mods)


class QMBConv(_QBlock):
    """Int8 inverted residual: [expand 1x1 + act] -> depthwise + act -> [SE, float32] -> project
    1x1 [+ input], on the qconv kernels. Without SE the depthwise and the projection are one
    fused ``q_dwsep_conv``; with SE ``q_dw_conv_act`` gives the channel sums for the pool and
    ``q_pw_conv`` applies the gates to its input codes."""

    def __init__(self, in_scale: float, in_zp: int, expand: Optional[QStage], dw: QStage, se: Optional[nn.Module],
                 project: QStage, skip: bool, stride, padding):
        super().__init__()
        self.se = se
        self.skip = bool(skip)
        self._init(in_scale, in_zp, (("expand", expand), ("dw", dw), ("project", project)), stride, padding)

    def _refresh(self) -> None:
        super()._refresh()
        self._se_of = se = getattr(self, "se", None)  # what _se_args / _se_mods were made from
        self._se_args = _se_args(se)
        self._se_mods = tuple(se.modules()) if se is not None else ()
        self._plan = self._make_plan()
        self._geom = {}  # (H, W) -> (pad, Ho, Wo) of the plan's calls

    def __getstate__(self):  # copy.deepcopy / pickle: the plan (C++, pointers into the buffers) is made anew
        state = self.__dict__.copy()
        state.pop("_plan", None)
        state.pop("_geom", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._refresh()

    def _make_plan(self):
        """The block's C++ plan (_C.QBlockPlan: one call per block, the same kernels and integers
        as the op-by-op path) when every array is a dense CPU tensor and the SE is one the plan
        runs (q_se_gates'), else None."""
        C = _c_module()
        if C is None or not hasattr(C, "QBlockPlan") or (self.se is not None and self._se_args is None):
            return None
        se = self._se_args or (None, None, 0, None, None, 5)
        d, p = self._cfg["dw"], self._cfg["project"]
        e = self._cfg.get("expand")
        arrays = {
            "expand_w": self.expand_weight.flatten(1) if e else None, "expand_bias": self.expand_bias if e else None,
            "expand_mult": self.expand_mult if e else None, "expand_lut": self.expand_lut if e else None,
            "expand_packed": self._packed.get("expand"), "taps": self.dw_weight[:, 0], "dw_bias": self.dw_bias,
            "dw_mult": self.dw_mult, "dw_lut": self.dw_lut, "se_w1": se[0], "se_b1": se[1], "se_w2": se[3],
            "se_b2": se[4], "project_w": self.project_weight.flatten(1), "project_bias": self.project_bias,
            "project_mult": self.project_mult, "project_lut": self.project_lut, "project_packed": self._packed.get("project"),
        }
        if any(t is not None and (t.device.type != "cpu" or not t.is_contiguous()) for t in arrays.values()):
            return None  # (the plan reads the arrays in place: no copies that would miss in-place edits)
        caps = {k: None if t is None else _to_dlpack(t.detach()) for k, t in arrays.items()}
        return C.QBlockPlan(
            self._in[1], caps["expand_w"], caps["expand_bias"], caps["expand_mult"], caps["expand_lut"],
            caps["expand_packed"], list(e[:4]) if e else [0, 0, 255, 0], caps["taps"], caps["dw_bias"], caps["dw_mult"],
            caps["dw_lut"], list(d[:4]), list(self.stride), caps["se_w1"], caps["se_b1"], se[2], caps["se_w2"],
            caps["se_b2"], se[5], d[4], caps["project_w"], caps["project_bias"], caps["project_mult"],
            caps["project_lut"], caps["project_packed"], list(p[:4]), self.skip, self._in[0] / p[4])

    def _run_plan(self, xq: Tensor) -> Optional[Tensor]:
        """The block through its plan (eager, CPU backend, no hooks on the SE), else None."""
        if (self._plan is None or not _PLANS or torch.compiler.is_compiling() or xq.device.type != "cpu"
                or _backend.forced_backend() not in (None, "cpu")
                or (self.se is not None and _se_hooked(self._se_mods))):
            return None
        N, _, H, W = xq.shape
        g = self._geom.get((H, W))
        if g is None:
            pad = self._geometry(xq)[1]
            g = self._geom[(H, W)] = (pad, *self._plan.output_hw(H, W, pad))
        out = torch.empty((N, g[1], g[2], self.project_weight.shape[0]), dtype=torch.uint8)
        xc = xq if xq.is_contiguous(memory_format=torch.channels_last) else xq.contiguous(memory_format=torch.channels_last)
        profiled("effops::q_mbconv_block", self._plan.run, _to_dlpack(xc.permute(0, 2, 3, 1)), _to_dlpack(out), g[0],
                 _qc._threads())
        return out.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        xq = self._codes_in(x)
        if self._se_of is not self.se:  # the SE module was replaced after construction
            self._refresh()
        out = self._run_plan(xq)
        if out is not None:
            return self._out(out)
        h, h_zp = xq, self._in[1]
        if "expand" in self._cfg:
            e = self._cfg["expand"]
            h = _q_call("q_pw_conv", _qc._pw_impl, h, self.expand_weight, self.expand_bias, self.expand_mult,
                        self.expand_lut, None, None, h_zp, e[0], e[1], e[2], 0, 1.0, self._packed["expand"],
                        scratch="expanded")
            h_zp = e[3]
        residual = xq if self.skip else None
        if self.se is None:
            return self._out(self._dwsep(h, h_zp, residual))
        stride, pad = self._geometry(h)
        d, p = self._cfg["dw"], self._cfg["project"]
        y, sums = _q_call("q_dw_conv_act", _qc._dw_impl, h, self.dw_weight, self.dw_bias, self.dw_mult, self.dw_lut,
                          stride, pad, h_zp, d[0], d[1], d[2], scratch="depthwise")
        if self._se_args is not None and not _se_hooked(self._se_mods):  # one op (C++ on the CPU): means + MLP
            gates = _q_call("q_se_gates", _qc._se_impl, sums, y.shape[2] * y.shape[3], d[3], d[4], *self._se_args)
        else:
            means = (sums.to(torch.float32) / float(y.shape[2] * y.shape[3]) - d[3]) * d[4]
            gates = se_gate_of(self.se)(means[:, :, None, None])[:, :, 0, 0].to(torch.float32).contiguous()
        out = _q_call("q_pw_conv", _qc._pw_impl, y, self.project_weight, self.project_bias, self.project_mult,
                      self.project_lut, gates, residual, d[3], p[0], p[1], p[2], self._in[1], self._in[0] / p[4],
                      self._packed["project"])
        return self._out(out)


class QDWSeparableConv2d(_QBlock):
    """Int8 ``DWSeparableConv2d``: depthwise + act -> pointwise + pw_act, one fused kernel."""

    def __init__(self, in_scale: float, in_zp: int, dw: QStage, project: QStage, stride, padding):
        super().__init__()
        self._init(in_scale, in_zp, (("dw", dw), ("project", project)), stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self._out(self._dwsep(self._codes_in(x), self._in[1], None))


class QConv2d(Refreshing):
    """Int8 form of one dense conv stage of an ``effops.models`` EfficientNet: conv + BN (folded)
    + swish (a table), as one kernel - the stem (``conv_stem`` + ``bn1``: 3x3 stride 2, patches
    built in cache and the pointwise GEMM, ``q_conv2d``) and the classifier's head conv
    (``conv_head`` + ``bn2``: 1x1, ``q_pw_conv``). Float in (quantised at its input parameters) or
    the codes at those; float32 out, or the codes when ``chain_out`` (the stem, when the first
    block reads them). The models call it in place of conv + BN + act (``includes_bn_act``); the BN
    module stays in the tree, unused."""

    includes_bn_act = True

    def __init__(self, in_scale: float, in_zp: int, stage: QStage, stride=(1, 1), padding=(0, 0)):
        super().__init__()
        self.register_buffer("in_scale", torch.tensor(float(in_scale), dtype=torch.float64))
        self.register_buffer("in_zp", torch.tensor(int(in_zp), dtype=torch.int64))
        self.register_buffer("weight", stage.weight.clone())  # [Co, C, KH, KW] int8
        self.register_buffer("bias", stage.bias.clone())
        self.register_buffer("mult", stage.mult.clone())
        self.register_buffer("lut", None if stage.lut is None else stage.lut.clone())
        self.register_buffer("cfg", torch.tensor([stage.zp, stage.qmin, stage.qmax, stage.ozp], dtype=torch.int64))
        self.register_buffer("out_scale", torch.tensor(float(stage.scale), dtype=torch.float64))
        self.register_buffer("chain_out", torch.tensor(False))
        self.stride = tuple(int(v) for v in stride)
        self.padding = padding
        self._refresh()

    def _refresh(self) -> None:
        self._in = (float(self.in_scale), int(self.in_zp))
        self._cfg = tuple(int(v) for v in self.cfg.tolist()) + (float(self.out_scale),)
        self._chain = bool(self.chain_out)
        k = tuple(self.weight.shape[2:])
        self._pointwise = k == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), 0, "valid", "same")
        self._wp = self.weight if self._pointwise else _qc.patch_weight(self.weight)
        self._packed = pack_pw(self._wp, self.bias, self._in[1])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    def in_qparams(self) -> Tuple[float, int]:
        return self._in

    def out_qparams(self) -> Tuple[float, int]:
        return self._cfg[4], self._cfg[3]

    def set_chain_out(self, on: bool) -> None:
        """Return uint8 codes (at out_qparams) instead of float: for a next block whose input
        parameters are these."""
        self.chain_out.fill_(bool(on))
        self._refresh()

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: x must be a tensor [N, {self.in_channels}, H, W], got {got}")
        if x.dtype != torch.uint8:
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name}: x must be a float tensor or uint8 codes, got {x.dtype}")
            x = quantize_tensor(x.float(), *self._in)
        zp, qmin, qmax, ozp, _ = self._cfg
        if self._pointwise:
            q = _q_call("q_pw_conv", _qc._pw_impl, x, self.weight, self.bias, self.mult, self.lut, None, None,
                        self._in[1], zp, qmin, qmax, 0, 1.0, self._packed)
        else:
            k = self.weight.shape[2:]
            g = conv_geometry(name, x.shape[2:], k, self.stride, self.padding, 1)
            q = _qc.conv2d_patched(x, self._wp, k, self.bias, self.mult, self.lut, list(g.stride), list(g.pad),
                                   self._in[1], zp, qmin, qmax, self._packed)
        if self._chain:
            return q
        return dequantize_tensor(q, *self.out_qparams())

    def extra_repr(self) -> str:
        k = tuple(self.weight.shape[2:])
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={k}, stride={self.stride}, "
                f"padding={self.padding!r}, in=(scale={self._in[0]:.4g}, zp={self._in[1]}), "
                f"out=(scale={self._cfg[4]:.4g}, zp={self._cfg[3]}), chain_out={self._chain}")


__all__ = ["QStage", "QMBConv", "QDWSeparableConv2d", "QConv2d", "quantize_tensor", "dequantize_tensor",
           "release_scratch"]
