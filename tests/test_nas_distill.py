"""effops search --teacher MODEL --teacher-weights CKPT: the NAS proxy trains each candidate with
the teacher's soft targets (compress.distill.kd_loss); with kd_alpha=0 it is the plain proxy
exactly, the teacher is read weights-only, and a teacher that does not fit fails before the search."""

from __future__ import annotations

import fractions

import pytest
import torch

from effops.nas import HANDMADE_BASELINE, ProxyConfig, proxy_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(max_samples=300, channels=4, epochs=1, batch_size=32, threads=1)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from effops.models import create_model

    torch.manual_seed(3)
    t = create_model("efficientnet_b0", num_classes=10, in_chans=1)  # digits: 10 classes, 1 channel
    path = tmp_path_factory.mktemp("teacher") / "b0.pt"
    torch.save({"state_dict": t.state_dict()}, path)
    return str(path)


def test_teacher_changes_the_proxy_loss_and_alpha_zero_is_the_plain_proxy(teacher_file):
    plain = proxy_train(HANDMADE_BASELINE, ProxyConfig(**TINY), seed=0)
    kd = dict(TINY, teacher="efficientnet_b0", teacher_weights=teacher_file)
    a = proxy_train(HANDMADE_BASELINE, ProxyConfig(**kd, kd_alpha=0.9, kd_temperature=4.0), seed=0)
    b = proxy_train(HANDMADE_BASELINE, ProxyConfig(**kd, kd_alpha=0.9, kd_temperature=4.0), seed=0)
    assert a["train_loss"] != plain["train_loss"] and 0.0 <= a["accuracy"] <= 1.0
    assert a == {**b, "train_seconds": a["train_seconds"]}  # deterministic with a teacher too
    zero = proxy_train(HANDMADE_BASELINE, ProxyConfig(**kd, kd_alpha=0.0), seed=0)
    # alpha 0: the loss is the proxy's cross-entropy alone, and loading the teacher drew nothing
    # from the trial's RNG: the very same run
    for k in ("train_loss", "val_loss", "accuracy"):
        assert zero[k] == plain[k], k


def test_teacher_soft_targets_are_its_logits(teacher_file, monkeypatch):
    from effops.compress import distill
    from effops.nas import evaluate as ev

    seen = {}
    real = distill.kd_loss

    def spy(s, t, y, **kw):
        seen.setdefault("first", (t.clone(), kw))
        return real(s, t, y, **kw)

    monkeypatch.setattr(distill, "kd_loss", spy)
    cfg = ProxyConfig(**TINY, teacher="efficientnet_b0", teacher_weights=teacher_file, kd_alpha=0.5, kd_temperature=2.0)
    proxy_train(HANDMADE_BASELINE, cfg, seed=1)
    t, kw = seen["first"]
    assert kw == dict(temperature=2.0, alpha=0.5, label_smoothing=0.1)
    teacher = distill.load_teacher("efficientnet_b0", teacher_file, num_classes=10, in_chans=1)
    ds = cfg.dataset()
    perm = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher(ds.train_x[perm[:32]])
    torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)


def test_teacher_config_errors(teacher_file, tmp_path):
    from effops.compress.distill import load_teacher

    with pytest.raises(ValueError, match="needs both teacher"):
        ProxyConfig(teacher="efficientnet_b0")
    with pytest.raises(ValueError, match="needs both teacher"):
        ProxyConfig(teacher_weights=teacher_file)
    with pytest.raises(ValueError, match="kd_alpha must be a finite number in"):
        ProxyConfig(teacher="efficientnet_b0", teacher_weights=teacher_file, kd_alpha=2.0)
    back = ProxyConfig.from_dict(ProxyConfig(teacher="efficientnet_b0", teacher_weights=teacher_file).to_dict())
    assert back.teacher == "efficientnet_b0" and back.kd_temperature == 4.0
    with pytest.raises(ValueError, match="does not fit efficientnet_b0 with 5 classes"):
        load_teacher("efficientnet_b0", teacher_file, num_classes=5, in_chans=1)
    bad = tmp_path / "obj.pt"
    torch.save({"state_dict": fractions.Fraction(1, 3)}, bad)  # weights_only refuses objects
    with pytest.raises(ValueError, match="weights_only=True"):
        load_teacher("efficientnet_b0", str(bad), num_classes=10, in_chans=1)


def test_cli_search_teacher_flags(teacher_file, tmp_path, monkeypatch, capsys):
    from effops.cli import main
    from effops.nas import runner

    seen = {}

    def fake_run_search(config, out, resume=False):
        seen["config"] = config
        return [dict(trial=0, reward=0.5, accuracy=0.5, latency_ms=1.0)]

    monkeypatch.setattr(runner, "run_search", fake_run_search)
    rc = main(["search", "--out", str(tmp_path / "s"), "--budget", "1", "--teacher", "efficientnet_b0",
               "--teacher-weights", teacher_file, "--kd-alpha", "0.3", "--kd-temperature", "2", "--no-progress"])
    assert rc == 0
    p = seen["config"].proxy
    assert (p.teacher, p.teacher_weights, p.kd_alpha, p.kd_temperature) == ("efficientnet_b0", teacher_file, 0.3, 2.0)
    capsys.readouterr()
    rc = main(["search", "--out", str(tmp_path / "s2"), "--teacher", "efficientnet_b1", "--teacher-weights",
               teacher_file])
    assert rc == 2 and "--teacher: " in capsys.readouterr().err and "s2" not in seen
