"""A whole inverted-residual block in eager CPU inference as one kernel call.

MBConv and DepthwiseSeparableBlock run three fused ops per call in inference (expand pw_conv,
dw_conv_act with the pooled means, pw_conv with the SE gates and the residual) with the SE MLP
in torch between them. At batch 1 the Python around the kernels is a large share: measured on
EfficientNet-B0 (1 thread, AVX-512 EPYC), the 7x7 block 192 -> 1152 -> 192 took 714 us of which
the kernels ~600; over the network ~4.4 ms of a 13.8 ms forward was outside the kernels
(the per-op prepared-weight cache checks, argument conversion to DLPack, five torch calls for
the SE MLP, two allocations). A block plan (``effops._C.BlockPlan``) holds the block's kernel
arguments, converted once; a call checks one key (identity, version and shape of every
parameter and buffer the block reads, and its options), then one C++ call checks the contents
of the sources held as copies (writes through ``.data`` bypass the version counter), runs the
three kernels and the SE MLP, and keeps the intermediates in reused buffers.

Numerics are the op-by-op path's: the same kernels on the same prepared arguments, the pooled
means and the gates rounded to the input dtype as there; only the SE MLP's dot products are
summed in another order (float32).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.dlpack import to_dlpack as _to_dlpack

from .. import _backend
from ..ops._common import profiled
from ..ops.dwsep import ACT_CODES, _dw_weights, _pw_weights, _threads, conv_geometry
from ._parts import Unsupported, _global_hooks, act_of, fold_bn

_FAST = (torch.float32, torch.bfloat16)


def _none():
    return None


class _Plan:
    """c: the C++ plan, or None for a key whose block cannot be planned (not retried until the
    key changes). A copy (deepcopy, pickle) of a module drops its plan: it holds raw addresses."""

    __slots__ = ("key", "c", "keep", "geo", "co", "padding", "k", "stride", "dilation")

    def __init__(self, key, c=None):
        self.key, self.c = key, c

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return _none, ()


def _hooked(m: Optional[nn.Module]) -> bool:
    return m is not None and bool(m._forward_hooks or m._forward_pre_hooks)


# The SE layouts the C++ MLP runs (reduce conv, activation, expand conv, gate): effops's and
# timm's SqueezeExcite, torchvision's SqueezeExcitation. Anything else: the op path.
_SE_LAYOUTS = (("conv_reduce", "act1", "conv_expand", "gate"), ("fc1", "activation", "fc2", "scale_activation"))


def _se_convs(se):
    """(reduce conv, expand conv) of an SE of a known layout, else (None, None)."""
    m = se._modules
    for r, _, e, _ in _SE_LAYOUTS:
        if r in m and e in m:
            return m[r], m[e]
    return None, None


def _se_parts(se):
    """(reduce conv, act, expand conv, gate) of an SE effops can run in C++, else Unsupported."""
    if se is None:
        return None
    names = set(se._modules)
    pool = se._modules.get("avgpool")  # torchvision's: a global average pool, what the means are
    if pool is not None:
        if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
            raise Unsupported("squeeze-excite pool")
        names.discard("avgpool")
    for layout in _SE_LAYOUTS:
        if names == set(layout):
            break
    else:
        raise Unsupported("squeeze-excite layout")
    r, a, e, g = (se._modules[n] for n in layout)
    for c in (r, e):
        if (type(c) is not nn.Conv2d or c.kernel_size != (1, 1) or c.groups != 1 or c.stride != (1, 1)
                or c.padding not in ((0, 0), "valid", "same") or c.dilation != (1, 1)):
            raise Unsupported("squeeze-excite convs")
    if _gate_code(g) is None:
        raise Unsupported("squeeze-excite gate")
    act_of(a)
    return r, a, e, g


_HARD_SIGMOID = 6  # BlockPlan::kGateHardSigmoid: relu6(v + 3) / 6


def _gate_code(g) -> Optional[int]:
    if type(g).__name__ in ("Hardsigmoid", "HardSigmoid", "HardSigmoidMe"):
        return _HARD_SIGMOID
    try:
        return ACT_CODES["sigmoid"] if act_of(g) == "sigmoid" else None
    except Unsupported:
        return None


def block_forward(cache: dict, x: Tensor, expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding,
                  se, proj_conv, proj_bn, proj_act, skip: bool) -> Optional[Tensor]:
    """The block's output via its plan, or None where the plan does not apply (the caller runs
    its op-by-op path): not a plain eager CPU float32/bfloat16 channels_last inference call, a
    BN in training mode, hooks on the SE convs (the op path calls them), an SE the C++ MLP does
    not reproduce."""
    if (type(x) is not Tensor or not x.is_cpu or x.dtype not in _FAST or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last) or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or _get_current_dispatch_mode() is not None
            or _backend._C is None or _backend.forced_backend() not in (None, "cpu")):
        return None
    if (dw_bn is not None and dw_bn.training) or (proj_bn is not None and proj_bn.training) or (
            expand_bn is not None and expand_bn.training):
        return None
    r = e = None
    if se is not None:
        r, e = _se_convs(se)
        if r is None:
            return None
        if _hooked(r) or _hooked(e) or _global_hooks():
            return None
    src = [dw_conv.weight, dw_conv.bias, proj_conv.weight, proj_conv.bias]
    for bn in (expand_bn, dw_bn, proj_bn):
        if bn is not None:
            src += (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if expand_conv is not None:
        src += (expand_conv.weight, expand_conv.bias)
    if r is not None:
        src += (r.weight, r.bias, e.weight, e.bias)
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in src)):
        return None
    try:  # an inference tensor has no version counter: no plan for it
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.shape, t.dtype) for t in src)
    except RuntimeError:
        return None
    key += (padding, dw_conv.stride, dw_conv.dilation, dw_conv.groups, type(expand_act), type(dw_act),
            type(proj_act), skip,
            None if se is None else tuple(type(m) for m in se._modules.values()),
            tuple(None if bn is None else bn.eps for bn in (expand_bn, dw_bn, proj_bn)))
    p = cache.get("plan")
    if p is None or p.key != key:
        p = _build(key, src, expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding, se, proj_conv,
                   proj_bn, proj_act, skip)
        cache["plan"] = p
    if p.c is None:
        return None
    N, _, H, W = x.shape
    g = p.geo.get((H, W))
    if g is None:
        cg = conv_geometry("MBConv", (H, W), p.k, p.stride, p.padding, p.dilation)
        g = p.geo[(H, W)] = (*cg.pad, *cg.out_hw)
    out = torch.empty((N, p.co, g[4], g[5]), dtype=x.dtype, memory_format=torch.channels_last)
    ok = profiled("effops::mbconv_block", p.c.run, _to_dlpack(x.permute(0, 2, 3, 1)),
                  _to_dlpack(out.permute(0, 2, 3, 1)), g[0], g[1], g[2], g[3], _threads())
    if not ok:  # a source changed behind the version counter: prepare again
        cache.pop("plan", None)
        return block_forward(cache, x, expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding, se,
                             proj_conv, proj_bn, proj_act, skip)
    return out


def _build(key, src, expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding, se, proj_conv, proj_bn,
           proj_act, skip):
    if any(t is not None and (not t.is_cpu or not t.is_contiguous()) for t in src):
        return _Plan(key)
    try:
        parts = _se_parts(se)
        acts = [ACT_CODES[act_of(a)] for a in (expand_act, dw_act, proj_act)]
    except Unsupported:
        return _Plan(key)
    if dw_conv.groups != dw_conv.in_channels or dw_conv.out_channels != dw_conv.in_channels:
        return _Plan(key)
    like = torch.empty(0)  # the prepared arguments are float32 for float32 and bfloat16 inputs
    arrays = []

    def keep(t):
        if t is not None:
            arrays.append(t)
        return t

    ew = es = eb = None
    if expand_conv is not None:
        ew, es, eb = map(keep, _pw_weights(like, expand_conv.weight.detach(), *fold_bn(expand_bn, expand_conv.bias)))
    taps, ds, db = map(keep, _dw_weights(like, dw_conv.weight.detach(), *fold_bn(dw_bn, dw_conv.bias)))
    pw, ps, pb = map(keep, _pw_weights(like, proj_conv.weight.detach(), *fold_bn(proj_bn, proj_conv.bias)))
    se_args = (None, None, 0, None, None, 0)
    if parts is not None:
        r, a, e, g = parts
        rw = keep(r.weight.detach().flatten(1).float().contiguous())
        ew2 = keep(e.weight.detach().flatten(1).float().contiguous())
        rb = keep(None if r.bias is None else r.bias.detach().float().contiguous())
        eb2 = keep(None if e.bias is None else e.bias.detach().float().contiguous())
        se_args = (rw, rb, ACT_CODES[act_of(a)], ew2, eb2, _gate_code(g))
    arrays = [t.detach() for t in arrays]
    in_place = {t.data_ptr() for t in arrays}
    sources = [t.detach() for t in src if t is not None and t.data_ptr() not in in_place]
    copies = [t.clone() for t in sources]

    def cap(t):
        return None if t is None else _to_dlpack(t.detach())

    p = _Plan(key)
    p.c = getattr(_backend._C, "_module", _backend._C).BlockPlan(
        cap(ew), cap(es), cap(eb), acts[0] if expand_conv is not None else 0, cap(taps), cap(ds), cap(db), acts[1],
        list(dw_conv.stride), list(dw_conv.dilation), cap(se_args[0]), cap(se_args[1]), se_args[2],
        cap(se_args[3]), cap(se_args[4]), se_args[5], cap(pw), cap(ps), cap(pb), acts[2], bool(skip),
        [t.data_ptr() for t in sources], [t.data_ptr() for t in copies],
        [t.numel() * t.element_size() for t in sources])
    p.keep = (arrays, sources, copies)
    p.geo = {}
    p.co = pw.shape[0]
    p.padding, p.k, p.stride, p.dilation = padding, tuple(dw_conv.kernel_size), tuple(dw_conv.stride), tuple(
        dw_conv.dilation)
    return p
