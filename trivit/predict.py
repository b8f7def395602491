"""``trivit predict IMAGE_OR_DIR... --model DIR``: classify images with a checkpoint folder in one framework.

Preprocessing follows the folder's ``preprocessor_config.json`` (``ViTImageProcessor``, or
``ViTHybridImageProcessor`` when its ``image_processor_type`` says so); the model class follows
``config.json``'s ``model_type`` ("vit" or "vit-hybrid"). Only the framework asked for is imported.

Exit codes: 0 every image was read; 3 some inputs were skipped (named on stderr, and under
``"skipped"`` with ``--json``); 2 usage errors (no model folder, no images found, bad options, a
checkpoint that is not an image classifier).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trivit.folders import (FRAMEWORKS, MODEL_TYPES, UsageError, load_pretrained, load_processor, read_config_json,
                            read_image)

__all__ = ["add_parser", "run", "find_images", "EXIT_OK", "EXIT_USAGE", "EXIT_SKIPPED"]

EXIT_OK, EXIT_USAGE, EXIT_SKIPPED = 0, 2, 3
#: ``(pixels (N, C, H, W) float32, interpolate_pos_encoding) -> (N, num_labels) float32 logits``, in one framework.
Forward = Callable[[np.ndarray, bool], np.ndarray]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``trivit`` sub-command table."""
    p = sub.add_parser(
        "predict", help="classify images with a checkpoint folder (top-k labels and probabilities)",
        description="Classify images (files, or folders walked recursively) with a checkpoint folder. "
                    "Exit code 0: all read; 3: some inputs skipped (named on stderr); 2: usage error.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint folder: config.json, weights, preferably preprocessor_config.json")
    p.add_argument("--framework", choices=FRAMEWORKS, default="torch", help="which framework runs it (default torch)")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5; at most num_labels)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of a table")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------ inputs
