"""``trivit demo``: build a small ViT, preprocess a real photo, run it, save the canonical checkpoint,
reload it in every installed framework and show the numbers agree."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "run"]


def _load_photo(path: str | None) -> np.ndarray:
    if path is not None:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        raise SystemExit("trivit demo: pass --image PATH (or install scikit-learn for its sample photos)") from None
    return load_sample_image("china.jpg")


def _run_framework(name: str, folder: Path, pixels: np.ndarray) -> np.ndarray:
    """Load the checkpoint in one framework and return its logits as numpy."""
    module, cls = _FRAMEWORK_CLASSES[name]
    model = getattr(importlib.import_module(module), cls).from_pretrained(folder)
    if name == "pt":
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(pixels)).logits.numpy()
    return np.asarray(model(pixels).logits)


_FRAMEWORK_CLASSES = {
    "pt": ("vit_torch", "ViTForImageClassification"),
    "tf": ("vit_tf", "TFViTForImageClassification"),
    "flax": ("vit_flax", "FlaxViTForImageClassification"),
}


def _installed_frameworks() -> list[str]:
    """Frameworks whose models import here (an extra not installed is reported, not fatal)."""
    found = []
    for name, (module, cls) in _FRAMEWORK_CLASSES.items():
        try:
            getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:
            print(f"skipping {name}: {e} (pip install 'trivit[{ {'pt': 'torch'}.get(name, name) }]')")
            continue
        found.append(name)
    return found


def run(args: argparse.Namespace) -> int:
    import torch

    from vit_core.config import ViTConfig
    from vit_core.image_processing import ViTImageProcessor
    from vit_torch import ViTForImageClassification

    torch.manual_seed(args.seed)
    labels = ["tabby cat", "pagoda", "tulip", "sports car", "volcano"]
    config = ViTConfig.from_variant(args.variant, id2label=dict(enumerate(labels)))
    model = ViTForImageClassification(config).eval()
    print(f"built ViT-{args.variant} classifier: {model.num_parameters() / 1e6:.1f}M parameters (random weights)")

    photo = _load_photo(args.image)
    processor = ViTImageProcessor()
    pixels = processor(photo, return_tensors="np").pixel_values
    print(f"preprocessed a {photo.shape[1]}x{photo.shape[0]} photo -> pixel_values {tuple(pixels.shape)}")

    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels)).logits.numpy()
    print(f"forward pass: {1e3 * (time.perf_counter() - t0):.0f} ms; top label {labels[int(logits.argmax())]!r} "
          "(meaningless with random weights)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out) if args.out else Path(tmp) / "vit-demo"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        files = sorted(p.name for p in folder.iterdir())
        print(f"saved {folder}: {files}")
        worst = 0.0
        for name in _installed_frameworks():
            diff = float(np.abs(_run_framework(name, folder, pixels) - logits).max())
            worst = max(worst, diff)
            print(f"reloaded in {name:>4}: max |logits - original| = {diff:.2e}")
    if worst > 1e-4:
        print("FAILED: a reloaded model disagrees with the original", file=sys.stderr)
        return 1
    print("ok")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="build a small ViT, run a real photo through it, save and reload it")
    p.add_argument("--variant", default="Ti/16", help="model preset, e.g. Ti/16, S/16, B/16 (default Ti/16)")
    p.add_argument("--image", help="a photo to use (default: scikit-learn's china.jpg)")
    p.add_argument("--out", help="folder to keep the checkpoint in (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p
