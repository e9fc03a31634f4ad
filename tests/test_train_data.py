"""effops.train data: the generated ``shapes`` set (determinism, tight boxes, occlusion rule, atomic
cache), the COCO reader (label mapping, effdet's skipping rules, errors on untrusted files),
transforms (boxes follow the pixels), collate padding, loader order (seed / epoch / resume / DDP)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("pycocotools")

from effops.train import CocoDetection, build_loader, collate_detections, ensure_shapes, make_dataset  # noqa: E402
from effops.train import shapes as shapes_mod  # noqa: E402
from effops.train.data import load_coco_json, resolve_data  # noqa: E402
from effops.train.transforms import DetectionTransform, RandomFlip, flip_boxes, yxyx_to_xyxy  # noqa: E402

TINY = dict(num_train=12, num_val=4, image_size=96, seed=3)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    return ensure_shapes(cache_dir=tmp_path_factory.mktemp("cache"), workers=0, **TINY)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ shapes
def test_shapes_deterministic_and_independent_of_workers(tiny_shapes, tmp_path):
    again = ensure_shapes(cache_dir=tmp_path, workers=2, **TINY)
    assert again.name == tiny_shapes.name and again != tiny_shapes
    a, b = _digest(tiny_shapes), _digest(again)
    assert len(a) == TINY["num_train"] + TINY["num_val"] + 3 and a == b
    other = ensure_shapes(cache_dir=tmp_path, workers=0, **dict(TINY, seed=4))
    assert other != again and _digest(other) != a
    # a second call reuses the folder; nothing temporary is left next to it
    assert ensure_shapes(cache_dir=tmp_path, **TINY) == again
    assert sorted(p.name for p in again.parent.iterdir() if not p.name.endswith(".lock")) == \
        sorted([again.name, other.name])


def _generate_into(cache, queue):
    queue.put(str(ensure_shapes(cache_dir=cache, workers=0, **TINY)))


def test_shapes_concurrent_generators_agree(tiny_shapes, tmp_path, monkeypatch):
    """Two processes asking for the same set at once: one renders it (the other waits on the lock),
    both get the one complete folder."""
    import multiprocessing as mp

    real, log = shapes_mod._generate, tmp_path / "generated.log"

    def logged(*a):
        with open(log, "a") as f:
            f.write("x\n")
        real(*a)

    monkeypatch.setattr(shapes_mod, "_generate", logged)  # inherited by the forked children
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_generate_into, args=(tmp_path / "cache", q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = {q.get(timeout=5) for _ in procs}
    assert len(got) == 1
    folder = Path(got.pop())
    assert _digest(folder) == _digest(tiny_shapes)
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no temporary folder left
    assert log.read_text() == "x\n"  # rendered once


def test_shapes_losing_the_rename_race_keeps_the_winner(tiny_shapes, tmp_path, monkeypatch):
    """Deterministically: another generator finishes while this one is still writing."""
    real = shapes_mod._generate
    monkeypatch.setattr(shapes_mod, "_generation_lock", lambda path: contextlib.nullcontext())  # no flock: a race

    def slow(params, folder, workers, progress):
        real(params, folder, workers, progress)
        monkeypatch.setattr(shapes_mod, "_generate", real)
        winner = ensure_shapes(cache_dir=tmp_path, workers=0, **TINY)  # completes and renames first
        (winner / "winner").write_text("")

    monkeypatch.setattr(shapes_mod, "_generate", slow)
    folder = ensure_shapes(cache_dir=tmp_path, workers=0, **TINY)
    assert (folder / "winner").is_file()  # the first complete folder stays; the loser's copy is gone
    (folder / "winner").unlink()
    assert _digest(folder) == _digest(tiny_shapes)
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]


def test_shapes_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFOPS_CACHE", str(tmp_path / "env"))
    p = shapes_mod.shapes_dir(shapes_mod.shapes_params(**TINY))
    assert p.parent == tmp_path / "env" / "shapes" and p.name.startswith(f"v{shapes_mod.VERSION}-12-4-96px-seed3-")
    assert shapes_mod.shapes_dir(shapes_mod.shapes_params(**TINY), tmp_path / "x").parent == tmp_path / "x" / "shapes"


def test_shapes_bad_params_and_partial_folder(tmp_path):
    with pytest.raises(TypeError, match="num_train"):
        shapes_mod.shapes_params(num_train=2.5)
    with pytest.raises(ValueError, match="min_visible"):
        shapes_mod.shapes_params(min_visible=1.5)
    with pytest.raises(ValueError, match="too small"):
        shapes_mod.shapes_params(image_size=32)
    final = shapes_mod.shapes_dir(shapes_mod.shapes_params(**TINY), tmp_path)
    final.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="not a complete shapes set"):
        ensure_shapes(cache_dir=tmp_path, workers=0, **TINY)


def test_shapes_layout_and_annotations(tiny_shapes):
    for split, n in (("train", TINY["num_train"]), ("val", TINY["num_val"])):
        data = load_coco_json(tiny_shapes / "annotations" / f"instances_{split}.json")
        assert [im["id"] for im in data["images"]] == list(range(1, n + 1))
        assert [c["name"] for c in data["categories"]] == list(shapes_mod.CLASSES)
        assert all((tiny_shapes / split / im["file_name"]).is_file() for im in data["images"])
        per_image = {}
        for a in data["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96 and a["area"] <= w * h
        assert all(1 <= len(v) <= 6 for v in per_image.values())


def test_shapes_boxes_tight_on_the_pixels(tmp_path):
    """Without grain every object is one solid colour: the pixels of that colour near its box
    span exactly the box, and their count is the annotated area."""
    params = shapes_mod.shapes_params(**dict(TINY, grain=False, image_size=128))
    checked = 0
    for index in range(10):
        img, anns, owner, full = shapes_mod._render(params, "train", index)
        assert len(anns) == len(full) >= 1
        for i, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            colours = img[owner == i]
            assert (colours == colours[0]).all()  # solid
            y0, x0 = max(0, y - 3), max(0, x - 3)
            win = img[y0:y + h + 3, x0:x + w + 3]
            match = (win == colours[0]).all(-1)
            ys, xs = np.nonzero(match)
            assert (xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1) == (x, y, x + w, y + h)
            assert match.sum() == a["area"]
            # the occlusion rule: at least min_visible of every object shows
            assert a["area"] >= params["min_visible"] * full[i]
            checked += 1
    assert checked >= 20


def test_shapes_occluded_objects_are_not_kept():
    """With min_visible = 1, no object may lose a single pixel to a later one: every mask is whole."""
    params = shapes_mod.shapes_params(**dict(TINY, min_visible=1.0, max_objects=6))
    for index in range(6):
        _, anns, owner, full = shapes_mod._render(params, "train", index)
        assert [a["area"] for a in anns] == full
        assert [int((owner == i).sum()) for i in range(len(anns))] == full


# ------------------------------------------------------------------------------ COCO reader
def _write_coco(root: Path, data: dict, images=((64, 48), (80, 80))) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(images):
        PIL.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / "img" / f"{i + 1}.png")
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


def _coco_dict() -> dict:
    return dict(
        images=[dict(id=1, file_name="1.png", width=64, height=48), dict(id=2, file_name="2.png", width=80, height=80)],
        categories=[dict(id=7, name="b"), dict(id=3, name="a")],
        annotations=[
            dict(id=1, image_id=1, category_id=3, bbox=[4, 6, 10, 20], area=200, iscrowd=0),
            dict(id=2, image_id=1, category_id=7, bbox=[20.5, 2, 30, 10]),  # no area / iscrowd: filled in
            dict(id=3, image_id=1, category_id=7, bbox=[0, 0, 64, 48], iscrowd=1),  # crowd: not a target
            dict(id=4, image_id=1, category_id=3, bbox=[5, 5, 0, 8]),  # zero width: skipped (effdet)
            dict(id=5, image_id=1, category_id=3, bbox=[5, 5, 0.5, 8]),  # narrower than 1 px: skipped
            dict(id=6, image_id=2, category_id=3, bbox=[1, 1, 5, 5], ignore=1),  # ignored
        ])


def test_coco_reader_labels_and_skipping(tmp_path):
    ann = _write_coco(tmp_path, _coco_dict())
    ds = CocoDetection(tmp_path / "img", ann, image_size=64, train=False)
    assert len(ds) == 2 and ds.img_ids == [1, 2] and ds.num_classes == 2
    assert ds.cat_id_to_label == {7: 1, 3: 2} and ds.label_to_cat_id == {1: 7, 2: 3}  # file order, offset 1
    boxes, labels = ds.gt(0)
    np.testing.assert_array_equal(boxes, [[6, 4, 26, 14], [2, 20.5, 12, 50.5]])  # yxyx
    np.testing.assert_array_equal(labels, [2, 1])
    assert ds.gt(1)[0].shape == (0, 4)
    x, t = ds[0]  # 64 x 48 at 64: scale 1, boxes unchanged
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(t["boxes"], torch.tensor(boxes))
    assert t["img_id"] == 1 and t["img_scale"] == 1.0 and t["img_size"] == (48, 64)
    assert t["labels"].dtype == torch.int64
    # COCOeval needs area and iscrowd on every ground-truth entry
    assert ds.coco.anns[2]["area"] == 300.0 and ds.coco.anns[2]["iscrowd"] == 0
    xy = CocoDetection(tmp_path / "img", ann, image_size=64, train=False, box_format="xyxy", cat_ids_as_labels=True)
    _, t2 = xy[0]
    torch.testing.assert_close(t2["boxes"], torch.tensor(yxyx_to_xyxy(boxes)))
    assert t2["labels"].tolist() == [3, 7] and xy.num_classes == 7
    assert len(CocoDetection(tmp_path / "img", ann, image_size=64, train=True, ignore_empty=False)) == 2
    with pytest.warns(UserWarning, match="smaller than min_img_size"):
        assert len(CocoDetection(tmp_path / "img", ann, image_size=64, train=False, min_img_size=50)) == 1


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("images"), "'images' must be a list"),
    (lambda d: d["images"][0].update(id="1"), r"images\[0\]: 'id' must be an int"),
    (lambda d: d["images"][1].update(id=1), "duplicate image id 1"),
    (lambda d: d["images"][0].update(width=0), "'width' must be a positive int"),
    (lambda d: d["images"][0].update(file_name="../../etc/passwd"), "relative path"),
    (lambda d: d["images"][0].update(file_name="/abs.png"), "relative path"),
    (lambda d: d["categories"][1].update(id=7), "duplicate category id 7"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"annotations\[0\] \(id 1\): 'bbox' has a negative"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "'bbox' must be"),
    (lambda d: d["annotations"][0].update(bbox=["1", 2, 3, 4]), "'bbox' must be"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), "'bbox' must be"),
    (lambda d: d["annotations"][1].update(image_id=99), r"annotations\[1\] \(id 2\): 'image_id' must be the id"),
    (lambda d: d["annotations"][1].update(category_id=1), "'category_id' must be the id"),
    (lambda d: d["annotations"][1].pop("bbox"), "has no 'bbox' field"),
    (lambda d: d["annotations"][1].update(id=1), "duplicate annotation id"),
    (lambda d: d["annotations"][0].update(iscrowd=2), "'iscrowd' must be 0 or 1"),
    (lambda d: d["annotations"][0].update(area=-1), "'area' must be a number >= 0"),
])
def test_coco_reader_rejects_bad_files(tmp_path, edit, match):
    d = _coco_dict()
    edit(d)
    ann = _write_coco(tmp_path, d)
    with pytest.raises(ValueError, match=match) as e:
        CocoDetection(tmp_path / "img", ann, image_size=64, train=False)
    assert str(ann) in str(e.value)


def test_coco_reader_file_errors(tmp_path):
    ann = _write_coco(tmp_path, _coco_dict())
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="bad.json: not a valid JSON file"):
        CocoDetection(tmp_path / "img", bad, image_size=64, train=False)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="top level must be a JSON object"):
        CocoDetection(tmp_path / "img", bad, image_size=64, train=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        CocoDetection(tmp_path / "img", tmp_path / "nope.json", image_size=64, train=False)
    (tmp_path / "img" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .* are missing .*: 2.png"):
        CocoDetection(tmp_path / "img", ann, image_size=64, train=False)
    ds = CocoDetection(tmp_path / "img", ann, image_size=64, train=False, check_files=False)
    with pytest.raises(FileNotFoundError, match=r"2.png.*image id 2.*missing"):
        ds[1]
    (tmp_path / "img" / "2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*2.png"):
        ds[1]
    PIL.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "img" / "2.png")
    with pytest.raises(ValueError, match=r"2.png' is 12 x 10 but .* says width 80, height 80"):
        ds[1]
    with pytest.raises(ValueError, match="box_format"):
        CocoDetection(tmp_path / "img", ann, image_size=64, train=False, box_format="xywh")


def test_resolve_data_layouts(tmp_path, tiny_shapes):
    assert resolve_data(tiny_shapes, "val") == (tiny_shapes / "val", tiny_shapes / "annotations" / "instances_val.json")
    alt = tmp_path / "alt"
    (alt / "annotations").mkdir(parents=True)
    (alt / "images" / "val").mkdir(parents=True)
    (alt / "annotations" / "instances_val.json").write_text("{}")
    assert resolve_data(alt, "val") == (alt / "images" / "val", alt / "annotations" / "instances_val.json")
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        resolve_data(alt, "train")
    with pytest.raises(ValueError, match="split must be a plain name"):
        resolve_data(alt, "../val")
    with pytest.raises(FileNotFoundError, match="neither 'shapes' nor a folder"):
        resolve_data(tmp_path / "missing", "val")


# ------------------------------------------------------------------------------ transforms
def _rect_image(w=120, h=90, box=(20, 30, 50, 100)):
    """A grey image with one red rectangle at yxyx ``box`` (pixel edges)."""
    a = np.full((h, w, 3), 128, np.uint8)
    y1, x1, y2, x2 = box
    a[y1:y2, x1:x2] = (255, 0, 0)
    return PIL.fromarray(a), np.array([box], np.float32), np.array([1], np.int64)


def test_flip_twice_is_identity():
    img, boxes, labels = _rect_image()
    flip = RandomFlip(prob=1.0)
    rng = np.random.default_rng(0)
    i1, b1, _ = flip(img, boxes, labels, rng)
    np.testing.assert_array_equal(b1, [[20, 20, 50, 90]])  # x -> 120 - x
    assert (np.asarray(i1)[20:50, 20:90] == (255, 0, 0)).all()
    i2, b2, _ = flip(i1, b1, labels, rng)
    np.testing.assert_array_equal(b2, boxes)
    assert (np.asarray(i2) == np.asarray(img)).all()
    np.testing.assert_array_equal(flip_boxes(flip_boxes(boxes, 77), 77), boxes)


@pytest.mark.parametrize("seed", range(12))
def test_train_transform_boxes_follow_the_pixels(seed):
    img, boxes, labels = _rect_image()
    tf = DetectionTransform(64, train=True, scale=(0.5, 2.0), interpolation="nearest", fill=0)
    x, b, lab, img_scale = tf(img, boxes, labels, np.random.default_rng(seed))
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    red = x[0] > 2.0  # normalised 255 in the red channel
    if not red.any():  # cropped away entirely
        assert b.shape == (0, 4)
        return
    assert b.shape == (1, 4) and lab.tolist() == [1]
    ys, xs = np.nonzero(red)
    got = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)
    # within a pixel and a half: nearest resampling (half a pixel) and effdet's single scale for both
    # axes while the resized size is rounded down (less than a pixel at the far edge)
    np.testing.assert_allclose(b[0], got, atol=1.5)
    assert 0.5 / 120 * 64 - 1e-6 <= 1 / img_scale <= 2.0 / 120 * 64 + 1e-6


def test_eval_transform_records_the_scale():
    img, boxes, labels = _rect_image(w=200, h=100)
    tf = DetectionTransform(64, train=False)
    x, b, _, img_scale = tf(img, boxes, labels)
    assert img_scale == pytest.approx(200 / 64)
    np.testing.assert_allclose(b * img_scale, boxes, rtol=1e-6)
    # the pad below the resized image is the mean colour, normalised: about 0
    assert np.abs(x[:, 40:, :]).max() < 0.02
    with pytest.raises(ValueError, match="needs rng"):
        DetectionTransform(64, train=True)(img, boxes, labels)
    with pytest.raises(ValueError, match="image_size"):
        DetectionTransform(0, train=False)


# ------------------------------------------------------------------------------ batches and order
def test_collate_pads_with_minus_one():
    t = lambda n: dict(boxes=torch.arange(4 * n, dtype=torch.float32).view(n, 4), labels=torch.arange(1, n + 1),  # noqa
                       img_id=n, img_scale=0.5, img_size=(10, 20))
    batch = [(torch.zeros(3, 8, 8), t(2)), (torch.ones(3, 8, 8), t(0)), (torch.zeros(3, 8, 8), t(3))]
    out = collate_detections(batch)
    assert out["images"].shape == (3, 3, 8, 8) and out["boxes"].shape == (3, 3, 4) and out["labels"].shape == (3, 3)
    assert out["labels"].tolist() == [[1, 2, -1], [-1, -1, -1], [1, 2, 3]]
    assert (out["boxes"][0, 2] == -1).all() and (out["boxes"][1] == -1).all()
    torch.testing.assert_close(out["boxes"][2], t(3)["boxes"])
    assert out["img_id"].tolist() == [2, 0, 3] and out["img_size"].tolist() == [[10, 20]] * 3
    assert out["img_scale"].dtype == torch.float32
    empty = collate_detections([(torch.zeros(3, 8, 8), t(0))])
    assert empty["boxes"].shape == (1, 1, 4) and empty["labels"].tolist() == [[-1]]
    fixed = collate_detections(batch, pad_to=2)
    assert fixed["labels"].tolist() == [[1, 2], [-1, -1], [1, 2]]


def _epoch(loader):
    return [(b["img_id"].tolist(), b["images"], b["boxes"]) for b in loader]


def _same(a, b):
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, ia, ba), (_, ib, bb) in zip(a, b):
        torch.testing.assert_close(ia, ib, rtol=0, atol=0)
        torch.testing.assert_close(ba, bb, rtol=0, atol=0)


def test_loader_order_is_a_function_of_seed_and_epoch(tiny_shapes):
    ds = make_dataset(tiny_shapes, "train", image_size=64, train=True, seed=5)
    e0 = _epoch(build_loader(ds, 4, train=True, seed=1, epoch=0))
    assert len(e0) == 3 and sorted(sum((x[0] for x in e0), [])) == list(range(1, 13))
    _same(e0, _epoch(build_loader(ds, 4, train=True, seed=1, epoch=0, workers=2)))  # workers change nothing
    e1 = _epoch(build_loader(ds, 4, train=True, seed=1, epoch=1))
    assert [x[0] for x in e1] != [x[0] for x in e0]
    assert [x[0] for x in _epoch(build_loader(ds, 4, train=True, seed=2, epoch=0))] != [x[0] for x in e0]
    # resuming inside epoch 1 after one batch replays the rest of it exactly
    _same(e1[1:], _epoch(build_loader(ds, 4, train=True, seed=1, epoch=1, skip_batches=1)))
    # the same image gets other augmentation in another epoch, the same in the same epoch
    ds.set_epoch(0)
    a = ds[3][0]
    ds.set_epoch(1)
    assert not torch.equal(a, ds[3][0])
    ds.set_epoch(0)
    assert torch.equal(a, ds[3][0])
    # evaluation: every image once, in file order, last partial batch kept
    val = make_dataset(tiny_shapes, "train", image_size=64, train=False)
    assert [x[0] for x in _epoch(build_loader(val, 5, train=False))] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, 0, train=True)


def test_distributed_sampler_split_matches_one_process(tiny_shapes):
    from torch.utils.data.distributed import DistributedSampler

    ds = make_dataset(tiny_shapes, "train", image_size=64, train=True, seed=5)
    single = _epoch(build_loader(ds, 4, train=True, seed=9, epoch=2))
    ranks = [_epoch(build_loader(ds, 2, train=True, seed=9, epoch=2, sampler=DistributedSampler(
        ds, num_replicas=2, rank=r, shuffle=True, seed=9))) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (ids, images, _) in enumerate(single):
        got = ranks[0][step][0] + ranks[1][step][0]
        assert sorted(got) == sorted(ids)
        assert not set(ranks[0][step][0]) & set(ranks[1][step][0])
        # the same images with the same augmentation, wherever they are loaded
        for r in range(2):
            for j, img_id in enumerate(ranks[r][step][0]):
                torch.testing.assert_close(ranks[r][step][1][j], images[ids.index(img_id)], rtol=0, atol=0)


# ------------------------------------------------------------------------------ effdet as the oracle
def test_matches_effdets_parser_and_eval_transform(tiny_shapes):
    """effdet's CocoParser (category ids as labels, yxyx) + transforms_coco_eval on the same files:
    the same boxes, labels, scale and pixels."""
    effdet_data = pytest.importorskip("effdet.data")
    from effdet.data.parsers import CocoParserCfg, create_parser

    ann = tiny_shapes / "annotations" / "instances_val.json"
    parser = create_parser("coco", cfg=CocoParserCfg(ann_filename=str(ann)))
    theirs = effdet_data.DetectionDatset(tiny_shapes / "val", parser=parser,
                                         transform=effdet_data.transforms.transforms_coco_eval(
                                             img_size=64, use_prefetcher=True))
    ours = CocoDetection(tiny_shapes / "val", ann, image_size=64, train=False, cat_ids_as_labels=True)
    assert len(ours) == len(theirs) and ours.img_ids == parser.img_ids
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255
    for i in range(len(ours)):
        img_t, tgt_t = theirs[i]
        x, tgt = ours[i]
        torch.testing.assert_close(x * std + mean, torch.from_numpy(img_t).float(), atol=2e-3, rtol=0)
        np.testing.assert_allclose(tgt["boxes"].numpy(), tgt_t["bbox"], rtol=1e-6)
        assert tgt["labels"].tolist() == tgt_t["cls"].tolist()
        assert tgt["img_scale"] == pytest.approx(tgt_t["img_scale"])
        assert tgt["img_size"] == tuple(reversed(tgt_t["img_size"]))  # effdet: (width, height)


@pytest.mark.parametrize("seed", range(6))
def test_random_resize_pad_matches_effdets_given_the_same_draws(seed):
    """The crop / pad / box arithmetic of effdet's RandomResizePad, fed the draws ours made."""
    tf = pytest.importorskip("effdet.data.transforms")
    from effops.train.transforms import RandomResizePad

    rs = np.random.default_rng(100 + seed)
    w, h = int(rs.integers(40, 200)), int(rs.integers(40, 200))
    img = PIL.fromarray(rs.integers(0, 256, (h, w, 3), dtype=np.uint8))
    y1, x1 = rs.uniform(0, h / 2, 8), rs.uniform(0, w / 2, 8)
    boxes = np.stack([y1, x1, y1 + rs.uniform(1, h / 2, 8), x1 + rs.uniform(1, w / 2, 8)], 1).astype(np.float32)
    labels = np.arange(1, 9, dtype=np.int64)
    ours = RandomResizePad(96, scale=(0.3, 2.0), interpolation="bilinear", fill=(124, 116, 104))
    o_img, o_boxes, o_labels, o_scale = ours(img, boxes.copy(), labels, np.random.default_rng(seed))
    # the draws, as ours takes them from the generator
    g = np.random.default_rng(seed)
    f = g.uniform(0.3, 2.0)
    s = min(f * 96 / h, f * 96 / w)
    sh, sw = int(h * s), int(w * s)
    oy, ox = int(max(0.0, float(sh - 96)) * g.uniform(0, 1)), int(max(0.0, float(sw - 96)) * g.uniform(0, 1))
    theirs = tf.RandomResizePad(96, scale=(0.3, 2.0), interpolation="bilinear", fill_color=(124, 116, 104))
    theirs._get_params = lambda _img: (sh, sw, oy, ox, s)
    t_img, anno = theirs(img, dict(bbox=boxes.copy(), cls=labels.copy()))
    assert (np.asarray(o_img) == np.asarray(t_img)).all()
    np.testing.assert_allclose(o_boxes, anno["bbox"], rtol=1e-6, atol=1e-4)
    assert o_labels.tolist() == anno["cls"].tolist() and o_scale == pytest.approx(anno["img_scale"])
