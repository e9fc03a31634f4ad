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

import threading
from collections import OrderedDict
from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.dlpack import to_dlpack as _to_dlpack

from .. import _backend
from ..ops._common import custom_op, profiled
from ..ops.dwsep import ACT_CODES, _dw_weights, _pw_weights, _threads, conv_geometry
from ._parts import Unsupported, _global_hooks, act_of, fold_bn_tensors

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


# The block's tensors in fixed positions (None where absent): what a plan is keyed on and made from.
_DW_W, _DW_B, _PJ_W, _PJ_B, _EBN, _DBN, _PBN, _EX_W, _EX_B, _SE = 0, 1, 2, 3, 4, 8, 12, 16, 18, 20
_N_SRC = 24


def _attr(m: nn.Module, name: str):
    """m.<name> for a parameter or buffer, read from the module's dicts (nn.Module.__getattr__
    costs ~0.5 us a call, and a block reads ~20); anything else (a parametrization's property)
    through getattr."""
    d = m._parameters
    if name in d:
        return d[name]
    d = m._buffers
    if name in d:
        return d[name]
    return getattr(m, name)


def _sources(expand_conv, expand_bn, dw_conv, dw_bn, proj_conv, proj_bn, r, e) -> list:
    """The block's tensors in the fixed positions."""
    src = [None] * _N_SRC
    src[_DW_W], src[_DW_B] = _attr(dw_conv, "weight"), _attr(dw_conv, "bias")
    src[_PJ_W], src[_PJ_B] = _attr(proj_conv, "weight"), _attr(proj_conv, "bias")
    for at, bn in ((_EBN, expand_bn), (_DBN, dw_bn), (_PBN, proj_bn)):
        if bn is not None:
            src[at] = _attr(bn, "weight")
            src[at + 1] = _attr(bn, "bias")
            src[at + 2] = _attr(bn, "running_mean")
            src[at + 3] = _attr(bn, "running_var")
    if expand_conv is not None:
        src[_EX_W], src[_EX_B] = _attr(expand_conv, "weight"), _attr(expand_conv, "bias")
    if r is not None:
        src[_SE], src[_SE + 1] = _attr(r, "weight"), _attr(r, "bias")
        src[_SE + 2], src[_SE + 3] = _attr(e, "weight"), _attr(e, "bias")
    return src


def _structure(expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding, se, proj_conv, proj_bn, proj_act,
               skip):
    """(src, opts) of a block a plan can run, else None. src: its tensors in the fixed positions
    above; opts: everything else the kernels need (activation codes, SE gate, stride, dilation,
    BN eps, skip), as ints and floats. Depends on the modules only, not on tensor data, so it
    also runs while torch.compile traces."""
    for bn in (expand_bn, dw_bn, proj_bn):
        if bn is not None and (bn.training or bn.running_mean is None or bn.running_var is None):
            return None
    r = e = None
    se_act = gate = 0
    if se is not None:
        r, e = _se_convs(se)
        if r is None or _hooked(r) or _hooked(e) or _global_hooks():
            return None
        try:
            _, a, _, g = _se_parts(se)
            se_act, gate = ACT_CODES[act_of(a)], _gate_code(g)
        except Unsupported:
            return None
    if dw_conv.groups != dw_conv.in_channels or dw_conv.out_channels != dw_conv.in_channels:
        return None
    try:
        acts = [ACT_CODES[act_of(a)] for a in (expand_act, dw_act, proj_act)]
    except Unsupported:
        return None
    src = _sources(expand_conv, expand_bn, dw_conv, dw_bn, proj_conv, proj_bn, r, e)
    ints = [int(expand_conv is not None), *acts, se_act, gate, int(bool(skip)), *dw_conv.stride, *dw_conv.dilation,
            *dw_conv.kernel_size, int(expand_bn is not None), int(dw_bn is not None), int(proj_bn is not None)]
    eps = [float(bn.eps) if bn is not None else 0.0 for bn in (expand_bn, dw_bn, proj_bn)]
    return src, ints, eps


