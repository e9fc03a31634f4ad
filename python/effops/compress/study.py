"""Studies behind the README's compression numbers (run on this machine, CPU, in minutes):

* ``python -m effops.compress.study kd``: does distillation matter? A teacher (a small
  EfficientNet-style net of effops MBConv blocks, trained on digits) and two students - the
  teacher pruned by 75% and a narrow net from scratch - each trained with ``DistillationLoss``
  and without (cross-entropy), same epochs, over 3 seeds; held-out accuracy mean +- sd.
* ``python -m effops.compress.study tpglobal``: global ranking at equal MACs: Torch-Pruning per
  layer and global (``global_pruning=True``, its mean-normalised BN-scale), effops per group and
  ``global_ranking=True``, each at Torch-Pruning's MACs, fine-tuned the same way over 3 seeds.
* ``python -m effops.compress.study tp``: effops.compress.prune against Torch-Pruning
  (``pip install torch-pruning``) on the same timm model, amount and criterion (BN scale),
  after the same fine-tuning: held-out accuracy, params, MACs, and latency (batch 1 and 8,
  interleaved timing, each timed model's outputs checked against its eager reference).

Results are printed and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn as nn

from ..nn import MBConv
from ._finetune import evaluate, finetune
from .prune import count_macs, count_params, prune


def mini_net(width: float = 1.0, in_chans: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Stem 3x3 -> 5 MBConv blocks (two strided) -> 1x1 head -> pool -> linear."""
    c = [max(8, int(round(v * width / 8)) * 8) for v in (16, 24, 40, 128)]
    return nn.Sequential(
        nn.Conv2d(in_chans, c[0], 3, padding=1, bias=False), nn.BatchNorm2d(c[0]), nn.SiLU(),
        MBConv(c[0], c[0], 3, expand_ratio=4), MBConv(c[0], c[1], 3, stride=2, expand_ratio=6),
        MBConv(c[1], c[1], 3, expand_ratio=6), MBConv(c[1], c[2], 5, stride=2, expand_ratio=6),
        MBConv(c[2], c[2], 5, expand_ratio=6),
        nn.Conv2d(c[2], c[3], 1, bias=False), nn.BatchNorm2d(c[3]), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(c[3], num_classes))


