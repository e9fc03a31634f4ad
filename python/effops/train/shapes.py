"""``shapes``: a deterministic synthetic detection set that effops generates itself (no download).

Each image is a textured background (smooth value noise, a linear gradient, sine stripes or a
checkerboard, optionally with fine grain) with 1..``max_objects`` solid shapes of ``CLASSES`` at
random sizes, colours, rotations and positions, drawn in order so later shapes occlude earlier
ones. How the boxes stay correct:

* every shape is rasterised (Pillow ``ImageDraw``, no anti-aliasing) into a mask; an owner map
  records which shape each pixel shows, so a box is the tight box of that shape's *visible*
  pixels, and ``area`` is its visible pixel count (what COCOeval's area ranges use);
* a new shape (drawn on top, so itself whole) that would leave an earlier one with less than
  ``min_visible`` of its pixels visible is rejected and placed again elsewhere (up to 20 tries,
  then left out): no object is mostly hidden, and no unlabelled fragment of a dropped object is
  left in the image.

Boxes are COCO ``[x, y, w, h]`` in pixel-edge coordinates: a shape covering pixel columns
``x0..x1`` has ``x = x0`` and ``w = x1 - x0 + 1``. Category ids are ``1..len(CLASSES)``.

Layout (the COCO folder layout ``effops eval --data DIR`` reads)::

    <dir>/annotations/instances_train.json   <dir>/train/000001.png ...
    <dir>/annotations/instances_val.json     <dir>/val/000001.png ...
    <dir>/shapes.json                        the parameters (written last: marks a complete set)

``<dir>`` is ``<cache>/shapes/v<VERSION>-<params>-<hash>``, ``<cache>`` the ``cache_dir`` argument,
else ``$EFFOPS_CACHE``, else ``$XDG_CACHE_HOME/effops``, else ``~/.cache/effops``. Generation writes
into a temporary sibling folder and renames it into place (atomic), so processes generating the same
set at once never see or leave a partial one. Every image has its own random stream (seeded by
``(seed, split, index)``), so the files are byte-identical for the same parameters whatever the
number of worker processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

VERSION = 1
CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "crescent")
_SPLIT_CODE = {"train": 1, "val": 2}
_MAX_TRIES = 20


def _pil():
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:  # pragma: no cover - pillow is in the train / test extras
        raise ImportError("effops.train.shapes needs Pillow: pip install 'effops[train]'") from e
    return Image, ImageDraw


# ------------------------------------------------------------------------------ drawing
def _background(rng: np.random.Generator, size: int, Image) -> np.ndarray:
    """A textured H x W x 3 float background in 0..255."""
    kind = int(rng.integers(0, 4))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 0:  # smooth value noise: a coarse random grid, bicubic upsampling
        g = int(rng.integers(3, 12))
        grid = rng.uniform(0, 255, (g, g, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
    elif kind == 1:  # linear gradient between two colours
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
        img = c0 + (c1 - c0) * t[..., None]
    elif kind == 2:  # sine stripes
        period = rng.uniform(6, 40)
        t = 0.5 + 0.5 * np.sin(u * (2 * math.pi / period))
        img = c0 + (c1 - c0) * t[..., None]
    else:  # checkerboard, rotated
        cell = rng.uniform(8, 40)
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        img = c0 + (c1 - c0) * t[..., None]
    return np.clip(img, 0, 255).astype(np.float32)


def _polygon(cx: float, cy: float, radii: Sequence[float], rot: float) -> List[Tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k, r in enumerate(radii)]


def _shape_mask(cls: int, cx: float, cy: float, r: float, rot: float, size: int, Image, ImageDraw) -> np.ndarray:
    """Boolean mask of shape ``CLASSES[cls]`` with circumradius ``r`` centred at (cx, cy)."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    name = CLASSES[cls]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        d.polygon(_polygon(cx, cy, [r] * 4, rot), fill=255)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, [r] * 3, rot), fill=255)
    elif name == "star":
        d.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5, rot), fill=255)
    elif name == "hexagon":
        d.polygon(_polygon(cx, cy, [r] * 6, rot), fill=255)
    elif name == "cross":  # a plus sign: arms of half-width 0.3 r
        a, c, s = 0.3 * r, math.cos(rot), math.sin(rot)
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a),
               (-a, r)]
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=255)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        q = 0.55 * r
        d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    elif name == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy, q = cx + 0.5 * r * math.cos(rot), cy + 0.5 * r * math.sin(rot), 0.85 * r
        d.ellipse([ox - q, oy - q, ox + q, oy + q], fill=0)
    else:  # pragma: no cover - CLASSES and this function change together
        raise AssertionError(name)
    return np.asarray(m) > 0


