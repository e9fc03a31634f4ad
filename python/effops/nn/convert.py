"""``effops.nn.convert(model)``: swap the depthwise-separable and inverted-residual blocks of
models users already have for fused ones.

Recognised blocks: timm ``DepthwiseSeparableConv``, ``InvertedResidual`` (EfficientNet,
tf_EfficientNet with TF 'same' padding, MobileNetV2/V3, MNASNet, ...) and ``EdgeResidual``
(EfficientNet-EdgeTPU, EfficientNetV2's early stages); torchvision ``MBConv`` and
``FusedMBConv`` (EfficientNet, EfficientNetV2), ``InvertedResidual`` (MobileNetV2, MobileNetV3)
and MNASNet's ``_InvertedResidual``; effdet's BiFPN fusion nodes (``Fnode``: FpnCombine +
after_combine -> weighted_fuse + fused separable conv) and its other ``SeparableConv2d`` layers
(the heads). Each replacement keeps the original block's children under their original names:
the parameters and buffers are the same objects (shared, not copied), the state_dict keys are
unchanged (checkpoints load either way), and training works (see effops.nn.dwsep).

Recognition is strict (see ``_convert_rules``): a block whose every computing part is not
understood - an unknown activation, a non-BatchNorm norm layer, grouped convs, a stage the
fused form does not have (timm's space-to-depth ``conv_s2d``), hooks - is left untouched and
reported with the reason.

Blocks led by a dense kxk conv (EdgeResidual, FusedMBConv) have no effops kernel for that conv:
it runs in eager PyTorch with its BatchNorm folded into the weights, and the rest (SE gates,
the 1x1 projection with its BatchNorm, the residual add) is one ``pw_conv``. A FusedMBConv
without expansion (only the kxk conv + BN + act) gains nothing from that and is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.dwsep import PreparedPW, pw_conv, same_padding
from . import _convert_rules as R
from . import _trunk
from ._plan import block_forward
from ._parts import (
    ConvStage,
    Unsupported,
    _bn_training,
    _drop_path_active,
    _inference,
    _prepared,
    bn_act,
    mbconv_forward,
    padding_of,
    se_gate_of,
    sepconv_forward,
)


@dataclass
class ConvertReport:
    replaced: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, original, replacement)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, original, reason)

    def __str__(self) -> str:
        lines = [f"effops.nn.convert: {len(self.replaced)} blocks replaced, {len(self.skipped)} left as they were"]
        for name, orig, new in self.replaced:
            lines.append(f"  replaced {name or '<root>'}: {orig} -> {new}")
        for name, orig, why in self.skipped:
            lines.append(f"  kept     {name or '<root>'}: {orig} ({why})")
        return "\n".join(lines)


Spec = Tuple[str, str, Optional[str], bool]  # (conv, bn, act, the BN applies the act itself)


class _Adopted(nn.Module):
    """A fused replacement that adopts the original block's children (same names, same objects)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self._original_class = f"{type(original).__module__}.{type(original).__qualname__}"
        self._cache = {}  # prepared kernel arguments for inference (see _parts._prepared)

    def _sub(self, name: str) -> nn.Module:
        """self.get_submodule(name); a direct child read from _modules (get_submodule costs ~10 us
        a call on a slow CPU, and a block's forward reads up to seven)."""
        m = self._modules.get(name)
        return m if m is not None else self.get_submodule(name)

    def _stage(self, spec: Optional[Spec]) -> Optional[ConvStage]:
        if spec is None:
            return None
        conv, bn, act, bn_has_act = spec
        b = self._sub(bn)
        a = bn_act(b) if bn_has_act else (self._sub(act) if act else None)
        return ConvStage(self._sub(conv), b, a, bn_has_act=bn_has_act)

    def _se(self, name: Optional[str]):
        return se_gate_of(self._sub(name)) if name else None

    def _planned(self, x: Tensor, expand: Optional[ConvStage], dw: ConvStage, proj: ConvStage, drop) -> Optional[Tensor]:
        """The inverted residual as one kernel call in eager CPU inference (nn._plan), or None."""
        if self.training or _drop_path_active(drop):
            return None
        e = (expand.conv, expand.bn, expand.act) if expand is not None else (None, None, None)
        se = self._sub(self.se_name) if self.se_name else None
        return block_forward(self._cache, x, *e, dw.conv, dw.bn, dw.act, padding_of(dw.conv), se, proj.conv, proj.bn,
                             proj.act, self.skip)

    def extra_repr(self) -> str:
        return f"fused replacement of {self._original_class}"


