"""effops.train.loop: resume (clean stop and SIGKILL at random moments) equals the uninterrupted
run, 2 gloo processes equal one process with the whole batch, corrupt / mismatched checkpoints
give clear errors, a short train + eval smoke run through the CLI, and the schedule / EMA / SyncBN
/ journal pieces."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("PIL")

from effops.train.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from effops.train.distributed import SyncBatchNorm2d, convert_sync_batchnorm  # noqa: E402
from effops.train.loop import TrainConfig, TrainError, build_model, train  # noqa: E402
from effops.train.metrics_log import MetricsLog, read_metrics  # noqa: E402
from effops.train.schedule import ModelEma, WarmupCosine  # noqa: E402

TINY_MODEL = dict(fpn_channels=16, fpn_cell_repeats=1, box_class_repeats=1, backbone_width=0.25, backbone_depth=0.34)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core machine: one thread is several times faster than two
    # competing with other processes (OpenMP waits), and the results do not depend on it
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from effops.train.shapes import ensure_shapes

    return str(ensure_shapes(cache_dir=tmp_path_factory.mktemp("cache"), num_train=12, num_val=6, image_size=96,
                             workers=1))


class _NotPlainData:
    pass


def _cfg(out, data, **kw):
    base = dict(out=str(out), data=data, image_size=128, epochs=2, batch_size=4, workers=0, lr=2e-3,
                model_overrides=dict(TINY_MODEL), drop_path_rate=0.2, ema=0.99, evaluate=False, progress=False,
                log_every=1, eval_batch_size=3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(out):
    ck = load_checkpoint(str(Path(out) / "checkpoint.pt"))
    return ck


def _assert_same_weights(a, b, rtol=1e-4, atol=1e-6):
    for key in ("model", "model_ema"):
        sa, sb = a[key], b[key]
        assert sa.keys() == sb.keys()
        for k in sa:
            if sa[k].is_floating_point():
                torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m: f"{key}.{k}: {m}")
            else:
                assert torch.equal(sa[k], sb[k]), f"{key}.{k}"


def _train_losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"]


# ----------------------------------------------------------------------------- resume
def test_resume_after_a_stop_equals_the_uninterrupted_run(shapes_dir, tmp_path):
    full = train(_cfg(tmp_path / "full", shapes_dir))
    assert full["step"] == 6  # 12 images / batch 4 = 3 steps per epoch, 2 epochs
    # stop inside epoch 1 (step 2), resume; stop at the epoch boundary (step 3), resume to the end
    train(_cfg(tmp_path / "cut", shapes_dir, max_steps=2))
    ck = _weights(tmp_path / "cut")
    assert (ck["epoch"], ck["position"], ck["step"]) == (0, 2, 2)
    train(_cfg(tmp_path / "cut", shapes_dir, max_steps=3, resume=True))
    ck = _weights(tmp_path / "cut")
    assert (ck["epoch"], ck["position"], ck["step"]) == (1, 0, 3)
    train(_cfg(tmp_path / "cut", shapes_dir, resume=True, checkpoint_every=2))  # allowed to differ
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    a, b = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "cut")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))  # the journal holds each step once
    assert [l for _, l in a] == pytest.approx([l for _, l in b], rel=1e-5)


_WORKER = textwrap.dedent("""
    import json, sys
    from effops.train.loop import TrainConfig, train
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


def _run_worker(cfg: TrainConfig, extra_env=None, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "python") + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(cfg.to_dict())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _last_logged_step(out_dir) -> int:
    recs = read_metrics(Path(out_dir) / "metrics.jsonl")
    return max((r["step"] for r in recs), default=0)


