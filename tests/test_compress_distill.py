"""effops.compress.distill: values against hand formulas, float64 gradcheck, the teacher wrapper,
the detection variant, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from effops.compress.distill import DetectionDistillationLoss, DistillationLoss, detection_kd_loss, kd_loss


def _hand_kd(s, t, y, T, alpha):
    s, t = s.numpy().astype(np.float64), t.numpy().astype(np.float64)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lps, lpt = log_softmax(s / T), log_softmax(t / T)
    kl = (np.exp(lpt) * (lpt - lps)).sum(1).mean() * T * T
    if y is None:
        return kl
    ce = -log_softmax(s)[np.arange(len(y)), y.numpy()].mean()
    return alpha * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T,alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 0.0), (7.0, 1.0)])
def test_kd_value_matches_hand_formula(T, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3, torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    assert float(kd_loss(s, t, y, temperature=T, alpha=alpha)) == pytest.approx(_hand_kd(s, t, y, T, alpha), rel=1e-12)
    assert float(kd_loss(s, t, temperature=T)) == pytest.approx(_hand_kd(s, t, None, T, alpha), rel=1e-12)
    assert float(kd_loss(t, t, temperature=T)) == pytest.approx(0.0, abs=1e-12)  # KL(p || p) = 0


def test_kd_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (4,), generator=g)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, t, y, temperature=3.0, alpha=0.7), (s,))
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, t, temperature=0.5), (s,))
    # the teacher's logits are a target: no gradient flows into them
    t2 = t.clone().requires_grad_(True)
    kd_loss(s, t2, y).backward()
    assert t2.grad is None and s.grad is not None
    # T^2 scaling: the soft term's gradient size does not shrink as 1/T^2 at high temperature
    g1 = torch.autograd.grad(kd_loss(s, t, temperature=1.0), s)[0].norm()
    g8 = torch.autograd.grad(kd_loss(s, t, temperature=8.0), s)[0].norm()
    assert 0.05 < float(g8 / g1) < 20


def test_distillation_loss_runs_the_teacher_in_eval_no_grad():
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).train()
    student = nn.Linear(8, 4)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    kd = DistillationLoss(teacher, temperature=4.0, alpha=0.9)
    loss = kd(student(x), y, inputs=x)
    with torch.no_grad():
        t = teacher.eval()(x)
    teacher.train()
    assert torch.allclose(loss, kd_loss(student(x), t, y, temperature=4.0, alpha=0.9))
    assert teacher.training  # mode restored
    assert float(teacher[1].num_batches_tracked) == 0  # eval: BN statistics untouched
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.weight.grad is not None
    assert torch.allclose(kd(student(x), y, teacher_logits=t), loss)
    assert "temperature=4.0" in repr(kd)


def _hand_det(s_outs, t_outs, T, box_weight, delta):
    num, den = 0.0, 0.0
    for sc, sb, tc, tb in zip(*s_outs, *t_outs):
        sc, sb = sc.detach(), sb.detach()
        b, ak, h, w = sb.shape
        a = ak // 4
        c = sc.shape[1] // a
        for n in range(b):
            for i in range(h):
                for j in range(w):
                    for k in range(a):
                        sl = sc[n, k * c:(k + 1) * c, i, j].double()
                        tl = tc[n, k * c:(k + 1) * c, i, j].double()
                        pt, ps = torch.sigmoid(tl / T), torch.sigmoid(sl / T)
                        kl = float((pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))).sum())
                        d = (sb[n, k * 4:(k + 1) * 4, i, j] - tb[n, k * 4:(k + 1) * 4, i, j]).double().abs()
                        hub = float(torch.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta)).sum())
                        wgt = float(torch.sigmoid(tl).max())
                        num += wgt * (kl * T * T + box_weight * hub)
                        den += wgt
    return num / max(den, 1.0)


def _det_outputs(g, b=2, a=3, c=2, sizes=((4, 4), (2, 2)), dtype=torch.float64, grad=False):
    cls = [torch.randn(b, a * c, h, w, generator=g, dtype=dtype, requires_grad=grad) for h, w in sizes]
    box = [(torch.randn(b, a * 4, h, w, generator=g, dtype=dtype) * 0.2).requires_grad_(grad) for h, w in sizes]
    return cls, box


def test_detection_kd_value_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    s, t = _det_outputs(g, grad=True), _det_outputs(g)
    val = detection_kd_loss(s, t, temperature=2.0, box_weight=0.5, huber_delta=0.1)
    assert float(val.detach()) == pytest.approx(_hand_det(s, t, 2.0, 0.5, 0.1), rel=1e-10)
    assert float(detection_kd_loss(t, t)) == pytest.approx(0.0, abs=1e-12)

    def f(c0, c1, b0, b1):
        return detection_kd_loss(([c0, c1], [b0, b1]), t, temperature=1.5, box_weight=2.0, huber_delta=0.3)

    assert torch.autograd.gradcheck(f, (*s[0], *s[1]))


def test_detection_distillation_loss_with_and_without_hard_loss():
    g = torch.Generator().manual_seed(4)
    t_out = _det_outputs(g, dtype=torch.float32)

    class Teacher(nn.Module):
        def forward(self, x):
            return t_out

    s_out = _det_outputs(g, dtype=torch.float32)
    hard = lambda outs, targets: sum(o.square().mean() for o in outs[0]) * targets  # noqa: E731
    kd_only = DetectionDistillationLoss(Teacher(), temperature=1.0)
    both = DetectionDistillationLoss(Teacher(), temperature=1.0, alpha=0.25, hard_loss=hard)
    x = torch.zeros(2, 3, 8, 8)
    pure = detection_kd_loss(s_out, t_out)
    assert torch.allclose(kd_only(s_out, inputs=x), pure)
    assert torch.allclose(both(s_out, 2.0, inputs=x), 0.25 * pure + 0.75 * hard(s_out, 2.0))
    assert torch.allclose(both(s_out, 2.0, teacher_outputs=t_out), both(s_out, 2.0, inputs=x))


def test_bad_input():
    t = nn.Linear(3, 2)
    s = torch.randn(4, 2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationLoss(t, temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillationLoss(t, alpha=1.5)
    with pytest.raises(TypeError, match="temperature must be a finite float"):
        DistillationLoss(t, temperature=math.nan)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        DistillationLoss("resnet")
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, torch.randn(4, 3))
    with pytest.raises(ValueError, match="targets must be an int64 tensor"):
        kd_loss(s, s, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="float tensor"):
        kd_loss(s.long(), s)
    kd = DistillationLoss(t)
    with pytest.raises(ValueError, match="exactly one of inputs"):
        kd(s, None)
    with pytest.raises(TypeError, match="student_outputs must be"):
        detection_kd_loss(torch.randn(2, 3), torch.randn(2, 3))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="outputs must match"):
        detection_kd_loss(_det_outputs(g, a=3), _det_outputs(g, a=2))
    with pytest.raises(ValueError, match="huber_delta must be > 0"):
        DetectionDistillationLoss(t, huber_delta=0.0)


@pytest.mark.slow  # prunes and back-propagates an EfficientDet-D0: ~10-20 s on 2 shared cores
def test_detection_kd_trains_a_pruned_efficientdet_toward_its_teacher():
    from effops.compress import prune
    from effops.models import create_model

    torch.manual_seed(5)
    teacher = create_model("tf_efficientdet_d0", num_classes=3, image_size=128).eval()
    x = torch.randn(2, 3, 128, 128)
    student, _ = prune(teacher, amount=0.5, example_input=x[:1])
    student.eval()  # frozen BN (fused kernels, fused backward)
    kd = DetectionDistillationLoss(teacher, temperature=2.0)
    opt = torch.optim.SGD([p for n, p in student.named_parameters() if "predict" in n or "conv_rep" in n], lr=0.05)
    loss = kd(student(x), inputs=x)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = kd(student(x), inputs=x)
    assert math.isfinite(float(loss.detach())) and float(after) < float(loss.detach())
    assert all(p.grad is None for p in teacher.parameters())