def _nchw_fast(x: Tensor, stages) -> bool:
    """An NCHW input in inference: the kernels work in NHWC, so a block converts its (narrow)
    input once and its output back, instead of each kernel converting the wide tensors between
    them. Measured, 1 thread, batch 1, 224x224, NCHW, whole models vs eager: efficientnet_b0
    0.68x -> 1.34x, mobilenet_v2 0.84x -> 1.72x, mnasnet1_0 1.04x -> 1.40x."""
    return (x.dim() == 4 and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
            and _inference(x, [s for s in stages if s is not None]))


def _check_skip(skip: bool, first: nn.Conv2d, last: nn.Conv2d, stride) -> None:
    if not isinstance(skip, bool):
        raise Unsupported(f"residual flag {skip!r} is not a bool")
    if skip and (first.in_channels != last.out_channels or tuple(stride) != (1, 1)):
        raise Unsupported("a residual between tensors of different shapes")


# ------------------------------------------------------------------------------ timm
_TIMM_CHILDREN = {  # required, optional (Identity unless configured)
    "DepthwiseSeparableConv": ({"conv_dw", "bn1", "conv_pw", "bn2"}, {"aa", "se", "drop_path"}),
    "InvertedResidual": ({"conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"}, {"aa", "se", "drop_path"}),
    "EdgeResidual": ({"conv_exp", "bn1", "conv_pwl", "bn2"}, {"aa", "se", "drop_path"}),
}


def _timm_common(m: nn.Module) -> None:
    R.no_hooks(m)
    if getattr(m, "conv_s2d", None) is not None:
        raise Unsupported("space-to-depth stage (conv_s2d: a dense 2x2 stride-2 conv before the depthwise) "
                          "has no fused equivalent")
    R.children(m, *_TIMM_CHILDREN[type(m).__name__])
    R.identity(getattr(m, "aa", None), "anti-aliasing layer")
    R.drop_path(getattr(m, "drop_path", None))


class FusedTimmBlock(_Adopted):
    """timm DepthwiseSeparableConv / InvertedResidual (children conv_pw?, bn1, conv_dw, bn2, aa, se,
    conv_pw(l), bn3?, drop_path)."""

    def __init__(self, original: nn.Module):
        _timm_common(original)
        super().__init__(original)
        self.inverted = type(original).__name__ == "InvertedResidual"
        self.skip = original.has_skip
        if self.inverted:
            self.spec = (("conv_pw", "bn1", None, True), ("conv_dw", "bn2", None, True),
                         ("conv_pwl", "bn3", None, True))
            expand = R.pointwise(self.conv_pw, "expansion conv")
            R.batchnorm(self.bn1, "bn1", expand.out_channels)
            dw = R.depthwise(self.conv_dw, "depthwise conv", expand.out_channels)
            R.batchnorm(self.bn2, "bn2", dw.out_channels)
            proj = R.pointwise(self.conv_pwl, "projection conv")
            R.batchnorm(self.bn3, "bn3", proj.out_channels)
        else:
            self.spec = (None, ("conv_dw", "bn1", None, True), ("conv_pw", "bn2", None, True))
            expand, dw = None, R.depthwise(self.conv_dw, "depthwise conv")
            R.batchnorm(self.bn1, "bn1", dw.out_channels)
            proj = R.pointwise(self.conv_pw, "pointwise conv")
            R.batchnorm(self.bn2, "bn2", proj.out_channels)
        R.chain(*[(c, n) for c, n in ((expand, "expansion conv"), (dw, "depthwise conv"), (proj, "projection conv"))
                  if c is not None])
        self.se_name = "se" if R.squeeze_excite(getattr(self, "se", None), "squeeze-excite", dw.out_channels) else None
        _check_skip(self.skip, expand if expand is not None else dw, proj, dw.stride)

    def forward(self, x: Tensor) -> Tensor:
        expand, dw, proj = (self._stage(s) for s in self.spec)
        drop = getattr(self, "drop_path", None)
        nchw = _nchw_fast(x, (expand, dw, proj))
        if nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._planned(x, expand, dw, proj, drop)
        if out is None:
            out = mbconv_forward(x, expand, dw, self._se(self.se_name), proj, skip=self.skip, drop_path=drop,
                                 cache=self._cache)
        return out.contiguous() if nchw else out


