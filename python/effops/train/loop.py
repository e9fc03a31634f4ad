"""Training EfficientDet detectors: ``train(TrainConfig(...))`` (``effops train`` on the command line).

One step: a batch of ``build_loader``'s (images, padded yxyx gt boxes, labels) -> the model under
autocast (bf16 on the CPU; bf16 or fp16 with a GradScaler on CUDA) -> anchor labelling and the
detection loss on the device (``DetectionLoss.from_gt``'s parts) -> backward -> gradient clipping
-> AdamW / SGD -> the warmup + cosine learning rate -> the EMA of the weights.

Crash safety: ``<out>/checkpoint.pt`` is replaced atomically at the end of every epoch and every
``checkpoint_every`` steps (see ``checkpoint.py`` for its contents); ``resume=True`` continues from
it with the same data order (the sampler's ``(seed, epoch)`` permutation, the batches already
trained skipped), the same augmentation (a function of (seed, epoch, index)), the same schedule and
the same RNG states, each restored at the point of the run where it was saved, so a run killed
at any moment and resumed computes what the uninterrupted run computes. ``metrics.jsonl`` is an
append-only, fsync'ed journal (a resumed run drops the records written after its checkpoint);
``curves.png`` plots it.

Data parallel: under ``torchrun --nproc-per-node N`` each process takes ``batch_size / N`` images
of each global batch (DistributedSampler order), BatchNorms are synchronised
(``distributed.SyncBatchNorm2d``), the loss is normalised by the positives of the global batch and
scaled by N so that DDP's gradient average is the gradient of the one-process loss: N processes
compute what one process with the whole batch computes, up to floating-point reordering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..nas._checks import atomic_write
from .checkpoint import (CheckpointError, gather_rng_states, load_checkpoint, load_model_state, save_checkpoint,
                         set_rng_state)
from .distributed import all_reduce_sum, convert_sync_batchnorm, init_from_env
from .metrics_log import MetricsLog, plot_curves
from .schedule import ModelEma, WarmupCosine

AMP_MODES = ("off", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT = "checkpoint.pt"
_MODEL_OVERRIDES = ("fpn_channels", "fpn_cell_repeats", "box_class_repeats", "backbone_width", "backbone_depth")
# settings a resumed run may change; every other one must equal the checkpoint's
_MAY_DIFFER = ("workers", "out", "resume", "weights", "progress", "log_every", "checkpoint_every", "max_steps",
               "eval_max_images", "eval_batch_size", "device")


class TrainError(RuntimeError):
    """The run cannot start or continue (a setting, the output folder, a diverged loss)."""


@dataclass
class TrainConfig:
    """Settings of a training run (``effops train --help`` describes each)."""

    out: str
    model: str = "tf_efficientdet_d0"
    data: str = "shapes"
    image_size: int = 512
    epochs: int = 10
    batch_size: int = 8  # global: over all processes
    lr: Optional[float] = None  # default: 1e-3 (adamw), 0.09 * batch_size / 64 (sgd, effdet's)
    optimizer: str = "adamw"
    weight_decay: Optional[float] = None  # default: 1e-2 (adamw), 4e-5 (sgd); never on biases / norms
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    warmup_factor: float = 0.001
    min_lr_ratio: float = 0.01
    clip_grad: float = 10.0
    amp: str = "off"
    ema: float = 0.9998  # 0: no EMA
    workers: int = 2
    seed: int = 42
    device: str = "cpu"
    resume: bool = False
    weights: Optional[str] = None
    drop_path_rate: Optional[float] = None  # default: the variant's
    label_smoothing: float = 0.0
    box_loss_weight: float = 50.0
    teacher: Optional[str] = None  # distil from this EfficientDet variant (teacher.py) ...
    teacher_weights: Optional[str] = None  # ... with these weights
    kd_alpha: float = 0.5  # loss = alpha * L_kd + (1 - alpha) * detection loss
    kd_temperature: float = 1.0
    kd_box_weight: float = 1.0
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    log_every: int = 10
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps in all
    evaluate: bool = True
    eval_max_images: Optional[int] = None
    eval_batch_size: int = 8
    progress: bool = True
    model_overrides: Dict[str, Any] = field(default_factory=dict)  # tiny models: see _MODEL_OVERRIDES
    data_options: Dict[str, Any] = field(default_factory=dict)  # shapes: ensure_shapes options

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        def posint(name, lo=1, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"train: {name} must be an int >= {lo}, got {v!r}")

        def real(name, lo, hi, optional=False, lo_open=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or \
                    not (lo < v if lo_open else lo <= v) or v > hi:
                raise ValueError(f"train: {name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")

        for n in ("image_size", "epochs", "batch_size", "log_every", "eval_batch_size"):
            posint(n)
        for n in ("workers", "checkpoint_every"):
            posint(n, lo=0)
        posint("seed", lo=0)
        posint("max_steps", optional=True)
        posint("eval_max_images", optional=True)
        if self.image_size % 128:
            raise ValueError(f"train: image_size must be a multiple of 128 (EfficientDet's P7 stride), got "
                             f"{self.image_size}")
        real("lr", 0.0, 10.0, optional=True, lo_open=True)
        real("weight_decay", 0.0, 1.0, optional=True)
        for n, lo, hi in (("momentum", 0, 1), ("warmup_epochs", 0, 1e6), ("warmup_factor", 0, 1),
                          ("min_lr_ratio", 0, 1), ("clip_grad", 0, 1e9), ("ema", 0, 0.999999999),
                          ("label_smoothing", 0, 1), ("box_loss_weight", 0, 1e9), ("kd_alpha", 0, 1),
                          ("kd_box_weight", 0, 1e9)):
            real(n, lo, hi)
        real("kd_temperature", 0.0, 1e3, lo_open=True)
        for n in ("teacher", "teacher_weights"):
            v = getattr(self, n)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"train: {n} must be a non-empty string, got {v!r}")
        if (self.teacher is None) != (self.teacher_weights is None):
            raise ValueError("train: distillation needs both teacher (--teacher MODEL) and teacher_weights "
                             "(--teacher-weights CKPT): an untrained teacher teaches nothing")
        real("drop_path_rate", 0.0, 0.99, optional=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"train: amp must be one of {AMP_MODES}, got {self.amp!r}")
        dev = torch.device(self.device)
        if self.amp == "fp16" and dev.type != "cuda":
            raise ValueError("train: amp='fp16' needs a CUDA device (fp16 with a GradScaler); on the CPU use 'bf16'")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train: device {self.device!r} but torch sees no CUDA device")
        bad = sorted(set(self.model_overrides) - set(_MODEL_OVERRIDES))
        if bad:
            raise ValueError(f"train: unknown model_overrides {bad}; allowed: {list(_MODEL_OVERRIDES)}")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise ValueError(f"train: out must be a folder path, got {self.out!r}")
        return self


# ----------------------------------------------------------------------------- model and optimizer
def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The EfficientDet of ``cfg.model`` at ``cfg.image_size`` with ``num_classes`` classes; with
    ``model_overrides`` a reduced one (BiFPN width / cells, head depth, backbone width / depth
    multipliers: for tests and quick runs)."""
    from ..models.efficientdet import EfficientDet, get_config
    from ..models import efficientnet as en

    over = dict(cfg.model_overrides)
    bw, bd = over.pop("backbone_width", None), over.pop("backbone_depth", None)
    kw = dict(num_classes=int(num_classes), image_size=(cfg.image_size, cfg.image_size), **over)
    if cfg.drop_path_rate is not None:
        kw["drop_path_rate"] = float(cfg.drop_path_rate)
    econf = get_config(cfg.model, **kw)
    backbone = None
    if bw is not None or bd is not None:
        style = "tf_efficientnet" if econf.backbone.startswith("tf_") else "efficientnet"
        var = en.VARIANTS[econf.backbone.rsplit("_", 1)[1]]
        padding, eps = en.STYLES[style]
        specs = en.block_specs(float(bw or var.width), float(bd or var.depth), econf.drop_path_rate)
        backbone = en.EfficientNetFeatures(f"{econf.backbone}_w{bw}_d{bd}", specs, padding, eps, 0.1,
                                           out_indices=(2, 3, 4), in_chans=3, image_size=cfg.image_size,
                                           channels_last=True)
        en._init_weights(backbone)  # the builder's TF-style initialisation
        backbone = backbone.to(memory_format=torch.channels_last)
        econf = dataclasses.replace(econf, backbone_channels=tuple(backbone.feature_channels))
    return EfficientDet(econf, backbone=backbone)


