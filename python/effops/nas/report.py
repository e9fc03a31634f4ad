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

import ast
import json
import os
from typing import Any, Dict, List, Optional

from .network import NASNetwork, build
from .objective import pareto_front
from ._checks import check_int, check_keys, check_str, read_json
from .runner import SearchError, read_config, read_journal
from .space import NUM_INPUT_STATES, Cell, Genotype, GenotypeError, check_op_names

EXPORT_FORMAT = "effops.nas.export/1"


def _ranked(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Best reward first; ties: the earlier trial.
    return sorted(records, key=lambda r: (-r["reward"], r["trial"]))


def _dataset_info(out_dir: str) -> Dict[str, Any]:
    path = os.path.join(out_dir, "dataset.json")
    if os.path.exists(path):
        d = read_json(path, "dataset info", SearchError)
        where = f"dataset info {path!r}"
        check_keys(d, _DATASET_FIELDS, where, SearchError, required=_DATASET_FIELDS)
        check_str(d["name"], "name", where, SearchError, max_len=1024)
        check_int(d["num_classes"], "num_classes", where, SearchError, lo=1, hi=1 << 20)
        check_int(d["in_channels"], "in_channels", where, SearchError, lo=1, hi=4096)
        check_int(d["image_size"], "image_size", where, SearchError, lo=1, hi=1 << 16)
        check_int(d["train"], "train", where, SearchError)
        check_int(d["val"], "val", where, SearchError)
        return d
    ds = read_config(out_dir).proxy.dataset()
    return {"name": ds.name, "num_classes": ds.num_classes, "in_channels": ds.in_channels,
            "image_size": ds.image_size, "train": len(ds.train_y), "val": len(ds.val_y)}


_DATASET_FIELDS = ("name", "num_classes", "in_channels", "image_size", "train", "val")


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
        text = _python_module(record, build_args, ds, out_dir)
    d = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(d, exist_ok=True)
    with open(out_path, "w") as f:
        f.write(text)
    return doc


def _python_module(record: Dict[str, Any], build_args: Dict[str, Any], ds: Dict[str, Any], out_dir: str) -> str:
    """The source of a module that builds the exported network.

    Values read from the run directory are never pasted into the code as text: every one is
    validated first (ints are ints, op names are known ops, the genotype is a valid one) and
    written as a Python literal with ``repr``, so a hostile journal or dataset.json cannot add
    statements. The result is parsed back and checked to consist of exactly the template's
    statements, its assignments plain literals."""
    g = Genotype.from_dict(record["genotype"])
    check_op_names([op for cell in (g.normal, g.reduce) for b in cell.blocks for op in (b.op_a, b.op_b)],
                   "export: genotype")
    trial = int(record["trial"])
    for k, v in build_args.items():
        if k != "stem" and (isinstance(v, bool) or not isinstance(v, int)):
            raise SearchError(f"export: build argument {k} must be an integer, got {v!r}")
    image_size, in_channels = int(ds["image_size"]), int(ds["in_channels"])
    acc, lat = float(record["accuracy"]), float(record["latency_ms"])
    genotype_lines = "\n".join("    " + line for line in str(g).splitlines())
    # The docstring holds only validated numbers and op names; the search path goes in a literal.
    doc = (f"Network found by `effops search` (trial {trial}; its search directory is SEARCH).\n\n"
           f"Proxy results: held-out accuracy {acc:.4f}, latency {lat:.3f} ms (batch 1, latency table).\n"
           f"Genotype:\n{genotype_lines}\n\n"
           "    from model import model\n"
           "    net = model()                         # as searched\n"
           "    net = model(C=36, N=6, num_classes=100)  # scaled up for retraining\n")
    if '"""' in doc or "\\" in doc:
        raise SearchError("export: the genotype description cannot be written as a docstring")
    text = (
        f'"""{doc}"""\n\n'
        "from effops.nas import Genotype, build\n\n"
        f"SEARCH = {os.path.abspath(out_dir)!r}\n"
        f"GENOTYPE = Genotype.from_dict({g.to_dict()!r})\n"
        f"BUILD = {dict(build_args)!r}\n"
        f"IMAGE_SIZE = {image_size!r}\n"
        f"IN_CHANNELS = {in_channels!r}\n"
        + _PY_FUNCTIONS
    )
    _check_generated(text)
    return text


_PY_FUNCTIONS = '''

def model(**overrides):
    """The network; keyword arguments override BUILD (C, N, num_classes, stem, in_channels, ...)."""
    return build(GENOTYPE, **{**BUILD, **overrides})


if __name__ == "__main__":
    import torch

    net = model().eval()
    out = net(torch.zeros(1, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    print(GENOTYPE)
    print(f"{sum(p.numel() for p in net.parameters()):,} parameters; output {tuple(out.shape)}")
'''


def _check_generated(text: str) -> None:
    """Parse the generated module and require exactly the template's top-level statements,
    with literal-only values (a second line of defence behind the validation above)."""
    tree = ast.parse(text)
    kinds = [type(n).__name__ for n in tree.body]
    expected = ["Expr", "ImportFrom", "Assign", "Assign", "Assign", "Assign", "Assign", "FunctionDef", "If"]
    names = [n.targets[0].id for n in tree.body[2:7] if isinstance(n, ast.Assign)]
    if kinds != expected or names != ["SEARCH", "GENOTYPE", "BUILD", "IMAGE_SIZE", "IN_CHANNELS"]:
        raise SearchError(f"export: the generated module has an unexpected structure {kinds} {names}")
    for node in [tree.body[2].value, *tree.body[3].value.args, tree.body[4].value, tree.body[5].value,
                 tree.body[6].value]:
        ast.literal_eval(node)  # raises on anything that is not a plain literal


def load_exported(path: str, **overrides) -> NASNetwork:
    """Rebuild the network of an exported ``.json`` file (keyword arguments override its build
    arguments)."""
    doc = read_json(path, "load_exported:", GenotypeError)
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"load_exported: {path!r} is not an effops.nas export ({EXPORT_FORMAT})")
    where = f"load_exported: {path!r}"
    b = check_keys(doc.get("build"), _BUILD_FIELDS, f"{where}: build", GenotypeError, required=_BUILD_FIELDS)
    for k in _BUILD_FIELDS:
        if k == "stem":
            check_str(b[k], "build.stem", where, GenotypeError, max_len=64)
        else:
            check_int(b[k], f"build.{k}", where, GenotypeError, lo=1, hi=1 << 20)
    try:
        g = Genotype.from_dict(doc.get("genotype"))
    except GenotypeError as e:
        raise GenotypeError(f"{where}: {e}") from None
    return build(g, **{**b, **overrides})


_BUILD_FIELDS = ("C", "N", "num_classes", "stem", "in_channels", "stem_multiplier")
