"""``effops prune``: the iterative schedule - evaluate, prune, fine-tune, evaluate, choose.

    effops prune --model efficientnet_b0 [--weights CKPT] --data digits --amount 0.5 \\
        --steps 2 --epochs 3 [--teacher self | --teacher MODEL --teacher-weights CKPT] --out runs/p

Without ``--weights`` the model is first trained for ``--train-epochs`` on the data's training
split. Each of ``--steps`` steps removes ``1 - (1 - amount) ** (1 / steps)`` of every channel
group (so the steps together keep ``1 - amount``; with ``--target-macs F`` step s aims at
``F ** (s / steps)`` of the starting MACs), then fine-tunes ``--epochs`` epochs (distilling from
the teacher when given: ``self`` is the model before pruning), then evaluates on the held-out
split. The chosen model is the smallest whose held-out accuracy is within ``--tolerance``
points of the unpruned model's (the most accurate step if none is); it is written to
``OUT/pruned.pt`` (``{"state_dict", "prune"}``; reload with
``shrink_to(create_model(name, ...), sd)`` then ``load_state_dict``) with ``OUT/report.json``.

Crash-safe: ``OUT/state.pt`` (atomically replaced after every epoch and phase) holds the run;
``--resume`` continues where it stopped, and refuses a different configuration. All files are
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Optional

import torch

from ..nas._checks import atomic_write, check_int, check_keys, check_str, torch_load_plain

_FORMAT = "effops-prune-1"
_CONFIG_KEYS = ("model", "weights", "data", "image_size", "max_samples", "amount", "target_macs", "criterion",
                "steps", "epochs", "train_epochs", "teacher", "teacher_weights", "temperature", "alpha", "lr",
                "batch_size", "seed", "tolerance", "round_to", "global_ranking")
_ADDED_DEFAULTS = {"global_ranking": False}  # keys added since the format: a run saved before has the default


class PruneRunError(ValueError):
    """A run directory or option that cannot be used; the message says which and why."""


def add_parser(sub) -> None:
    sp = sub.add_parser("prune", help="iterative structured pruning with fine-tuning (and distillation)",
                        description=__doc__.split("\n\n")[0])
    sp.add_argument("--model", required=True, help="effops model name (effops.models.list_models())")
    sp.add_argument("--weights", default=None, help="checkpoint to start from (unpruned or pruned); default: train first")
    sp.add_argument("--data", default="digits", help="'digits', an image folder or a .pt/.npz file (effops.nas.data)")
    sp.add_argument("--image-size", type=int, default=32)
    sp.add_argument("--max-samples", type=int, default=None)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--amount", type=float, default=None, help="fraction of each group's channels removed (default 0.5)")
    g.add_argument("--target-macs", type=float, default=None, help="final MACs as a fraction of the start's")
    sp.add_argument("--criterion", default="bn_scale", choices=["bn_scale", "l1", "taylor"])
    sp.add_argument("--steps", type=int, default=1, help="prune/fine-tune rounds (default 1)")
    sp.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per step (default 3)")
    sp.add_argument("--train-epochs", type=int, default=5, help="epochs of training first when --weights is not given")
    sp.add_argument("--teacher", default=None, help="'self' (the unpruned model) or a model name to distil from")
    sp.add_argument("--teacher-weights", default=None, help="checkpoint of --teacher MODEL")
    sp.add_argument("--temperature", type=float, default=4.0)
    sp.add_argument("--alpha", type=float, default=0.9)
    sp.add_argument("--lr", type=float, default=0.05)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--tolerance", type=float, default=1.0, help="accuracy points the chosen model may lose (default 1)")
    sp.add_argument("--round-to", type=int, default=1, help="kept channels are a multiple of this")
    sp.add_argument("--global-ranking", action="store_true", help="rank channels across all layers (criterion "
                    "normalised per group) instead of removing the same fraction of every group")
    sp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--resume", action="store_true", help="continue the run in --out")
    sp.set_defaults(func=run)


def _config(args) -> Dict[str, Any]:
    cfg = {k: getattr(args, k) for k in _CONFIG_KEYS}
    if cfg["amount"] is None and cfg["target_macs"] is None:
        cfg["amount"] = 0.5
    for k in ("steps", "epochs", "batch_size", "round_to"):
        if cfg[k] < 1:
            raise PruneRunError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if cfg["train_epochs"] < 0:
        raise PruneRunError(f"--train-epochs must be >= 0, got {cfg['train_epochs']}")
    if cfg["amount"] is not None and not 0 < cfg["amount"] < 1:
        raise PruneRunError(f"--amount must be in (0, 1), got {cfg['amount']}")
    if cfg["target_macs"] is not None and not 0 < cfg["target_macs"] < 1:
        raise PruneRunError(f"--target-macs must be a fraction in (0, 1), got {cfg['target_macs']}")
    if cfg["teacher_weights"] and (cfg["teacher"] in (None, "self")):
        raise PruneRunError("--teacher-weights needs --teacher MODEL")
    if not cfg["weights"] and cfg["train_epochs"] == 0:
        raise PruneRunError("give --weights, or --train-epochs >= 1 to train the model first")
    return cfg


def _save(path: str, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _load_state(path: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    where = f"prune run {path!r}"
    st = torch_load_plain(path, where, PruneRunError)
    check_keys(st, {"format", "config", "stage", "step", "epoch", "model", "optimizer", "history"}, where,
               PruneRunError, required=("format", "config", "stage", "step", "epoch", "model", "history"))
    if st["format"] != _FORMAT:
        raise PruneRunError(f"{where}: format {st['format']!r} is not {_FORMAT!r}")
    check_str(st["stage"], "stage", where, PruneRunError)
    if st["stage"] not in ("train", "prune", "finetune", "done"):
        raise PruneRunError(f"{where}: unknown stage {st['stage']!r}")
    check_int(st["step"], "step", where, PruneRunError)
    check_int(st["epoch"], "epoch", where, PruneRunError)
    if not isinstance(st["model"], dict) or not all(isinstance(v, torch.Tensor) for v in st["model"].values()):
        raise PruneRunError(f"{where}: model must be a state_dict")
    if not isinstance(st["history"], list):
        raise PruneRunError(f"{where}: history must be a list")
    if isinstance(st["config"], dict):
        st["config"] = {**_ADDED_DEFAULTS, **st["config"]}
    if st["config"] != cfg:
        diff = sorted(k for k in set(cfg) | set(st["config"] if isinstance(st["config"], dict) else {})
                      if not isinstance(st["config"], dict) or st["config"].get(k) != cfg.get(k))
        raise PruneRunError(f"{where}: --resume with a different configuration ({', '.join(diff)}); use another --out")
    return st


def _build(name: str, ds, sd: Optional[dict] = None):
    from ..models import create_model
    from .prune import shrink_to

    model = create_model(name, num_classes=ds.num_classes, in_chans=ds.in_channels)
    if sd is not None:
        shrink_to(model, sd)
        model.load_state_dict(sd, strict=True)
    return model


def _teacher(cfg, ds, base_sd):
    if cfg["teacher"] is None:
        return None
    if cfg["teacher"] == "self":
        return _build(cfg["model"], ds, base_sd).eval()
    from ..models import create_model
    from ..models.weights import read_checkpoint

    t = create_model(cfg["teacher"], num_classes=ds.num_classes, in_chans=ds.in_channels)
    if cfg["teacher_weights"]:
        from .prune import shrink_to

        sd = read_checkpoint(cfg["teacher_weights"])
        shrink_to(t, sd)
        t.load_state_dict(sd, strict=True)
    return t.eval()


def _choose(history, tolerance: float) -> Dict[str, Any]:
    base = history[0]["accuracy"]
    ok = [h for h in history[1:] if h["accuracy"] >= base - tolerance / 100.0]
    if ok:
        best = min(ok, key=lambda h: (h["macs"], -h["accuracy"]))
        return dict(best, why=f"smallest within {tolerance} points of the unpruned {100 * base:.2f}%")
    best = max(history[1:], key=lambda h: (h["accuracy"], -h["macs"]))
    return dict(best, why=f"no step within {tolerance} points of {100 * base:.2f}%: the most accurate")


def run(args) -> int:
    try:
        return _run(args)
    except (PruneRunError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"effops prune: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from ..models.weights import read_checkpoint
    from ..nas.data import load_dataset
    from ._finetune import evaluate, finetune
    from .prune import count_macs, count_params, prune

    cfg = _config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    state_path = os.path.join(out, "state.pt")
    if args.resume:
        if not os.path.isfile(state_path):
            raise PruneRunError(f"--resume: {state_path!r} does not exist")
        st = _load_state(state_path, cfg)
    else:
        if os.path.exists(state_path):
            raise PruneRunError(f"{out!r} already holds a run; pass --resume to continue it, or use another --out")
        os.makedirs(out, exist_ok=True)
        st = {"format": _FORMAT, "config": cfg, "stage": "train", "step": 0, "epoch": 0, "model": None,
              "optimizer": None, "history": []}
    ds = load_dataset(cfg["data"], cfg["image_size"], 0.2, 0, cfg["max_samples"])
    x_ex, y_ex = ds.train_x[:64], ds.train_y[:64]
    if st["model"] is not None:
        model = _build(cfg["model"], ds, st["model"])
    else:
        model = _build(cfg["model"], ds, read_checkpoint(cfg["weights"]) if cfg["weights"] else None)

    def checkpoint(**changes):
        st.update(changes)
        st["model"] = model.state_dict()
        _save(state_path, st)

    def measure(step: int, amount: float) -> Dict[str, Any]:
        ev = evaluate(model, ds.val_x, ds.val_y)
        h = {"step": step, "amount": amount, "accuracy": ev["accuracy"], "val_loss": ev["loss"],
             "params": count_params(model), "macs": count_macs(model, x_ex[:1])}
        print(f"effops prune: step {step}: held-out {100 * h['accuracy']:.2f}%, {h['params']:,} params, "
              f"{h['macs']:,} MACs", flush=True)
        return h

    common = dict(lr=cfg["lr"], batch_size=cfg["batch_size"])
    if st["stage"] == "train":
        if not cfg["weights"]:
            finetune(model, ds.train_x, ds.train_y, epochs=cfg["train_epochs"], seed=cfg["seed"], start_epoch=st["epoch"],
                     optimizer_state=st["optimizer"], **dict(common, lr=max(cfg["lr"], 0.1)),
                     on_epoch=lambda e, o, l: checkpoint(epoch=e + 1, optimizer=o))
        st["history"] = [measure(0, 0.0)]
        _save(os.path.join(out, "base.pt"), {"state_dict": model.state_dict()})
        checkpoint(stage="prune", step=1, epoch=0, optimizer=None)
    steps = cfg["steps"]
    base_sd = None
    if cfg["teacher"] == "self":
        base_sd = torch_load_plain(os.path.join(out, "base.pt"), "prune run base.pt", PruneRunError)["state_dict"]
    teacher = _teacher(cfg, ds, base_sd)
    base_macs = st["history"][0]["macs"]
    while st["stage"] in ("prune", "finetune"):
        s = st["step"]
        if cfg["amount"] is not None:
            per = 1.0 - (1.0 - cfg["amount"]) ** (1.0 / steps)
            kw = dict(amount=per)
        else:
            per = None
            kw = dict(target_macs=int(base_macs * cfg["target_macs"] ** (s / steps)))
        if st["stage"] == "prune":
            model, rep = prune(model, criterion=cfg["criterion"], example_input=x_ex, targets=y_ex,
                               round_to=cfg["round_to"], global_ranking=cfg["global_ranking"], **kw)
            print(f"effops prune: step {s}: pruned {rep.amount:.3f} of "
                  f"{'all channels (global ranking)' if rep.global_ranking else 'each group'}: params {rep.params_before:,} -> "
                  f"{rep.params_after:,}, MACs x{rep.macs_ratio:.3f}", flush=True)
            checkpoint(stage="finetune", epoch=0, optimizer=None)
        finetune(model, ds.train_x, ds.train_y, epochs=cfg["epochs"], seed=cfg["seed"] + s, start_epoch=st["epoch"],
                 optimizer_state=st["optimizer"], teacher=teacher, temperature=cfg["temperature"],
                 alpha=cfg["alpha"], on_epoch=lambda e, o, l: checkpoint(epoch=e + 1, optimizer=o), **common)
        h = measure(s, per if per is not None else kw["target_macs"] / base_macs)
        _save(os.path.join(out, f"step{s}.pt"), {"state_dict": model.state_dict()})
        st["history"].append(h)
        checkpoint(stage="prune" if s < steps else "done", step=s + 1, epoch=0, optimizer=None)
    chosen = _choose(st["history"], cfg["tolerance"])
    sd = torch_load_plain(os.path.join(out, f"step{chosen['step']}.pt"), "prune run step file", PruneRunError)
    _save(os.path.join(out, "pruned.pt"), {"state_dict": sd["state_dict"],
                                           "prune": {"model": cfg["model"], "num_classes": ds.num_classes,
                                                     "in_chans": ds.in_channels, "step": chosen["step"]}})
    report = {"config": cfg, "history": st["history"], "chosen": chosen}
    atomic_write(os.path.join(out, "report.json"), lambda f: f.write(json.dumps(report, indent=1)), mode="w")
    print(f"effops prune: chose step {chosen['step']} ({chosen['why']}): {100 * chosen['accuracy']:.2f}%, "
          f"{chosen['params']:,} params, {chosen['macs']:,} MACs -> {os.path.join(out, 'pruned.pt')}", flush=True)
    return 0
