"""BiFPN weighted feature fusion: ``weighted_fuse``.

One BiFPN node resamples its 2-4 inputs to the node's resolution and combines them with learned
non-negative weights (EfficientDet, Tan et al. 2020)::

    fastattn: out = act( sum_i relu(w_i) R_i(x_i) / (sum_j relu(w_j) + eps) )
    attn:     out = act( sum_i softmax(w)_i R_i(x_i) )
    sum:      out = act( sum_i R_i(x_i) )

Resample modes R_i, computed while reading (no resampled copy is written):

* ``'identity'``  - the input is at the output size;
* ``'nearest'``   - nearest-neighbour upsampling with ``F.interpolate(mode='nearest')``'s index
  rule (src = min(floor(dst * in / out), in - 1), the ratio in float32), any integer factor;
* ``'maxpool'``   - 3x3 max pool, stride 2, TensorFlow 'same' padding with -inf (effdet's
  ``MaxPool2dSame``, tf_ models): output ceil(H / 2), e.g. 25 -> 13;
* ``'maxpool_sym'`` - 3x3 max pool, stride 2, padding 1 (``nn.MaxPool2d(3, 2, 1)``, effdet's
  non-tf models). NaN propagates through both pools as in torch.

The weight normalisation is done in float64 by differentiable torch ops on the k weights (by
Python floats, the same arithmetic, on the eager CPU inference path); the kernels receive the
normalised weights and return the gradient with respect to them. Inputs of
float32/bfloat16 (and float16 on CUDA/Triton) are accumulated in float32.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ._common import MAX_SIZE, EffopsInputError, EffopsTypeError, check_real, check_tensor, custom_op, profiled
from .dwsep import (ACT_CODES, _autocast, _check_x, _fast_path_ok, _from_nhwc, _nhwc, act_grad, act_name, apply_act,
                    same_padding)

_backend.register_op("weighted_fuse", ("cpu", "cuda", "triton", "reference"))

METHODS = ("fastattn", "attn", "sum")
MODES = ("identity", "nearest", "maxpool", "maxpool_sym")
MODE_CODES = {m: i for i, m in enumerate(MODES)}


# =============================================================================== geometry
def resampled_size(mode: str, h: int, w: int, out: Optional[Tuple[int, int]] = None) -> Optional[Tuple[int, int]]:
    """The size mode maps (h, w) to; for 'nearest' the output size itself (any larger size)."""
    if mode == "identity":
        return h, w
    if mode in ("maxpool", "maxpool_sym"):
        return -(-h // 2), -(-w // 2)  # TF same: ceil(n/2); padding 1: floor((n - 1) / 2) + 1, equal
    return out


def nearest_index(dst: Tensor, n_in: int, n_out: int) -> Tensor:
    """ATen's nearest source index: min(floor(dst * (float)n_in / n_out), n_in - 1)."""
    if n_in == n_out:
        return dst
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    return torch.clamp(torch.floor(dst.to(torch.float32) * scale).to(torch.int64), max=n_in - 1)


def maxpool_pads(mode: str, h: int, w: int) -> Tuple[int, int]:
    """(top, left) padding of the 3x3 stride-2 pool."""
    if mode == "maxpool_sym":
        return 1, 1
    return same_padding(h, 3, 2, 1)[0], same_padding(w, 3, 2, 1)[0]


# =============================================================================== reference
def resample_reference(x: Tensor, mode: str, out_hw: Tuple[int, int]) -> Tensor:
    if mode == "identity":
        return x
    if mode == "nearest":
        return F.interpolate(x, size=out_hw, mode="nearest")
    if mode == "maxpool":
        ph = same_padding(x.shape[2], 3, 2, 1)
        pw = same_padding(x.shape[3], 3, 2, 1)
        return F.max_pool2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=-math.inf), 3, 2)
    if mode == "maxpool_sym":
        return F.max_pool2d(x, 3, 2, 1)
    raise ValueError(mode)