def _ms(xs: List[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} +- {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{100 * xs[0]:.2f}"


def kd_study(args) -> Dict:
    from ..nas.data import load_dataset

    ds = load_dataset("digits", image_size=16, seed=0)
    n_train = args.train_samples or len(ds.train_y)
    tx, ty = ds.train_x[:n_train], ds.train_y[:n_train]
    torch.manual_seed(0)
    teacher = mini_net(2.0)
    finetune(teacher, ds.train_x, ds.train_y, epochs=args.teacher_epochs, lr=0.1, seed=0)
    t_acc = evaluate(teacher, ds.val_x, ds.val_y)["accuracy"]
    print(f"teacher (width 2, {count_params(teacher):,} params, {args.teacher_epochs} epochs on all "
          f"{len(ds.train_y)}): held-out {100 * t_acc:.2f}%", flush=True)
    x = ds.train_x[:8]
    pruned0, rep = prune(teacher, amount=0.75, example_input=x)
    res: Dict = {"teacher_accuracy": t_acc, "teacher_params": count_params(teacher), "train_samples": n_train,
                 "epochs": args.epochs, "temperature": args.temperature, "alpha": args.alpha, "students": {}}
    students = {"pruned75": lambda seed: copy.deepcopy(pruned0),
                "narrow_scratch": lambda seed: (torch.manual_seed(seed), mini_net(0.5))[1]}
    for sname, make in students.items():
        row = {}
        for mode in ("ce", "kd"):
            accs = []
            for seed in range(3):
                s = make(seed)
                finetune(s, tx, ty, epochs=args.epochs, lr=0.05 if sname == "pruned75" else 0.1, seed=seed,
                         teacher=teacher if mode == "kd" else None, temperature=args.temperature, alpha=args.alpha)
                accs.append(evaluate(s, ds.val_x, ds.val_y)["accuracy"])
                print(f"  {sname} {mode} seed {seed}: {100 * accs[-1]:.2f}%", flush=True)
            row[mode] = accs
        row["params"] = count_params(make(0))
        res["students"][sname] = row
        print(f"{sname} ({row['params']:,} params): CE {_ms(row['ce'])}%  KD {_ms(row['kd'])}%", flush=True)
    return res


# ----------------------------------------------------------------------------- Torch-Pruning
def _timm_base(num_classes: int, in_chans: int) -> nn.Module:
    import timm

    return timm.create_model("tinynet_e", num_classes=num_classes, in_chans=in_chans)


def _interleaved(models: Dict[str, nn.Module], x: torch.Tensor, rounds: int = 7, calls: int = 5) -> Dict[str, float]:
    """Median over rounds of the mean ms per call; the models take turns in every round."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
            m(x)
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[k].append((time.perf_counter() - t0) * 1000 / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def _tp_prune(model: nn.Module, x: torch.Tensor, amount: float, global_pruning: bool = False) -> nn.Module:
    import torch_pruning as tp

    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ignored = linear[-1:] or [m for n, m in model.named_modules() if n.endswith("predict.conv_pw")]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.BNScaleImportance(), pruning_ratio=amount,
                                  ignored_layers=ignored, global_pruning=global_pruning)
    pruner.step()
    return model


def _tp_on(name: str, make, x: torch.Tensor, amount: float) -> str:
    """What Torch-Pruning does with a model effops prunes: pruned and correct, or why not."""
    m = make().eval()
    macs0 = count_macs(m, x)
    try:
        with torch.no_grad():
            ref_shape = m(x).shape
        _tp_prune(m, x, amount)
        with torch.no_grad():
            shape = m(x).shape
        macs = count_macs(m, x)
    except Exception as e:  # noqa: BLE001 - the study records whatever goes wrong
        return f"{name}: Torch-Pruning fails: {type(e).__name__}: {str(e)[:160]}"
    if shape != ref_shape:
        return f"{name}: Torch-Pruning gives outputs {list(shape)} instead of {list(ref_shape)}"
    return f"{name}: Torch-Pruning runs, MACs x{macs / macs0:.3f}"


def tp_study(args) -> Dict:
    from ..models import create_model
    from ..nas.data import load_dataset
    from ..nn import convert

    ds = load_dataset("digits", image_size=args.image_size, seed=0)
    torch.manual_seed(0)
    base = _timm_base(ds.num_classes, ds.in_channels)
    finetune(base, ds.train_x, ds.train_y, epochs=args.base_epochs, lr=0.1, seed=0)
    base_acc = evaluate(base, ds.val_x, ds.val_y)["accuracy"]
    print(f"base tinynet_e: {100 * base_acc:.2f}% held-out, {count_params(base):,} params", flush=True)
    x = ds.train_x[:8]
    base.eval()
    out = {"amount": args.amount, "image_size": args.image_size, "base_accuracy": base_acc,
           "base_params": count_params(base), "base_macs": count_macs(base, x[:1]), "epochs": args.epochs}
    # Torch-Pruning: dependency graph on the eager timm model, BN-scale importance, same amount;
    # effops: the same model converted to the fused blocks, pruned, same criterion
    tp0 = _tp_prune(copy.deepcopy(base), x, args.amount)
    ef0, rep = prune(convert(copy.deepcopy(base)), amount=args.amount, criterion="bn_scale", example_input=x)
    # and effops at Torch-Pruning's MACs (effops also prunes SE and head channels: at one amount it
    # removes more): accuracy at equal cost
    ef1, _ = prune(convert(copy.deepcopy(base)), target_macs=count_macs(tp0, x[:1]), criterion="bn_scale",
                   example_input=x[:1])
    tuned = {}
    for name, m0 in (("torch_pruning", tp0), ("effops", ef0), ("effops_same_macs", ef1)):
        accs = []
        for seed in range(args.seeds):
            m = copy.deepcopy(m0)
            finetune(m, ds.train_x, ds.train_y, epochs=args.epochs, lr=0.05, seed=seed)
            accs.append(evaluate(m, ds.val_x, ds.val_y)["accuracy"])
            tuned.setdefault(name, m)
        out[name] = {"accuracy": accs, "params": count_params(m0), "macs": count_macs(m0, x[:1])}
        print(f"{name}: {_ms(accs)}% held-out after {args.epochs} epochs ({args.seeds} seeds), "
              f"{out[name]['params']:,} params, {out[name]['macs']:,} MACs", flush=True)
    tpm, efm = tuned["torch_pruning"].eval(), tuned["effops"].eval()
    models = {"base_eager": base, "base_effops": convert(copy.deepcopy(base)).eval(),
              "tp_eager": tpm, "tp_effops": convert(copy.deepcopy(tpm)).eval(), "effops_pruned": efm,
              "effops_same_macs": tuned["effops_same_macs"].eval()}
    torch.set_num_threads(args.threads)
    for size in (args.image_size, args.latency_size):
        for b in (1, 8):
            g = torch.Generator().manual_seed(b)
            xb = (ds.val_x[:b] if size == args.image_size else torch.randn(b, ds.in_channels, size, size, generator=g))
            xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():  # outputs checked: each fused model computes what its eager source does
                torch.testing.assert_close(models["tp_effops"](xb), tpm(xb), rtol=1e-3, atol=1e-4)
                torch.testing.assert_close(models["base_effops"](xb), base(xb), rtol=1e-3, atol=1e-4)
            ms = _interleaved(models, xb)
            out[f"latency_ms_{size}px_b{b}"] = ms
            print(f"{size}x{size} batch {b}, {args.threads} thread(s): " + ", ".join(
                f"{k} {v:.2f} ms ({ms['base_eager'] / v:.2f}x)" for k, v in ms.items()), flush=True)
    xs = torch.randn(1, 3, 64, 64)
    out["coverage"] = [
        _tp_on("effops efficientnet_b0", lambda: create_model("efficientnet_b0", num_classes=10), xs, args.amount),
        _tp_on("converted timm efficientnet_b0", lambda: convert(_timm3()), xs, args.amount),
        _tp_on("effops tf_efficientdet_d0 (class logits)", lambda: _DetLogits(create_model(
            "tf_efficientdet_d0", num_classes=5, image_size=128)), torch.randn(1, 3, 128, 128), args.amount)]
    for line in out["coverage"]:
        print(line, flush=True)
    return out


def _tuned_accuracies(m0: nn.Module, ds, args) -> List[float]:
    """Held-out accuracy after the study's fine-tuning (args.epochs, lr 0.05), per seed."""
    accs = []
    for seed in range(args.seeds):
        m = copy.deepcopy(m0)
        finetune(m, ds.train_x, ds.train_y, epochs=args.epochs, lr=0.05, seed=seed)
        accs.append(evaluate(m, ds.val_x, ds.val_y)["accuracy"])
    return accs


def tp_global_study(args) -> Dict:
    from ..nas.data import load_dataset
    from ..nn import convert

    ds = load_dataset("digits", image_size=args.image_size, seed=0)
    torch.manual_seed(0)
    base = _timm_base(ds.num_classes, ds.in_channels)
    finetune(base, ds.train_x, ds.train_y, epochs=args.base_epochs, lr=0.1, seed=0)
    base.eval()
    x = ds.train_x[:8]
    macs0 = count_macs(base, x[:1])
    out = {"amount": args.amount, "image_size": args.image_size, "epochs": args.epochs, "seeds": args.seeds,
           "base_accuracy": evaluate(base, ds.val_x, ds.val_y)["accuracy"], "base_macs": macs0,
           "base_params": count_params(base), "models": {}}
    print(f"base tinynet_e: {100 * out['base_accuracy']:.2f}% held-out, {macs0:,} MACs", flush=True)
    models = {}
    for tp_global in (False, True):
        tpm = _tp_prune(copy.deepcopy(base), x, args.amount, global_pruning=tp_global)
        target = count_macs(tpm, x[:1])
        mode = "global" if tp_global else "per_layer"
        models[f"torch_pruning_{mode}"] = tpm
        for g in (False, True):  # effops at exactly (at most) Torch-Pruning's MACs
            models[f"effops_{'global' if g else 'per_group'}_at_tp_{mode}_macs"], _ = prune(
                convert(copy.deepcopy(base)), target_macs=target, criterion="bn_scale", example_input=x[:1],
                global_ranking=g)
    for name, m0 in models.items():
        accs = _tuned_accuracies(m0, ds, args)
        out["models"][name] = {"accuracy": accs, "params": count_params(m0), "macs": count_macs(m0, x[:1])}
        print(f"{name}: {_ms(accs)}% held-out ({args.seeds} seeds), {out['models'][name]['params']:,} params, "
              f"MACs x{out['models'][name]['macs'] / macs0:.3f}", flush=True)
    # latency (untuned weights: the widths decide it); Torch-Pruning's models on effops's blocks too
    timed = {"base_effops": convert(copy.deepcopy(base)).eval()}
    for k, m in models.items():
        timed[k] = (convert(copy.deepcopy(m)) if k.startswith("torch_pruning") else m).eval()
    torch.set_num_threads(args.threads)
    for b in (1, 8):
        xb = torch.randn(b, ds.in_channels, args.latency_size, args.latency_size,
                         generator=torch.Generator().manual_seed(b)).contiguous(memory_format=torch.channels_last)
        ms = _interleaved(timed, xb)
        out[f"latency_ms_{args.latency_size}px_b{b}"] = ms
        print(f"{args.latency_size}px b{b}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
    return out


def _timm3() -> nn.Module:
    import timm

    return timm.create_model("efficientnet_b0", num_classes=10)


class _DetLogits(nn.Module):
    """EfficientDet with its P3 class logits as the one output (Torch-Pruning wants a tensor)."""

    def __init__(self, det: nn.Module):
        super().__init__()
        self.det = det

    def forward(self, x):
        cls, box = self.det(x)
        return torch.cat([c.flatten(1) for c in cls] + [b.flatten(1) for b in box], 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m effops.compress.study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kd")
    k.add_argument("--teacher-epochs", type=int, default=15)
    k.add_argument("--epochs", type=int, default=10)
    k.add_argument("--train-samples", type=int, default=None, help="train the students on the first N samples")
    k.add_argument("--temperature", type=float, default=4.0)
    k.add_argument("--alpha", type=float, default=0.9)
    t = sub.add_parser("tp")
    t.add_argument("--amount", type=float, default=0.5)
    t.add_argument("--base-epochs", type=int, default=10)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--image-size", type=int, default=32)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--latency-size", type=int, default=128, help="also time at this input size (random data)")
    tg = sub.add_parser("tpglobal")
    tg.add_argument("--amount", type=float, default=0.5)
    tg.add_argument("--base-epochs", type=int, default=10)
    tg.add_argument("--epochs", type=int, default=5)
    tg.add_argument("--image-size", type=int, default=32)
    tg.add_argument("--threads", type=int, default=1)
    tg.add_argument("--seeds", type=int, default=3)
    tg.add_argument("--latency-size", type=int, default=128)
    for q in (k, t, tg):
        q.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = {"kd": kd_study, "tp": tp_study, "tpglobal": tp_global_study}[args.cmd](args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