def _render(params: dict, split: str, index: int) -> Tuple[np.ndarray, List[dict], np.ndarray, List[int]]:
    """Image ``index`` of ``split``: (H x W x 3 uint8, [{category_id, bbox, area}], the owner map
    (object index per pixel, -1 = background), each object's whole-mask pixel count)."""
    Image, ImageDraw = _pil()
    size, min_visible = params["image_size"], params["min_visible"]
    rng = np.random.default_rng([params["seed"], _SPLIT_CODE[split], index])
    img = _background(rng, size, Image)
    owner = np.full((size, size), -1, dtype=np.int16)
    objects: List[Tuple[int, np.ndarray, int]] = []  # (class, colour, full mask area)
    r_min, r_max = params["min_radius"], params["max_radius_frac"] * size
    for _ in range(int(rng.integers(1, params["max_objects"] + 1))):
        cls = int(rng.integers(0, len(CLASSES)))
        for _try in range(_MAX_TRIES):
            r = float(math.exp(rng.uniform(math.log(r_min), math.log(max(r_max, r_min + 1)))))
            cx, cy = rng.uniform(r, size - r, 2)
            mask = _shape_mask(cls, float(cx), float(cy), r, float(rng.uniform(0, 2 * math.pi)), size, Image,
                               ImageDraw)
            area = int(mask.sum())
            if area < 16:
                continue
            trial = owner.copy()
            trial[mask] = len(objects)
            if objects:
                counts = np.bincount(trial[trial >= 0].ravel(), minlength=len(objects) + 1)
                if any(counts[i] < min_visible * objects[i][2] for i in range(len(objects))):
                    continue
            # a colour that stands out from the background under the shape
            under = img[mask].mean(0)
            for _c in range(8):
                colour = rng.uniform(0, 255, 3)
                if np.abs(colour - under).sum() > 150:
                    break
            owner = trial
            objects.append((cls, colour, area))
            break
    for i, (_, colour, _) in enumerate(objects):
        img[owner == i] = colour
    grain = float(rng.choice([0.0, 0.0, 0.0, 3.0]))  # fine grain on a quarter of the images (PNG size)
    if grain and params["grain"]:
        img = img + rng.normal(0.0, grain, img.shape)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    anns = []
    for i, (cls, _, _) in enumerate(objects):
        ys, xs = np.nonzero(owner == i)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        anns.append(dict(category_id=cls + 1, bbox=[x0, y0, x1 - x0 + 1, y1 - y0 + 1], area=int(len(xs))))
    return out, anns, owner, [o[2] for o in objects]


def _render_chunk(params: dict, split: str, indices: List[int], folder: str) -> List[Tuple[int, List[dict]]]:
    Image, _ = _pil()
    out = []
    for i in indices:
        arr, anns, _, _ = _render(params, split, i)
        Image.fromarray(arr).save(os.path.join(folder, f"{i + 1:06d}.png"), format="PNG", compress_level=6)
        out.append((i, anns))
    return out


# ------------------------------------------------------------------------------ the set
def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"shapes: {name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"shapes: {name} must be >= {lo}, got {v}")
    return int(v)