def _tensor_key(src):
    """Identity, version, shape and dtype of every tensor (RuntimeError for an inference tensor:
    it has no version counter)."""
    return tuple(None if t is None else (t.data_ptr(), t._version, t.shape, t.dtype) for t in src)


def block_forward(cache: dict, x: Tensor, expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding,
                  se, proj_conv, proj_bn, proj_act, skip: bool) -> Optional[Tensor]:
    """The block's output via its plan, or None where the plan does not apply (the caller runs
    its op-by-op path): not a plain CPU float32/bfloat16 channels_last inference call (under CPU
    bf16 autocast the input is cast to bf16 and the block runs in bf16, as the op path's casts
    do; autocast to another dtype takes the op path), a BN in
    training mode, hooks on the SE convs (the op path calls them), an SE the C++ MLP does not
    reproduce. Under torch.compile (not torch.export) the block becomes one effops::mbconv_block
    op in the graph, so a compiled effops model runs the same one call per block as eager."""
    if torch.compiler.is_compiling():
        # exported programs keep the standard ops (ONNX, other runtimes); the op runs the CPU kernels
        if (torch.compiler.is_exporting() or not x.is_cpu or x.dtype not in _FAST or x.dim() != 4
                or not x.is_contiguous(memory_format=torch.channels_last)
                or _backend._C is None or _backend.forced_backend() not in (None, "cpu")):
            return None
        if torch.is_autocast_enabled("cpu"):
            if torch.get_autocast_dtype("cpu") != torch.bfloat16:
                return None
            x = x.to(torch.bfloat16)
        N, _, H, W = x.shape
        st = _structure(expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding, se, proj_conv, proj_bn,
                        proj_act, skip)
        if st is None:
            return None
        src, ints, eps = st
        if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in src)):
            return None
        cg = conv_geometry("MBConv", (H, W), tuple(dw_conv.kernel_size), tuple(dw_conv.stride), padding,
                           tuple(dw_conv.dilation))
        return _block_op(x, src, ints + list(cg.pad), eps)
    # Eager: the cheap checks every call, the full validation (_structure) once per key.
    if (type(x) is not Tensor or not x.is_cpu or x.dtype not in _FAST or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last)
            or _get_current_dispatch_mode() is not None or _backend._C is None
            or _backend.forced_backend() not in (None, "cpu")):
        return None
    if torch.is_autocast_enabled("cpu"):  # bf16 autocast: the block in bf16, as the op path casts it
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return None
        x = x.to(torch.bfloat16)
    N, _, H, W = x.shape
    for bn in (expand_bn, dw_bn, proj_bn):
        if bn is not None and bn.training:
            return None
    r = e = None
    if se is not None:
        r, e = _se_convs(se)
        if r is None or _hooked(r) or _hooked(e) or _global_hooks():
            return None
    src = _sources(expand_conv, expand_bn, dw_conv, dw_bn, proj_conv, proj_bn, r, e)
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in src)):
        return None
    try:
        key = _tensor_key(src)
    except RuntimeError:
        return None
    key += (padding, dw_conv.stride, dw_conv.dilation, dw_conv.groups, type(expand_act), type(dw_act),
            type(proj_act), skip, None if se is None else tuple(map(type, se._modules.values())),
            None if expand_bn is None else expand_bn.eps, None if dw_bn is None else dw_bn.eps,
            None if proj_bn is None else proj_bn.eps)
    p = cache.get("plan")
    if p is None or p.key != key:
        st = _structure(expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding, se, proj_conv, proj_bn,
                        proj_act, skip)
        p = _Plan(key) if st is None else _prepare(key, *st)
        cache["plan"] = p
    if p.c is None:
        return None
    g = p.geo.get((H, W))
    if g is None:
        cg = conv_geometry("MBConv", (H, W), p.k, p.stride, padding, p.dilation)
        g = p.geo[(H, W)] = (*cg.pad, *cg.out_hw)
    out = torch.empty((N, p.co, g[4], g[5]), dtype=x.dtype, memory_format=torch.channels_last)
    ok = profiled("effops::mbconv_block", p.c.run, _to_dlpack(x.permute(0, 2, 3, 1)),
                  _to_dlpack(out.permute(0, 2, 3, 1)), g[0], g[1], g[2], g[3], _threads())
    if not ok:  # a source changed behind the version counter: prepare again
        cache.pop("plan", None)
        return block_forward(cache, x, expand_conv, expand_bn, expand_act, dw_conv, dw_bn, dw_act, padding, se,
                             proj_conv, proj_bn, proj_act, skip)
    return out