def _load_initial_weights(model: nn.Module, path: str) -> str:
    """``--weights``: all of the checkpoint; a class head of another size is left at its
    initialisation (fine-tuning a COCO model on other classes). Returns what was done."""
    from ..models.weights import load_weights, read_checkpoint

    sd = read_checkpoint(path)
    target = model.state_dict()
    head = [k for k in target if k.startswith("class_net.predict.")]
    if any(k in sd and tuple(sd[k].shape) != tuple(target[k].shape) for k in head):
        rest = {k: v for k, v in sd.items() if k not in head}
        missing = [k for k in target if k not in rest and k not in head]
        unexpected = [k for k in rest if k not in target]
        shapes = [k for k in rest if k in target and tuple(rest[k].shape) != tuple(target[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"--weights {path}: does not fit {getattr(model, 'model_name', 'the model')}: "
                             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another shape "
                             f"(e.g. {(missing + unexpected + shapes)[:4]})")
        model.load_state_dict(rest, strict=False)
        return f"loaded {path} (class head re-initialised: the checkpoint has another number of classes)"
    load_weights(model, path)
    return f"loaded {path}"


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)  # biases, BN, BiFPN edge weights: no decay
    if cfg.optimizer == "sgd":
        lr = cfg.lr if cfg.lr is not None else 0.09 * cfg.batch_size / 64
        wd = 4e-5 if cfg.weight_decay is None else cfg.weight_decay
        groups = [dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)]
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    lr = cfg.lr if cfg.lr is not None else 1e-3
    wd = 1e-2 if cfg.weight_decay is None else cfg.weight_decay
    groups = [dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr)


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _seed_all(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _check_resume(saved: Dict[str, Any], cfg: TrainConfig, world_size: int, ckpt: Dict[str, Any], where: str) -> None:
    mine = cfg.to_dict()
    # a setting added after the checkpoint was written counts as its default there
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    saved = {k: saved.get(k, defaults.get(k)) for k in mine}
    diff = [f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in mine
            if k not in _MAY_DIFFER and _norm(saved.get(k)) != _norm(mine[k])]
    if diff:
        raise CheckpointError(f"{where}: --resume with other settings than the checkpoint's ({'; '.join(diff[:6])}); "
                              f"resume with the same ones, or start a new run in another --out")
    if ckpt["world_size"] != world_size:
        raise CheckpointError(f"{where}: written by {ckpt['world_size']} process(es), resumed with {world_size}; "
                              f"the data order and RNG states are per process - resume with the same number")
    if len(ckpt["rng"]) != world_size:
        raise CheckpointError(f"{where}: holds {len(ckpt['rng'])} RNG states for {ckpt['world_size']} processes")


def _norm(v):
    return json.loads(json.dumps(v)) if isinstance(v, (dict, list, tuple)) else v


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) the training ``cfg`` describes; returns a summary (steps, last metrics)."""
    from ..models.loss import DetectionLoss
    from .data import build_loader, make_dataset

    cfg.validate()
    device = torch.device(cfg.device)
    rank, world_size, local_rank = init_from_env(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    main = rank == 0
    if cfg.batch_size % world_size:
        raise ValueError(f"train: batch_size {cfg.batch_size} must be divisible by the {world_size} processes")
    per_rank = cfg.batch_size // world_size
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    state = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"--resume: {str(out)!r} holds no {CHECKPOINT}; start the run without --resume")
        state = load_checkpoint(str(ckpt_path))
        _check_resume(state["config"], cfg, world_size, state, f"checkpoint {str(ckpt_path)!r}")
    elif ckpt_path.exists():
        raise TrainError(f"{str(out)!r} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose "
                         f"another --out")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            atomic_write(str(out / "config.json"), lambda f: f.write(json.dumps(cfg.to_dict(), indent=1)), "w")
    _barrier()

    opts = dict(shapes_options=cfg.data_options or None)
    train_ds = make_dataset(cfg.data, "train", image_size=cfg.image_size, train=True, seed=cfg.seed, **opts)
    val_ds = make_dataset(cfg.data, "val", image_size=cfg.image_size, train=False, **opts) \
        if cfg.evaluate and main else None
    num_classes = train_ds.num_classes
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"train: batch_size {cfg.batch_size} is larger than the {len(train_ds)} training images")
    if state is not None and state.get("dataset_size") != len(train_ds):
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r}: written for {state.get('dataset_size')} training "
                              f"images, the data now has {len(train_ds)}")

    _seed_all(cfg.seed)  # the same initial weights in every process
    model = build_model(cfg, num_classes)
    note = _load_initial_weights(model, cfg.weights) if cfg.weights and state is None else None
    if world_size > 1:
        model = convert_sync_batchnorm(model)
    model.to(device).train()
    ema = ModelEma(model, cfg.ema) if cfg.ema > 0 else None
    opt = make_optimizer(model, cfg)
    total_steps = steps_per_epoch * cfg.epochs
    sched = WarmupCosine(opt, total_steps, min(total_steps, int(round(cfg.warmup_epochs * steps_per_epoch))),
                         warmup_factor=cfg.warmup_factor, min_lr_ratio=cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    epoch = position = step = 0
    rng = None
    if state is not None:
        where = f"checkpoint {str(ckpt_path)!r}"
        load_model_state(model, state["model"], where)
        if ema is not None:
            if not isinstance(state.get("model_ema"), dict):
                raise CheckpointError(f"{where}: has no EMA weights but the run uses ema={cfg.ema}")
            load_model_state(ema.module, state["model_ema"], where + " (model_ema)")
            ema.load_state_dict(state.get("ema"))
        try:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if scaler.is_enabled():
                scaler.load_state_dict(state.get("scaler") or {})
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{where}: the optimizer / schedule / scaler state does not fit: {e}") from None
        epoch, position, step = state["epoch"], state["position"], state["step"]
        if not (epoch <= cfg.epochs and position <= steps_per_epoch and step == epoch * steps_per_epoch + position):
            raise CheckpointError(f"{where}: inconsistent position (epoch {epoch}, batch {position}, step {step}) for "
                                  f"{cfg.epochs} epochs of {steps_per_epoch} steps")
        rng = state["rng"][rank]
        del state
    else:
        _seed_all(cfg.seed * 1000 + rank + 1)  # per-process randomness (drop path) of a fresh run
    net = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    loss_fn = DetectionLoss(num_classes, box_loss_weight=cfg.box_loss_weight, label_smoothing=cfg.label_smoothing)
    teacher = None
    if cfg.teacher is not None:
        from .teacher import load_detection_teacher

        with torch.random.fork_rng(devices=[]):  # building it draws init values: leave the run's RNG alone
            teacher = load_detection_teacher(cfg.teacher, cfg.teacher_weights, num_classes=num_classes,
                                             image_size=cfg.image_size, device=device)
    log = MetricsLog(out / "metrics.jsonl", keep_until_step=step) if main else None  # drops a killed run's tail
    if main and note:
        print(f"effops train: {note}")
    anchors = model.anchor_boxes

    def save(ep: int, pos: int) -> None:
        rngs = gather_rng_states()
        if main:
            save_checkpoint(str(ckpt_path), dict(
                epoch=ep, position=pos, step=step, config=cfg.to_dict(), world_size=world_size,
                dataset_size=len(train_ds), model=model.state_dict(),
                model_ema=ema.module.state_dict() if ema is not None else None,
                ema=ema.state_dict() if ema is not None else None, optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), scaler=scaler.state_dict(), rng=rngs,
                image_size=cfg.image_size, model_name=cfg.model, num_classes=num_classes))
        _barrier()

    last_eval: Dict[str, float] = {}
    stopped = False
    for ep in range(epoch, cfg.epochs):
        start = position if ep == epoch else 0
        resuming = rng is not None and ep == epoch
        if resuming and start == 0:  # saved at an epoch boundary: before this epoch's loader existed
            set_rng_state(rng, "checkpoint")
        it = None
        if start < steps_per_epoch:
            loader = build_loader(train_ds, per_rank, train=True, workers=cfg.workers, seed=cfg.seed, epoch=ep,
                                  skip_batches=start)
            it = iter(loader)
        if resuming and start > 0:  # saved inside the epoch: the loader was running
            set_rng_state(rng, "checkpoint")
        bar = _progress(main and cfg.progress, steps_per_epoch, start, f"epoch {ep + 1}/{cfg.epochs}")
        acc = torch.zeros(4, dtype=torch.float64, device=device)
        n_acc, t_acc = 0, time.perf_counter()
        for i in range(start, steps_per_epoch):
            batch = next(it)
            images = batch["images"].to(device, non_blocking=True)
            boxes = batch["boxes"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                cls_out, box_out = net(images)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(images)
            cls_t, box_t, npos = loss_fn.label(anchors, boxes, labels)
            norm = all_reduce_sum(npos.sum().float()) + 1.0 if world_size > 1 else None
            total, cls_l, box_l = loss_fn.flat(cls_out, box_out, cls_t, box_t, npos, normalizer=norm)
            kd = torch.zeros((), device=device)
            if teacher is not None:
                kd = _kd_term(cfg, (cls_out, box_out), t_out, world_size)
                total = cfg.kd_alpha * kd + (1.0 - cfg.kd_alpha) * total
            scaler.scale(total * world_size if world_size > 1 else total).backward()
            if cfg.clip_grad > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if ema is not None:
                ema.update(model)
            step, position = step + 1, i + 1
            acc += torch.stack([total.detach(), cls_l.detach(), box_l.detach(), kd.detach().float()]).double()
            n_acc += 1
            if n_acc == cfg.log_every or position == steps_per_epoch:
                acc = all_reduce_sum(acc)  # each process holds its share of the global batch's loss
                mean = (acc / n_acc).tolist()
                if not math.isfinite(mean[0]):
                    raise TrainError(f"train: the loss is {mean[0]} at step {step} (epoch {ep + 1}); lower --lr, "
                                     f"use --amp bf16 / fp16 with its scaler, or --clip-grad")
                dt = time.perf_counter() - t_acc
                ips = n_acc * cfg.batch_size / max(dt, 1e-9)
                if main:
                    rec = dict(kind="train", epoch=ep + 1, step=step, loss=mean[0], class_loss=mean[1],
                               box_loss=mean[2], lr=sched.lr, img_per_s=ips, time=time.time())
                    if teacher is not None:
                        rec["kd_loss"] = mean[3]  # loss = kd_alpha * kd_loss + (1 - kd_alpha) * the detection loss
                    log.append(rec)
                    bar.set_postfix(loss=f"{mean[0]:.4f}", lr=f"{sched.lr:.2e}", img_s=f"{ips:.1f}")
                acc.zero_()
                n_acc, t_acc = 0, time.perf_counter()
            bar.update(1)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and position < steps_per_epoch:
                save(ep, position)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = True
                break
        bar.close()
        it = None
        if stopped and position < steps_per_epoch:
            save(ep, position)
            break
        if val_ds is not None:
            from .evaluate import evaluate

            target = ema.module if ema is not None else model
            res = evaluate(target, val_ds, device=device, batch_size=cfg.eval_batch_size, workers=cfg.workers,
                           max_images=cfg.eval_max_images,
                           amp=None if cfg.amp == "off" else (torch.bfloat16 if cfg.amp == "bf16" else torch.float16))
            res.pop("detections", None)
            last_eval = {k: float(v) for k, v in res.items()}
            log.append(dict(kind="eval", epoch=ep + 1, step=step, weights="ema" if ema is not None else "model",
                            **last_eval, time=time.time()))
            print(f"effops train: epoch {ep + 1}: COCO AP {100 * last_eval['AP']:.2f}, "
                  f"AP50 {100 * last_eval['AP50']:.2f}"
                  f" ({last_eval['num_images']:.0f} val images, {'EMA' if ema is not None else 'model'} weights)")
        _barrier()
        save(ep + 1, 0)
        position = 0
        if main:
            plot_curves(out / "metrics.jsonl", out / "curves.png")
        if stopped:
            break
    _barrier()
    return dict(step=step, epochs_done=min(cfg.epochs, step // steps_per_epoch), steps_per_epoch=steps_per_epoch,
                metrics=last_eval, checkpoint=str(ckpt_path), world_size=world_size)


def _kd_term(cfg: TrainConfig, student_out, teacher_out, world_size: int) -> torch.Tensor:
    """The detection distillation term; under DDP normalised by the teacher confidence summed
    over all processes (and scaled by N as the detection loss is), so that N processes compute
    what one process with the whole batch computes."""
    from ..compress.distill import detection_kd_parts

    num, den = detection_kd_parts(student_out, teacher_out, temperature=cfg.kd_temperature,
                                  box_weight=cfg.kd_box_weight)
    if world_size > 1:
        den = all_reduce_sum(den.float())
    return num.float() / den.float().clamp_min(1.0)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


__all__ = ["TrainConfig", "TrainError", "train", "build_model", "make_optimizer", "AMP_MODES", "OPTIMIZERS"]
