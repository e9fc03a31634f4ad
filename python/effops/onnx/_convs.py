"""ONNX lowerings of the fused convolution and fusion ops (``effops::dwsep_conv``,
``effops::dw_conv_act``, ``effops::pw_conv``, ``effops::weighted_fuse``).

Each function receives the custom op's arguments as the exporter passes them (tensors as graph
values, ``None`` for an absent optional tensor, lists/strings/bools as Python values) and emits
standard-domain ONNX nodes computing the op's reference implementation (``ops/dwsep.py``,
``ops/bifpn.py``):

* per-channel affine (folded BatchNorm): the scale is multiplied into the conv weight
  (``W' = W * scale[:, None, None, None]``) and the bias becomes the Conv's ``B``: one Conv per
  convolution, as a BatchNorm-folded network is deployed. The products are computed in the
  graph on initializers and constant-folded by ``effops.onnx.export`` (fp32 rounding of
  ``W * scale`` instead of ``conv(x, W) * scale``: ~1 ulp per term, far inside 1e-4);
* padding: the (top, bottom, left, right) pads the op received - TensorFlow 'same' padding
  already resolved, asymmetric where TF puts the extra row/column at the bottom/right - become
  the Conv's ``pads = [top, left, bottom, right]`` (ONNX Conv pads may be asymmetric; zero
  padding, applied after ``preact``'s activation as in the reference);
* activations: Relu, Clip(0, 6), x * Sigmoid(x) (silu: no SiLU op before opset 24), HardSwish,
  Sigmoid;
* ``dw_conv_act``'s pooled side output: GlobalAveragePool + Flatten;
* ``pw_conv``'s channel_scale (SE gates): Mul by the [N, C, 1, 1] gates before the 1x1 Conv;
* ``weighted_fuse``: the normalised weights arrive as a graph value (relu / sum + eps or
  softmax, computed by the exported float64 torch ops), one Gather per input, then
  ``sum_i w_i * R_i(x_i)`` in input order and the activation. Resampling:
  identity; 'nearest' - Resize(mode nearest, asymmetric, floor) when the output is an integer
  multiple of the input (then ONNX's ``dst / (out / in)`` and effops's ``dst * (in / out)``
  give the same floor), otherwise a Gather per axis with effops's own index table (exact for
  any ratio); 'maxpool' - MaxPool 3x3/2 with the TF 'same' pads (ONNX pads of MaxPool never
  win the max, which is effops's -inf padding); 'maxpool_sym' - MaxPool 3x3/2 pads 1.
  (NaN inputs: effops's pools propagate NaN as torch does; ONNX leaves it to the runtime.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op

from ..ops.bifpn import MODES, nearest_index
from ..ops.dwsep import same_padding


def _ints(values) -> "ir.Value":
    return op.Constant(value_ints=[int(v) for v in values])


def _like(t, x):
    return None if t is None else op.CastLike(t, x)


def _activation(x, name: str):
    """The activation ``name`` (effops's names: ops/dwsep.ACTIVATIONS) of x."""
    if name == "none":
        return x
    if name == "relu":
        return op.Relu(x)
    if name == "relu6":
        return op.Clip(x, op.CastLike(op.Constant(value_float=0.0), x), op.CastLike(op.Constant(value_float=6.0), x))
    if name == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if name == "hardswish":
        return op.HardSwish(x)
    if name == "sigmoid":
        return op.Sigmoid(x)
    raise ValueError(f"effops.onnx: activation {name!r} has no ONNX lowering")


def _folded(w, scale, x):
    """The conv weight with the per-output-channel scale multiplied in, in x's dtype."""
    w = op.CastLike(w, x)
    if scale is not None:
        w = op.Mul(w, op.Reshape(op.CastLike(scale, x), _ints([-1, 1, 1, 1])))
    return w


def _conv(x, w, scale, bias, *, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), group: int = 1):
    top, bottom, left, right = (int(p) for p in pad)
    return op.Conv(x, _folded(w, scale, x), _like(bias, x), strides=[int(s) for s in stride],
                   pads=[top, left, bottom, right], dilations=[int(d) for d in dilation], group=int(group))


