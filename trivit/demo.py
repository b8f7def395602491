"""``trivit demo``: fine-tune a small ViT on scikit-learn's digits (Keras ``model.fit`` by default), load the
checkpoint in PyTorch, TF and Flax, and show that all three classify the held-out digits alike.

No network: the digits ship with scikit-learn. Prints a table (accuracy per framework, the largest logit
difference between frameworks, the checkpoint folder) and writes ``demo.png`` (training curves and test
digits with predicted / true labels). Exit code 1 if an accuracy is below ``--min-accuracy`` or two
frameworks' logits differ by more than ``--max-diff``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "run", "demo", "DemoResult", "demo_config"]

#: How each framework's classifier is named and called on NCHW numpy pixels.
_CLASSES = {"torch": ("vit_torch", "ViTForImageClassification"), "tf": ("vit_tf", "TFViTForImageClassification"),
            "flax": ("vit_flax", "FlaxViTForImageClassification")}


def demo_config(image_size: int = 32):
    """The demo's ViT: 32×32 input (the 8×8 digits upscaled 4×), 8×8 patches (16 tokens, each 2×2 digit pixels),
    width 64, 2 layers, 4 heads, MLP 128: ~70k parameters, about a second per epoch on 2 CPU cores."""
    from vit_core.config import ViTConfig

    return ViTConfig(image_size=image_size, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, id2label={i: str(i) for i in range(10)})


@dataclass
class DemoResult:
    """What the demo measured: ``accuracy`` and ``logits`` (N, 10) per framework on the held-out split,
    ``max_diff`` (largest |logit difference| over framework pairs), the checkpoint ``folder``, the ``png``,
    the training history and the seconds spent training / evaluating."""

    accuracy: dict[str, float]
    logits: dict[str, np.ndarray]
    labels: np.ndarray
    max_diff: float
    folder: Path
    png: Path
    history: object
    train_seconds: float
    eval_seconds: float


def _logits(framework: str, folder: Path, pixels: np.ndarray) -> np.ndarray:
    """Load ``folder`` with ``framework``'s ``from_pretrained`` and return its (N, K) float32 logits."""
    from trivit.training import import_quietly, native_log_filter

    module, name = _CLASSES[framework]
    with native_log_filter():
        model = getattr(import_quietly(module), name).from_pretrained(folder)
    chunks = []
    for i in range(0, len(pixels), 256):
        x = pixels[i:i + 256]
        if framework == "torch":
            import torch

            with torch.no_grad():
                chunks.append(model.eval()(torch.from_numpy(x)).logits.numpy())
        else:
            chunks.append(np.asarray(model(x).logits))
    return np.concatenate(chunks).astype(np.float32)