def shapes_params(*, num_train: int = 2000, num_val: int = 300, image_size: int = 256, seed: int = 0,
                  max_objects: int = 6, min_radius: int = 8, max_radius_frac: float = 0.22,
                  min_visible: float = 0.5, grain: bool = True) -> dict:
    """The validated parameters of a set (what its folder name and hash are made from): images per
    split, their side in pixels, the seed, at most ``max_objects`` per image, circumradius from
    ``min_radius`` px to ``max_radius_frac`` of the side (log-uniform), the fraction of an object
    that must stay visible, and whether a quarter of the images get fine grain (sigma 3)."""
    p = dict(version=VERSION, classes=list(CLASSES), num_train=_check_int("num_train", num_train, 1),
             num_val=_check_int("num_val", num_val, 1), image_size=_check_int("image_size", image_size, 32),
             seed=_check_int("seed", seed, 0), max_objects=_check_int("max_objects", max_objects, 1),
             min_radius=_check_int("min_radius", min_radius, 4))
    for name, v, lo, hi in (("max_radius_frac", max_radius_frac, 0.02, 0.5), ("min_visible", min_visible, 0.0, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
            raise ValueError(f"shapes: {name} must be a number in [{lo}, {hi}], got {v!r}")
        p[name] = float(v)
    if not isinstance(grain, bool):
        raise TypeError(f"shapes: grain must be a bool, got {type(grain).__name__}")
    p["grain"] = grain
    if p["max_radius_frac"] * p["image_size"] < p["min_radius"]:
        raise ValueError(f"shapes: image_size {image_size} is too small for min_radius {min_radius} "
                         f"(max radius {p['max_radius_frac'] * p['image_size']:.1f} px)")
    return p


def cache_root(cache_dir=None) -> Path:
    """The effops cache folder: ``cache_dir``, else $EFFOPS_CACHE, else $XDG_CACHE_HOME/effops, else
    ~/.cache/effops."""
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"shapes: cache_dir must be a path, got {type(cache_dir).__name__}")
        return Path(cache_dir)
    env = os.environ.get("EFFOPS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "effops"


def shapes_dir(params: dict, cache_dir=None) -> Path:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = (f"v{VERSION}-{params['num_train']}-{params['num_val']}-{params['image_size']}px-seed{params['seed']}-"
            f"{digest}")
    return cache_root(cache_dir) / "shapes" / name


def _coco_json(params: dict, split: str, results: List[Tuple[int, List[dict]]]) -> dict:
    size = params["image_size"]
    images, annotations = [], []
    for i, anns in sorted(results, key=lambda t: t[0]):
        images.append(dict(id=i + 1, file_name=f"{i + 1:06d}.png", width=size, height=size))
        for a in anns:
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, iscrowd=0, **a))
    cats = [dict(id=k + 1, name=n, supercategory="shape") for k, n in enumerate(CLASSES)]
    info = dict(description=f"effops shapes v{VERSION} ({split})", version=str(VERSION))
    return dict(info=info, images=images, annotations=annotations, categories=cats, licenses=[])


def _generate(params: dict, folder: Path, workers: int, progress: bool) -> None:
    (folder / "annotations").mkdir(parents=True)
    jobs = []
    for split in ("train", "val"):
        (folder / split).mkdir()
        n = params[f"num_{split}"]
        chunk = max(1, min(64, -(-n // max(1, 4 * workers))))
        jobs += [(split, list(range(s, min(n, s + chunk)))) for s in range(0, n, chunk)]
    results: Dict[str, list] = {"train": [], "val": []}
    total, done, t0 = params["num_train"] + params["num_val"], 0, time.perf_counter()

    def report(split, res):
        nonlocal done
        results[split] += res
        done += len(res)
        if progress:
            print(f"\reffops shapes: {done}/{total} images ({time.perf_counter() - t0:.0f} s)", end="",
                  file=sys.stderr, flush=True)

    if workers <= 1:
        for split, idx in jobs:
            report(split, _render_chunk(params, split, idx, str(folder / split)))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork where there is one: no re-import of the caller's __main__ (scripts without a main guard)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futs = [(split, ex.submit(_render_chunk, params, split, idx, str(folder / split))) for split, idx in jobs]
            for split, f in futs:
                report(split, f.result())
    if progress:
        print(file=sys.stderr)
    for split in ("train", "val"):
        text = json.dumps(_coco_json(params, split, results[split]), separators=(",", ":"))
        (folder / "annotations" / f"instances_{split}.json").write_text(text)
    (folder / "shapes.json").write_text(json.dumps(params, indent=1, sort_keys=True))


@contextlib.contextmanager
def _generation_lock(path: Path):
    """An advisory lock (flock) held while generating, so processes asking for the same set at once
    (DDP ranks, parallel test runs) wait for the first instead of each rendering it. Correctness
    does not depend on it: the atomic rename alone keeps the folder whole (no flock: no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_shapes(*, cache_dir=None, workers: Optional[int] = None, progress: bool = False, **kw) -> Path:
    """The folder of the ``shapes`` set with these parameters (see ``shapes_params`` for them and
    their defaults: 2000 train + 300 val images of 256 x 256), generated on first use.

    ``workers``: processes that render images (default: the CPUs this process may use, at most 8;
    0 or 1 renders in this process). The result does not depend on it.
    """
    params = shapes_params(**kw)
    final = shapes_dir(params, cache_dir)
    marker = final / "shapes.json"
    if marker.is_file():
        return final
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    workers = _check_int("workers", workers, 0)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _generation_lock(final.parent / f".{final.name}.lock"):
        if marker.is_file():  # made by the process that held the lock before us
            return final
        if final.exists():
            raise RuntimeError(f"shapes: {final} exists but is not a complete shapes set (no shapes.json); "
                               f"delete the folder to generate it again")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            _generate(params, tmp / "set", workers, progress)
            try:
                os.rename(tmp / "set", final)
            except OSError:
                if not marker.is_file():  # not a concurrent generator winning the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = ["CLASSES", "VERSION", "ensure_shapes", "shapes_params", "shapes_dir", "cache_root"]
