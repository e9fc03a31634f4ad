"""torch.compile through effops's backward ops: the fake kernels of the backward custom ops
declare the strides the real kernels return (a converted model's compiled training step
failed on the depthwise weight gradient's [KH, KW, C] layout: issue 9)."""

from __future__ import annotations

import pytest
import torch

import effops
from effops.nn import DWSeparableConv2d, MBConv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(MBConv(8, 8, 3, 1, expand_ratio=4), MBConv(8, 12, 5, 2, expand_ratio=6),
                              DWSeparableConv2d(12, 16, 3, act="relu6"))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()  # BN frozen: the fused forward and the fused backward ops


@pytest.mark.parametrize("channels_last", [True, False])
def test_compiled_backward_equals_eager(channels_last):
    net = _net()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 11, 9).contiguous(memory_format=fmt).requires_grad_()
    torch._dynamo.reset()
    explain = torch._dynamo.explain(net)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(net, fullgraph=True)
    compiled(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    gx = x.grad.clone()
    net.zero_grad()
    x.grad = None
    net(x).square().sum().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
