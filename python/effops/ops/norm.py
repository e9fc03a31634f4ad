"""Training-mode BatchNorm followed by an activation: ``batch_norm_act``.

``batch_norm_act(x, weight, bias, running_mean, running_var, training=True, momentum, eps, act)``
computes ``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
eps))``: with ``training=True`` the batch statistics normalise x (biased variance) and the
running statistics, when given, are updated with the unbiased one, as ``nn.BatchNorm2d`` does.

Why a fused op: in training a BatchNorm cannot be folded into the conv before it, and PyTorch
runs batch_norm (two passes over the map), the activation (one more, plus a copy of its input
when it is in place) and, backward, the activation's gradient and batch_norm_backward (three
more passes and two fresh buffers). The CPU kernel does two passes each way: forward the
channel sums, then ``y = act(x * a + b)``; backward the channel sums of ``g = dy * act'(x * a +
b)`` and ``g * (x - mean)``, then dx - recomputing the pre-activation from x, so nothing but
x is saved for the backward (csrc/norm/bn_act.cpp). Statistics are summed in float64 over a
fixed split of the rows: the result does not depend on the thread count.

Backends: ``cpu`` (float32 / bfloat16 storage computed in float32, float64; NHWC rows, i.e.
channels_last tensors - others are copied to that layout and back), ``triton`` (the same two
passes each way, float32 / bfloat16 / float16 storage, float32 compute; CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1) and ``reference`` (PyTorch ops, any device and dtype).
``training=False`` (running statistics) runs as PyTorch's batch_norm + the activation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from ._common import EffopsInputError, EffopsTypeError, check_real, check_tensor, custom_op
from .dwsep import ACT_CODES, _from_nhwc, act_grad, act_name, apply_act

_backend.register_op("batch_norm_act", ("cpu", "triton", "reference"))

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _vec(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if t is None else t.detach().to(_acc(x)).contiguous()


def _rows(t: Tensor) -> Tensor:
    """[N, C, H, W] -> its NHWC rows [N * H * W, C] (a view of a channels_last tensor)."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _like(out_rows: Tensor, x: Tensor) -> Tensor:
    N, C, H, W = x.shape
    out = _from_nhwc(out_rows.view(N, H, W, C))
    cl = x.is_contiguous(memory_format=torch.channels_last)
    return out if cl else out.contiguous()


def _select(x: Tensor) -> str:
    b = _backend.select("batch_norm_act", x.device)
    if (b == "cpu" and x.dtype not in _CPU_DTYPES) or (b == "triton" and x.dtype == torch.float64):
        return "reference"  # fp16 on the CPU; the Triton kernels compute in float32 at most
    return b


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _like_x(out_nhwc: Tensor, x: Tensor) -> Tensor:
    out = _from_nhwc(out_nhwc)
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def _threads() -> int:
    return max(1, torch.get_num_threads())


