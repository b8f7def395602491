"""Fine-tuning of a ViT classifier in PyTorch, TF/Keras or JAX/Flax behind one contract (one process, or data
parallel with ``distributed=True``: torch DDP under torchrun, a JAX mesh, TF MirroredStrategy).

:func:`fit` trains ``ViTForImageClassification`` (or its TF / Flax twin) and, after every epoch, writes
an HF-loadable checkpoint into ``out`` (``config.json`` + ``model.safetensors`` via ``save_pretrained``,
``preprocessor_config.json``) plus ``trainer_state.json`` (epoch, history, settings) and the optimizer
state in the framework's own format (``optimizer.pt`` / ``optimizer.npz`` / ``optimizer.msgpack``).
``resume=True`` continues from that folder, optimizer state and LR schedule included.

The three trainers share everything but the step: the data (NCHW float32, normalised as
:class:`vit_core.ViTImageProcessor` does), the per-epoch order and augmentation (seeded by
``(seed, epoch)`` so a resumed run sees the same batches), AdamW (betas 0.9/0.999, eps 1e-8,
decoupled weight decay), the LR schedule (:func:`learning_rate`) and the metrics
(:func:`classification_metrics`: mean cross-entropy over the examples, top-1 accuracy).

* torch: a plain loop, ``torch.optim.AdamW`` + ``LambdaLR``, a tqdm bar; bf16 = CPU/CUDA autocast.
* tf: ``model.compile(AdamW)`` + ``model.fit`` on the model's internal loss, Keras' progress bar;
  bf16 = the ``mixed_bfloat16`` policy; no gradient checkpointing (refused: vit_tf has no remat switch).
* flax: ``optax.adamw`` + :func:`vit_flax.training.make_train_step`, a tqdm bar; bf16 = ``dtype=bfloat16``
  (fp32 master params); gradient checkpointing = ``nn.remat`` per layer.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trivit.quiet import import_quietly, native_log_filter, quiet_frameworks
from vit_core.atomic import staged_files
from vit_core.config import ConfigError, ViTConfig
from vit_core.image_processing import ViTImageProcessor
from vit_core.interpolation import resize_matrix

__all__ = [
    "FRAMEWORKS", "TrainingError", "Dataset", "History", "EpochRecord", "fit", "load_data", "load_image_folder",
    "load_digits", "split", "augment", "classification_metrics", "learning_rate", "resolve_model", "quiet_frameworks",
    "resize_position_embeddings", "STATE_FILE", "native_log_filter", "import_quietly",
]

FRAMEWORKS: tuple[str, ...] = ("torch", "tf", "flax")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILES = {"torch": "optimizer.pt", "tf": "optimizer.npz", "flax": "optimizer.msgpack"}
#: AdamW hyper-parameters shared by the three trainers (the frameworks' defaults differ).
BETAS, EPS = (0.9, 0.999), 1e-8
#: The split is always drawn with this seed: the same held-out images whatever ``--seed`` says.
SPLIT_SEED = 0
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class TrainingError(ValueError):
    """A user-facing problem (bad folder, argument, checkpoint); the message names what is wrong."""


# ----------------------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """Preprocessed images with integer labels.

    ``pixel_values``: (N, 3, H, W) float32, normalised as ``ViTImageProcessor`` does; ``labels``: (N,) int64;
    ``id2label``: class index -> name; ``flip``: whether horizontal flips are label-preserving;
    ``min_scale``: the smallest crop area fraction of the random resized crop.
    """

    pixel_values: np.ndarray
    labels: np.ndarray
    id2label: dict[int, str]
    flip: bool = True
    min_scale: float = 0.5

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.pixel_values[index], self.labels[index], self.id2label, self.flip, self.min_scale)


def load_image_folder(folder: str | os.PathLike[str], processor: ViTImageProcessor,
                      log: Callable[[str], None] = print) -> Dataset:
    """One sub-folder per class (sorted names are the labels); every file Pillow reads is an example.

    Unreadable files are reported by name and skipped. Raises :class:`TrainingError` for a missing
    folder, fewer than two classes, or a class without a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    if not root.is_dir():
        raise TrainingError(f"--data {str(folder)!r}: no such folder (expected one sub-folder per class, "
                            "or 'sklearn-digits')")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise TrainingError(f"--data {str(folder)!r}: found {len(classes)} class folder(s) {classes}; "
                            "a classifier needs at least two (one sub-folder per class)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = 0
        for path in sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB")))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                log(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
                continue
            labels.append(index)
            found += 1
        if not found:
            raise TrainingError(f"--data {str(folder)!r}: class folder {name!r} holds no readable image")
    pixels = processor(images, return_tensors="np").pixel_values.astype(np.float32)
    return Dataset(pixels, np.asarray(labels, np.int64), dict(enumerate(classes)))


def load_digits(processor: ViTImageProcessor) -> Dataset:
    """scikit-learn's 1,797 8×8 digits (0..16 ink), as uint8 grey images upscaled by ``processor``.

    No horizontal flips (a mirrored 2 or 7 is not a digit) and a mild crop (at least 80% of the area).
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise TrainingError("--data sklearn-digits needs scikit-learn (pip install scikit-learn)") from None
    digits = sk_digits()
    grey = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    pixels = processor(list(grey), return_tensors="np").pixel_values.astype(np.float32)
    return Dataset(pixels, digits.target.astype(np.int64), {i: str(i) for i in range(10)}, flip=False, min_scale=0.8)


def split(data: Dataset, val_fraction: float) -> tuple[Dataset, Dataset]:
    """A fixed (``SPLIT_SEED``) stratified split: about ``val_fraction`` of each class held out, at least one
    image per class kept for training; returns ``(train, val)``."""
    if not 0.0 < val_fraction < 1.0:
        raise TrainingError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(SPLIT_SEED)
    val_idx: list[np.ndarray] = []
    train_idx: list[np.ndarray] = []
    for c in np.unique(data.labels):
        idx = rng.permutation(np.flatnonzero(data.labels == c))
        n_val = min(max(1, int(round(val_fraction * len(idx)))), len(idx) - 1) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    val, train = np.sort(np.concatenate(val_idx)), np.sort(np.concatenate(train_idx))
    if not len(val):
        raise TrainingError("no image left for validation: every class has a single image")
    return data.subset(train), data.subset(val)


def make_processor(model: str | os.PathLike[str] | ViTConfig, image_size: int) -> ViTImageProcessor:
    """The checkpoint folder's processor (if it has ``preprocessor_config.json``) resized to ``image_size``,
    else the default ``ViTImageProcessor`` at that size."""
    if not isinstance(model, ViTConfig) and (Path(model) / "preprocessor_config.json").is_file():
        return ViTImageProcessor.from_pretrained(model, size={"height": image_size, "width": image_size})
    return ViTImageProcessor(size={"height": image_size, "width": image_size})


def load_data(spec: str, processor: ViTImageProcessor, *, val_fraction: float = 0.1, limit: int | None = None,
              log: Callable[[str], None] = print) -> tuple[Dataset, Dataset]:
    """``--data``: ``"sklearn-digits"`` or a class-folder path; ``limit`` keeps a fixed random subset first."""
    data = load_digits(processor) if spec == "sklearn-digits" else load_image_folder(spec, processor, log)
    if limit is not None and limit < len(data):
        if limit < 2 * len(data.id2label):
            raise TrainingError(f"--limit {limit} is too small for {len(data.id2label)} classes")
        data = data.subset(np.sort(np.random.default_rng(SPLIT_SEED).permutation(len(data))[:limit]))
    return split(data, val_fraction)


def augment(pixels: np.ndarray, rng: np.random.Generator, *, flip: bool, min_scale: float) -> np.ndarray:
    """Random resized crop + (if ``flip``) horizontal flip with probability 1/2, in numpy.

    ``pixels``: (N, C, H, W) float32 → same shape. Per image: a box of area fraction U(min_scale, 1) and
    aspect ratio log-uniform in [3/4, 4/3] (clipped to the image), resized back to H×W bilinearly
    (PyTorch's ``interpolate`` weights, :func:`vit_core.interpolation.resize_matrix`).
    """
    n, _, h, w = pixels.shape
    out = np.empty_like(pixels)
    for i in range(n):
        area = h * w * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = int(np.clip(round(math.sqrt(area / ratio)), 1, h))
        cw = int(np.clip(round(math.sqrt(area * ratio)), 1, w))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = pixels[i, :, y0:y0 + ch, x0:x0 + cw].astype(np.float64)
        img = resize_matrix(ch, h, "bilinear") @ crop @ resize_matrix(cw, w, "bilinear").T  # (C, H, W)
        if flip and rng.random() < 0.5:
            img = img[:, :, ::-1]
        out[i] = img
    return out


def epoch_arrays(train: Dataset, epoch: int, seed: int, do_augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's shuffled (and augmented) ``(pixel_values (N, C, H, W), labels (N,))``: a function of
    ``(seed, epoch)`` only, so a resumed run sees exactly the batches a straight run would."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(train))
    x = train.pixel_values[order]
    if do_augment:
        x = augment(x, rng, flip=train.flip, min_scale=train.min_scale)
    return np.ascontiguousarray(x, np.float32), train.labels[order]


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(mean cross-entropy over the examples, top-1 accuracy)`` from (N, K) logits and (N,) labels."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    return loss, float((logits.argmax(axis=1) == labels).mean())


def learning_rate(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then constant (``"constant"``) or cosine to 0
    at step ``total`` (``"cosine"``). The torch, Keras and optax trainers evaluate this same formula."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------- model
@dataclass
class ModelSource:
    """Where the initial weights come from: a canonical ``folder`` (loaded with ``overrides``: new labels
    → head swap) or none (fresh weights for ``config``)."""

    config: ViTConfig
    folder: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def resolve_config(model: str | os.PathLike[str] | ViTConfig, image_size: int | None) -> tuple[ViTConfig, Path | None]:
    """``--model``: a ViTConfig, a checkpoint folder (its config) or a preset such as ``"Ti/16"`` (at
    ``image_size``, default 224). Returns the config *as stored* and the folder (or None)."""
    if isinstance(model, ViTConfig):
        return (model.copy(image_size=image_size) if image_size else model), None
    path = Path(model)
    if path.is_dir():
        try:
            config = ViTConfig.from_pretrained(path)
        except (FileNotFoundError, ConfigError, ValueError) as e:
            raise TrainingError(f"--model {str(model)!r}: {e}") from None
        if config.model_type != "vit":
            raise TrainingError(f"--model {str(model)!r}: model_type {config.model_type!r}; trivit train fine-tunes "
                                "plain ViT classifiers only")
        return config, path
    try:
        return ViTConfig.from_variant(str(model), image_size=image_size or 224), None
    except ConfigError as e:
        raise TrainingError(f"--model {str(model)!r} is neither a checkpoint folder nor a preset: {e}") from None


def resize_position_embeddings(src: Path, dst: Path, image_size: int) -> None:
    """Copy the canonical checkpoint ``src`` to ``dst`` with ``image_size`` and the position embeddings'
    patch grid resized (bicubic or per ``config.interpolate_pos_mode``, PyTorch's kernel; the class-token
    row is kept) — what ``interpolate_pos_encoding`` does at run time, done once on the weights."""
    from vit_core.checkpoint import read_checkpoint, write_checkpoint
    from vit_core.pretrained import saved_config_dict

    config = ViTConfig.from_pretrained(src)
    new = config.copy(image_size=image_size)
    state = read_checkpoint(src)
    tensors = {k: np.asarray(state[k]) for k in state}
    key = next((k for k in tensors if k.endswith("embeddings.position_embeddings")), None)
    if key is None:
        raise TrainingError(f"--model {str(src)!r}: no position embeddings in the checkpoint")
    (gh, gw), (nh, nw) = config.feature_grid(*config.image_hw), new.feature_grid(*new.image_hw)
    pe = tensors[key].astype(np.float64)  # (1, 1 + gh*gw, D)
    if pe.shape[1] != 1 + gh * gw:
        raise TrainingError(f"--model {str(src)!r}: {key} has {pe.shape[1]} rows, expected 1 + {gh}x{gw}")
    mode = getattr(config, "interpolate_pos_mode", "bicubic") or "bicubic"
    grid = pe[0, 1:].reshape(gh, gw, -1)
    grid = np.einsum("Yy,yxd,Xx->YXd", resize_matrix(gh, nh, mode), grid, resize_matrix(gw, nw, mode))
    tensors[key] = np.concatenate([pe[:, :1], grid.reshape(1, nh * nw, -1)], axis=1).astype(tensors[key].dtype)
    write_checkpoint(dst, tensors, saved_config_dict(new, "ViTForImageClassification", str(tensors[key].dtype)))


def resolve_model(model: str | os.PathLike[str] | ViTConfig, image_size: int | None, id2label: dict[int, str],
                  scratch: Path) -> ModelSource:
    """The initial weights for ``id2label`` at ``image_size``: a fresh config, or a folder (resized into
    ``scratch`` when the size changes) loaded with a new head when the labels differ."""
    config, folder = resolve_config(model, image_size)
    labels = {"num_labels": len(id2label), "id2label": dict(id2label),
              "label2id": {v: k for k, v in id2label.items()}}
    if folder is None:
        return ModelSource(config.copy(**labels))
    if image_size and config.image_hw != (image_size, image_size):
        resized = scratch / "resized"
        resize_position_embeddings(folder, resized, image_size)
        folder, config = resized, ViTConfig.from_pretrained(resized)
    overrides: dict[str, Any] = {}
    if config.id2label != dict(id2label):
        overrides = {**labels, "ignore_mismatched_sizes": True}
    return ModelSource(config.copy(**labels), folder, overrides)


# ----------------------------------------------------------------------------------------- history
@dataclass
class EpochRecord:
    """One epoch: mean train cross-entropy (over the epoch's examples), val cross-entropy and top-1 accuracy."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class History:
    """Per-epoch records of a run (a resumed run's history includes the earlier epochs)."""

    framework: str
    records: list[EpochRecord] = field(default_factory=list)

    @property
    def train_loss(self) -> list[float]:
        return [r.train_loss for r in self.records]

    @property
    def val_loss(self) -> list[float]:
        return [r.val_loss for r in self.records]

    @property
    def val_accuracy(self) -> list[float]:
        return [r.val_accuracy for r in self.records]


@dataclass
class _Run:
    """Everything a framework trainer needs; the trainers differ only in how they step and save."""

    framework: str
    source: ModelSource
    train: Dataset
    val: Dataset
    epochs: int
    start_epoch: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str
    seed: int
    bf16: bool
    gradient_checkpointing: bool
    do_augment: bool
    progress: bool
    out: Path
    processor: ViTImageProcessor
    history: History
    optimizer_state: Path | None
    log: Callable[[str], None]
    #: ``--distributed``: the engine's handle (torch :class:`trivit.distributed.TorchContext`, a JAX ``Mesh``,
    #: a ``tf.distribute`` strategy), or None for a single process / device.
    dist: Any = None
    world: int = 1  #: ranks / devices the global batch is split over
    main: bool = True  #: this process writes checkpoints (rank 0)

    @property
    def n_train(self) -> int:
        """Examples used per epoch: all, less ``len(train) % world`` (so that the last batch splits evenly)."""
        return len(self.train) - len(self.train) % self.world

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @property
    def warmup(self) -> int:
        """Warm-up steps: one epoch's worth, at most 100 (independent of ``epochs``, so resuming with a
        larger ``epochs`` continues a ``constant`` schedule exactly)."""
        return min(100, self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        return learning_rate(step, peak=self.lr, warmup=self.warmup, total=self.total_steps, schedule=self.schedule)

    def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        x, y = epoch_arrays(self.train, epoch, self.seed, self.do_augment)
        x, y = x[:self.n_train], y[:self.n_train]
        for i in range(0, len(y), self.batch_size):
            yield x[i:i + self.batch_size], y[i:i + self.batch_size]

    def end_epoch(self, epoch: int, train_loss: float, val_logits: np.ndarray, seconds: float,
                  save_model: Callable[[Path], None], optimizer_bytes: bytes) -> EpochRecord:
        """Record the epoch and write the checkpoint: model (save_pretrained, atomic), then the processor,
        optimizer state and ``trainer_state.json`` staged together (all or nothing)."""
        val_loss, val_acc = classification_metrics(val_logits, self.val.labels)
        record = EpochRecord(epoch + 1, float(train_loss), val_loss, val_acc, round(seconds, 3))
        self.history.records.append(record)
        if not self.main:
            return record
        save_model(self.out)
        state = {"framework": self.framework, "epoch": epoch + 1, "epochs": self.epochs,
                 "global_step": (epoch + 1) * self.steps_per_epoch, "batch_size": self.batch_size, "lr": self.lr,
                 "weight_decay": self.weight_decay, "schedule": self.schedule, "seed": self.seed,
                 "augment": self.do_augment, "dtype": "bf16" if self.bf16 else "float32", "devices": self.world,
                 "optimizer_file": OPTIMIZER_FILES[self.framework],
                 "history": [asdict(r) for r in self.history.records]}
        with staged_files(self.out) as open_staged:
            with open_staged("preprocessor_config.json") as f:
                f.write((json.dumps(self.processor.to_dict(), indent=2, sort_keys=True) + "\n").encode())
            with open_staged(OPTIMIZER_FILES[self.framework]) as f:
                f.write(optimizer_bytes)
            with open_staged(STATE_FILE) as f:
                f.write((json.dumps(state, indent=2) + "\n").encode())
        return record


def _tqdm(run: _Run, epoch: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=len(run.train), desc=f"epoch {epoch + 1}/{run.epochs}", unit="img", disable=not run.progress,
                leave=True, dynamic_ncols=True)


def _fit_torch(run: _Run) -> None:
    import torch

    from vit_torch import ViTForImageClassification

    torch.manual_seed(run.seed)
    src = run.source
    model = (ViTForImageClassification.from_pretrained(src.folder, **src.overrides) if src.folder
             else ViTForImageClassification(src.config))
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ddp, device = None, torch.device("cpu")
    if run.dist is not None:
        from trivit.distributed import rank_shard, torch_train_step, wrap_ddp

        ddp, device = wrap_ddp(model, run.dist), run.dist.device
    # The fused kernel (one pass over each parameter, CPU and CUDA): the same AdamW update, rounded in another order.
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=BETAS, eps=EPS, weight_decay=run.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: run.lr_at(s) / run.lr)
    if run.optimizer_state is not None:
        saved = torch.load(run.optimizer_state, weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])

    def logits(x: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
            return np.concatenate([model(torch.from_numpy(x[i:i + 256]).to(device)).logits.float().cpu().numpy()
                                   for i in range(0, len(x), 256)])

    for epoch in range(run.start_epoch, run.epochs):
        t0, total = time.perf_counter(), 0.0
        model.train()
        with _tqdm(run, epoch) as bar:
            for xb, yb in run.batches(epoch):
                if ddp is not None:  # this rank's shard; DDP averages the gradients, the loss is the global mean
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16):
                        loss = torch_train_step(ddp, opt, rank_shard({"pixel_values": xb, "labels": yb},
                                                                     run.dist.rank, run.world))
                    sched.step()
                    total += float(loss) * len(yb)
                    bar.update(len(yb))
                    bar.set_postfix(loss=f"{float(loss):.4f}")
                    continue
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.bf16):
                    loss = model(pixel_values=torch.from_numpy(xb), labels=torch.from_numpy(yb)).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(yb)
                bar.update(len(yb))
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            buf = io.BytesIO()
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
            rec = run.end_epoch(epoch, total / run.n_train, logits(run.val.pixel_values),
                                time.perf_counter() - t0, model.save_pretrained, buf.getvalue())
            bar.set_postfix(loss=f"{rec.train_loss:.4f}", val_loss=f"{rec.val_loss:.4f}",
                            val_acc=f"{rec.val_accuracy:.4f}")


def _fit_flax(run: _Run) -> None:
    FlaxViTForImageClassification = import_quietly("vit_flax").FlaxViTForImageClassification
    import jax
    import jax.numpy as jnp
    import optax
    from flax import serialization

    from vit_flax.training import make_train_step

    src = run.source
    kwargs = {"dtype": jnp.bfloat16 if run.bf16 else jnp.float32, "gradient_checkpointing": run.gradient_checkpointing,
              "seed": run.seed}
    model = (FlaxViTForImageClassification.from_pretrained(src.folder, **src.overrides, **kwargs) if src.folder
             else FlaxViTForImageClassification(src.config, **kwargs))

    def schedule(step: jax.Array) -> jax.Array:  # learning_rate(), in jnp
        s = jnp.asarray(step, jnp.float32)
        warm = run.lr * (s + 1) / run.warmup
        t = jnp.clip((s - run.warmup) / max(1, run.total_steps - run.warmup), 0.0, 1.0)
        after = run.lr * 0.5 * (1 + jnp.cos(jnp.pi * t)) if run.schedule == "cosine" else jnp.full_like(s, run.lr)
        return jnp.where(s < run.warmup, warm, after)

    tx = optax.adamw(schedule, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=run.weight_decay)
    params = model.params
    opt_state = tx.init(params)
    if run.optimizer_state is not None:
        opt_state = serialization.from_bytes(opt_state, run.optimizer_state.read_bytes())
    step = make_train_step(model, tx, run.dist)
    if run.dist is not None:  # data parallel over the mesh: replicated state, batches split over "data"
        from vit_flax.training import replicate, shard_batch

        params, opt_state = replicate(params, run.dist), replicate(opt_state, run.dist)
    forward = jax.jit(lambda p, x: model(x, params=p).logits.astype(jnp.float32))

    def logits(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(forward(params, x[i:i + 256])) for i in range(0, len(x), 256)])

    for epoch in range(run.start_epoch, run.epochs):
        t0, total = time.perf_counter(), 0.0
        with _tqdm(run, epoch) as bar:
            for xb, yb in run.batches(epoch):
                batch = {"pixel_values": xb, "labels": yb}
                batch = batch if run.dist is None else shard_batch(batch, run.dist)
                params, opt_state, loss = step(params, opt_state, batch)
                total += float(loss) * len(yb)
                bar.update(len(yb))
                bar.set_postfix(loss=f"{float(loss):.4f}")
            model.params = params
            rec = run.end_epoch(epoch, total / run.n_train, logits(run.val.pixel_values), time.perf_counter() - t0,
                                model.save_pretrained, serialization.to_bytes(opt_state))
            bar.set_postfix(loss=f"{rec.train_loss:.4f}", val_loss=f"{rec.val_loss:.4f}",
                            val_acc=f"{rec.val_accuracy:.4f}")


