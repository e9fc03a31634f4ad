"""``metrics.jsonl``: the training journal (one JSON object per line, appended and fsync'ed), and
``curves.png``, its loss and mAP curves.

Records: ``{"kind": "train", "epoch", "step", "loss", "class_loss", "box_loss", "lr", "img_per_s",
"time"}`` every ``log_every`` steps and ``{"kind": "eval", "epoch", "step", "AP", "AP50", ...}``
after each epoch's COCO evaluation. A run killed after its last checkpoint may have appended
records the resumed run will write again: opening the journal with ``keep_until_step=S`` rewrites
it (atomically) without the records after step S, and without a torn last line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..nas._checks import atomic_write


def read_metrics(path) -> List[Dict]:
    """The journal's records (lines that are not JSON objects - a line torn by a kill - skipped)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    with open(p, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


class MetricsLog:
    """Append-only JSON lines; each line is on disk (fsync) when ``append`` returns."""

    def __init__(self, path, keep_until_step: Optional[int] = None):
        self.path = Path(path)
        if keep_until_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= keep_until_step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(str(self.path), lambda f: f.write(text), "w")

    def append(self, record: Dict) -> None:
        line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in record.items()}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def plot_curves(metrics_path, png_path) -> Optional[Path]:
    """Loss (total, class, box) against the step and COCO AP / AP50 against the epoch, as a PNG
    (replaced atomically). Returns its path, or None when matplotlib is missing or nothing is
    logged yet."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read_metrics(metrics_path)
    tr = [r for r in recs if r.get("kind") == "train" and r.get("loss") is not None]
    ev = [r for r in recs if r.get("kind") == "eval" and r.get("AP") is not None]
    if not tr and not ev:
        return None
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4))
    if tr:
        steps = [r["step"] for r in tr]
        for key, label in (("loss", "total"), ("class_loss", "class"), ("box_loss", "box")):
            a0.plot(steps, [r.get(key) for r in tr], label=label)
        a0.set_yscale("log")
        a0.set_xlabel("step")
        a0.set_ylabel("training loss")
        a0.legend()
        a0.grid(True, alpha=0.3)
    if ev:
        epochs = [r["epoch"] for r in ev]
        for key in ("AP", "AP50", "AP75"):
            a1.plot(epochs, [100 * r.get(key, float("nan")) for r in ev], marker="o", label=key)
        a1.set_xlabel("epoch")
        a1.set_ylabel("COCO box AP (%, val)")
        a1.legend()
        a1.grid(True, alpha=0.3)
    fig.tight_layout()
    png = Path(png_path)
    atomic_write(str(png), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return png


__all__ = ["MetricsLog", "read_metrics", "plot_curves"]