def _picture(path: Path, history, pixels: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> None:
    """Training curves (loss, accuracy) beside a 4×8 grid of test digits titled predicted/true; atomic PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vit_core.atomic import atomic_write

    fig = plt.figure(figsize=(13, 5.2))
    grid = fig.add_gridspec(4, 12)
    ax = fig.add_subplot(grid[:, :4])
    epochs = [r.epoch for r in history.records]
    ax.plot(epochs, history.train_loss, "o-", label="train loss")
    ax.plot(epochs, history.val_loss, "s-", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    acc_ax = ax.twinx()
    acc_ax.plot(epochs, history.val_accuracy, "^-", color="tab:green", label="val accuracy")
    acc_ax.set_ylim(0, 1.01)
    acc_ax.set_ylabel("val accuracy")
    lines = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title(f"training ({history.framework})")
    for k in range(min(32, len(labels))):
        cell = fig.add_subplot(grid[k // 8, 4 + k % 8])
        cell.imshow(pixels[k, 0], cmap="gray_r")
        ok = predicted[k] == labels[k]
        cell.set_title(f"{predicted[k]} / {labels[k]}", fontsize=9, color="black" if ok else "red")
        cell.axis("off")
    fig.suptitle("trivit demo: ViT on sklearn digits — test digits titled predicted / true")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def demo(*, framework: str = "tf", epochs: int = 25, batch_size: int = 32, lr: float = 2e-3, out: str | Path =
         "trivit-demo-output", limit: int | None = None, seed: int = 0, progress: bool = True,
         log=print) -> DemoResult:
    """Train on the digits with ``framework``, reload the checkpoint in all three frameworks, evaluate, draw."""
    from trivit import training

    training.quiet_frameworks()
    config = demo_config()
    processor = training.make_processor(config, config.image_hw[0])
    train, val = training.load_data("sklearn-digits", processor, val_fraction=0.1, limit=limit)
    log(f"sklearn digits: {len(train)} training / {len(val)} held-out images, upscaled 8x8 -> 32x32; "
        f"ViT 32px, patch 8, width 64, 2 layers; training with {framework} for {epochs} epoch(s)")
    out = Path(out)
    t0 = time.perf_counter()
    history = training.fit(framework, config, train, val, epochs=epochs, out=out, batch_size=batch_size, lr=lr,
                           seed=seed, progress=progress, schedule="cosine", processor=processor)
    t1 = time.perf_counter()
    logits = {name: _logits(name, out, val.pixel_values) for name in _CLASSES}
    t2 = time.perf_counter()
    accuracy = {name: float((z.argmax(1) == val.labels).mean()) for name, z in logits.items()}
    names = list(logits)
    max_diff = max(float(np.abs(logits[a].astype(np.float64) - logits[b]).max())
                   for i, a in enumerate(names) for b in names[i + 1:])
    png = out / "demo.png"
    _picture(png, history, val.pixel_values, val.labels, logits[framework].argmax(1))
    return DemoResult(accuracy, logits, val.labels, max_diff, out, png, history, t1 - t0, t2 - t1)


def run(args: argparse.Namespace) -> int:
    from trivit.training import TrainingError

    try:
        result = demo(framework=args.framework, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      out=args.out, limit=args.limit, seed=args.seed, progress=not args.no_progress)
    except TrainingError as e:
        print(f"trivit demo: error: {e}", file=sys.stderr)
        return 2
    n = len(result.labels)
    print(f"\ntrained with {args.framework} in {result.train_seconds:.1f} s; evaluated {n} held-out digits "
          f"in all three frameworks in {result.eval_seconds:.1f} s")
    print(f"{'framework':<12}{'accuracy':>10}")
    for name, acc in result.accuracy.items():
        print(f"{name:<12}{acc:>10.2%}")
    print(f"max |logit difference| between frameworks: {result.max_diff:.2e}")
    print(f"checkpoint (HF-loadable): {result.folder.resolve()}")
    print(f"picture: {result.png.resolve()}")
    failed = []
    if min(result.accuracy.values()) < args.min_accuracy:
        failed.append(f"accuracy below {args.min_accuracy:.0%}")
    if not result.max_diff <= args.max_diff:
        failed.append(f"frameworks disagree by more than {args.max_diff:g}")
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    print("ok")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="fine-tune a small ViT on sklearn digits, check it in torch, tf and flax",
                       description="Fine-tune a small ViT on scikit-learn's digits (no network), reload the checkpoint "
                                   "in PyTorch, TF and Flax, and compare accuracies and logits.")
    p.add_argument("--framework", default="tf", choices=list(_CLASSES),
                   help="trainer: tf (Keras model.fit, default), torch (a PyTorch loop) or flax (an optax loop)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine schedule)")
    p.add_argument("--out", default="trivit-demo-output", help="checkpoint folder (default ./trivit-demo-output)")
    p.add_argument("--limit", type=int, help="use only this many digits (a quick check; accuracy drops)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.95, help="fail below this accuracy (default 0.95)")
    p.add_argument("--max-diff", type=float, default=1e-4, help="fail above this logit difference (default 1e-4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p
