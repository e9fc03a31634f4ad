"""``effops classify``: top-5 of generated images with a checkpoint; unreadable files are per-file
errors that do not stop the others."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from effops.cli import main
from effops.models import create_model

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "b0_10.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model.eval()


def test_classify_prints_top5_and_reports_bad_files(tmp_path, checkpoint, capsys):
    ckpt, model = checkpoint
    rng = np.random.default_rng(0)
    good = []
    for i, (w, h) in enumerate([(80, 60), (50, 90)]):
        p = tmp_path / f"img{i}.png"
        PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        good.append(p)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(10)))
    rc = main(["classify", str(good[0]), str(bad), str(good[1]), "--model", "efficientnet_b0", "--weights", str(ckpt),
               "--image-size", "64", "--labels", str(labels)])
    out, err = capsys.readouterr()
    assert rc == 1  # one file failed, the others were classified
    assert "broken.jpg: cannot read the image" in err
    blocks = out.strip().split(str(good[1]))
    assert str(good[0]) in blocks[0]
    for block in blocks:
        rows = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+class(\d+)$", block, flags=re.M)
        assert len(rows) == 5
        probs = [float(r[1]) for r in rows]
        assert probs == sorted(probs, reverse=True) and all(r[0] == r[2] for r in rows)
    # the printed top class is the model's own prediction on the same preprocessing
    from effops.models.classify_cli import preprocess

    with torch.no_grad():
        expect = model(preprocess(good[1], 64)).softmax(-1)[0]
    first = re.findall(r"^\s+(\d+)\s+([0-9.]+)", blocks[1], flags=re.M)[0]
    assert int(first[0]) == int(expect.argmax()) and float(first[1]) == pytest.approx(expect.max().item(), abs=1e-4)


def test_classify_bad_arguments(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    assert main(["classify", "x.png", "--model", "resnet50", "--weights", str(ckpt)]) == 2
    assert "unknown classification model 'resnet50'" in capsys.readouterr().err
    assert main(["classify", "x.png", "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