def _fold(src, at, has_bn, eps, conv_bias):
    """(scale, bias) of the BN at src[at:at + 4] after a conv with conv_bias."""
    if not has_bn:
        return None, conv_bias
    w, b, mean, var = (t.detach() if t is not None else None for t in src[at:at + 4])
    return fold_bn_tensors(w, b, mean, var, eps, None if conv_bias is None else conv_bias.detach())


def _prepare(key, src, ints, eps):
    """The C++ plan of a block from its tensors and options (a _Plan whose c is None where the
    tensors do not suit the kernels)."""
    if any(t is not None and (not t.is_cpu or not t.is_contiguous()) for t in src):
        return _Plan(key)
    has_expand, ea, da, pa, se_act, gate, skip, sh, sw, dh, dw, kh, kw, e_bn, d_bn, p_bn = ints[:16]
    like = torch.empty(0)  # the prepared arguments are float32 for float32 and bfloat16 inputs
    arrays = []

    def keep(t):
        if t is not None:
            arrays.append(t)
        return t

    ew = es = eb = None
    if has_expand:
        ew, es, eb = map(keep, _pw_weights(like, src[_EX_W].detach(), *_fold(src, _EBN, e_bn, eps[0], src[_EX_B])))
    taps, ds, db = map(keep, _dw_weights(like, src[_DW_W].detach(), *_fold(src, _DBN, d_bn, eps[1], src[_DW_B])))
    pw, ps, pb = map(keep, _pw_weights(like, src[_PJ_W].detach(), *_fold(src, _PBN, p_bn, eps[2], src[_PJ_B])))
    se_args = (None, None, 0, None, None, 0)
    if src[_SE] is not None:
        rw, rb, xw, xb = src[_SE:_SE + 4]
        se_args = (keep(rw.detach().flatten(1).float().contiguous()),
                   keep(None if rb is None else rb.detach().float().contiguous()), se_act,
                   keep(xw.detach().flatten(1).float().contiguous()),
                   keep(None if xb is None else xb.detach().float().contiguous()), gate)
    arrays = [t.detach() for t in arrays]
    in_place = {t.data_ptr() for t in arrays}
    sources = [t.detach() for t in src if t is not None and t.data_ptr() not in in_place]
    copies = [t.clone() for t in sources]

    def cap(t):
        return None if t is None else _to_dlpack(t.detach())

    p = _Plan(key)
    p.c = getattr(_backend._C, "_module", _backend._C).BlockPlan(
        cap(ew), cap(es), cap(eb), ea if has_expand else 0, cap(taps), cap(ds), cap(db), da, [sh, sw], [dh, dw],
        cap(se_args[0]), cap(se_args[1]), se_args[2], cap(se_args[3]), cap(se_args[4]), se_args[5], cap(pw), cap(ps),
        cap(pb), pa, bool(skip), [t.data_ptr() for t in sources], [t.data_ptr() for t in copies],
        [t.numel() * t.element_size() for t in sources])
    # AMX panels of a weight read in place are a copy: the plan then watches that weight's bytes
    src_ptrs = {t.data_ptr() for t in src if t is not None}
    p.c.watch_in_place(ew is not None and ew.data_ptr() in src_ptrs, pw.data_ptr() in src_ptrs)
    p.keep = (arrays, sources, copies)
    p.geo = {}
    p.co = pw.shape[0]
    p.k, p.stride, p.dilation = (kh, kw), (sh, sw), (dh, dw)
    return p


