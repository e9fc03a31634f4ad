"""``effops train --model tf_efficientdet_d0 --data shapes|DIR --image-size S --epochs E --batch-size B
--out DIR [--resume] [--teacher MODEL --teacher-weights CKPT] ...`` (see ``loop.py``; the teacher:
``teacher.py``); ``torchrun --nproc-per-node N -m effops train ...``
runs it data-parallel (gloo on the CPU, nccl on CUDA; ``--batch-size`` is the global batch)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    sp = sub.add_parser("train", help="train an EfficientDet detector (COCO folder or the shapes set), resumable, DDP")
    sp.add_argument("--model", default="tf_efficientdet_d0", help="EfficientDet variant (default tf_efficientdet_d0)")
    sp.add_argument("--data", default="shapes", help="'shapes' (generated on first use) or a COCO folder with "
                    "annotations/instances_{train,val}.json and train/, val/ (default shapes)")
    sp.add_argument("--image-size", type=int, default=512, help="model input size, a multiple of 128 (default 512)")
    sp.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    sp.add_argument("--batch-size", type=int, default=8, help="global batch size over all processes (default 8)")
    sp.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 adamw, 0.09*B/64 sgd)")
    sp.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="default adamw")
    sp.add_argument("--weight-decay", type=float, default=None, help="default 1e-2 adamw, 4e-5 sgd (not on biases/BN)")
    sp.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9, Nesterov)")
    sp.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup length in epochs (default 1)")
    sp.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak lr of the cosine (default 0.01)")
    sp.add_argument("--clip-grad", type=float, default=10.0, help="gradient norm clip, 0: off (default 10)")
    sp.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                    help="autocast: bf16 (CPU or CUDA) or fp16 with a GradScaler (CUDA) (default off)")
    sp.add_argument("--ema", type=float, default=0.9998, help="EMA decay of the weights, 0: off (default 0.9998)")
    sp.add_argument("--workers", type=int, default=2, help="data loading processes per training process (default 2)")
    sp.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, curves.png, config.json")
    sp.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    sp.add_argument("--weights", default=None, help="initial weights (a state_dict or checkpoint; a class head of "
                    "another size is re-initialised)")
    sp.add_argument("--seed", type=int, default=42, help="data order, augmentation, init seed (default 42)")
    sp.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    sp.add_argument("--drop-path-rate", type=float, default=None, help="backbone stochastic depth (default: variant's)")
    sp.add_argument("--label-smoothing", type=float, default=0.0, help="focal loss label smoothing (default 0)")
    sp.add_argument("--teacher", default=None, metavar="MODEL", help="distil from this EfficientDet variant "
                    "(needs --teacher-weights): loss = kd-alpha * KD + (1 - kd-alpha) * detection loss")
    sp.add_argument("--teacher-weights", default=None, metavar="CKPT", help="the teacher's weights: an effops train "
                    "checkpoint (its EMA weights and reduced-model settings) or a state_dict; read weights-only")
    sp.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the distillation term (default 0.5)")
    sp.add_argument("--kd-temperature", type=float, default=1.0, help="temperature of the class-logit KD (default 1)")
    sp.add_argument("--kd-box-weight", type=float, default=1.0,
                    help="weight of the box regression toward the teacher's within the KD term (default 1)")
    sp.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default: 0)")
    sp.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl record (default 10)")
    sp.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after N steps in all")
    sp.add_argument("--no-eval", action="store_true", help="skip the COCO evaluation after each epoch")
    sp.add_argument("--eval-max-images", type=int, default=None, help="evaluate the first N val images only")
    sp.add_argument("--shapes-train", type=int, default=None, help="--data shapes: training images (default 2000)")
    sp.add_argument("--shapes-val", type=int, default=None, help="--data shapes: validation images (default 300)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .checkpoint import CheckpointError
    from .loop import TrainConfig, TrainError, train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_options = {}
    for name, key in (("shapes_train", "num_train"), ("shapes_val", "num_val")):
        v = getattr(args, name)
        if v is not None:
            if args.data != "shapes":
                print(f"effops train: --{name.replace('_', '-')} applies to --data shapes only", file=sys.stderr)
                return 2
            data_options[key] = v
    try:
        cfg = TrainConfig(out=args.out, model=args.model, data=args.data, image_size=args.image_size,
                          epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          weight_decay=args.weight_decay, momentum=args.momentum, warmup_epochs=args.warmup_epochs,
                          min_lr_ratio=args.min_lr_ratio, clip_grad=args.clip_grad, amp=args.amp, ema=args.ema,
                          workers=args.workers, seed=args.seed, device=device, resume=args.resume, weights=args.weights,
                          drop_path_rate=args.drop_path_rate, label_smoothing=args.label_smoothing,
                          teacher=args.teacher, teacher_weights=args.teacher_weights, kd_alpha=args.kd_alpha,
                          kd_temperature=args.kd_temperature, kd_box_weight=args.kd_box_weight,
                          checkpoint_every=args.checkpoint_every, log_every=args.log_every, max_steps=args.max_steps,
                          evaluate=not args.no_eval, eval_max_images=args.eval_max_images,
                          progress=not args.no_progress, data_options=data_options)
        summary = train(cfg)
    except (ValueError, TypeError, TrainError, CheckpointError, FileNotFoundError) as e:
        print(f"effops train: {e}", file=sys.stderr)
        return 2
    rank = _rank()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        m = summary["metrics"]
        tail = f", val COCO AP {100 * m['AP']:.2f} AP50 {100 * m['AP50']:.2f}" if m else ""
        print(f"effops train: {summary['step']} steps ({summary['epochs_done']} epochs){tail}; "
              f"checkpoint {summary['checkpoint']}")
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


__all__ = ["add_parser", "run"]