@pytest.mark.slow
def test_resume_after_sigkill_at_random_moments(shapes_dir, tmp_path):
    kw = dict(epochs=3, checkpoint_every=1, workers=1)  # 9 steps; a data worker process is killed too
    ref = _run_worker(_cfg(tmp_path / "ref", shapes_dir, **kw))
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err.decode()[-2000:]
    rnd = random.Random(1234)
    out_dir, kills, at = tmp_path / "killed", 0, []
    # one kill during start-up, then kills at random moments after random steps (inside a step, while
    # a checkpoint or the journal is being written, ...), then a run to the end
    plan = [("time", rnd.uniform(0.5, 2.0))] + [("step", rnd.choice(r)) for r in ((2, 3), (4, 5, 6), (7, 8))] + [None]
    for what in plan:
        p = _run_worker(_cfg(out_dir, shapes_dir, resume=(out_dir / "checkpoint.pt").exists(), **kw))
        t0 = time.monotonic()
        while what is not None and p.poll() is None and time.monotonic() - t0 < 300:
            if what[0] == "time" and time.monotonic() - t0 >= what[1]:
                break
            if what[0] == "step" and _last_logged_step(out_dir) >= what[1]:
                time.sleep(rnd.uniform(0.0, 0.3))
                break
            time.sleep(0.02)
        if what is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            ck = out_dir / "checkpoint.pt"
            at.append(load_checkpoint(str(ck))["step"] if ck.exists() else None)
            continue
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
        break
    print(f"killed {kills} times; the checkpoint was at steps {at}")
    assert kills >= 3 and len({s for s in at if s is not None and 0 < s < 9}) >= 2, at  # killed mid-training
    _assert_same_weights(_weights(tmp_path / "ref"), _weights(out_dir))
    assert [s for s, _ in _train_losses(out_dir)] == list(range(1, 10))


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(shapes_dir, tmp_path):
    # SGD at a small lr: a tiny BN net trained from scratch amplifies fp differences ~20x per step at lr 0.05
    kw = dict(epochs=1, batch_size=4, optimizer="sgd", lr=0.02, drop_path_rate=0.0, max_steps=3)
    one = _run_worker(_cfg(tmp_path / "one", shapes_dir, **kw))
    _, err = one.communicate(timeout=600)
    assert one.returncode == 0, err.decode()[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg = json.dumps(_cfg(tmp_path / "two", shapes_dir, **kw).to_dict())
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(_free_port()), "--no-python", sys.executable, "-c", _WORKER, cfg],
                       env=env, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    _assert_same_weights(a, b, rtol=1e-3, atol=2e-4)  # measured: <= 8e-5 on weights of magnitude 0.5
    assert [l for _, l in _train_losses(tmp_path / "one")] == pytest.approx(
        [l for _, l in _train_losses(tmp_path / "two")], rel=1e-4)
    # and BN really is synchronised: running statistics equal the one-process ones
    bn = [k for k in a["model"] if k.endswith("running_var")]
    for k in bn:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5)


def test_sync_batchnorm_conversion_keeps_every_bn_and_state():
    cfg = TrainConfig(out="unused", image_size=128, model_overrides=dict(TINY_MODEL))
    model = build_model(cfg, 3)
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    keys = list(model.state_dict())
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    model.train()
    ref = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model2 = build_model(cfg, 3)
    model2.load_state_dict(sd)
    convert_sync_batchnorm(model2)
    assert sum(isinstance(m, SyncBatchNorm2d) for m in model2.modules()) == n_bn > 30
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model2.modules())
    assert list(model2.state_dict()) == keys
    model2.train()
    got = model2(x)  # one process: plain BatchNorm2d semantics
    for r, g in zip(ref[0] + ref[1], got[0] + got[1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad checkpoints
def test_corrupt_and_mismatched_checkpoints(shapes_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, shapes_dir, max_steps=2))
    path = out / "checkpoint.pt"
    good = path.read_bytes()
    with pytest.raises(TrainError, match="already holds a run"):
        train(_cfg(out, shapes_dir))
    with pytest.raises(TrainError, match="holds no checkpoint.pt"):
        train(_cfg(tmp_path / "empty", shapes_dir, resume=True))
    with pytest.raises(CheckpointError, match="other settings.*batch_size"):
        train(_cfg(out, shapes_dir, resume=True, batch_size=2))
    with pytest.raises(CheckpointError, match="other settings.*model_overrides"):
        train(_cfg(out, shapes_dir, resume=True, model_overrides=dict(TINY_MODEL, fpn_channels=24)))
    path.write_bytes(good[: len(good) // 2])  # torn file
    with pytest.raises(CheckpointError, match="cannot read"):
        train(_cfg(out, shapes_dir, resume=True))
    torch.save({"x": _NotPlainData()}, path)  # an object that is not plain data
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(str(path))
    torch.save({"conv.weight": torch.zeros(3)}, path)  # a state_dict, not a training checkpoint
    with pytest.raises(CheckpointError, match="not an effops training checkpoint"):
        load_checkpoint(str(path))
    ck = torch.load(__import__("io").BytesIO(good), weights_only=True)
    ck["step"] = "3"
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="'step' must be a int"):
        load_checkpoint(str(path))
    ck = torch.load(__import__("io").BytesIO(good), weights_only=True)
    ck["model"] = {k: v for k, v in ck["model"].items() if "class_net" not in k}
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="does not fit the model.*missing"):
        train(_cfg(out, shapes_dir, resume=True))
    ck = torch.load(__import__("io").BytesIO(good), weights_only=True)
    ck["rng"][0]["torch"] = torch.zeros(3)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        train(_cfg(out, shapes_dir, resume=True))
    path.write_bytes(good)
    train(_cfg(out, shapes_dir, resume=True, max_steps=3))  # the intact file still resumes
    assert _weights(out)["step"] == 3


def test_bad_settings_are_named():
    for kw, match in ((dict(image_size=100), "multiple of 128"), (dict(amp="fp8"), "amp"),
                      (dict(amp="fp16"), "fp16.*CUDA"), (dict(optimizer="lamb"), "optimizer"),
                      (dict(batch_size=0), "batch_size"), (dict(ema=1.0), "ema"), (dict(lr=-1.0), "lr"),
                      (dict(model_overrides=dict(depth=2)), "model_overrides")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(out="x", **kw).validate()


# ----------------------------------------------------------------------------- smoke: CLI train + eval
def test_cli_train_then_eval_smoke(shapes_dir, tmp_path, capsys):
    from effops.cli import main

    out = tmp_path / "d0"
    rc = main(["train", "--model", "tf_efficientdet_d0", "--data", shapes_dir, "--image-size", "128", "--epochs", "2",
               "--batch-size", "4", "--workers", "0", "--ema", "0.9", "--lr", "2e-3", "--out", str(out),
               "--no-progress", "--log-every", "2"])
    assert rc == 0
    recs = read_metrics(out / "metrics.jsonl")
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and all(0.0 <= r["AP"] <= 1.0 for r in evals)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["loss"] > 0 for r in recs if r["kind"] == "train")
    capsys.readouterr()
    rc = main(["eval", "--model", "tf_efficientdet_d0", "--weights", str(out / "checkpoint.pt"), "--data", shapes_dir,
               "--out", str(tmp_path / "eval.json")])
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["image_size"] == [128, 128]
    assert res["AP"] == pytest.approx(evals[-1]["AP"], abs=1e-6)  # the EMA weights the epoch evaluated


def test_python_m_effops_train_help():
    p = subprocess.run([sys.executable, "-m", "effops", "train", "--help"], capture_output=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO / "python")))
    assert p.returncode == 0 and b"--resume" in p.stdout and b"--amp" in p.stdout