def normalize_weights(weights: Optional[Tensor], method: str, k: int, eps: float, device) -> Tensor:
    """The k normalised fusion weights, float64, differentiable."""
    dt = torch.float64
    if method == "sum":
        return torch.ones(k, dtype=dt, device=device)
    w = weights.to(dt)
    if method == "attn":
        return torch.softmax(w, dim=0)
    r = torch.relu(w)
    return r / (r.sum() + eps)


def normalized_floats(weights: Optional[Tensor], method: str, k: int, eps: float) -> List[float]:
    """``normalize_weights`` as Python floats (CPU weights; no autograd)."""
    if method == "sum":
        return [1.0] * k
    w = weights.tolist()
    if method == "attn":
        m = max(w)
        e = [math.exp(v - m) for v in w]
        s = sum(e)
        return [v / s for v in e]
    r = [0.0 if v <= 0 else v for v in w]  # relu; NaN stays NaN
    s = sum(r) + eps
    if s == 0:  # every weight <= 0 and eps == 0: 0 / 0, NaN as in torch (Python would raise)
        return [math.nan] * k
    return [v / s for v in r]


def weighted_fuse_reference(inputs: Sequence[Tensor], wn: Tensor, modes: Sequence[str], act: str,
                            out_hw: Tuple[int, int]) -> Tensor:
    """act(sum_i wn[i] * R_i(inputs[i])) in the inputs' dtype (differentiable)."""
    out = None
    for x, m, w in zip(inputs, modes, wn):
        t = resample_reference(x, m, out_hw) * w.to(x.dtype)
        out = t if out is None else out + t
    return apply_act(out, act)


# =============================================================================== CPU backend
def _threads() -> int:
    return max(1, torch.get_num_threads())


def _empty_like_out(x: Tensor, out_hw, dtype=None) -> Tensor:
    """An NHWC buffer [N, Ho, Wo, C] (its permute(0, 3, 1, 2) is a channels_last NCHW tensor)."""
    N, C = x.shape[:2]
    return torch.empty((N, out_hw[0], out_hw[1], C), dtype=dtype or x.dtype, device=x.device)


def _fuse_cpu(inputs, wn, modes, act, out_hw):
    out = _empty_like_out(inputs[0], out_hw)
    _backend._C.fuse_forward([_nhwc(x) for x in inputs], wn.detach().double().tolist(),
                             [MODE_CODES[m] for m in modes], ACT_CODES[act], out, _threads())
    return _from_nhwc(out)


def _fuse_backward_cpu(grad, inputs, wn, modes, act, out_hw):
    acc = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    grads = [torch.empty((x.shape[0], x.shape[1], *x.shape[2:]), dtype=acc, device=x.device,
                         memory_format=torch.channels_last).permute(0, 2, 3, 1) for x in inputs]
    gwn = torch.empty(len(inputs), dtype=torch.float64)
    _backend._C.fuse_backward(_nhwc(grad.to(acc)), [_nhwc(x) for x in inputs], wn.detach().double().tolist(),
                              [MODE_CODES[m] for m in modes], ACT_CODES[act], grads, gwn, _threads())
    return [_from_nhwc(g) for g in grads], gwn


def _cuda_geometry(inputs, modes, out_hw):
    """Per input: kernel mode (identity 0, nearest 1, pool 2), nearest ratios, pool pads."""
    codes, scales, pads = [], [], []
    for x, m in zip(inputs, modes):
        H, W = x.shape[2:]
        codes.append({"identity": 0, "nearest": 1}.get(m, 2))
        scales += [float(torch.tensor(H, dtype=torch.float32) / out_hw[0]),
                   float(torch.tensor(W, dtype=torch.float32) / out_hw[1])]
        pads += list(maxpool_pads(m, H, W)) if m.startswith("maxpool") else [0, 0]
    return codes, scales, pads


