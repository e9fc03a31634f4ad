"""The end-of-search report and the export of a found network.

``write_report(out_dir)`` writes into the search directory:

* ``report.md`` / ``report.json``  the best genotypes by reward and the accuracy/latency
                                    Pareto front, with their metrics;
* ``best_genotype.json``           the best genotype (``Genotype.from_json`` reads it);
* ``pareto.png``                   every trial's latency vs accuracy, the front highlighted;
* ``best_cell.png``                a drawing of the best genotype's normal and reduction cells.

``export(out_dir, out_path)`` writes the best (or a chosen) network for retraining: a ``.json``
file (genotype + build arguments; ``load_exported`` rebuilds it) or a ``.py`` module that
builds it with ``effops.nas.build``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from .network import NASNetwork, build
from .objective import pareto_front
from .runner import SearchError, read_config, read_journal
from .space import NUM_INPUT_STATES, Cell, Genotype, GenotypeError

EXPORT_FORMAT = "effops.nas.export/1"


def _ranked(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Best reward first; ties: the earlier trial.
    return sorted(records, key=lambda r: (-r["reward"], r["trial"]))


def _dataset_info(out_dir: str) -> Dict[str, Any]:
    path = os.path.join(out_dir, "dataset.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    ds = read_config(out_dir).proxy.dataset()
    return {"name": ds.name, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "image_size": ds.image_size, "train": len(ds.train_y), "val": len(ds.val_y)}


def summarize(out_dir: str, top: int = 5) -> Dict[str, Any]:
    config = read_config(out_dir)
    records = read_journal(out_dir)
    if not records:
        raise SearchError(f"{out_dir!r}: the journal has no finished trial yet")
    ranked = _ranked(records)
    front = [records[i] for i in pareto_front(records)]
    return {
        "strategy": config.strategy,
        "objective": config.make_objective().describe(),
        "budget": config.budget,
        "trials": len(records),
        "dataset": _dataset_info(out_dir),
        "proxy": config.proxy.to_dict(),
        "best": ranked[:top],
        "pareto_front": front,
    }


def _fmt_row(r: Dict[str, Any]) -> str:
    return (f"| {r['trial']} | {r['reward']:.4f} | {r['accuracy']:.4f} | {r['latency_ms']:.3f} | "
            f"{r['params']:,} | {r['flops'] / 1e6:.2f} |")


def write_report(out_dir: str, top: int = 5) -> Dict[str, Any]:
    s = summarize(out_dir, top)
    records = read_journal(out_dir)
    best = s["best"][0]
    best_g = Genotype.from_dict(best["genotype"])
    with open(os.path.join(out_dir, "best_genotype.json"), "w") as f:
        f.write(best_g.to_json(indent=2) + "\n")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(s, f, indent=2)
    plot_pareto(records, os.path.join(out_dir, "pareto.png"), best_trial=best["trial"])
    draw_genotype(best_g, os.path.join(out_dir, "best_cell.png"),
                  title=f"best genotype: trial {best['trial']}, accuracy {best['accuracy']:.3f}, "
                        f"latency {best['latency_ms']:.2f} ms")
    ds, p = s["dataset"], s["proxy"]
    lines = [
        "# effops search report",
        "",
        f"- strategy: {s['strategy']}; objective: {s['objective']}; trials: {s['trials']} of budget {s['budget']}",
        f"- data: {ds['name']} ({ds['train']} training / {ds['val']} held-out images, "
        f"{ds['image_size']}x{ds['image_size']}, {ds['num_classes']} classes)",
        f"- proxy: C={p['channels']}, N={p['cells']}, {p['epochs']} epoch(s), batch {p['batch_size']}, lr {p['lr']}",
        "- latency: latency-table estimate (per-op timings, calibrated on whole networks; batch 1, "
        "this machine)",
        "",
        "## Best genotypes",
        "",
        "| trial | reward | accuracy | latency ms | params | MFLOPs |",
        "|---|---|---|---|---|---|",
        *[_fmt_row(r) for r in s["best"]],
        "",
        "Best genotype:",
        "",
        "```",
        str(best_g),
        "```",
        "",
        "## Pareto front (accuracy vs latency)",
        "",
        "| trial | reward | accuracy | latency ms | params | MFLOPs |",
        "|---|---|---|---|---|---|",
        *[_fmt_row(r) for r in s["pareto_front"]],
        "",
        "![Pareto front](pareto.png)",
        "",
        "![Best cell](best_cell.png)",
        "",
    ]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return s


# =============================================================================== plots
def _figure(w: float, h: float):
    # No pyplot: a figure with its own Agg canvas leaves the user's matplotlib state alone.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SearchError("the report's plots need matplotlib: pip install 'effops[nas]'") from None
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_pareto(records: List[Dict[str, Any]], path: str, best_trial: Optional[int] = None) -> None:
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    lat = [r["latency_ms"] for r in records]
    acc = [r["accuracy"] for r in records]
    ax.scatter(lat, acc, s=14, c="0.6", label="trials")
    front = [records[i] for i in pareto_front(records)]
    ax.step([r["latency_ms"] for r in front], [r["accuracy"] for r in front], where="post", c="C3", lw=1.5)
    ax.scatter([r["latency_ms"] for r in front], [r["accuracy"] for r in front], s=28, c="C3", label="Pareto front")
    if best_trial is not None:
        b = next(r for r in records if r["trial"] == best_trial)
        ax.scatter([b["latency_ms"]], [b["accuracy"]], s=140, marker="*", c="C0", label="best reward", zorder=3)
    ax.set_xlabel("latency (ms, batch 1)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{len(records)} trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def _draw_cell(ax, cell: Cell, title: str) -> None:
    """NASNet-paper style: per block two op boxes feeding an add node; inputs on the left,
    blocks left to right in index order, their unused outputs into a concat node."""
    dx = 2.8
    pos = {0: (0.0, 1.4), 1: (0.0, -1.4)}  # c_{k-2}, c_{k-1}
    for i in range(len(cell.blocks)):
        pos[NUM_INPUT_STATES + i] = (dx * (i + 1), 1.0 if i % 2 == 0 else -1.0)
    out_x = dx * (len(cell.blocks) + 1) - 0.6
    box = dict(boxstyle="round,pad=0.25", ec="0.4")
    arrow = dict(arrowstyle="-|>", lw=0.9, color="0.35", shrinkA=2, shrinkB=2)
    for i, b in enumerate(cell.blocks):
        bx, by = pos[NUM_INPUT_STATES + i]
        for k, (src, op) in enumerate(((b.input_a, b.op_a), (b.input_b, b.op_b))):
            ox, oy = bx - 1.25, by + (0.45 if k == 0 else -0.45)
            sx, sy = pos[src]
            ax.annotate("", xy=(ox - 0.55, oy), xytext=(sx + 0.35, sy),
                        arrowprops=dict(arrow, connectionstyle=f"arc3,rad={0.08 if k == 0 else -0.08}"))
            ax.text(ox, oy, op, ha="center", va="center", fontsize=6.5, bbox=dict(box, fc="#e2efda"))
            ax.annotate("", xy=(bx - 0.2, by), xytext=(ox + 0.55, oy), arrowprops=arrow)
    for s in cell.output_states():
        sx, sy = pos[s]
        ax.annotate("", xy=(out_x - 0.45, 0), xytext=(sx + 0.25, sy),
                    arrowprops=dict(arrow, color="C3", ls="--", connectionstyle="arc3,rad=-0.1"))
    for s, (x, y) in pos.items():
        label = {0: "c_{k-2}", 1: "c_{k-1}"}.get(s, f"+ b{s - NUM_INPUT_STATES}")
        ax.text(x, y, label, ha="center", va="center", fontsize=8,
                bbox=dict(box, fc="#dde8f5" if s < NUM_INPUT_STATES else "#f5ecd0"))
    ax.text(out_x, 0, "concat", ha="center", va="center", fontsize=8, bbox=dict(box, fc="#f6d5d5"))
    ax.set_xlim(-0.8, out_x + 0.8)
    ax.set_ylim(-2.2, 2.2)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def draw_genotype(genotype: Genotype, path: str, title: str = "") -> None:
    """A PNG of both cells: each block's two ops (green boxes) feed its sum (+ bN); dashed
    edges carry the unused states into the concatenated output."""
    fig = _figure(13, 6.5)
    _draw_cell(fig.add_subplot(2, 1, 1), genotype.normal, "normal cell")
    _draw_cell(fig.add_subplot(2, 1, 2), genotype.reduce, "reduction cell")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)


# =============================================================================== export
def _pick(out_dir: str, rank: int, trial: Optional[int]) -> Dict[str, Any]:
    records = read_journal(out_dir)
    if not records:
        raise SearchError(f"{out_dir!r}: the journal has no finished trial yet")
    if trial is not None:
        for r in records:
            if r["trial"] == trial:
                return r
        raise ValueError(f"--trial {trial} is not in the journal of {out_dir!r}")
    if rank < 1 or rank > len(records):
        raise ValueError(f"--rank must be in 1..{len(records)}, got {rank}")
    return _ranked(records)[rank - 1]


def export(out_dir: str, out_path: str, rank: int = 1, trial: Optional[int] = None) -> Dict[str, Any]:
    """Write the network of the rank-th best trial (or ``trial``) to ``out_path``."""
    if not out_path.endswith((".py", ".json")):
        raise ValueError(f"--out must end in .py or .json, got {out_path!r}")
    record = _pick(out_dir, rank, trial)
    config = read_config(out_dir)
    ds = _dataset_info(out_dir)
    build_args = {"C": config.proxy.channels, "N": config.proxy.cells, "num_classes": ds["num_classes"],
                  "stem": "cifar", "in_channels": ds["in_channels"], "stem_multiplier": config.proxy.stem_multiplier}
    metrics = {k: record[k] for k in ("accuracy", "latency_ms", "params", "flops", "reward")}
    doc = {"format": EXPORT_FORMAT, "genotype": record["genotype"], "build": build_args,
           "trial": record["trial"], "metrics": metrics, "search": os.path.abspath(out_dir),
           "image_size": ds["image_size"]}
    if out_path.endswith(".json"):
        text = json.dumps(doc, indent=2) + "\n"
    else:
        g = Genotype.from_dict(record["genotype"])
        text = _PY_TEMPLATE.format(
            trial=record["trial"], search=os.path.abspath(out_dir), acc=metrics["accuracy"],
            lat=metrics["latency_ms"], genotype_str="\n".join("    " + line for line in str(g).splitlines()),
            genotype_json=g.to_json(indent=4), build=json.dumps(build_args, indent=4),
            image_size=ds["image_size"], in_channels=ds["in_channels"],
        )
    d = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(d, exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text)
    return doc


_PY_TEMPLATE = '''"""Network found by `effops search` (trial {trial} of {search}).