# ----------------------------------------------------------------------------- pieces
def test_warmup_cosine_schedule_and_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = WarmupCosine(opt, 110, 10, warmup_factor=0.1, min_lr_ratio=0.0)
    lrs = [s.lr]
    for _ in range(110):
        s.step()
        lrs.append(s.lr)
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5) and lrs[110] == pytest.approx(0.0, abs=1e-12)
    s2 = WarmupCosine(torch.optim.SGD([p], lr=1.0), 110, 10, warmup_factor=0.1)
    s2.load_state_dict(s.state_dict())
    assert s2.lr == pytest.approx(0.0, abs=1e-12) and s2.step_count == 110
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(torch.optim.SGD([p], lr=1.0), 120, 10).load_state_dict(s.state_dict())


def test_ema_decay_warmup_and_buffers():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(m, 0.9998)
    w0 = ema.module[0].weight.clone()
    with torch.no_grad():
        m[0].weight.add_(1.0)
        m[1].num_batches_tracked.fill_(5)
    ema.update(m)
    d = min(0.9998, 2 / 11)
    torch.testing.assert_close(ema.module[0].weight, d * w0 + (1 - d) * m[0].weight)
    assert int(ema.module[1].num_batches_tracked) == 5
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_metrics_log_drops_the_tail_of_a_killed_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for s in (1, 2, 3):
        log.append(dict(kind="train", step=s, loss=float(s)))
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # torn by a kill
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(path, keep_until_step=2).append(dict(kind="train", step=3, loss=9.0))
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 9.0)]


def test_initial_weights_keep_all_but_a_resized_class_head(tmp_path):
    from effops.train.loop import _load_initial_weights

    cfg = TrainConfig(out="unused", image_size=128, model_overrides=dict(TINY_MODEL))
    torch.manual_seed(1)
    src = build_model(cfg, 5)
    torch.save(src.state_dict(), tmp_path / "five.pt")
    torch.manual_seed(2)
    same = build_model(cfg, 5)
    assert "class head" not in _load_initial_weights(same, str(tmp_path / "five.pt"))
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    torch.manual_seed(3)
    other = build_model(cfg, 3)
    head_before = other.class_net.predict.conv_pw.weight.clone()
    assert "class head re-initialised" in _load_initial_weights(other, str(tmp_path / "five.pt"))
    assert torch.equal(other.class_net.predict.conv_pw.weight, head_before)
    assert torch.equal(other.backbone.conv_stem.weight, src.backbone.conv_stem.weight)
    wider = build_model(TrainConfig(out="unused", image_size=128, model_overrides=dict(TINY_MODEL, fpn_channels=24)), 3)
    with pytest.raises(ValueError, match="does not fit"):
        _load_initial_weights(wider, str(tmp_path / "five.pt"))