def _fuse_cuda(inputs, wn, modes, act, out_hw):
    out = _empty_like_out(inputs[0], out_hw)
    x0 = inputs[0]
    _backend._cuda.fuse_forward([_nhwc(x) for x in inputs], wn.detach().float().contiguous(),
                                *_cuda_geometry(inputs, modes, out_hw), ACT_CODES[act], out,
                                torch.cuda.current_stream(x0.device).cuda_stream, x0.device.index)
    return _from_nhwc(out)


def _fuse_backward_cuda(grad, inputs, wn, modes, act, out_hw):
    x0 = inputs[0]
    g = _nhwc(grad.float())
    gpre = torch.empty_like(g)
    blocks = -(-g.numel() // _backend._cuda.fuse_threads)
    part = torch.empty(blocks, 4, dtype=torch.float32, device=x0.device)
    grads = [torch.empty(x.shape[0], x.shape[2], x.shape[3], x.shape[1], dtype=torch.float32, device=x.device)
             for x in inputs]
    w = wn.detach().float().contiguous()
    _backend._cuda.fuse_backward(g, [_nhwc(x) for x in inputs], w, *_cuda_geometry(inputs, modes, out_hw),
                                 ACT_CODES[act], gpre, part, grads, torch.cuda.current_stream(x0.device).cuda_stream,
                                 x0.device.index)
    grads = [gpre * w[i] if m == "identity" else g_ for i, (m, g_) in enumerate(zip(modes, grads))]
    return [_from_nhwc(t) for t in grads], part.double().sum(0)[: len(inputs)]


def _fuse_triton(inputs, wn, modes, act, out_hw):
    from ..triton import bifpn as tb

    out = tb.fuse_forward([_nhwc(x) for x in inputs], wn.detach().float().contiguous(), modes, ACT_CODES[act], out_hw)
    return _from_nhwc(out)


def _fuse_backward_triton(grad, inputs, wn, modes, act, out_hw):
    from ..triton import bifpn as tb

    grads, gwn = tb.fuse_backward(_nhwc(grad.float()), [_nhwc(x) for x in inputs], wn.detach().float().contiguous(),
                                  modes, ACT_CODES[act], out_hw)
    return [_from_nhwc(g) for g in grads], gwn


def _select(inputs) -> str:
    b = _backend.select("weighted_fuse", inputs[0].device)
    if b in ("triton", "cuda") and inputs[0].dtype == torch.float64:
        return "reference"  # the GPU kernels compute in float32 at most
    return b


def _fuse_backward_reference(grad, inputs, wn, modes, act, out_hw):
    """Explicit adjoints (custom-op bodies run below autograd): identity, nearest (scatter-add of
    the index map), max pools (max_pool2d's own backward on the padded input)."""
    acc = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    xs = [x.to(acc) for x in inputs]
    terms = [resample_reference(x, m, out_hw) for x, m in zip(xs, modes)]
    pre = sum(t * w.to(acc) for t, w in zip(terms, wn))
    gpre = grad.to(acc) * act_grad(pre, act)
    gwn = torch.stack([(gpre * t).sum() for t in terms]).to(torch.float64)
    grads = []
    for x, m, w in zip(xs, modes, wn):
        g = gpre * w.to(acc)
        if m == "identity":
            gx = g
        elif m == "nearest":
            H, W = x.shape[2:]
            ih = nearest_index(torch.arange(out_hw[0]), H, out_hw[0])
            iw = nearest_index(torch.arange(out_hw[1]), W, out_hw[1])
            flat = (ih[:, None] * W + iw[None, :]).reshape(-1).to(x.device)
            gx = torch.zeros(x.shape[0], x.shape[1], H * W, dtype=acc, device=x.device)
            gx.index_add_(2, flat, g.reshape(x.shape[0], x.shape[1], -1))
            gx = gx.view_as(x)
        else:
            if m == "maxpool":
                ph, pw = same_padding(x.shape[2], 3, 2, 1), same_padding(x.shape[3], 3, 2, 1)
            else:
                ph = pw = (1, 1)
            xp = F.pad(x, (pw[0], pw[1], ph[0], ph[1]), value=-math.inf)
            _, idx = F.max_pool2d(xp, 3, 2, return_indices=True)
            gp = torch.zeros_like(xp).reshape(x.shape[0], x.shape[1], -1)
            gp.scatter_add_(2, idx.reshape(x.shape[0], x.shape[1], -1), g.reshape(x.shape[0], x.shape[1], -1))
            gx = gp.view_as(xp)[:, :, ph[0]:ph[0] + x.shape[2], pw[0]:pw[0] + x.shape[3]]
        grads.append(gx)
    return grads, gwn


# =============================================================================== custom ops
def _out_hw_of(out_size: List[int]) -> Tuple[int, int]:
    return int(out_size[0]), int(out_size[1])


def _like(out: Tensor, x: Tensor) -> Tensor:
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@custom_op(
    "effops::weighted_fuse",
    "(Tensor[] inputs, Tensor wn, SymInt[] mode_codes, SymInt[] out_size, str act) -> Tensor",
)
def _fuse_op(inputs: List[Tensor], wn: Tensor, mode_codes: List[int], out_size: List[int], act: str) -> Tensor:
    out_hw = _out_hw_of(out_size)
    modes = [MODES[c] for c in mode_codes]
    backend = _select(inputs)
    if backend == "cpu":
        out = _fuse_cpu(inputs, wn, modes, act, out_hw)
    elif backend == "cuda":
        out = _fuse_cuda(inputs, wn, modes, act, out_hw)
    elif backend == "triton":
        out = _fuse_triton(inputs, wn, modes, act, out_hw)
    else:
        out = weighted_fuse_reference(inputs, wn, modes, act, out_hw)
    return _like(out, inputs[0])


@_fuse_op.register_fake
def _(inputs, wn, mode_codes, out_size, act):
    x = inputs[0]
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = x.new_empty((x.shape[0], x.shape[1], *_out_hw_of(out_size)))
    return out.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@custom_op(
    "effops::weighted_fuse_backward",
    "(Tensor grad, Tensor[] inputs, Tensor wn, SymInt[] mode_codes, SymInt[] out_size, str act) "
    "-> (Tensor[], Tensor)",
)
def _fuse_bwd_op(grad: Tensor, inputs: List[Tensor], wn: Tensor, mode_codes: List[int], out_size: List[int],
                 act: str) -> Tuple[List[Tensor], Tensor]:
    out_hw = _out_hw_of(out_size)
    modes = [MODES[c] for c in mode_codes]
    fn = {"cpu": _fuse_backward_cpu, "cuda": _fuse_backward_cuda, "triton": _fuse_backward_triton}.get(
        _select(inputs), _fuse_backward_reference)
    grads, gwn = fn(grad, inputs, wn, modes, act, out_hw)
    return [_like(g.to(x.dtype), x) for g, x in zip(grads, inputs)], gwn.to(wn.dtype).to(wn.device)


@_fuse_bwd_op.register_fake
def _(grad, inputs, wn, mode_codes, out_size, act):
    return [torch.empty_like(x) for x in inputs], torch.empty_like(wn)


def _fuse_setup(ctx, inputs, output):
    xs, wn, modes, out_size, act = inputs
    ctx.save_for_backward(*xs, wn)
    ctx.cfg = (len(xs), modes, out_size, act)


def _fuse_backward(ctx, grad):
    k, modes, out_size, act = ctx.cfg
    saved = ctx.saved_tensors
    xs, wn = list(saved[:k]), saved[k]
    grads, gwn = torch.ops.effops.weighted_fuse_backward(grad, xs, wn, modes, out_size, act)
    return list(grads), gwn, None, None, None


_fuse_op.register_autograd(_fuse_backward, setup_context=_fuse_setup)


# =============================================================================== public API
# Configurations that passed weighted_fuse's checks on the eager CPU inference path, keyed by
# everything those checks read (shapes, dtypes, modes, options): a repeated call - a BiFPN node
# in a loop - skips the ~10 us of Python validation. The per-call conditions of the fast path
# (no grad, no tracing, no autocast, plain CPU tensors, cpu backend) are still checked.
_PLANS: dict = {}


def _plan_key(inputs, weights, resample, method, eps, act, out_size):
    """The cache key, or None where the arguments cannot form one (then the checks run and name the
    bad argument). Option values are keyed with their types (True == 1 == 1.0 in a dict), and the
    key is hashed here: an unhashable option must fall through to the checks, not raise."""
    try:
        if not isinstance(inputs, (list, tuple)) or type(weights) not in (torch.Tensor, torch.nn.Parameter):
            return None
        typed = lambda v: (type(v), v)  # noqa: E731
        key = (tuple((x.shape, x.dtype) for x in inputs), weights.shape, weights.dtype,
               tuple(map(typed, resample)), typed(method), typed(eps), typed(act),
               None if out_size is None else tuple(map(typed, out_size)))
        hash(key)
        return key
    except (AttributeError, TypeError):
        return None


def _validated_plan(inputs, weights, resample, method, eps, act, out_size):
    if not _PLANS or not isinstance(inputs, (list, tuple)) or not inputs:
        return None
    for x in inputs:
        if type(x) is not torch.Tensor or not x.is_cpu or x.requires_grad:
            return None
    if weights is None or not weights.is_cpu or not _fast_path_ok(inputs[0], weights.requires_grad):
        return None
    key = _plan_key(inputs, weights, resample, method, eps, act, out_size)
    return _PLANS.get(key) if key is not None else None


def _fuse_eager_cpu(xs, weights, method: str, eps: float, out_hw, codes: List[int], act_code: int) -> Tensor:
    """The eager CPU inference call: straight to the kernel, no dispatch, weights as floats."""
    out = _empty_like_out(xs[0], out_hw)
    _backend._C.fuse_forward([_nhwc(x) for x in xs], normalized_floats(weights, method, len(xs), eps), codes,
                             act_code, out, _threads())
    out = _from_nhwc(out)
    return out if xs[0].is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def weighted_fuse(inputs: Sequence[Tensor], weights: Optional[Tensor], *, resample: Sequence[str],
                  method: str = "fastattn", eps: float = 1e-4, act: Optional[str] = "silu",
                  out_size: Optional[Tuple[int, int]] = None) -> Tensor:
    """One BiFPN fusion: ``act(sum_i normalized(weights)_i * R_i(inputs[i]))`` in one pass, the
    resampling done while reading (see the module docstring for the modes and methods).

    Args:
        inputs: 2 to 4 tensors [N, C, H_i, W_i] of one dtype and device.
        weights: [len(inputs)] learned fusion weights (None allowed for method 'sum').
        resample: one mode per input: 'identity', 'nearest', 'maxpool' (TF same), 'maxpool_sym'.
        method: 'fastattn' (relu, normalised by the sum + eps), 'attn' (softmax), 'sum'.
        act: activation of the fused map (None for none).
        out_size: the output (H, W); default: the size of the first 'identity' input.
    """
    op = "weighted_fuse"
    plan = _validated_plan(inputs, weights, resample, method, eps, act, out_size)
    if plan is not None:  # eager CPU inference on a configuration validated before
        return profiled("effops::weighted_fuse", _fuse_eager_cpu, inputs, weights, method, float(eps), *plan)
    if not isinstance(inputs, (list, tuple)):
        raise EffopsTypeError(f"{op}: inputs must be a list of tensors, got {type(inputs).__name__}")
    if not 2 <= len(inputs) <= 4:
        raise EffopsInputError(f"{op}: inputs must hold 2 to 4 tensors, got {len(inputs)}")
    xs = list(_autocast(*(check_tensor(op, f"inputs[{i}]", x) for i, x in enumerate(inputs))))
    x0 = _check_x(op, xs[0], "inputs[0]")
    for i, x in enumerate(xs[1:], 1):
        if x.dim() != 4 or x.shape[:2] != x0.shape[:2]:
            raise EffopsInputError(f"{op}: inputs[{i}] must be [N, C, H, W] with N, C = {list(x0.shape[:2])} like inputs[0] "
                             f"(mismatched channels or batch), got {list(x.shape)}")
        if x.dtype != x0.dtype:
            raise EffopsTypeError(f"{op}: all inputs must have one dtype; inputs[0] is {x0.dtype}, inputs[{i}] is {x.dtype}")
        if x.device != x0.device:
            raise EffopsInputError(f"{op}: all inputs must be on one device; inputs[0] is on {x0.device}, "
                             f"inputs[{i}] is on {x.device}")
    if not isinstance(resample, (list, tuple)) or len(resample) != len(xs):
        raise EffopsInputError(f"{op}: resample must list one mode per input ({len(xs)}), got {resample!r}")
    for i, m in enumerate(resample):
        if m not in MODES:
            raise EffopsInputError(f"{op}: resample[{i}] must be one of {list(MODES)}, got {m!r}")
    if method not in METHODS:
        raise EffopsInputError(f"{op}: method must be one of {list(METHODS)}, got {method!r}")
    if weights is None:
        if method != "sum":
            raise EffopsInputError(f"{op}: weights are required for method {method!r}")
    else:
        weights = check_tensor(op, "weights", weights)
        if tuple(weights.shape) != (len(xs),):
            raise EffopsInputError(f"{op}: weights must have shape [{len(xs)}] (one per input), got {list(weights.shape)}")
        if not weights.dtype.is_floating_point:
            raise EffopsTypeError(f"{op}: weights must have a floating dtype, got {weights.dtype}")
        if weights.device != x0.device:
            raise EffopsInputError(f"{op}: weights are on {weights.device} but the inputs on {x0.device}")
    a = act_name(op, "act", act)
    eps = check_real(op, "eps", eps, allow_nan=False, allow_inf=False)
    if eps < 0:
        raise EffopsInputError(f"{op}: eps must be >= 0, got {eps}")
    if out_size is None:
        ident = [x for x, m in zip(xs, resample) if m == "identity"]
        if not ident:
            raise EffopsInputError(f"{op}: out_size is required when no input has resample mode 'identity'")
        out_hw = tuple(ident[0].shape[2:])
    else:
        if (not isinstance(out_size, (list, tuple)) or len(out_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIZE for v in out_size)):
            raise EffopsInputError(f"{op}: out_size must be a pair of positive ints (<= {MAX_SIZE}), got {out_size!r}")
        out_hw = (int(out_size[0]), int(out_size[1]))
    for i, (x, m) in enumerate(zip(xs, resample)):
        h, w = x.shape[2:]
        if m == "nearest":
            if h > out_hw[0] or w > out_hw[1]:
                raise EffopsInputError(f"{op}: inputs[{i}] ({h}x{w}) cannot be upsampled ('nearest') to {out_hw[0]}x{out_hw[1]}")
        elif resampled_size(m, h, w) != out_hw:
            raise EffopsInputError(f"{op}: resample[{i}]={m!r} maps inputs[{i}] ({h}x{w}) to "
                             f"{'x'.join(map(str, resampled_size(m, h, w)))}, not the output size {out_hw[0]}x{out_hw[1]}")
    if _fast_path_ok(x0, weights is not None and weights.requires_grad) and all(
            type(x) is torch.Tensor and not x.requires_grad for x in xs[1:]):
        # eager CPU inference: remember the validated configuration for the next call
        plan = (out_hw, [MODE_CODES[m] for m in resample], ACT_CODES[a])
        key = _plan_key(inputs, weights, resample, method, eps, act, out_size)
        if key is not None:
            if len(_PLANS) >= 256:
                _PLANS.clear()
            _PLANS[key] = plan
        return profiled("effops::weighted_fuse", _fuse_eager_cpu, xs, weights, method, float(eps), *plan)
    wn = normalize_weights(weights, method, len(xs), float(eps), x0.device)
    return torch.ops.effops.weighted_fuse(list(xs), wn, [MODE_CODES[m] for m in resample], list(out_hw), a)