# ------------------------------------------------------------------------------ torchvision
def _tv_items(seq: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    """The layers of a torchvision block's Sequential, Conv2dNormActivation stages flattened."""
    from torchvision.ops.misc import Conv2dNormActivation

    R.exact(seq, (nn.Sequential,), prefix)
    items = []
    for n, c in seq.named_children():
        if type(c) is Conv2dNormActivation:
            items += [(f"{prefix}.{n}.{n2}", c2) for n2, c2 in c.named_children()]
        else:
            items.append((f"{prefix}.{n}", c))
    return items


def _tv_stages(items: List[Tuple[str, nn.Module]]) -> List[tuple]:
    """[("conv", Spec, conv) | ("se", name, module)]: each conv followed by its BatchNorm and an
    optional activation."""
    out, i = [], 0
    while i < len(items):
        q, m = items[i]
        if isinstance(m, nn.Conv2d):
            R.conv(m, q)
            if i + 1 >= len(items) or type(items[i + 1][1]) not in R.bn_types():
                raise Unsupported(f"{q}: a conv without a BatchNorm after it")
            bq, bn = items[i + 1]
            if R.batchnorm(bn, bq, m.out_channels) is not None:
                raise Unsupported(f"{bq}: a BatchNorm with an activation inside a torchvision block")
            i += 2
            aq = None
            if i < len(items) and R.is_act(items[i][1]):
                aq = items[i][0]
                R.act(items[i][1], aq)
                i += 1
            out.append(("conv", (q, bq, aq, False), m))
        elif R.is_squeeze_excite(m):
            out.append(("se", q, m))
            i += 1
        else:
            raise Unsupported(f"{q}: {type(m).__name__} has no fused equivalent")
    return out


# block class name -> (its Sequential, the residual flag, the drop-path child, required children)
_TV_BLOCKS = {
    "MBConv": ("block", "use_res_connect", "stochastic_depth"),
    "FusedMBConv": ("block", "use_res_connect", "stochastic_depth"),
    "InvertedResidual": (None, "use_res_connect", None),  # MobileNetV2: conv, MobileNetV3: block
    "_InvertedResidual": ("layers", "apply_residual", None),  # MNASNet
}


def _tv_parse(m: nn.Module):
    """(stages, residual flag, drop-path child name) of a torchvision block, strictly checked."""
    R.no_hooks(m)
    seq, flag, drop = _TV_BLOCKS[type(m).__name__]
    if seq is None:
        seq = "block" if hasattr(m, "block") else "conv"
    R.children(m, {seq} | ({drop} if drop else set()))
    if drop:
        R.drop_path(getattr(m, drop), drop)
    return _tv_stages(_tv_items(getattr(m, seq), seq)), getattr(m, flag), drop


class FusedTorchvisionBlock(_Adopted):
    """torchvision MBConv / InvertedResidual (MobileNetV2, V3) / MNASNet _InvertedResidual: a
    Sequential of conv-BN-act stages ([1x1 expand], depthwise, [SqueezeExcitation], 1x1 project)."""

    def __init__(self, original: nn.Module):
        stages, skip, drop = _tv_parse(original)
        super().__init__(original)
        self.skip, self.drop = skip, drop
        kinds = "".join("s" if s[0] == "se" else ("d" if R.is_depthwise(s[2]) else
                                                   "p" if R.is_pointwise(s[2]) else "k") for s in stages)
        if kinds not in ("dp", "pdp", "dsp", "pdsp"):
            raise Unsupported(f"layers {kinds!r} (p: 1x1, d: depthwise, k: dense conv, s: SE) are not an inverted residual")
        convs = [s for s in stages if s[0] == "conv"]
        expand = convs[0] if len(convs) == 3 else None
        dw, proj = convs[-2], convs[-1]
        if proj[1][2] is not None:
            raise Unsupported("an activation after the projection")
        R.chain(*[(s[2], s[1][0]) for s in convs])
        se = [s for s in stages if s[0] == "se"]
        self.se_name = se[0][1] if se else None
        if se:
            R.squeeze_excite(se[0][2], se[0][1], dw[2].out_channels)
        self.spec = (expand[1] if expand else None, dw[1], proj[1])
        _check_skip(self.skip, convs[0][2], proj[2], dw[2].stride)

    def forward(self, x: Tensor) -> Tensor:
        expand, dw, proj = (self._stage(s) for s in self.spec)
        drop = getattr(self, self.drop) if self.drop else None
        nchw = _nchw_fast(x, (expand, dw, proj))
        if nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._planned(x, expand, dw, proj, drop)
        if out is None:
            out = mbconv_forward(x, expand, dw, self._se(self.se_name), proj, skip=self.skip, drop_path=drop,
                                 cache=self._cache)
        return out.contiguous() if nchw else out


# ------------------------------------------------------------------------------ dense-conv blocks
def _dense_conv(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """conv's geometry (TF 'same' padding included) with the given weight and bias."""
    pad = padding_of(conv)
    if pad == "same":
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        t, b = same_padding(x.shape[2], kh, sh, dh)
        l, r = same_padding(x.shape[3], kw, sw, dw)
        if (t, l) == (b, r):
            pad = (t, l)
        else:
            x, pad = F.pad(x, (l, r, t, b)), (0, 0)
    return F.conv2d(x, weight, bias, conv.stride, pad, conv.dilation, conv.groups)


def _folded(stage: ConvStage) -> Tuple[Tensor, Optional[Tensor]]:
    """The conv's weight and bias with its (eval-mode) BatchNorm folded in."""
    scale, bias = stage.affine()
    w = stage.conv.weight
    return (w if scale is None else w * scale.to(w.dtype).reshape(-1, 1, 1, 1)), bias


_INPLACE = {"none": lambda t: t, "relu": torch.relu_, "sigmoid": torch.sigmoid_,
            "relu6": lambda t: F.relu6(t, inplace=True), "silu": lambda t: F.silu(t, inplace=True),
            "hardswish": lambda t: F.hardswish(t, inplace=True)}


class FusedDenseBlock(_Adopted):
    """timm EdgeResidual / torchvision FusedMBConv: dense kxk conv (BN, act) -> [SE] -> 1x1
    project (BN) [+ x]. The kxk conv runs in eager PyTorch with BN folded into its weights; SE
    gates, projection, BN and residual are one pw_conv."""

    def __init__(self, original: nn.Module):
        if type(original).__name__ == "EdgeResidual":
            _timm_common(original)
            super().__init__(original)
            self.skip, self.drop = original.has_skip, "drop_path" if hasattr(original, "drop_path") else None
            dense = R.conv(self.conv_exp, "expansion conv")
            R.batchnorm(self.bn1, "bn1", dense.out_channels)
            proj = R.pointwise(self.conv_pwl, "projection conv")
            R.batchnorm(self.bn2, "bn2", proj.out_channels)
            self.spec = (("conv_exp", "bn1", None, True), ("conv_pwl", "bn2", None, True))
            has_se = R.squeeze_excite(getattr(self, "se", None), "squeeze-excite", dense.out_channels) is not None
            self.se_name = "se" if has_se else None
        else:  # torchvision FusedMBConv
            stages, skip, drop = _tv_parse(original)
            super().__init__(original)
            self.skip, self.drop, self.se_name = skip, drop, None
            kinds = [s[0] for s in stages]
            if kinds == ["conv"]:
                # measured: BN folded into the conv + in-place act/add is 0.88-0.98x eager on NCHW,
                # 1.02-1.05x on channels_last (1 thread, 24ch 112x112): not a gain worth a swap
                raise Unsupported("a lone dense conv + BN + act (no expansion): nothing to fuse, "
                                  "no faster than eager (its Conv2dNormActivation runs BN-folded)")
            if kinds != ["conv", "conv"] or not R.is_pointwise(stages[1][2]):
                raise Unsupported("layers are not a dense conv followed by a 1x1 projection")
            (_, dspec, dense), (_, pspec, proj) = stages
            if pspec[2] is not None:
                raise Unsupported("an activation after the projection")
            self.spec = (dspec, pspec)
        R.chain((dense, "expansion conv"), (proj, "projection conv"))
        _check_skip(self.skip, dense, proj, dense.stride)

    def forward(self, x: Tensor) -> Tensor:
        dense, proj = (self._stage(s) for s in self.spec)
        se = self._se(self.se_name)
        drop = getattr(self, self.drop) if self.drop else None
        if _bn_training(dense.bn) or _bn_training(proj.bn):  # the original's computation, module by module
            h = dense.post(dense.conv(x))
            if self.se_name:
                h = self._sub(self.se_name)(h)
            out = proj.post(proj.conv(h))
            return (drop(out) if drop is not None else out) + x if self.skip else out
        res_in_kernel = self.skip and not _drop_path_active(drop)
        fast = _inference(x, (dense, proj))
        # The kernels work in NHWC, and so does oneDNN's dense conv fastest: an NCHW input is
        # converted once here (the kxk conv's output, often 4x wider, is then never copied)
        nchw = _nchw_fast(x, (dense, proj))
        if nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        if fast:
            w, b = _prepared(self._cache, "dense", (dense,), lambda: _folded(dense))
            h = _INPLACE[dense.act_name](_dense_conv(x, dense.conv, w, b))
        else:
            h = _dense_conv(x, dense.conv, *_folded(dense))
            h = dense.act(h) if dense.act is not None else h
        gates = se(h.mean((2, 3), keepdim=True))[:, :, 0, 0].to(h.dtype) if se is not None else None
        res = x if res_in_kernel else None

        def pw_kw():
            scale, bias = proj.affine()
            return dict(scale=scale, bias=bias, act=proj.act_name)

        if fast:
            out = _prepared(self._cache, "project", (proj,), lambda: PreparedPW(proj.conv.weight, **pw_kw()))(h, gates, res)
        else:
            out = pw_conv(h, proj.conv.weight, channel_scale=gates, residual=res, **pw_kw())
        if self.skip and not res_in_kernel:
            out = drop(out) + x
        return out.contiguous() if nchw else out


# ------------------------------------------------------------------------------ effdet
class FusedSeparableConv2d(_Adopted):
    """effdet SeparableConv2d: conv_dw -> conv_pw (+bias) -> bn? -> act?."""

    def __init__(self, original: nn.Module):
        R.no_hooks(original)
        R.children(original, {"conv_dw", "conv_pw"}, {"bn", "act"})
        super().__init__(original)
        dw = R.depthwise(self.conv_dw, "depthwise conv")
        pw = R.pointwise(self.conv_pw, "pointwise conv")
        R.chain((dw, "depthwise conv"), (pw, "pointwise conv"))
        bn = getattr(self, "bn", None)
        if bn is not None:
            R.batchnorm(bn, "bn", pw.out_channels)
        act = getattr(self, "act", None)
        if act is not None:
            R.act(act, "act")
        self._pw_act()

    def _pw_act(self):
        if getattr(self, "act", None) is not None:
            bact = bn_act(getattr(self, "bn", None))
            if bact is not None and not isinstance(bact, nn.Identity):
                raise Unsupported("two activations after the pointwise conv")
            return self.act
        return bn_act(getattr(self, "bn", None))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, preact: Optional[str] = None) -> Tensor:
        bn = getattr(self, "bn", None)
        pw = ConvStage(self.conv_pw, bn, self._pw_act(), bn_has_act=bn_act(bn) is not None)
        if pw.bn_has_act and getattr(self, "act", None) is not None:
            pw.bn_has_act = False
        return sepconv_forward(x, ConvStage(self.conv_dw, None, None), pw, preact=preact, residual=residual,
                               cache=self._cache)


# ------------------------------------------------------------------------------ the converter
# Blocks of the same families that are known and deliberately left as they are (reported, so a
# user sees why nothing was gained there).
_NOT_FUSED = [
    ("timm.models._efficientnet_blocks", "CondConvResidual",
     "CondConv: per-example expert-mixed weights from a routing layer, no fused kernel"),
    ("timm.models.ghostnet", "GhostBottleneck",
     "Ghost module: a primary conv whose output is concatenated with cheap depthwise features, no fused kernel"),
]


def _refuse(why: str):
    def make(m: nn.Module) -> nn.Module:
        raise Unsupported(why)
    return make


def _rules() -> List[Tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]]:
    """(match, make) pairs; match is on the exact class (a subclass may compute something else:
    timm's CondConvResidual subclasses InvertedResidual)."""
    rules = []
    try:
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual

        rules.append((lambda m: type(m) in (DepthwiseSeparableConv, InvertedResidual), FusedTimmBlock))
        rules.append((lambda m: type(m) is EdgeResidual, FusedDenseBlock))
    except ImportError:
        pass
    try:
        from timm.models._efficientnet_blocks import ConvBnAct

        from ._trunk import FusedConvBnAct

        rules.append((lambda m: type(m) is ConvBnAct, FusedConvBnAct))
    except ImportError:
        pass
    for mod, cls, why in _NOT_FUSED:
        c = R._cls(mod, cls)
        if c is not None:
            rules.append(((lambda m, c=c: type(m) is c), _refuse(why)))
    try:
        from torchvision.models.efficientnet import FusedMBConv, MBConv
        from torchvision.models.mnasnet import _InvertedResidual as MNAS
        from torchvision.models.mobilenetv2 import InvertedResidual as TV2
        from torchvision.models.mobilenetv3 import InvertedResidual as TV3

        rules.append((lambda m: type(m) in (MBConv, TV2, TV3, MNAS), FusedTorchvisionBlock))
        rules.append((lambda m: type(m) is FusedMBConv, FusedDenseBlock))
    except ImportError:
        pass
    try:
        from torchvision.ops.misc import Conv2dNormActivation

        from ._trunk import FusedConvNormAct

        rules.append((lambda m: type(m) is Conv2dNormActivation, FusedConvNormAct))
    except ImportError:
        pass
    try:
        from effdet.efficientdet import SeparableConv2d

        rules.append((lambda m: type(m) is SeparableConv2d, FusedSeparableConv2d))
    except ImportError:
        pass
    return rules


