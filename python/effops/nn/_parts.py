"""Building blocks shared by effops.nn modules and the converter: BatchNorm folding, activation
and padding introspection, squeeze-and-excitation gates, and the fused forward passes of a
depthwise-separable conv and of an inverted residual (MBConv)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _module_mod

from .. import _backend
from ..ops.norm import batch_norm_act
from ..ops.dwsep import (PreparedDW, PreparedDWSep, PreparedPW, apply_act, dw_conv_act, dwsep_conv, pw_conv,
                         same_padding)


class Unsupported(Exception):
    """A module the fused kernels cannot reproduce exactly (the converter leaves it as it is)."""


# ----------------------------------------------------------------------------- activations
_ACT_BY_CLASS = {
    "Identity": "none", "ReLU": "relu", "ReLU6": "relu6", "SiLU": "silu", "Swish": "silu", "SwishMe": "silu",
    "Hardswish": "hardswish", "HardSwish": "hardswish", "HardSwishMe": "hardswish", "Sigmoid": "sigmoid",
}


def act_of(m: Optional[nn.Module]) -> str:
    """The effops activation name of an activation module (None / Identity -> 'none')."""
    if m is None:
        return "none"
    name = _ACT_BY_CLASS.get(type(m).__name__)
    if name is None:
        raise Unsupported(f"activation {type(m).__name__} has no fused equivalent")
    return name


# ----------------------------------------------------------------------------- convolutions
def _own_padding(conv) -> Optional[Union[str, Tuple[int, int]]]:
    """conv.effops_padding (the padding an effops weight container's op applies), else None. An
    instance attribute is read from __dict__: getattr on a Conv2d without it costs
    nn.Module.__getattr__ a raised AttributeError, on every forward of every block."""
    if hasattr(type(conv), "effops_padding"):  # defined by the class (or a property): getattr
        return getattr(conv, "effops_padding", None)
    d = getattr(conv, "__dict__", None)
    return None if d is None else d.get("effops_padding")


def padding_of(conv: nn.Conv2d) -> Union[str, Tuple[int, int]]:
    own = _own_padding(conv)  # effops modules: the padding the op applies
    if own is not None:
        return own
    if type(conv).__name__ in ("Conv2dSame", "Conv2dSameExport"):  # timm: dynamic TF 'same'
        return "same"
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise Unsupported(f"padding_mode={conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        if conv.padding == "same" and tuple(conv.stride) == (1, 1):
            return "same"  # torch's 'same' (stride 1) pads like TensorFlow's
        raise Unsupported(f"padding={conv.padding!r}")
    return tuple(conv.padding)


def check_depthwise(conv: nn.Module) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise Unsupported(f"{type(conv).__name__} is not a Conv2d")
    if not (conv.groups == conv.in_channels == conv.out_channels):
        raise Unsupported("not a depthwise conv (groups != channels, or a channel multiplier)")
    return conv


def check_pointwise(conv: nn.Module) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise Unsupported(f"{type(conv).__name__} is not a Conv2d")
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1:
        raise Unsupported("not a 1x1, stride 1, groups 1 conv")
    if padding_of(conv) not in ((0, 0), "same"):
        raise Unsupported("a padded 1x1 conv")
    return conv


# ----------------------------------------------------------------------------- BatchNorm
def check_bn(bn: Optional[nn.Module]) -> Optional[nn.BatchNorm2d]:
    if bn is None or isinstance(bn, nn.Identity):
        return None
    if not isinstance(bn, nn.BatchNorm2d):
        raise Unsupported(f"norm layer {type(bn).__name__} is not a BatchNorm2d")
    if not bn.track_running_stats:
        raise Unsupported("BatchNorm2d without running statistics")
    return bn


def bn_act(bn: Optional[nn.Module]) -> Optional[nn.Module]:
    """timm's BatchNormAct2d carries its activation: (bn.act)."""
    if bn is None:
        return None
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise Unsupported("BatchNormAct2d with dropout")
    return getattr(bn, "act", None)


def _bn_training(bn: Optional[nn.BatchNorm2d]) -> bool:
    return bn is not None and bn.training


def fold_bn_tensors(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
                    conv_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(scale, bias) with BN(conv(x) + conv_bias) == conv(x) * scale + bias for a BN given by its
    tensors (fold_bn's formula; effops.nn._plan folds from tensors alone)."""
    inv = torch.rsqrt(var + eps)
    scale = inv if weight is None else weight * inv
    shift = -mean if conv_bias is None else conv_bias - mean
    return scale, (shift * scale if bias is None else bias + shift * scale)


def fold_bn(bn: Optional[nn.BatchNorm2d], conv_bias: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(scale, bias) with BN(conv(x) + conv_bias) == conv(x) * scale + bias, from the running
    statistics. Differentiable in the BN affine parameters and the conv bias. Cached on the BN
    module while nothing needs a gradient (inference), keyed by the parameters' versions."""
    if bn is None:
        return None, conv_bias
    tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var, conv_bias)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    compiling = torch.compiler.is_compiling()
    key = None
    if not grad and not compiling:
        key = _version_key(tensors)
        cached = getattr(bn, "_effops_fold", None)
        if key is not None:
            key = key + (bn.eps,)
            if cached is not None and cached[0] == key and _unchanged(*cached[3]):
                return cached[1], cached[2]
    scale, bias = fold_bn_tensors(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, conv_bias)
    if key is not None:
        src = [t for t in tensors if t is not None]
        bn._effops_fold = (key, scale, bias, (src, [t.detach().clone() for t in src]))
    return scale, bias


# ----------------------------------------------------------------------------- squeeze-excite
def pooled_conv(conv: nn.Module, m: Tensor) -> Tensor:
    """conv(m) for pooled means m [N, C, 1, 1]: a plain 1x1 Conv2d (no padding, groups 1, no hooks)
    runs as one F.linear on [N, C]. torch sends a 1x1 conv on a 1x1 map to its slow reference conv
    (~20 us a call, 2 per SE block, 32 per EfficientNet-B0 forward); the GEMM costs a few us."""
    if (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid", "same") and not (conv._forward_hooks or conv._forward_pre_hooks
                                                                  or _global_hooks())
            and m.dim() == 4 and m.shape[2:] == (1, 1)):
        w, b = conv.weight.flatten(1), conv.bias
        if w.dtype != m.dtype:  # a bfloat16 model: the MLP runs in float32 (the means' dtype) as under autocast
            w, b = w.to(m.dtype), None if b is None else b.to(m.dtype)
        out = F.linear(m.flatten(1), w, b)
        return out[:, :, None, None]
    return conv(m)


def _global_hooks() -> bool:
    return bool(getattr(_module_mod, "_global_forward_hooks", None)
                or getattr(_module_mod, "_global_forward_pre_hooks", None))


def se_gate_of(se: Optional[nn.Module]) -> Optional[Callable[[Tensor], Tensor]]:
    """A function means [N, C, 1, 1] -> gates [N, C, 1, 1] doing what the SE module does between
    its global pool and its multiply (timm SqueezeExcite, torchvision SqueezeExcitation)."""
    if se is None or isinstance(se, nn.Identity):
        return None
    names = {n for n, _ in se.named_children()}
    if {"conv_reduce", "conv_expand"} <= names:  # timm
        def gate(m):
            s = pooled_conv(se.conv_reduce, m)
            s = se.act1(se.bn(s) if hasattr(se, "bn") else s)
            return se.gate(pooled_conv(se.conv_expand, s))
        return gate
    if {"fc1", "fc2"} <= names:  # torchvision
        return lambda m: se.scale_activation(pooled_conv(se.fc2, se.activation(pooled_conv(se.fc1, m))))
    raise Unsupported(f"squeeze-excite module {type(se).__name__}")


# ----------------------------------------------------------------------------- training BN + act
def _plain_bn(bn: nn.Module) -> bool:
    """nn.BatchNorm2d itself, or timm's BatchNormAct2d (whose drop bn_act checked is Identity):
    the classes whose forward bn_act_train reproduces (subclasses, e.g. SyncBatchNorm, keep theirs)."""
    return type(bn) is nn.BatchNorm2d or (type(bn).__name__ == "BatchNormAct2d" and isinstance(bn, nn.BatchNorm2d))


def _hooked(*mods: Optional[nn.Module]) -> bool:
    return _global_hooks() or any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in mods)


def bn_act_train(bn: nn.BatchNorm2d, act: Optional[nn.Module], t: Tensor, act_in_bn: bool = False,
                 pool: bool = False):
    """act(bn(t)) for a BatchNorm in training mode as one fused op (effops.ops.batch_norm_act);
    act_in_bn: act is the BN's own (timm BatchNormAct2d), else a BatchNormAct2d must carry none:
    nn.BatchNorm2d.forward's semantics (num_batches_tracked, momentum None = cumulative average,
    running statistics updated). None where the modules' own forwards must run: eval mode, hooks,
    other BN classes or activations, tensors the CPU kernel does not take (the reference would
    only repeat what the modules do). pool: (output, its means over H, W [N, C, 1, 1])."""
    if not bn.training or not _plain_bn(bn) or t.dim() != 4 or t.device.type != "cpu":
        return None
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float64) or t.shape[1] != bn.num_features:
        return None
    own_act = getattr(bn, "act", None) if type(bn) is not nn.BatchNorm2d else None
    drop = getattr(bn, "drop", None) if type(bn) is not nn.BatchNorm2d else None
    if drop is not None and type(drop) is not nn.Identity:
        return None
    if act_in_bn:
        act = own_act
    elif own_act is not None and type(own_act) is not nn.Identity:
        return None  # BN's own activation, then another one: the modules run
    if _hooked(bn, act, own_act, drop):
        return None
    name = _ACT_BY_CLASS.get(type(act).__name__, None) if act is not None else "none"
    if name is None or _backend.forced_backend() not in (None, "cpu") or _backend._C is None:
        return None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    track = bn.track_running_stats
    return batch_norm_act(t, bn.weight, bn.bias, bn.running_mean if track else None,
                          bn.running_var if track else None, training=True, momentum=factor, eps=bn.eps, act=name,
                          pool=pool)