Proxy results: held-out accuracy {acc:.4f}, latency {lat:.3f} ms (batch 1, latency table).
Genotype:
{genotype_str}

    from model import model
    net = model()                         # as searched
    net = model(C=36, N=6, num_classes=100)  # scaled up for retraining
"""

import json

from effops.nas import Genotype, build

GENOTYPE = Genotype.from_json("""{genotype_json}""")
BUILD = json.loads("""{build}""")
IMAGE_SIZE = {image_size}


def model(**overrides):
    """The network; keyword arguments override BUILD (C, N, num_classes, stem, in_channels, ...)."""
    return build(GENOTYPE, **{{**BUILD, **overrides}})


if __name__ == "__main__":
    import torch

    net = model().eval()
    out = net(torch.zeros(1, {in_channels}, IMAGE_SIZE, IMAGE_SIZE))
    print(GENOTYPE)
    print(f"{{sum(p.numel() for p in net.parameters()):,}} parameters; output {{tuple(out.shape)}}")
'''


def load_exported(path: str, **overrides) -> NASNetwork:
    """Rebuild the network of an exported ``.json`` file (keyword arguments override its build
    arguments)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise ValueError(f"load_exported: cannot read {path!r}: {e}") from None
    except json.JSONDecodeError as e:
        raise GenotypeError(f"load_exported: {path!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"load_exported: {path!r} is not an effops.nas export ({EXPORT_FORMAT})")
    return build(Genotype.from_dict(doc["genotype"]), **{**doc["build"], **overrides})
