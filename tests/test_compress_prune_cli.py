"""``effops prune``: the schedule end to end, crash + --resume, the chosen checkpoint reloads,
and run directories that cannot be used give clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from effops.cli import main

pytest.importorskip("sklearn")

ARGS = ["prune", "--model", "efficientnet_b0", "--data", "digits", "--image-size", "16", "--max-samples", "100",
        "--train-epochs", "1", "--epochs", "1", "--batch-size", "32", "--threads", "1"]


def test_bad_options_and_run_dirs(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(ARGS + ["--amount", "1.5", "--out", out]) == 2
    assert "--amount must be in (0, 1)" in capsys.readouterr().err
    assert main(ARGS + ["--steps", "0", "--out", out]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(ARGS + ["--teacher-weights", "x.pt", "--out", out]) == 2
    assert "--teacher-weights needs --teacher MODEL" in capsys.readouterr().err
    assert main(ARGS + ["--resume", "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    os.makedirs(out)
    with open(os.path.join(out, "state.pt"), "wb") as f:
        f.write(b"not a torch file")
    assert main(ARGS + ["--out", out]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(ARGS + ["--resume", "--out", out]) == 2
    assert "cannot read" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": Evil()}, os.path.join(out, "state.pt"))
    assert main(ARGS + ["--resume", "--out", out]) == 2
    err = capsys.readouterr()
    assert "refused" in err.err and "pwned" not in err.out
    torch.save({"format": "effops-prune-1", "config": {}, "stage": "train", "step": 0, "epoch": 0, "model": {},
                "history": []}, os.path.join(out, "state.pt"))
    assert main(ARGS + ["--resume", "--out", out]) == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.slow  # trains an EfficientNet-B0 on 2 cores: ~1-2 min
def test_schedule_crash_resume_and_reload(tmp_path, monkeypatch, capsys):
    import effops.compress._finetune as ft
    from effops.compress import shrink_to
    from effops.models import create_model
    from effops.nas.data import load_dataset

    out = str(tmp_path / "run")
    argv = ARGS + ["--amount", "0.5", "--steps", "2", "--teacher", "self", "--out", out]
    real_finetune, calls = ft.finetune, []

    def crashing(*a, **k):  # the second fine-tune (step 1) dies after its first epoch
        calls.append(k.get("start_epoch"))
        if len(calls) == 2:
            def on_epoch(e, o, loss, cb=k["on_epoch"]):
                cb(e, o, loss)
                raise KeyboardInterrupt("simulated crash")
            k = dict(k, on_epoch=on_epoch)
        return real_finetune(*a, **k)

    monkeypatch.setattr(ft, "finetune", crashing)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    st = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    assert st["stage"] == "finetune" and st["step"] == 1 and st["epoch"] == 1 and len(st["history"]) == 1
    calls.clear()
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: (calls.append(k.get("start_epoch")), real_finetune(*a, **k))[1])
    assert main(argv + ["--resume"]) == 0
    assert calls == [1, 0]  # step 1 resumed after its finished epoch (no retraining), then step 2
    rep = json.load(open(os.path.join(out, "report.json")))
    hist = rep["history"]
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert hist[0]["params"] > hist[1]["params"] > hist[2]["params"]
    assert 0.2 < hist[2]["macs"] / hist[0]["macs"] < 0.35  # two steps of 29% keep ~50% of each group
    chosen = rep["chosen"]
    ck = torch.load(os.path.join(out, "pruned.pt"), weights_only=True)
    assert ck["prune"]["step"] == chosen["step"]
    model = shrink_to(create_model("efficientnet_b0", num_classes=10, in_chans=1), ck["state_dict"])
    model.load_state_dict(ck["state_dict"], strict=True)
    ds = load_dataset("digits", 16, 0.2, 0, 100)
    acc = ft.evaluate(model, ds.val_x, ds.val_y)["accuracy"]
    assert acc == pytest.approx(chosen["accuracy"])
    assert "chose step" in capsys.readouterr().out