# ----------------------------------------------------------------------------- fused forwards
@dataclass
class ConvStage:
    """A conv followed by BatchNorm (or not) and an activation. bn_has_act: the BN module applies
    the activation itself (timm BatchNormAct2d), which matters only on the composed path."""

    conv: nn.Conv2d
    bn: Optional[nn.BatchNorm2d]
    act: Optional[nn.Module]
    bn_has_act: bool = False

    @property
    def act_name(self) -> str:
        return act_of(self.act)

    def post_pooled(self, t: Tensor) -> Tuple[Tensor, Tensor]:
        """(post(t), its means over H, W): with a training BN, both from one fused op."""
        if self.bn is not None:
            fused = bn_act_train(self.bn, self.act, t, act_in_bn=self.bn_has_act, pool=True)
            if fused is not None:
                return fused
        y = self.post(t)
        return y, y.mean((2, 3), keepdim=True)

    def affine(self):
        return fold_bn(self.bn, self.conv.bias)

    def post(self, t: Tensor) -> Tensor:
        """BN (batch statistics when training) then the activation, as the original module. A
        training BN with its activation runs as one fused ``batch_norm_act`` (bn_act_train)."""
        if self.bn is not None:
            fused = bn_act_train(self.bn, self.act, t, act_in_bn=self.bn_has_act)
            if fused is not None:
                return fused
            t = self.bn(t)
            if self.bn_has_act:
                return t
        return self.act(t) if self.act is not None else t