# =============================================================================== reference
def batch_norm_act_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                             act: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, biased var) with batch statistics, computed in float32 (float64 for
    float64 x); differentiable in x, weight, bias. (The op's pooled means are y.mean((2, 3)).)"""
    xa = x.to(_acc(x))
    var, mean = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    z = (xa - mean[None, :, None, None]) * invstd[None, :, None, None]
    if weight is not None:
        z = z * weight.to(xa.dtype)[None, :, None, None]
    if bias is not None:
        z = z + bias.to(xa.dtype)[None, :, None, None]
    return apply_act(z, act).to(x.dtype), mean, invstd, var


def _backward_reference(grad, x, weight, bias, mean, invstd, grad_pooled, act):
    """Explicit adjoints (custom-op bodies run below autograd)."""
    dt = _acc(x)
    xa, g = x.to(dt), grad.to(dt)
    C = x.shape[1]
    if grad_pooled is not None:
        g = g + (grad_pooled.to(dt) / (x.shape[2] * x.shape[3]))[:, :, None, None]
    shape = (1, C, 1, 1)
    w = torch.ones(C, dtype=dt, device=x.device) if weight is None else weight.to(dt)
    b = torch.zeros(C, dtype=dt, device=x.device) if bias is None else bias.to(dt)
    xhat = (xa - mean.to(dt).view(shape)) * invstd.to(dt).view(shape)
    g = g * act_grad(xhat * w.view(shape) + b.view(shape), act)
    m = x.numel() // C
    sg = g.sum((0, 2, 3))
    sgx = (g * xhat).sum((0, 2, 3))
    gx = (w * invstd.to(dt)).view(shape) * (g - (sg / m).view(shape) - xhat * (sgx / m).view(shape))
    return gx.to(x.dtype), sgx, sg


# =============================================================================== CPU backend
def _forward_cpu(x, weight, bias, eps, act, pool):
    N, C = x.shape[:2]
    xr = _rows(x)
    y = torch.empty_like(xr)
    dt = _acc(x)
    mean, invstd, var = (torch.empty(C, dtype=dt) for _ in range(3))
    pooled = torch.empty(N, C, dtype=dt) if pool else torch.empty(0, dtype=dt)
    _backend._C.bn_act_forward(xr, N, _vec(weight, x), _vec(bias, x), float(eps), ACT_CODES[act], y, mean, invstd,
                               var, pooled if pool else None, _threads())
    return _like(y, x), mean, invstd, var, pooled


def _backward_cpu(grad, x, weight, bias, mean, invstd, grad_pooled, act):
    N, C = x.shape[:2]
    xr = _rows(x)
    gx = torch.empty_like(xr)
    dt = _acc(x)
    gw, gb = torch.empty(C, dtype=dt), torch.empty(C, dtype=dt)
    gp = None if grad_pooled is None else grad_pooled.to(dt).contiguous()
    _backend._C.bn_act_backward(_rows(grad.to(x.dtype)), xr, N, _vec(weight, x), _vec(bias, x),
                                mean.to(dt).contiguous(), invstd.to(dt).contiguous(), gp, ACT_CODES[act], gx, gw, gb,
                                _threads())
    return _like(gx, x), gw, gb


# =============================================================================== custom ops
@custom_op("effops::batch_norm_act",
           "(Tensor x, Tensor? weight, Tensor? bias, float eps, str act, bool pool) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _bn_act_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: str,
               pool: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, var, pooled): pooled the [N, C] means of y over H, W when pool, else empty."""
    backend = _select(x)
    if backend == "cpu":
        return _forward_cpu(x, weight, bias, eps, act, pool)
    if backend == "triton":
        from ..triton import norm as tn

        y, mean, invstd, var, pooled = tn.forward(_nhwc(x), weight, bias, eps, ACT_CODES[act], pool)
        return _like_x(y, x), mean, invstd, var, pooled
    with torch.no_grad():
        y, mean, invstd, var = batch_norm_act_reference(x, weight, bias, eps, act)
        pooled = y.to(_acc(x)).mean((2, 3)) if pool else y.new_empty(0, dtype=_acc(x))
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = y.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return y, mean, invstd, var, pooled


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=_acc(x))


@_bn_act_op.register_fake
def _(x, weight, bias, eps, act, pool):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)
    pooled = x.new_empty((x.shape[0], x.shape[1]) if pool else (0,), dtype=_acc(x))
    return y, _stats_like(x), _stats_like(x), _stats_like(x), pooled


@custom_op("effops::batch_norm_act_backward",
           "(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, Tensor? grad_pooled, "
           "str act) -> (Tensor, Tensor, Tensor)")
def _bn_act_bwd_op(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                   invstd: Tensor, grad_pooled: Optional[Tensor], act: str) -> Tuple[Tensor, Tensor, Tensor]:
    backend = _select(x)
    if backend == "cpu":
        gx, gw, gb = _backward_cpu(grad, x, weight, bias, mean, invstd, grad_pooled, act)
    elif backend == "triton":
        from ..triton import norm as tn

        gx, gw, gb = tn.backward(_nhwc(grad.to(x.dtype)), _nhwc(x), weight, bias, mean, invstd, grad_pooled,
                                 ACT_CODES[act])
        gx = _like_x(gx, x)
    else:
        gx, gw, gb = _backward_reference(grad, x, weight, bias, mean, invstd, grad_pooled, act)
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        gx = gx.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return gx, gw, gb


@_bn_act_bwd_op.register_fake
def _(grad, x, weight, bias, mean, invstd, grad_pooled, act):
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    gx = torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)
    return gx, _stats_like(x), _stats_like(x)


def _setup(ctx, inputs, output):
    x, weight, bias, eps, act, pool = inputs
    _, mean, invstd, var, _ = output
    ctx.mark_non_differentiable(mean, invstd, var)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, not zero tensors
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.act = act
    ctx.y_shape = tuple(output[0].shape)


def _backward(ctx, grad, _gmean, _ginvstd, _gvar, grad_pooled):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    if grad_pooled is not None and grad_pooled.numel() == 0:  # pool=False: the empty placeholder's
        grad_pooled = None
    if grad is None and grad_pooled is None:
        return None, None, None, None, None, None
    if grad is None:
        grad = x.new_zeros(ctx.y_shape).contiguous(memory_format=torch.channels_last)
    gx, gw, gb = torch.ops.effops.batch_norm_act_backward(grad, x, weight, bias, mean, invstd, grad_pooled, ctx.act)
    return (gx, None if weight is None else gw.to(weight.dtype), None if bias is None else gb.to(bias.dtype),
            None, None, None)


_bn_act_op.register_autograd(_backward, setup_context=_setup)


# =============================================================================== public API
def _check_vector(op: str, name: str, t, x: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    check_tensor(op, name, t)
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise EffopsInputError(f"{op}: {name} must have shape [{x.shape[1]}] (one value per channel of x), "
                               f"got {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise EffopsTypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
    if t.device != x.device:
        raise EffopsInputError(f"{op}: {name} is on {t.device} but x on {x.device}")
    return t


def batch_norm_act(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, *,
                   training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                   act: Optional[str] = "silu", pool: bool = False):
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``
    with the batch statistics computed and applied by one fused op (see the module docstring).

    Args:
        x: [N, C, H, W] float tensor (channels_last is the kernels' layout).
        weight, bias: [C] affine parameters, or None (1 and 0).
        running_mean, running_var: [C] buffers updated in place when training (momentum as in
            torch: ``new = (1 - momentum) * old + momentum * batch``, the unbiased variance), or None.
        training: batch statistics (True) or the running ones (False: PyTorch's batch_norm).
        act: 'relu', 'relu6', 'silu' ('swish'), 'hardswish', 'sigmoid' or None.
        pool: also return the means of the output over H and W, [N, C, 1, 1] in x's dtype (what a
            squeeze-excite reads), summed while the output is written; differentiable.

    Returns y, or (y, means) with pool.
    """
    op = "batch_norm_act"
    check_tensor(op, "x", x)
    if x.dim() != 4:
        raise EffopsInputError(f"{op}: x must be [N, C, H, W], got {x.dim()} dims ({list(x.shape)})")
    if not x.dtype.is_floating_point:
        raise EffopsTypeError(f"{op}: x must have a floating dtype, got {x.dtype}")
    weight = _check_vector(op, "weight", weight, x)
    bias = _check_vector(op, "bias", bias, x)
    running_mean = _check_vector(op, "running_mean", running_mean, x)
    running_var = _check_vector(op, "running_var", running_var, x)
    if (running_mean is None) != (running_var is None):
        raise EffopsInputError(f"{op}: give both running_mean and running_var, or neither")
    a = act_name(op, "act", act)
    eps = check_real(op, "eps", eps, allow_nan=False, allow_inf=False)
    if eps < 0:
        raise EffopsInputError(f"{op}: eps must be >= 0, got {eps}")
    momentum = check_real(op, "momentum", momentum, allow_nan=False, allow_inf=False)
    if not isinstance(training, bool):
        raise EffopsTypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    if not isinstance(pool, bool):
        raise EffopsTypeError(f"{op}: pool must be a bool, got {type(pool).__name__}")
    if not training:
        if running_mean is None:
            raise EffopsInputError(f"{op}: training=False needs running_mean and running_var")
        # torch's batch_norm, written out: it refuses parameters of a wider dtype than x ("mixed
        # dtype") and indexes an empty input's first channel
        dt, shape = _acc(x), (1, x.shape[1], 1, 1)
        scale = torch.rsqrt(running_var.to(dt) + eps)
        if weight is not None:
            scale = scale * weight.to(dt)
        shift = -running_mean.to(dt) * scale
        if bias is not None:
            shift = shift + bias.to(dt)
        y = apply_act(x.to(dt) * scale.view(shape) + shift.view(shape), a).to(x.dtype)
        return (y, y.mean((2, 3), keepdim=True)) if pool else y
    if eps <= 0:
        raise EffopsInputError(f"{op}: eps must be > 0 when training (batch statistics), got {eps}")
    m = x.numel() // max(x.shape[1], 1)
    if m <= 1:
        raise EffopsInputError(f"{op}: expected more than 1 value per channel when training, got input size "
                               f"{list(x.shape)}")
    y, mean, _, var, pooled = torch.ops.effops.batch_norm_act(x, weight, bias, float(eps), a, pool)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.to(running_var.dtype) * (m / (m - 1)), alpha=momentum)
    return (y, pooled.to(x.dtype)[:, :, None, None]) if pool else y