def _channels(w) -> int:
    c = w.shape[0]
    if not isinstance(c, int):  # a weight's shape is always static (it is a parameter)
        raise ValueError(f"effops.onnx: the depthwise weight has a non-static channel count {c!r}")
    return c


def dwsep_conv(x, dw_weight, pw_weight, dw_scale, dw_bias, pw_scale, pw_bias, residual,
               stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int], act: str, pw_act: str,
               preact: bool):
    a = _activation(x, act) if preact else x
    d = _conv(a, dw_weight, dw_scale, dw_bias, stride=stride, pad=pad, dilation=dilation, group=_channels(dw_weight))
    if not preact:
        d = _activation(d, act)
    p = _activation(_conv(d, pw_weight, pw_scale, pw_bias), pw_act)
    return p if residual is None else op.Add(p, residual)


def dw_conv_act(x, weight, scale, bias, stride: Sequence[int], pad: Sequence[int], dilation: Sequence[int],
                act: str):
    y = _activation(_conv(x, weight, scale, bias, stride=stride, pad=pad, dilation=dilation, group=_channels(weight)), act)
    return y, op.Flatten(op.GlobalAveragePool(y), axis=1)


def pw_conv(y, weight, channel_scale, scale, bias, residual, act: str):
    if channel_scale is not None:
        y = op.Mul(y, op.Unsqueeze(channel_scale, _ints([2, 3])))
    out = _activation(_conv(y, weight, scale, bias), act)
    return out if residual is None else op.Add(out, residual)


def _static_hw(x, what: str):
    h, w = x.shape[2], x.shape[3]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise ValueError(f"effops.onnx: weighted_fuse needs static spatial sizes ({what} is {h}x{w}); "
                         "export with a dynamic batch only")
    return h, w


def _nearest(x, out_hw, i: int):
    h, w = _static_hw(x, f"inputs[{i}]")
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if oh % h == 0 and ow % w == 0:
        return op.Resize(x, None, None, _ints([oh, ow]), axes=[2, 3], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    for axis, n_in, n_out in ((2, h, oh), (3, w, ow)):
        if n_in != n_out:
            idx = nearest_index(torch.arange(n_out), n_in, n_out).numpy().astype(np.int64)
            x = op.Gather(x, op.Constant(value=ir.tensor(idx)), axis=axis)
    return x


def _resample(x, mode: str, out_hw, i: int):
    if mode == "identity":
        return x
    if mode == "nearest":
        return _nearest(x, out_hw, i)
    if mode == "maxpool_sym":
        return op.MaxPool(x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])[0]  # (Y, Indices)
    h, w = _static_hw(x, f"inputs[{i}]")
    (top, bottom), (left, right) = same_padding(h, 3, 2, 1), same_padding(w, 3, 2, 1)
    return op.MaxPool(x, kernel_shape=[3, 3], strides=[2, 2], pads=[top, left, bottom, right])[0]


def weighted_fuse(inputs, wn, mode_codes: Sequence[int], out_size: Sequence[int], act: str):
    out = None
    x0 = inputs[0]
    for i, (x, code) in enumerate(zip(inputs, mode_codes)):
        w = op.CastLike(op.Gather(wn, op.Constant(value_int=i)), x0)
        t = op.Mul(_resample(x, MODES[int(code)], out_size, i), w)
        out = t if out is None else op.Add(out, t)
    return _activation(out, act)


def translations() -> dict:
    """{effops op overload: lowering} for torch.onnx.export's custom_translation_table."""
    e = torch.ops.effops
    return {e.dwsep_conv.default: dwsep_conv, e.dw_conv_act.default: dw_conv_act, e.pw_conv.default: pw_conv,
            e.weighted_fuse.default: weighted_fuse}


__all__ = ["translations"]