# ------------------------------------------------------------------ the block as one op for torch.compile
# Plans of the op, keyed as the modules' own (tensors' identity, version, shape, dtype; options;
# not the input size: a plan serves every size). A plan holds its tensors, so their memory is
# never reused while it is cached: a key cannot match other weights. One plan per block (its
# "slot": the same tensors and options, any versions): a new version replaces the old plan, so
# weights updated between compiled calls (training with a compiled evaluation) do not pile up
# plans holding old copies. Bounded: the least recently used plans go first (a deleted model's
# plans keep its weights alive until then).
_OP_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_OP_SLOTS: dict = {}
_OP_PLANS_MAX = 512
_OP_LOCK = threading.Lock()


def _slot(key):
    tensors, ints, eps = key
    return tuple(None if k is None else k[0] for k in tensors), ints, eps


def _op_plan(src, ints, eps) -> "_Plan":
    key = (_tensor_key(src), tuple(ints[:16]), tuple(eps))
    with _OP_LOCK:
        p = _OP_PLANS.get(key)
        if p is not None:
            _OP_PLANS.move_to_end(key)
            return p
    p = _prepare(key, src, ints, eps)
    with _OP_LOCK:
        slot = _slot(key)
        old = _OP_SLOTS.get(slot)
        if old is not None and old != key:
            _OP_PLANS.pop(old, None)
        _OP_SLOTS[slot] = key
        _OP_PLANS[key] = p
        while len(_OP_PLANS) > _OP_PLANS_MAX:
            k, _ = _OP_PLANS.popitem(last=False)
            if _OP_SLOTS.get(_slot(k)) == k:
                del _OP_SLOTS[_slot(k)]
    return p


def _drop_op_plan(p: "_Plan") -> None:
    with _OP_LOCK:
        if _OP_PLANS.get(p.key) is p:
            del _OP_PLANS[p.key]
            if _OP_SLOTS.get(_slot(p.key)) == p.key:
                del _OP_SLOTS[_slot(p.key)]


@custom_op("effops::mbconv_block", "(Tensor x, Tensor?[] src, SymInt[] ints, float[] eps) -> Tensor")
def _block_op(x: Tensor, src: List[Optional[Tensor]], ints: List[int], eps: List[float]) -> Tensor:
    """A whole inverted-residual block in inference (effops.nn._plan): x channels_last float32 or
    bfloat16 on the CPU; src / ints / eps as _structure makes them, ints followed by the depthwise
    conv's pads (top, bottom, left, right)."""
    p = _op_plan(src, ints, eps)
    if p.c is None:
        raise RuntimeError("effops::mbconv_block: these tensors cannot run as one block (not CPU contiguous)")
    pt, pb, pl, pr = ints[16:20]
    Ho, Wo = p.c.output_hw(x.shape[2], x.shape[3], pt, pb, pl, pr)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((x.shape[0], p.co, Ho, Wo), dtype=x.dtype, memory_format=torch.channels_last)
    if not p.c.run(_to_dlpack(xc.permute(0, 2, 3, 1)), _to_dlpack(out.permute(0, 2, 3, 1)), pt, pb, pl, pr,
                   _threads()):  # a source changed behind the version counter
        _drop_op_plan(p)
        return _block_op(x, src, ints, eps)
    return out


@_block_op.register_fake
def _(x, src, ints, eps):
    sh, sw, dh, dw, kh, kw = ints[7:13]
    pt, pb, pl, pr = ints[16:20]
    Ho = (x.shape[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    Wo = (x.shape[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return x.new_empty((x.shape[0], src[_PJ_W].shape[0], Ho, Wo)).contiguous(memory_format=torch.channels_last)