def convert(model: nn.Module, *, copy_model: bool = False, report: bool = False, verbose: bool = False):
    """Replace the recognised blocks of ``model`` by fused ones.

    In place by default (the returned model is ``model``; parameters are shared with the
    replaced blocks); ``copy_model=True`` converts a deep copy instead. With ``report=True``
    returns ``(model, ConvertReport)``; ``verbose=True`` prints the report.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if copy_model:
        model = copy.deepcopy(model)
    rep = ConvertReport()
    rules = _rules()
    from .bifpn import FusedFnode, convert_effdet_fnodes

    convert_effdet_fnodes(model, rep)  # BiFPN nodes first: they contain separable convs

    def visit(parent: Optional[nn.Module], name: str, module: nn.Module, qual: str):
        if isinstance(module, FusedFnode):
            return module
        for match, make in rules:
            if match(module):
                try:
                    new = make(module)
                except Unsupported as e:
                    rep.skipped.append((qual, type(module).__name__, str(e)))
                    break
                new.train(module.training)
                if parent is not None:
                    setattr(parent, name, new)
                rep.replaced.append((qual, type(module).__name__, type(new).__name__))
                return new
        for cname, child in list(module.named_children()):
            visit(module, cname, child, f"{qual}.{cname}" if qual else cname)
        return module

    model = visit(None, "", model, "")
    for qual, m in model.named_modules():  # timm networks: their stem and head (see _trunk)
        if _trunk.is_timm_trunk(m):
            try:
                what = _trunk.fuse_timm_trunk(m)
            except Unsupported as e:
                rep.skipped.append((qual, type(m).__name__, f"stem and head: {e}"))
            else:
                rep.replaced.append((qual, type(m).__name__, f"{type(m).__name__} with {what} fused"))
    if verbose:
        print(rep)
    return (model, rep) if report else model
