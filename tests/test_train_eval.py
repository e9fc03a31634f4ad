"""effops.train.evaluate and ``effops eval``: COCO mAP through pycocotools on detections mapped back
to the original images (perfect -> 1, shifted -> lower, none -> 0), category ids restored,
restriction to the evaluated images, checkpoint forms (EMA preferred) and CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("pycocotools")

from effops.cli import main  # noqa: E402
from effops.models import Detections, create_model  # noqa: E402
from effops.train import CocoDetection, build_loader, coco_metrics, ensure_shapes, evaluate, make_dataset  # noqa: E402
from effops.train.transforms import yxyx_to_xyxy  # noqa: E402


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return ensure_shapes(cache_dir=tmp_path_factory.mktemp("cache"), workers=0, num_train=4, num_val=6,
                         image_size=96, seed=11)


class FixedDetector(torch.nn.Module):
    """Returns prepared Detections, one per call (the evaluation loader's batches, in order)."""

    def __init__(self, batches, image_size, num_classes):
        super().__init__()
        self.batches, self.calls = list(batches), 0
        self.image_size, self.num_classes = tuple(image_size), num_classes

    def detect(self, x):
        d = self.batches[self.calls]
        self.calls += 1
        assert x.shape[0] == d.boxes.shape[0] and tuple(x.shape[2:]) == self.image_size
        return d


def _detections(ds, batch_size, edit=lambda boxes, labels: (boxes, labels), extra=2):
    """Detections equal to the dataset's targets (model-input pixels, xyxy), edited by ``edit``."""
    per = []
    for i in range(len(ds)):
        _, t = ds[i]
        per.append(edit(yxyx_to_xyxy(t["boxes"]).clone(), t["labels"].clone()))
    out = []
    for s in range(0, len(per), batch_size):
        chunk = per[s:s + batch_size]
        M = max(len(b) for b, _ in chunk) + extra
        B = len(chunk)
        boxes, scores = torch.zeros(B, M, 4), torch.zeros(B, M)
        classes, num = torch.zeros(B, M, dtype=torch.int64), torch.zeros(B, dtype=torch.int64)
        for j, (b, lab) in enumerate(chunk):
            n = len(b)
            boxes[j, :n], classes[j, :n], num[j] = b, lab, n
            scores[j, :n] = torch.linspace(0.95, 0.5, n) if n > 1 else 0.9
        out.append(Detections(boxes, scores, classes, num))
    return out


def test_perfect_shifted_and_empty_predictions(shapes_dir):
    ds = make_dataset(shapes_dir, "val", image_size=64, train=False)  # 96 -> 64: boxes are scaled back
    perfect = evaluate(FixedDetector(_detections(ds, 4), (64, 64), 8), ds, batch_size=4)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    assert perfect["AP75"] == pytest.approx(1.0) and perfect["num_images"] == 6
    gt = {a["id"]: a for a in ds.coco.dataset["annotations"]}
    assert len(perfect["detections"]) == len(gt)
    first = sorted(perfect["detections"], key=lambda d: (d["image_id"], d["bbox"]))[0]
    match = [a for a in gt.values() if a["image_id"] == first["image_id"] and a["category_id"] == first["category_id"]]
    assert min(np.abs(np.array(a["bbox"]) - first["bbox"]).max() for a in match) < 0.01  # original pixels

    def shift(boxes, labels):  # a sixth of each box's width to the side with more room: IoU 5/7
        w = boxes[:, 2] - boxes[:, 0]
        dx = torch.where(boxes[:, 0] + boxes[:, 2] < 64, w, -w) / 6
        return boxes + torch.stack([dx, torch.zeros_like(dx), dx, torch.zeros_like(dx)], 1), labels

    shifted = evaluate(FixedDetector(_detections(ds, 4, shift), (64, 64), 8), ds, batch_size=4)
    # IoU 0.71 passes the thresholds 0.5 ... 0.7, five of COCO's ten
    assert shifted["AP50"] == pytest.approx(1.0) and shifted["AP75"] < 0.1 and 0.3 < shifted["AP"] < 0.7

    wrong = evaluate(FixedDetector(_detections(ds, 4, lambda b, lab: (b, lab % 8 + 1)), (64, 64), 8), ds, batch_size=4)
    assert wrong["AP"] == pytest.approx(0.0, abs=1e-9)

    none = evaluate(FixedDetector(_detections(ds, 4, lambda b, lab: (b[:0], lab[:0])), (64, 64), 8), ds, batch_size=4)
    assert none["detections"] == [] and none["num_images"] == 6
    assert none["AP"] == 0.0 and none["AP50"] == 0.0 and none["AR100"] == 0.0


def test_evaluate_on_one_rank_of_a_ddp_job_sees_every_image(shapes_dir, monkeypatch):
    """Rank 0 of 2 evaluating: the loader must not shard the split like a training loader does."""
    ds = make_dataset(shapes_dir, "val", image_size=64, train=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    assert len(build_loader(ds, 4, train=False).sampler) == 3  # a training-style loader: half the images
    res = evaluate(FixedDetector(_detections(ds, 4), (64, 64), 8), ds, batch_size=4)
    assert res["num_images"] == 6 and res["AP"] == pytest.approx(1.0)


def test_category_ids_restored_and_only_evaluated_images_count(tmp_path):
    (tmp_path / "img").mkdir()
    sizes = [(64, 48), (80, 80), (70, 40)]
    for i, (w, h) in enumerate(sizes):
        PIL.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    data = dict(images=[dict(id=10 + i, file_name=f"{i}.png", width=w, height=h) for i, (w, h) in enumerate(sizes)],
                categories=[dict(id=7, name="b"), dict(id=3, name="a")],
                annotations=[dict(id=1, image_id=10, category_id=3, bbox=[4, 6, 30, 20]),
                             dict(id=2, image_id=11, category_id=7, bbox=[20, 10, 40, 50]),
                             dict(id=3, image_id=12, category_id=7, bbox=[5, 5, 20, 20]),
                             dict(id=4, image_id=11, category_id=3, bbox=[0, 0, 80, 80], iscrowd=1)])
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoDetection(tmp_path / "img", tmp_path / "ann.json", image_size=64, train=False)
    res = evaluate(FixedDetector(_detections(ds, 2), (64, 64), 2), ds, batch_size=2)
    assert res["AP"] == pytest.approx(1.0)
    assert sorted(d["category_id"] for d in res["detections"]) == [3, 7, 7]
    # the first two images only: the third image's object is not a miss
    model = FixedDetector(_detections(ds, 2)[:1], (64, 64), 2)
    model.train()
    sub = evaluate(model, ds, batch_size=2, max_images=2)
    assert sub["num_images"] == 2 and sub["AP"] == pytest.approx(1.0) and model.training
    # ... while scoring those detections on all three images counts that miss
    assert coco_metrics(ds.coco, sub["detections"])["AR100"] < 1.0
    # a loader works as well as a dataset
    loader = build_loader(ds, 2, train=False)
    assert evaluate(FixedDetector(_detections(ds, 2), (64, 64), 2), loader)["AP"] == pytest.approx(1.0)
    # low scores are dropped
    for thr, kept in ((0.89, 3), (0.91, 0)):  # every score is 0.9 here
        low = evaluate(FixedDetector(_detections(ds, 2), (64, 64), 2), ds, batch_size=2, score_threshold=thr)
        assert len(low["detections"]) == kept


def test_evaluate_bad_arguments(shapes_dir):
    ds = make_dataset(shapes_dir, "val", image_size=64, train=False)
    with pytest.raises(TypeError, match="detect"):
        evaluate(torch.nn.Linear(2, 2), ds)
    with pytest.raises(ValueError, match=r"model takes \(128, 128\) inputs"):
        evaluate(FixedDetector([], (128, 128), 8), ds)
    with pytest.raises(ValueError, match="model has 3 classes"):
        evaluate(FixedDetector([], (64, 64), 3), ds)
    with pytest.raises(ValueError, match="train=True"):
        evaluate(FixedDetector([], (64, 64), 8), make_dataset(shapes_dir, "val", image_size=64, train=True))
    with pytest.raises(TypeError, match="CocoDetection"):
        evaluate(FixedDetector([], (64, 64), 8), [1, 2])
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_metrics(ds.coco, [dict(image_id=999, category_id=1, bbox=[0, 0, 1, 1], score=0.5)])


def _train_checkpoint(path, model, ema, data, overrides=None):
    """An ``effops train`` checkpoint's layout (loop.py): weights, EMA weights, EMA counters, the run."""
    torch.save(dict(epoch=3, position=0, model=model.state_dict(), model_ema=ema.state_dict(),
                    ema=dict(num_updates=5, decay=0.9998), image_size=128, model_name="tf_efficientdet_d0",
                    num_classes=8, config=dict(data=str(data), data_options={}, model_overrides=overrides or {},
                                               image_size=128, model="tf_efficientdet_d0")), path)


def test_checkpoint_forms_prefer_ema(tmp_path):
    from effops.models.weights import read_checkpoint

    a = {"w": torch.zeros(2)}
    b = {"w": torch.ones(2)}
    for form in (dict(model=a, ema=b), dict(model=a, model_ema=b, ema=dict(num_updates=3, decay=0.9)),
                 dict(model=a, model_ema=None, ema=None, epoch=1), dict(state_dict=a, state_dict_ema=b)):
        torch.save(form, tmp_path / "c.pth")
        expect = a if form.get("model_ema", 0) is None else b
        assert torch.equal(read_checkpoint(tmp_path / "c.pth")["w"], expect["w"]), form.keys()


def test_eval_cli_prefers_ema_and_reports_errors(shapes_dir, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("tf_efficientdet_d0", num_classes=8, image_size=128)
    ema = create_model("tf_efficientdet_d0", num_classes=8, image_size=128)
    ckpt = tmp_path / "checkpoint.pt"
    _train_checkpoint(ckpt, model, ema, shapes_dir)
    out, dets = tmp_path / "m" / "metrics.json", tmp_path / "dets.json"
    # model, image size and data all come from the checkpoint
    rc = main(["eval", "--weights", str(ckpt), "--batch-size", "2", "--max-images", "2", "--out", str(out),
               "--detections", str(dets)])
    text = capsys.readouterr().out
    assert rc == 0 and "AP50" in text and "2 images" in text
    metrics = json.loads(out.read_text())
    assert metrics["image_size"] == [128, 128] and metrics["num_classes"] == 8 and metrics["split"] == "val"
    assert metrics["data"] == str(shapes_dir)
    assert all(-1.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    # the EMA weights were evaluated: the same detections as evaluating `ema` directly
    direct = evaluate(ema, make_dataset(shapes_dir, "val", image_size=128, train=False), batch_size=2, max_images=2)
    assert json.loads(dets.read_text()) == json.loads(json.dumps(direct["detections"]))
    assert metrics["AP"] == pytest.approx(direct["AP"])
    # a bare state_dict of another class count: a clear error, exit status 2
    small = tmp_path / "three.pth"
    torch.save(create_model("tf_efficientdet_d0", num_classes=3, image_size=128).state_dict(), small)
    assert main(["eval", "--weights", str(small), "--data", str(shapes_dir), "--image-size", "128"]) == 2
    assert "3-class head" in capsys.readouterr().err
    assert main(["eval", "--weights", str(ckpt), "--data", str(tmp_path / "nowhere")]) == 2
    assert "cannot read --data" in capsys.readouterr().err
    assert main(["eval", "--weights", str(tmp_path / "missing.pth"), "--data", str(shapes_dir)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--model", "resnet50", "--weights", str(ckpt), "--data", str(shapes_dir)]) == 2
    assert "--model must be one of" in capsys.readouterr().err


def test_eval_cli_rebuilds_a_reduced_model(shapes_dir, tmp_path, capsys):
    loop = pytest.importorskip("effops.train.loop")
    over = dict(fpn_channels=16, fpn_cell_repeats=1, box_class_repeats=1)
    model = loop.build_model(loop.TrainConfig(out=str(tmp_path), image_size=128, model_overrides=over), 8)
    ckpt = tmp_path / "checkpoint.pt"
    _train_checkpoint(ckpt, model, model, shapes_dir, over)
    assert main(["eval", "--weights", str(ckpt), "--max-images", "1", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 1