def _inference(x: Tensor, stages) -> bool:
    """Nothing needs a gradient and nothing is being traced: prepared weights can be reused."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    if x.requires_grad:
        return False
    for s in stages:
        if s is None:
            continue
        for t in (s.conv.weight, s.conv.bias) + ((s.bn.weight, s.bn.bias) if s.bn is not None else ()):
            if t is not None and t.requires_grad:
                return False
    return True


def _version_key(tensors) -> Optional[tuple]:
    """Identity, version and layout of each tensor; None when one cannot be versioned (an
    inference tensor) or lives off the CPU, in which case nothing derived from them is cached
    (off the CPU the content check below would need a host synchronisation)."""
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif t.is_inference() or t.device.type != "cpu" or not t.is_contiguous():
            return None
        else:  # a new dtype or device means new storage: the data pointer covers them
            key.append((t.data_ptr(), t._version, t.shape, t.dtype))
    return tuple(key)


# What a cache entry is checked against on every use, beyond _version_key:
# * the stages' options: stride, padding (and everything padding_of reads), dilation, groups,
#   the activation's type, the BN eps - a module changed after an eval call must not reuse
#   kernel arguments prepared for the old settings;
# * the contents of every source whose prepared form is a copy (depthwise taps, folded BN,
#   folded weights, biases): writes through ``.data`` (an EMA's ``p.data.mul_(d).add_(...)``,
#   ``.data.copy_()``) bypass the version counter. One memcmp per source (C++, raw addresses of
#   live tensors). Skipped for the tensors a prepared op reads in place (its ``in_place()``:
#   float32 1x1 weights, where the prepared tensor is the parameter's own storage).
def _stage_options(s) -> tuple:
    c = s.conv  # a Conv2d, or a weight container with the padding the op applies (effops_padding)
    return (type(c), tuple(c.stride), tuple(c.dilation), getattr(c, "padding", None), getattr(c, "padding_mode", None),
            _own_padding(c), getattr(c, "groups", None), type(s.act),
            None if s.bn is None else s.bn.eps, s.bn_has_act)


def _snapshot(stages, op) -> Tuple[list, list]:
    """(sources to re-check, their copies): every source the prepared op does not read in place."""
    in_place = op.in_place() if hasattr(op, "in_place") else ()
    src, copies = [], []
    for t in _stage_sources(stages):
        if t is not None and not any(t is u for u in in_place):
            src.append(t)
            copies.append(t.detach().clone())
    return src, copies


def _unchanged(src: list, copies: list) -> bool:
    from .. import _backend

    if not src:
        return True
    if _backend._C is None:
        return all(torch.equal(a, b) for a, b in zip(src, copies))
    return _backend._C.same_bytes([t.data_ptr() for t in src], [t.data_ptr() for t in copies],
                                  [t.numel() * t.element_size() for t in copies])


def _stage_sources(stages) -> list:
    out = []
    for s in stages:
        out += [s.conv.weight, s.conv.bias]
        if s.bn is not None:
            out += [s.bn.weight, s.bn.bias, s.bn.running_mean, s.bn.running_var]
    return out


def _prepared(cache: dict, name: str, stages, make, options: tuple = ()):
    """cache[name] if it was made from the same parameters and buffers (same storage, version and
    contents: an in-place update, load_state_dict, an optimizer step or a write through .data
    invalidates it) and the same stage options; ``options``: anything else ``make`` reads
    (e.g. sepconv_forward's preact)."""
    key = _version_key(_stage_sources(stages))
    if key is None:
        return make()
    key = key + tuple(_stage_options(s) for s in stages) + (options,)
    hit = cache.get(name)
    if hit is not None and hit[0] == key and _unchanged(*hit[2]):
        return hit[1]
    p = make()
    cache[name] = (key, p, _snapshot(stages, p))
    return p


def _dense_conv(x: Tensor, w: Tensor, b: Optional[Tensor], conv, padding) -> Tensor:
    if padding == "same":  # TensorFlow SAME (timm's Conv2dSame): the extra row/column goes after
        kh, kw = w.shape[2:]
        ph = same_padding(x.shape[2], kh, conv.stride[0], conv.dilation[0])
        pw = same_padding(x.shape[3], kw, conv.stride[1], conv.dilation[1])
        if any(ph + pw):
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        padding = (0, 0)
    return F.conv2d(x, w, b, conv.stride, padding, conv.dilation, getattr(conv, "groups", 1))


def conv_bn_act_forward(x: Tensor, stage: ConvStage, cache: Optional[dict] = None, name: str = "conv",
                        channels_last: Optional[bool] = None) -> Tensor:
    """act(BN(conv(x))) of one ConvStage (a network's stem or head conv). A 1x1 stride-1 conv is one
    ``pw_conv`` (BN and act in its epilogue); any other conv (the 3x3 stride-2 stem) is torch's conv
    with the BN folded into its weight and bias, then the activation, in place in inference. With a
    cache (a dict of the module's), inference prepares the folded weights once (cache[name]). A BN
    in training mode: the conv, then stage.post (batch statistics, BN + act fused where it can).
    channels_last: the folded weight's layout (None: x's, where x's is unambiguous) - torch's conv
    follows the weight's layout for a 1-channel input, whose strides fit both layouts."""
    conv = stage.conv
    padding = padding_of(conv)
    w0 = conv.weight
    pointwise = (w0.shape[2:] == (1, 1) and tuple(conv.stride) == (1, 1) and getattr(conv, "groups", 1) == 1
                 and padding in ((0, 0), "same"))
    if _bn_training(stage.bn):
        t = pw_conv(x, w0, bias=conv.bias) if pointwise else _dense_conv(x, w0, conv.bias, conv, padding)
        return stage.post(t)
    fast = cache is not None and _inference(x, (stage,))
    if pointwise:
        def pw_kw():
            scale, bias = stage.affine()
            return dict(scale=scale, bias=bias, act=stage.act_name)
        if fast:
            return _prepared(cache, name, (stage,), lambda: PreparedPW(w0, **pw_kw()))(x)
        return pw_conv(x, w0, **pw_kw())
    if channels_last is None:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()

    def fold():
        scale, bias = stage.affine()
        w = w0 if scale is None else w0 * scale.to(w0.dtype)[:, None, None, None]
        if channels_last:  # canonical channels_last strides, also where they are ambiguous
            w = torch.empty_like(w, memory_format=torch.channels_last).copy_(w)
        return w, None if bias is None else bias.to(w.dtype)

    if fast:
        w, b = _prepared(cache, name, (stage,), fold, (channels_last,))
        return apply_act(_dense_conv(x, w, b, conv, padding), stage.act_name, inplace=True)
    w, b = fold()
    return apply_act(_dense_conv(x, w, b, conv, padding), stage.act_name)


def _drop_path_active(drop: Optional[nn.Module]) -> bool:
    if drop is None or isinstance(drop, nn.Identity) or not drop.training:
        return False
    p = getattr(drop, "drop_prob", getattr(drop, "p", 0.0))
    return bool(p)


def sepconv_forward(x: Tensor, dw: ConvStage, pw: ConvStage, *, preact: Optional[str] = None,
                    residual: Optional[Tensor] = None, cache: Optional[dict] = None) -> Tensor:
    """depthwise (BN, act) -> pointwise (BN, act) [+ residual]; preact: an activation applied to
    the input first (then dw has no activation). Fused unless a BN is in training mode. With a
    cache (a dict owned by the module), inference reuses the weights prepared for the kernels."""
    if _bn_training(dw.bn) or _bn_training(pw.bn):
        a = apply_act(x, preact) if preact else x
        d, _ = dw_conv_act(a, dw.conv.weight, stride=dw.conv.stride, padding=padding_of(dw.conv),
                           dilation=dw.conv.dilation, bias=dw.conv.bias, act=None)
        d = dw.post(d)
        p = pw.post(pw_conv(d, pw.conv.weight, bias=pw.conv.bias))
        return p if residual is None else p + residual

    def kw():  # folded BN and options; only on a cache miss in inference
        dws, dwb = dw.affine()
        pws, pwb = pw.affine()
        return dict(stride=dw.conv.stride, padding=padding_of(dw.conv), dilation=dw.conv.dilation, dw_scale=dws,
                    dw_bias=dwb, act=preact if preact else dw.act_name, pw_scale=pws, pw_bias=pwb,
                    pw_act=pw.act_name, preact=bool(preact))

    if cache is not None and _inference(x, (dw, pw)):
        op = _prepared(cache, "dwsep", (dw, pw), lambda: PreparedDWSep(dw.conv.weight, pw.conv.weight, **kw()),
                       (preact,))
        return op(x, residual)
    return dwsep_conv(x, dw.conv.weight, pw.conv.weight, residual=residual, **kw())


def mbconv_forward(x: Tensor, expand: Optional[ConvStage], dw: ConvStage, se: Optional[Callable[[Tensor], Tensor]],
                   project: ConvStage, *, skip: bool, drop_path: Optional[nn.Module] = None,
                   cache: Optional[dict] = None) -> Tensor:
    """Inverted residual: [expand 1x1 (BN, act)] -> depthwise (BN, act) -> [SE] -> project 1x1 (BN,
    act) [+ x]. In inference: expand is one pw_conv; without SE the rest is one dwsep_conv; with
    SE dw_conv_act gives the pooled means in the same pass and pw_conv applies the gates while
    loading. With any BN in training mode, the same effops convs with eager BN in between."""
    stages = [s for s in (expand, dw, project) if s is not None]
    res_in_kernel = skip and not _drop_path_active(drop_path)
    if any(_bn_training(s.bn) for s in stages):
        h = expand.post(pw_conv(x, expand.conv.weight, bias=expand.conv.bias)) if expand is not None else x
        d, _ = dw_conv_act(h, dw.conv.weight, stride=dw.conv.stride, padding=padding_of(dw.conv),
                           dilation=dw.conv.dilation, bias=dw.conv.bias, act=None)
        if se is not None:
            d, means = dw.post_pooled(d)
            d = d * se(means)
        else:
            d = dw.post(d)
        out = project.post(pw_conv(d, project.conv.weight, bias=project.conv.bias))
    else:
        fast = cache is not None and _inference(x, stages)

        def get(name, stages, make, call):  # prepared op in inference, else the public op
            return _prepared(cache, name, stages, make) if fast else call

        # Folded BN and options of a stage, computed only where used: on a prepared-op cache miss,
        # or per call on the public-op path.
        def pw_kw(stage):
            scale, bias = stage.affine()
            return dict(scale=scale, bias=bias, act=stage.act_name)

        geo = dict(stride=dw.conv.stride, padding=padding_of(dw.conv), dilation=dw.conv.dilation)

        def dw_kw():
            scale, bias = dw.affine()
            return dict(geo, scale=scale, bias=bias, act=dw.act_name)

        if expand is not None:
            op = get("expand", (expand,),
                     lambda: PreparedPW(expand.conv.weight, **pw_kw(expand)),
                     lambda t: pw_conv(t, expand.conv.weight, **pw_kw(expand)))
            h = op(x)
        else:
            h = x
        residual = x if res_in_kernel else None
        if se is None:
            def sep_kw():
                (ds, db), (ps, pb) = dw.affine(), project.affine()
                return dict(geo, dw_scale=ds, dw_bias=db, act=dw.act_name, pw_scale=ps, pw_bias=pb,
                            pw_act=project.act_name)
            op = get("dwsep", (dw, project),
                     lambda: PreparedDWSep(dw.conv.weight, project.conv.weight, **sep_kw()),
                     lambda t, r: dwsep_conv(t, dw.conv.weight, project.conv.weight, residual=r, **sep_kw()))
            out = op(h, residual)
        else:
            dop = get("dw", (dw,),
                      lambda: PreparedDW(dw.conv.weight, **dw_kw()),
                      lambda t: dw_conv_act(t, dw.conv.weight, **dw_kw()))
            y, means = dop(h)
            # The SE MLP on the pooled means [N, C] in float32, outside autocast: under bf16 autocast
            # each of its two 1x1 convs on a 1x1 map cost ~0.9 ms in oneDNN (most of it setup),
            # 30 ms per D0 forward; in float32 it is cheaper and more precise.
            with torch.autocast(device_type=means.device.type, enabled=False):
                gates = se(means.float()[:, :, None, None])[:, :, 0, 0].to(y.dtype)
            pop = get("project", (project,),
                      lambda: PreparedPW(project.conv.weight, **pw_kw(project)),
                      lambda t, c, r: pw_conv(t, project.conv.weight, channel_scale=c, residual=r, **pw_kw(project)))
            out = pop(y, gates, residual)
        if res_in_kernel or not skip:
            return out
    if skip:
        out = (drop_path(out) if drop_path is not None else out) + x
    return out