def _fit_tf(run: _Run) -> None:
    TFViTForImageClassification = import_quietly("vit_tf").TFViTForImageClassification
    import keras
    from keras import ops

    keras.utils.set_random_seed(run.seed)
    previous = keras.config.dtype_policy()
    src = run.source
    # under --distributed: model and optimizer variables mirrored over the strategy's replicas; Keras' fit
    # splits every global batch over them (the model's own loss is scaled by 1 / replicas, as Keras' losses are)
    scope = run.dist.scope() if run.dist is not None else contextlib.nullcontext()
    with scope:
        try:
            if run.bf16:
                keras.mixed_precision.set_global_policy("mixed_bfloat16")
            with native_log_filter():  # the first TF op probes for GPUs
                model = (TFViTForImageClassification.from_pretrained(src.folder, **src.overrides) if src.folder
                         else TFViTForImageClassification(src.config))
        finally:
            keras.config.set_dtype_policy(previous)

        class Schedule(keras.optimizers.schedules.LearningRateSchedule):
            """learning_rate(), in keras.ops."""

            def __call__(self, step: Any) -> Any:
                s = ops.cast(step, "float32")
                warm = run.lr * (s + 1.0) / run.warmup
                t = ops.clip((s - run.warmup) / max(1, run.total_steps - run.warmup), 0.0, 1.0)
                after = run.lr * 0.5 * (1.0 + ops.cos(math.pi * t)) if run.schedule == "cosine" else run.lr + 0.0 * s
                return ops.where(s < run.warmup, warm, after)

        optimizer = keras.optimizers.AdamW(learning_rate=Schedule(), weight_decay=run.weight_decay, beta_1=BETAS[0],
                                           beta_2=BETAS[1], epsilon=EPS)
        if run.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.compile(optimizer=optimizer)  # the model's internal loss: labels travel in x
        optimizer.build(model.trainable_variables)
        if run.optimizer_state is not None:
            with np.load(run.optimizer_state) as saved:
                arrays = [saved[f"v{i}"] for i in range(len(saved.files))]
            if len(arrays) != len(optimizer.variables):
                raise TrainingError(f"{run.optimizer_state}: {len(arrays)} optimizer variables, the model needs "
                                    f"{len(optimizer.variables)} (another model or Keras version?)")
            for var, value in zip(optimizer.variables, arrays):
                var.assign(value)

    forward = None

    def logits(x: np.ndarray) -> np.ndarray:
        nonlocal forward
        if forward is None:
            import tensorflow as tf

            forward = tf.function(lambda b: ops.cast(model(b, training=False).logits, "float32"))
        return np.concatenate([np.asarray(forward(x[i:i + 256])) for i in range(0, len(x), 256)])

    class EpochData(keras.utils.PyDataset):
        """The current epoch's shuffled, augmented batches (``epoch`` is set by the callback)."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch, self._cached = run.start_epoch, (-1, None)

        def __len__(self) -> int:
            return run.steps_per_epoch

        def __getitem__(self, i: int) -> dict[str, np.ndarray]:
            if self._cached[0] != self.epoch:
                self._cached = (self.epoch, epoch_arrays(run.train, self.epoch, run.seed, run.do_augment))
            x, y = self._cached[1]
            sl = slice(i * run.batch_size, min((i + 1) * run.batch_size, run.n_train))
            return {"pixel_values": x[sl], "labels": y[sl]}

    data = EpochData()

    class Checkpoint(keras.callbacks.Callback):
        """Validation metrics into Keras' logs (so its progress bar shows them) and the epoch checkpoint."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            data.epoch = epoch
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            buf = io.BytesIO()
            np.savez(buf, **{f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
            rec = run.end_epoch(epoch, float(logs["loss"]), logits(run.val.pixel_values), time.perf_counter() - self.t0,
                                model.save_pretrained, buf.getvalue())
            logs["val_loss"], logs["val_accuracy"] = rec.val_loss, rec.val_accuracy

    if run.start_epoch < run.epochs:
        model.fit(data, epochs=run.epochs, initial_epoch=run.start_epoch, verbose=1 if run.progress else 0,
                  callbacks=[Checkpoint()], shuffle=False)


_TRAINERS: dict[str, Callable[[_Run], None]] = {"torch": _fit_torch, "tf": _fit_tf, "flax": _fit_flax}


def _distributed_context(framework: str) -> tuple[Any, int, bool]:
    """``distributed=True``: ``(engine handle, devices the global batch is split over, whether this process is
    rank 0)`` from :mod:`trivit.distributed` — torch: the ``torchrun`` process group (DDP, one process per
    device); flax: a data-parallel ``Mesh`` over every device; tf: ``MirroredStrategy`` over the local GPUs.
    ``TRIVIT_TF_LOGICAL_DEVICES=N`` (a testing aid) splits the CPU into N logical TF devices and mirrors over them."""
    from trivit import distributed

    if framework == "torch":
        try:
            ctx = distributed.init_torch_distributed()
        except RuntimeError as e:
            raise TrainingError(f"--distributed with --framework torch runs one process per device under torchrun: "
                                f"`torchrun --nproc_per_node N -m trivit.cli train --distributed ...` ({e})") from None
        return ctx, ctx.world_size, ctx.rank == 0
    if framework == "flax":
        import_quietly("jax")
        mesh = distributed.jax_mesh()
        return mesh, int(mesh.size), True
    tf = import_quietly("tensorflow")
    devices, n = None, int(os.environ.get("TRIVIT_TF_LOGICAL_DEVICES") or 0)
    if n > 1:  # must run before TF initialises its devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        devices = [f"/cpu:{i}" for i in range(n)]
    with native_log_filter():
        strategy = distributed.tf_strategy(devices)
    return strategy, int(strategy.num_replicas_in_sync), True


def fit(framework: str, model: str | os.PathLike[str] | ViTConfig, train: Dataset, val: Dataset, *, epochs: int,
        out: str | os.PathLike[str], batch_size: int = 32, lr: float = 1e-3, resume: bool = False,
        dtype: str = "float32", gradient_checkpointing: bool = False, image_size: int | None = None, seed: int = 0,
        progress: bool = True, schedule: str = "constant", weight_decay: float = 0.01, augment: bool = True,
        processor: ViTImageProcessor | None = None, log: Callable[[str], None] = print,
        distributed: bool = False) -> History:
    """Fine-tune a ViT classifier on ``train`` for ``epochs`` (the total, counting resumed ones), evaluating
    on ``val`` and checkpointing into ``out`` after every epoch; returns the :class:`History`.

    ``model``: a checkpoint folder, a preset like ``"Ti/16"`` or a :class:`ViTConfig` (fresh weights). The head
    is replaced when the labels differ (``train.id2label``); ``image_size`` resizes a folder's position
    embeddings once (see :func:`resize_position_embeddings`). ``train``/``val`` pixels must already be at
    the model's input size. ``dtype``: ``"float32"`` or ``"bf16"`` (bf16 compute, fp32 weights).
    ``resume``: continue from ``out`` (its weights, optimizer state, schedule position and history).
    ``distributed``: data parallel over processes / devices (see :func:`_distributed_context`): every step
    is the single-process step on the same global batch of ``batch_size`` (which must divide by the device
    count); ``len(train) % devices`` examples are left out of each epoch; only rank 0 writes, logs and shows a bar.
    """
    if framework not in _TRAINERS:
        raise TrainingError(f"--framework {framework!r}: choose one of {list(_TRAINERS)}")
    if dtype not in ("float32", "fp32", "bf16", "bfloat16"):
        raise TrainingError(f"--dtype {dtype!r}: choose float32 or bf16")
    if schedule not in ("constant", "cosine"):
        raise TrainingError(f"schedule {schedule!r}: choose constant or cosine")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value < 1:
            raise TrainingError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise TrainingError(f"--lr must be > 0, got {lr}")
    if train.id2label != val.id2label:
        raise TrainingError("train and validation data have different labels")
    out = Path(out)
    history, start, opt_file, dist = History(framework), 0, None, (None, 1, True)
    with tempfile.TemporaryDirectory(prefix="trivit-train-") as scratch, contextlib.ExitStack() as cleanup:
        if distributed:
            dist = _distributed_context(framework)
            if framework == "torch":
                from trivit.distributed import close_torch_distributed

                cleanup.callback(close_torch_distributed)
            if batch_size % dist[1]:
                raise TrainingError(f"--distributed: the global --batch-size {batch_size} must be a multiple of the "
                                    f"{dist[1]} {'processes' if framework == 'torch' else 'devices'}")
            progress, log = progress and dist[2], (log if dist[2] else lambda _: None)
        if resume:
            state_path = out / STATE_FILE
            if not state_path.is_file():
                raise TrainingError(f"--resume: {state_path} not found (nothing to resume in --out {str(out)!r})")
            state = json.loads(state_path.read_text())
            if state["framework"] != framework:
                raise TrainingError(f"--resume: {out} was trained with --framework {state['framework']}, not "
                                    f"{framework} (optimizer states do not carry across frameworks)")
            if state["batch_size"] != batch_size:
                raise TrainingError(f"--resume: {out} was trained with --batch-size {state['batch_size']}, "
                                    f"got {batch_size}")
            config, _ = resolve_config(out, None)
            if config.id2label != train.id2label:
                raise TrainingError(f"--resume: {out}'s labels {sorted(config.id2label.values())} differ from the "
                                    f"data's {sorted(train.id2label.values())}")
            source = ModelSource(config, out)
            history.records = [EpochRecord(**r) for r in state["history"]]
            start, opt_file = int(state["epoch"]), out / state["optimizer_file"]
            if start >= epochs:
                log(f"{out} already holds {start} epoch(s) (>= --epochs {epochs}); nothing to do")
                return history
        else:
            source = resolve_model(model, image_size, train.id2label, Path(scratch))
        want = source.config.image_hw
        if train.pixel_values.shape[2:] != want or val.pixel_values.shape[2:] != want:
            raise TrainingError(f"data is {train.pixel_values.shape[2:]} pixels but the model takes {want}; "
                                "preprocess at the model's image size (make_processor)")
        out.mkdir(parents=True, exist_ok=True)
        run = _Run(framework, source, train, val, epochs, start, batch_size, lr, weight_decay, schedule, seed,
                   dtype in ("bf16", "bfloat16"), gradient_checkpointing, augment, progress, out,
                   processor or ViTImageProcessor(size={"height": want[0], "width": want[1]}), history, opt_file, log,
                   *dist)
        _TRAINERS[framework](run)
    return history
