"""Source detection and the uniform reader front end: ``read_source(path, fmt)`` → :class:`Converted`."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from vit_core.checkpoint import WEIGHT_FILES
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.config_hybrid import ViTHybridConfig
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import BASE_MODEL_PREFIX

from .common import Converted, LazyState, class_name, model_class_of
from .loading import read_checkpoint

__all__ = ["SOURCE_FORMATS", "detect_format", "read_source", "read_hf"]

#: ``--from`` values.
SOURCE_FORMATS: tuple[str, ...] = ("hf", "timm", "npz", "big_vision")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: ``config.json`` ``model_type`` → config class.
_CONFIG_CLASSES: dict[str, type[ViTConfig]] = {c.model_type: c for c in (ViTConfig, ViTHybridConfig)}


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess the source format: a folder is an HF checkpoint; files are recognised by their keys."""
    p = Path(path)
    if p.is_dir():
        if (p / CONFIG_NAME).is_file() and any((p / w).is_file() for w in WEIGHT_FILES):
            return "hf"
        raise CheckpointError(f"{p}: a folder, but not an HF checkpoint (needs {CONFIG_NAME} and one of {list(WEIGHT_FILES)})")
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    if p.suffix == ".npz":
        from .npz import NPZ_ERRORS, npz_flavour

        try:
            with zipfile.ZipFile(p) as z:
                keys = {n.removesuffix(".npy") for n in z.namelist()}
        except NPZ_ERRORS as e:
            raise CheckpointError(f"{p}: not a readable .npz archive ({type(e).__name__}: {e})") from None
        return npz_flavour(keys)
    if p.suffix == ".safetensors" or p.suffix in _TORCH_SUFFIXES:
        from .timm import load_flat_state, looks_like_timm

        keys = set(load_flat_state(p))
        if looks_like_timm(keys):
            return "timm"
        if any(k.startswith(("embeddings.", f"{BASE_MODEL_PREFIX}.embeddings.")) for k in keys):
            raise CheckpointError(f"{p}: HF weights without their {CONFIG_NAME}; pass the folder that holds both")
        raise CheckpointError(f"{p}: cannot tell the checkpoint format from its keys (e.g. {sorted(keys)[:4]}); pass --from")
    raise CheckpointError(f"{p}: unknown file type {p.suffix!r}; pass --from ({'|'.join(SOURCE_FORMATS)})")


def _config_class(folder: Path) -> type[ViTConfig]:
    """The config class named by ``folder/config.json``'s ``model_type`` (``ViTConfig`` when the file
    is unreadable or names another type: its own ``from_pretrained`` then reports the problem)."""
    try:
        model_type = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return ViTConfig
    return _CONFIG_CLASSES.get(model_type, ViTConfig)


def read_hf(path: str | os.PathLike[str], *, num_labels: int | None = None) -> Converted:
    """An HF folder (safetensors, bin, tf_model.h5 or flax_model.msgpack) as canonical tensors."""
    p = Path(path)
    config = _config_class(p).from_pretrained(p)
    state = read_checkpoint(p)
    shapes = state.shapes()
    model_class, flags = model_class_of(shapes, config)
    if num_labels is not None and model_class.endswith("ForImageClassification"):
        classes = shapes.get("classifier.weight", (0,))[0]
        if num_labels == 0:  # drop the head: the backbone without a pooler
            shapes = {k.removeprefix(f"{BASE_MODEL_PREFIX}."): v for k, v in shapes.items() if not k.startswith("classifier.")}
            config = config.copy(num_labels=0)
            model_class, flags = class_name(config, "Model"), {"add_pooling_layer": False}
            entries = {k: (v, lambda k=k: np.asarray(state[f"{BASE_MODEL_PREFIX}.{k}"])) for k, v in shapes.items()}
            out = Converted(config, model_class, LazyState(state.source, entries), flags)
            out.check()
            return out
        if num_labels != classes:
            raise CheckpointError(f"{state.source}: the classifier has {classes} classes, not --num-labels {num_labels}")
    entries = {k: (tuple(v), lambda k=k: np.asarray(state[k])) for k, v in shapes.items()}
    out = Converted(config, model_class, LazyState(state.source, entries), flags)
    out.check()
    return out


def read_source(path: str | os.PathLike[str], fmt: str | None = None, **options: Any) -> tuple[str, Converted]:
    """Read ``path`` as ``fmt`` (detected when ``None``); returns (format, converted).

    ``options``: ``num_heads`` (timm, npz), ``num_labels`` (all), ``exact_gelu`` (npz, big_vision),
    ``num_groups`` (timm and npz hybrids). Options that do not apply to the format are ignored when
    ``None``/``False`` and refused otherwise.
    """
    fmt = fmt or detect_format(path)
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"source format must be one of {list(SOURCE_FORMATS)}, got {fmt!r}")
    allowed = {"hf": {"num_labels"}, "timm": {"num_heads", "num_labels", "num_groups"},
               "npz": {"num_heads", "num_labels", "exact_gelu", "num_groups"},
               "big_vision": {"num_heads", "num_labels", "exact_gelu"}}
    bad = sorted(k for k, v in options.items() if v not in (None, False) and k not in allowed[fmt])
    if bad:
        raise ValueError(f"option(s) {bad} do not apply to {fmt} checkpoints")
    options = {k: v for k, v in options.items() if k in allowed[fmt]}
    if fmt == "hf":
        return fmt, read_hf(path, **options)
    if fmt == "timm":
        from .timm import read_timm

        return fmt, read_timm(path, **options)
    from .npz import read_npz

    return fmt, read_npz(path, flavour=fmt, **options)
