"""``trivit train``: fine-tune a ViT classifier on an image folder or sklearn's digits in PyTorch, TF/Keras or
JAX/Flax, checkpointing an HF-loadable folder every epoch (see :mod:`trivit.training`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on the ``trivit`` sub-command table."""
    p = sub.add_parser("train", help="fine-tune a ViT classifier (torch, tf or flax), checkpointing every epoch",
                       description="Fine-tune a ViT classifier; --out gets an HF-loadable checkpoint "
                                   "after every epoch.")
    p.add_argument("--data", required=True, help="a folder with one sub-folder of images per class, or sklearn-digits")
    p.add_argument("--model", default="Ti/16",
                   help="a checkpoint folder, or a preset such as Ti/16 built fresh at --image-size (default Ti/16)")
    p.add_argument("--framework", default="torch", help="torch (default), tf or flax")
    p.add_argument("--epochs", type=int, default=3, help="total epochs, counting resumed ones (default 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="after a linear warm-up: constant (default) or cosine decay to 0 at --epochs")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--out", required=True, help="checkpoint folder (written after every epoch)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (weights, optimizer, schedule)")
    p.add_argument("--image-size", type=int, help="train at this resolution (a checkpoint's position embeddings are "
                                                  "interpolated once; default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bf16"], help="bf16: bf16 compute, fp32 weights")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random resized crop / horizontal flip")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of each class (default 0.1)")
    p.add_argument("--limit", type=int, help="use a fixed random subset of this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--distributed", action="store_true",
                   help="data parallel: torch under torchrun (DDP, one process per device), flax over every JAX "
                        "device, tf MirroredStrategy; see docs/distributed.md")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from trivit import training

    training.quiet_frameworks()
    # --distributed under torchrun: every rank runs this; only rank 0 talks (and writes, see training.fit)
    say = print if not args.distributed or os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    try:
        if args.framework not in training.FRAMEWORKS:
            raise training.TrainingError(f"--framework {args.framework!r}: choose one of {list(training.FRAMEWORKS)}")
        if args.resume and not (Path(args.out) / training.STATE_FILE).is_file():
            raise training.TrainingError(f"--resume: nothing to resume in --out {args.out!r} "
                                         f"(no {training.STATE_FILE})")
        source = args.out if args.resume else args.model
        config, _ = training.resolve_config(source, None if args.resume else args.image_size)
        size = config.image_hw[0] if args.resume or not args.image_size else args.image_size
        processor = training.make_processor(source, size)
        train, val = training.load_data(args.data, processor, val_fraction=args.val_fraction, limit=args.limit)
        say(f"data: {len(train)} training / {len(val)} validation images, {len(train.id2label)} classes "
            f"({', '.join(list(train.id2label.values())[:10])}{', ...' if len(train.id2label) > 10 else ''}) "
            f"at {size}x{size}")
        history = training.fit(
            args.framework, args.model, train, val, epochs=args.epochs, out=args.out, batch_size=args.batch_size,
            lr=args.lr, resume=args.resume, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
            image_size=args.image_size, seed=args.seed, progress=args.progress, schedule=args.schedule,
            weight_decay=args.weight_decay, augment=args.augment, processor=processor, distributed=args.distributed)
    except (training.TrainingError, FileNotFoundError) as e:
        print(f"trivit train: error: {e}", file=sys.stderr)
        return 2
    for r in history.records:
        say(f"epoch {r.epoch}: train loss {r.train_loss:.4f}, val loss {r.val_loss:.4f}, "
            f"val accuracy {r.val_accuracy:.4f} ({r.seconds:.1f} s)")
    say(f"checkpoint: {args.out} (loads with from_pretrained in every framework and in HF transformers)")
    return 0