def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _pillow_opens(path: Path) -> bool:
    """Whether Pillow recognises the file's header (cheap: nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not an image" for a file found in a walk
        return False


def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand the command-line inputs into ``(image paths, [(path, reason), ...] skipped)``.

    A file given by name is always kept (a bad one is reported when read). Folders are walked
    recursively, skipping hidden entries, and their files sorted by path; a file found there is kept
    when its extension is one Pillow knows, or when Pillow recognises its header. Duplicates are dropped.
    """
    exts = _image_extensions()
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            inside = []
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                inside += [Path(root) / name for name in files if not name.startswith(".")]
            found += [f for f in sorted(inside) if f.suffix.lower() in exts or _pillow_opens(f)]
        elif path.exists():
            found.append(path)
        else:
            skipped.append((item, "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, skipped


# ------------------------------------------------------------------------------------ model folder
def _load_config(folder: Path) -> tuple[str, Any]:
    """``(model class name without framework prefix, vit_core config)`` from ``folder/config.json``."""
    import vit_core
    from vit_core.config import ConfigError

    file, data = read_config_json(folder, "--model")
    model_type = data.get("model_type", "vit")
    if model_type not in MODEL_TYPES:
        raise UsageError(f"{file}: model_type {model_type!r} is not one trivit predicts with ({list(MODEL_TYPES)})")
    class_name, config_class = MODEL_TYPES[model_type]
    try:
        config = getattr(vit_core, config_class).from_pretrained(folder)
    except (ConfigError, ValueError, TypeError) as e:
        raise UsageError(f"{file}: {e}") from None
    if not config.num_labels:
        raise UsageError(f"{file}: num_labels is 0, so the checkpoint has no classification head")
    if config.num_channels != 3:
        raise UsageError(f"{file}: num_channels is {config.num_channels}; trivit predict feeds RGB images (3)")
    return class_name, config


def _load_model(framework: str, class_name: str, folder: Path, note: Callable[[str], None]) -> Forward:
    """Load the classifier in ``framework`` and return its fp32 forward pass on numpy NCHW pixels."""
    model, info = load_pretrained(framework, class_name, folder, note)
    head = [k for k in info.get("missing_keys", []) + info.get("mismatched_keys", []) if "classifier" in str(k)]
    if head:
        raise UsageError(f"--model {folder}: the checkpoint has no trained classification head "
                         f"({', '.join(map(str, head))} would be random); it is not an image classifier")
    return _forward(framework, model)


def _forward(framework: str, model: Any) -> Forward:
    """Wrap ``model`` as ``(pixels (N, C, H, W), interpolate) -> logits (N, L)``, full fp32 on any device."""
    if framework == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: same numbers as the other frameworks
        torch.backends.cudnn.allow_tf32 = False
        model = model.to(device).eval()

        def run_torch(pixels: np.ndarray, interpolate: bool) -> np.ndarray:
            with torch.inference_mode():
                out = model(torch.from_numpy(pixels).to(device), interpolate_pos_encoding=interpolate)
                return out.logits.float().cpu().numpy()

        return run_torch
    if framework == "tf":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
        return lambda pixels, interpolate: np.asarray(
            model(pixels, interpolate_pos_encoding=interpolate, training=False).logits, dtype=np.float32)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    logits = jax.jit(lambda params, pixels, interpolate: model(pixels, params=params,
                                                               interpolate_pos_encoding=interpolate).logits,
                     static_argnums=2)
    return lambda pixels, interpolate: np.asarray(logits(model.params, pixels, interpolate), dtype=np.float32)


# ------------------------------------------------------------------------------------ the run
@dataclass
class _Results:
    """What one run found: per-image ``(path, [(label, id, probability), ...])`` and ``(path, reason)`` skips."""

    predictions: list[tuple[str, list[tuple[str, int, float]]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _probabilities(logits: np.ndarray, config: Any) -> np.ndarray:
    """(N, L) logits -> (N, L) float64 probabilities: sigmoid for multi-label checkpoints, else softmax."""
    z = logits.astype(np.float64)
    if config.problem_type == "multi_label_classification":
        return 1.0 / (1.0 + np.exp(-z))
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[tuple[Callable[[int], None], Callable[[str], None]]]:
    """``(advance(n), say(line))`` on stderr; a tqdm bar (when installed and ``enabled``) keeps lines above it."""
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)  # noqa: E731
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield (lambda n: None), say
        return
    with tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield bar.update, (lambda line: bar.write(line, file=sys.stderr))


def _predict(paths: list[Path], processor: Any, config: Any, forward: Forward, args: argparse.Namespace,
             results: _Results) -> None:
    """Read, preprocess and classify ``paths`` batch by batch into ``results``; skips are said on stderr."""
    top_k = min(args.top_k, config.num_labels)
    labels = config.id2label
    warned = False
    with _progress(len(paths), len(paths) > args.batch_size) as (advance, say):
        for path, why in results.skipped:
            say(f"trivit predict: skipped {path}: {why}")
        for chunk in _chunks(paths, args.batch_size):
            batch: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}  # same-shape images run together
            for path in chunk:
                try:
                    pixels = processor(read_image(path), return_tensors="np").pixel_values[0]
                except ValueError as e:
                    results.skipped.append((str(path), str(e)))
                    say(f"trivit predict: skipped {path}: {e}")
                    continue
                batch.setdefault(pixels.shape, []).append((str(path), pixels))
            for shape, group in batch.items():
                interpolate = tuple(shape[1:]) != tuple(config.image_hw)
                if interpolate and not warned:
                    warned = True
                    say(f"trivit predict: the processor gives {shape[1]}x{shape[2]} pixels, the model was built for "
                        f"{config.image_hw[0]}x{config.image_hw[1]}: interpolating its position embeddings")
                probs = _probabilities(forward(np.stack([px for _, px in group]), interpolate), config)
                for (path, _), row in zip(group, probs):
                    order = np.argsort(-row, kind="stable")[:top_k]
                    results.predictions.append((path, [(labels.get(int(i), str(int(i))), int(i), float(row[i]))
                                                       for i in order]))
            advance(len(chunk))
    index = {p: i for i, p in enumerate(map(str, paths))}  # shape groups may reorder within a batch
    results.predictions.sort(key=lambda item: index[item[0]])


def _table(results: _Results) -> str:
    """An aligned text table: one row per (image, rank); the path only on each image's first row."""
    rows = [("image", "rank", "label", "id", "probability")]
    for path, preds in results.predictions:
        for rank, (label, i, p) in enumerate(preds, 1):
            rows.append((path if rank == 1 else "", str(rank), label, str(i), f"{p:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    right = (False, True, False, True, True)
    return "\n".join("  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)).rstrip()
                     for row in rows)


def _document(results: _Results, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "framework": args.framework,
        "results": [{"path": path, "predictions": [{"label": label, "id": i, "probability": p} for label, i, p in preds]}
                    for path, preds in results.predictions],
        "skipped": [{"path": path, "error": error} for path, error in results.skipped],
    }


def run(args: argparse.Namespace) -> int:
    """Classify ``args.inputs`` with ``args.model``; prints the table (or JSON) on stdout, notes on stderr."""
    def note(line: str) -> None:
        print(f"trivit predict: {line}", file=sys.stderr)

    try:
        if args.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        folder = Path(args.model)
        class_name, config = _load_config(folder)
        paths, missing = find_images(args.inputs)
        if not paths:
            reasons = "; ".join(f"{p}: {why}" for p, why in missing)
            raise UsageError(f"no images found in {' '.join(args.inputs)}" + (f" ({reasons})" if reasons else ""))
        processor = load_processor(folder, config, note)
        forward = _load_model(args.framework, class_name, folder, note)
    except UsageError as e:
        print(f"trivit predict: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    results = _Results(skipped=list(missing))
    _predict(paths, processor, config, forward, args, results)
    if args.json:
        json.dump(_document(results, args), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif results.predictions:
        print(_table(results))
    if results.skipped:
        note(f"{len(results.skipped)} of {len(paths) + len(missing)} inputs skipped (exit code {EXIT_SKIPPED})")
        return EXIT_SKIPPED
    return EXIT_OK
