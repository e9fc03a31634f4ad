"""The README's compression table in one run: ``effops bench compress --threads 1``.

EfficientNet-B0 (``effops.models``, 1 input channel, 10 classes) trained on the digits set (8x8
images upscaled to 32x32; 1438 train / 359 held-out), then each compressed variant made from it
the same way in the same process, and fine-tuned the same way (``compress._finetune``: SGD,
cosine, the same epochs and seed):

* effops: fp32; pruned 30% / 50% (``prune(amount=...)``: that fraction of every channel group,
  BN-scale criterion); pruned with ``global_ranking`` at the 50% model's MACs; int8
  (``quantize``, 256 calibration images, minmax); pruned 50% + int8; distilled (the 50% pruned
  network fine-tuned with ``DistillationLoss`` from the fp32 model instead of cross-entropy).
* anchors: timm's efficientnet_b0 with the same weights (eager, channels_last), Torch-Pruning's
  50% of it (dependency graph, BN scale, per layer; same fine-tuning), torch.ao's FX static x86
  int8 of it and ONNX Runtime's static int8 (QDQ) of it, calibrated on the same images, where
  installed.

Columns: parameters, MACs and latency at 224x224 (batch 1: ms; batch 8: images/s; interleaved
timing in one run, ``harness.time_interleaved``; the rows also go to ``bench/results/<device>.csv``
like every bench), held-out accuracy at 32x32 (the training resolution). The fp32 effops and timm
models compute the same function (checked); the variants differ by design. The table's numbers
are appended as one JSON record per run to ``bench/results/compress-<device>.jsonl``;
``effops bench compress --table`` prints the latest record's table.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .harness import EFFOPS, Case, device_name, device_slug, inference

CL = torch.channels_last
_STATE: Dict[str, dict] = {}  # variant -> facts, from cases() to after_run() of the same run


def _accuracy(fn: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), 128):
            correct += int((fn(x[i:i + 128]).argmax(1) == y[i:i + 128]).sum())
    return correct / len(y)


def _variants(quick: bool) -> Dict[str, dict]:
    """name -> {fn (a callable on a float batch), params, macs_model (float model for MACs),
    accuracy, note}, in table order."""
    import timm

    from ..compress import count_params, prune, quantize
    from ..compress._finetune import finetune
    from ..compress.prune import count_macs
    from ..compress.study import _tp_prune
    from ..models import create_model
    from ..nas.data import load_dataset
    from .bench_qconv import _ao_fx, _onnx_int8

    ds = load_dataset("digits", image_size=32, seed=0)
    n = 160 if quick else len(ds.train_y)
    tx, ty, vx, vy = ds.train_x[:n], ds.train_y[:n], ds.val_x, ds.val_y
    base_epochs, epochs = (1, 1) if quick else (10, 5)
    torch.manual_seed(0)
    fp32 = create_model("efficientnet_b0", num_classes=ds.num_classes, in_chans=ds.in_channels)
    finetune(fp32, tx, ty, epochs=base_epochs, lr=0.1, seed=0)
    fp32.eval()

    def tuned(m: nn.Module, teacher: Optional[nn.Module] = None) -> nn.Module:
        finetune(m, tx, ty, epochs=epochs, lr=0.05, seed=0, teacher=teacher)
        return m.eval()

    xe = tx[:1]
    p50_raw, _ = prune(fp32, amount=0.5, criterion="bn_scale", example_input=xe)
    p30 = tuned(prune(fp32, amount=0.3, criterion="bn_scale", example_input=xe)[0])
    p50 = tuned(copy.deepcopy(p50_raw))
    g50 = tuned(prune(fp32, target_macs=count_macs(p50_raw, xe), criterion="bn_scale", example_input=xe,
                      global_ranking=True)[0])
    kd50 = tuned(copy.deepcopy(p50_raw), teacher=fp32)
    calib = tx[:256]
    q = quantize(fp32, calib, batch_size=32)
    qp50 = quantize(p50, calib, batch_size=32)
    tm = timm.create_model("efficientnet_b0", num_classes=ds.num_classes, in_chans=ds.in_channels)
    tm.load_state_dict(fp32.state_dict())  # the same network and weights (checked by the case)
    tm.eval()
    tm_cl = copy.deepcopy(tm).to(memory_format=CL)

    v: Dict[str, dict] = {}

    def add(name, fn, float_model, note=""):
        v[name] = dict(fn=fn, float_model=float_model, note=note)

    add(EFFOPS, fp32, fp32, "effops.models efficientnet_b0, fp32")
    add("effops pruned 30%", p30, p30, "30% of each channel group, fine-tuned")
    add("effops pruned 50%", p50, p50, "50% of each channel group, fine-tuned")
    add("effops pruned global", g50, g50, "global ranking at the 50% model's MACs, fine-tuned")
    add("effops int8", q, fp32, "quantize(fp32), minmax, 256 calibration images")
    add("effops pruned 50% + int8", qp50, p50, "quantize(pruned 50%)")
    add("effops distilled (pruned 50%)", kd50, kd50, "pruned 50% fine-tuned with the fp32 model as teacher")
    add("timm fp32 (eager)", tm_cl, tm, "same weights, channels_last")
    try:
        tp = tuned(_tp_prune(copy.deepcopy(tm), tx[:8], 0.5))
        add("Torch-Pruning 50% (timm eager)", copy.deepcopy(tp).to(memory_format=CL), tp,
            "50% per layer, BN scale, fine-tuned the same")
    except ImportError:
        print("bench compress: torch_pruning is not installed: no Torch-Pruning row")
    try:
        ao = _ao_fx(copy.deepcopy(tm), calib, tx[:8])
        add("torch.ao x86 int8 (timm)", ao, tm, "FX static, x86 backend, same calibration images")
    except Exception as e:  # noqa: BLE001 - an anchor that cannot run is reported, not fatal
        print(f"bench compress: torch.ao FX int8 unavailable: {type(e).__name__}: {e}")
    try:
        ort_fn = _onnx_int8(tm, calib, tx[:8], tempfile.mkdtemp(prefix="effops-bench-compress-"), dynamic_hw=True)
        add("ONNX Runtime int8 (timm)", ort_fn, tm, "static QDQ, per channel, same calibration images")
    except Exception as e:  # noqa: BLE001
        print(f"bench compress: onnxruntime static int8 unavailable: {type(e).__name__}: {e}")
    size = 64 if quick else 224
    xm = torch.zeros(1, ds.in_channels, size, size)
    for name, d in v.items():
        d["accuracy"] = _accuracy(d["fn"], vx, vy)
        d["params"] = count_params(d["float_model"])
        d["macs"] = count_macs(d["float_model"], xm)
    v["_meta"] = dict(size=size, train=n, val=len(vy), base_epochs=base_epochs, epochs=epochs,
                      in_channels=ds.in_channels)
    return v


def _check(outs) -> Optional[str]:
    ref, same = outs[EFFOPS], outs.get("timm fp32 (eager)")
    for k, o in outs.items():
        if o.shape != ref.shape or not torch.isfinite(o).all():
            return f"{k}: output {list(o.shape)} (finite: {bool(torch.isfinite(o).all())})"
    if same is not None:
        err = float((same - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if err > 2e-2:  # float reassociation (fused kernels, BN folded), amplified where a briefly trained
            # network has near-zero running variances; a real difference is of order 1
            return f"timm fp32 (eager) and effops fp32 differ: relative error {err:.2e}"
    return None


def cases(device: torch.device, quick: bool = False) -> List[Case]:
    if device.type != "cpu":
        return []
    try:
        import sklearn  # noqa: F401 - the digits set
        import timm  # noqa: F401
    except ImportError:
        return []
    v = _variants(quick)
    meta = v.pop("_meta")
    _STATE.clear()
    _STATE.update(v)
    _STATE["_meta"] = meta
    out = []
    for batch in (1, 8):
        x = torch.randn(batch, meta["in_channels"], meta["size"], meta["size"],
                        generator=torch.Generator().manual_seed(batch)).contiguous(memory_format=CL)
        impls = {k: (lambda f=d["fn"], x=x: f(x)) for k, d in v.items()}
        out.append(Case("compress", f"efficientnet_b0 digits b{batch} {meta['size']}px", "fp32/int8",
                        inference(impls), check=_check))
    return out


def after_run(case_list: List[Case], device: torch.device, results_dir: Optional[str]) -> None:
    """Join the timings of this run with the variants' facts: print the table, append the record."""
    if not _STATE or len(case_list) != 2:
        return
    meta = _STATE["_meta"]
    b1, b8 = case_list[0].results, case_list[1].results
    rows = []
    for name, d in _STATE.items():
        if name == "_meta" or name not in b1 or name not in b8:
            continue
        rows.append(dict(variant=name, params=d["params"], macs=d["macs"], accuracy=round(d["accuracy"], 4),
                         ms_b1=round(b1[name] * 1e3, 3), img_s_b8=round(8 / b8[name], 2), note=d["note"]))
    rec = dict(device=device_name(device), threads=torch.get_num_threads(), torch=torch.__version__,
               date=_dt.date.today().isoformat(), **meta, rows=rows)
    print(compress_table_of(rec))
    if results_dir is not None:
        path = Path(results_dir) / f"compress-{device_slug(device)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def compress_table_of(rec: dict) -> str:
    rows = rec["rows"]
    ref = next((r for r in rows if r["variant"] == EFFOPS), rows[0])
    lines = [f"**{rec['device']}**, {rec['threads']} thread(s), torch {rec['torch']}, {rec['date']}: "
             f"efficientnet_b0 on digits ({rec['train']} train / {rec['val']} held-out images at 32x32, "
             f"{rec['base_epochs']} + {rec['epochs']} fine-tuning epochs); params, MACs and latency at "
             f"{rec['size']}x{rec['size']}\n",
             "| variant | params | MACs | held-out accuracy | batch 1 ms (vs fp32) | batch 8 img/s (vs fp32) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = "effops fp32" if r["variant"] == EFFOPS else r["variant"]
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.0f} M | {100 * r['accuracy']:.2f}% | "
                     f"{r['ms_b1']:.2f} ({ref['ms_b1'] / r['ms_b1']:.2f}x) | "
                     f"{r['img_s_b8']:.1f} ({r['img_s_b8'] / ref['img_s_b8']:.2f}x) |")
    return "\n".join(lines)


def compress_table(results_dir: str) -> str:
    """The table of the latest record of each compress-<device>.jsonl in ``results_dir``."""
    out = []
    for path in sorted(Path(results_dir).glob("compress-*.jsonl")):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if lines:
            out.append(compress_table_of(json.loads(lines[-1])))
    return "\n\n".join(out) if out else f"no compress results in {results_dir} (run: effops bench compress)"
