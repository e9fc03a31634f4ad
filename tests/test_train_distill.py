"""effops train --teacher MODEL --teacher-weights CKPT: the student's loss is kd_alpha * KD +
(1 - kd_alpha) * the detection loss, training runs and moves the weights differently, teacher
checkpoints are read weights-only and a teacher that does not fit is refused by name."""

import fractions
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("PIL")

from effops.train.checkpoint import load_checkpoint  # noqa: E402
from effops.train.loop import TrainConfig, build_model, train  # noqa: E402
from effops.train.metrics_log import read_metrics  # noqa: E402

TINY = dict(fpn_channels=16, fpn_cell_repeats=1, box_class_repeats=1, backbone_width=0.25, backbone_depth=0.34)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from effops.train.shapes import ensure_shapes

    return str(ensure_shapes(cache_dir=tmp_path_factory.mktemp("cache"), num_train=8, num_val=4, image_size=96,
                             workers=1))


def _cfg(out, data, **kw):
    base = dict(out=str(out), data=data, image_size=128, epochs=1, batch_size=4, workers=0, lr=2e-3,
                model_overrides=dict(TINY), ema=0.0, evaluate=False, progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def teacher_ckpt(shapes_dir, tmp_path_factory):
    # a wider tiny teacher (other BiFPN width than the student: only the outputs must line up)
    out = tmp_path_factory.mktemp("teacher")
    train(_cfg(out, shapes_dir, seed=7, model_overrides=dict(TINY, fpn_channels=24), ema=0.9))
    return str(out / "checkpoint.pt")


def _train_recs(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"]


def test_teacher_changes_the_loss_and_training(shapes_dir, teacher_ckpt, tmp_path):
    train(_cfg(tmp_path / "plain", shapes_dir))
    train(_cfg(tmp_path / "kd", shapes_dir, teacher="tf_efficientdet_d0", teacher_weights=teacher_ckpt,
               kd_alpha=0.7, kd_temperature=2.0))
    plain, kd = _train_recs(tmp_path / "plain"), _train_recs(tmp_path / "kd")
    assert len(plain) == len(kd) == 2 and "kd_loss" not in plain[0]
    assert all(r["kd_loss"] > 0 and math.isfinite(r["kd_loss"]) for r in kd)
    # step 1: same seed, init and batch, so the detection loss is the plain run's: the logged loss
    # is 0.7 * KD + 0.3 * it (the student's weights only diverge after the first update)
    want = 0.7 * kd[0]["kd_loss"] + 0.3 * plain[0]["loss"]
    assert kd[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert abs(kd[0]["loss"] - plain[0]["loss"]) > 1e-3
    a, b = load_checkpoint(str(tmp_path / "plain" / "checkpoint.pt")), load_checkpoint(str(tmp_path / "kd" / "checkpoint.pt"))
    diff = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"]
               if a["model"][k].is_floating_point())
    assert diff > 1e-6  # the teacher's gradient moved the student elsewhere
    assert b["config"]["teacher_weights"] == teacher_ckpt


def test_kd_term_equals_detection_kd_loss_of_the_teacher(shapes_dir, teacher_ckpt):
    # the loop's KD term is compress.distill's detection_kd_loss of (student, loaded teacher)
    from effops.compress.distill import detection_kd_loss
    from effops.train.loop import _kd_term
    from effops.train.teacher import load_detection_teacher

    t = load_detection_teacher("tf_efficientdet_d0", teacher_ckpt, num_classes=8, image_size=128)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert t.class_net.predict.conv_pw.weight.shape[1] == 24  # built with the checkpoint's fpn_channels
    cfg = _cfg("unused", shapes_dir, kd_temperature=2.0, kd_box_weight=0.5)
    torch.manual_seed(0)
    s = build_model(cfg, 8).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        so, to = s(x), t(x)
    got = _kd_term(cfg, so, to, world_size=1)
    torch.testing.assert_close(got, detection_kd_loss(so, to, temperature=2.0, box_weight=0.5))
    assert float(got) > 0


def test_teacher_errors_are_named(shapes_dir, teacher_ckpt, tmp_path):
    from effops.train.teacher import load_detection_teacher

    with pytest.raises(ValueError, match="needs both teacher"):
        _cfg(tmp_path / "a", shapes_dir, teacher="tf_efficientdet_d0").validate()
    with pytest.raises(ValueError, match="needs both teacher"):
        _cfg(tmp_path / "a", shapes_dir, teacher_weights=teacher_ckpt).validate()
    with pytest.raises(ValueError, match="kd_alpha"):
        _cfg(tmp_path / "a", shapes_dir, kd_alpha=1.5).validate()
    with pytest.raises(ValueError, match="kd_temperature"):
        _cfg(tmp_path / "a", shapes_dir, kd_temperature=0.0).validate()
    with pytest.raises(ValueError, match="not of --teacher 'tf_efficientdet_d1'"):
        load_detection_teacher("tf_efficientdet_d1", teacher_ckpt, num_classes=8, image_size=128)
    with pytest.raises(ValueError, match="image size 128"):
        load_detection_teacher("tf_efficientdet_d0", teacher_ckpt, num_classes=8, image_size=256)
    with pytest.raises(ValueError, match="classifier for 8 classes"):
        load_detection_teacher("tf_efficientdet_d0", teacher_ckpt, num_classes=5, image_size=128)
    bad = tmp_path / "pickled.pt"
    torch.save({"model": fractions.Fraction(1, 3)}, bad)  # an object: weights_only refuses to unpickle it
    with pytest.raises(ValueError, match="refused"):
        load_detection_teacher("tf_efficientdet_d0", str(bad), num_classes=8, image_size=128)


def test_cli_flags_reach_the_config(monkeypatch, tmp_path):
    from effops import cli
    from effops.train import loop

    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return dict(step=0, epochs_done=0, metrics={}, checkpoint="-")

    monkeypatch.setattr(loop, "train", fake_train)
    rc = cli.main(["train", "--out", str(tmp_path / "o"), "--teacher", "tf_efficientdet_d1", "--teacher-weights",
                   "t.pt", "--kd-alpha", "0.25", "--kd-temperature", "3", "--kd-box-weight", "2", "--no-progress"])
    assert rc == 0
    c = seen["cfg"]
    assert (c.teacher, c.teacher_weights, c.kd_alpha, c.kd_temperature, c.kd_box_weight) == (
        "tf_efficientdet_d1", "t.pt", 0.25, 3.0, 2.0)
