"""torch.export of converted and effops models: the effops ops trace as single custom-op nodes
(their fake kernels give the shapes), and the exported program runs and equals eager.

Models at small image sizes; randomised BatchNorm statistics so that every folded scale and
bias matters (a freshly initialised BN is the identity)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import flat_tensors, randomize_bn

timm = pytest.importorskip("timm")

from effops.models import create_model  # noqa: E402
from effops.nn import convert  # noqa: E402



def _effops_ops(ep) -> set:
    return {n.target.name() for n in ep.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "effops"}


def _check(model, x, others=(), dynamic=True):
    with torch.no_grad():
        want = flat_tensors(model(x))
        ds = ({0: torch.export.Dim("batch")},) if dynamic else None
        ep = torch.export.export(model, (x,), dynamic_shapes=ds)
        got = flat_tensors(ep.module()(x))
        assert len(got) == len(want)
        # The same kernels, but eager inference runs each MBConv block as one call (nn._plan),
        # whose squeeze-excite MLP sums in another order than torch's linear: not bitwise.
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        for y in others:  # other batch sizes through the same program
            for g, w in zip(flat_tensors(ep.module()(y)), flat_tensors(model(y))):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    return ep


def test_converted_timm_efficientnet_b0():
    torch.manual_seed(0)
    m = randomize_bn(timm.create_model("efficientnet_b0", pretrained=False)).eval()
    convert(m)
    ep = _check(m, torch.randn(2, 3, 64, 64), [torch.randn(3, 3, 64, 64)])
    assert {"effops::dw_conv_act", "effops::pw_conv"} <= _effops_ops(ep)


@pytest.mark.parametrize("name,size", [("efficientnet_b0", 64), ("tf_efficientnet_b0", 65)])  # 65: asymmetric TF pads
def test_effops_efficientnet(name, size):
    torch.manual_seed(1)
    m = randomize_bn(create_model(name)).eval()
    ep = _check(m, torch.randn(2, 3, size, size), [torch.randn(1, 3, size, size)])
    assert {"effops::dw_conv_act", "effops::pw_conv"} <= _effops_ops(ep)


def test_effops_tf_efficientdet_d0_forward():
    torch.manual_seed(2)
    m = randomize_bn(create_model("tf_efficientdet_d0", image_size=128)).eval()
    ep = _check(m, torch.randn(2, 3, 128, 128), dynamic=False)
    assert {"effops::dwsep_conv", "effops::weighted_fuse", "effops::pw_conv"} <= _effops_ops(ep)


class _Detect(nn.Module):
    def __init__(self, det):
        super().__init__()
        self.det = det

    def forward(self, x):
        return tuple(self.det.detect(x))


@pytest.mark.slow
def test_effops_tf_efficientdet_d0_detect_dynamic_batch():
    torch.manual_seed(3)
    m = _Detect(randomize_bn(create_model("tf_efficientdet_d0", image_size=128))).eval()
    ep = _check(m, torch.randn(2, 3, 128, 128), [torch.randn(3, 3, 128, 128)])
    assert "effops::multiclass_nms" in _effops_ops(ep)
