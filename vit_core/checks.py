"""Input checks shared by every framework: one wording per error, raised before any framework op.

Each function takes plain shapes (tuples of ints), dtype names (``"float32"``, ``"int64"``, ``"bool"``:
see :func:`dtype_name`) or numpy values, so torch, TF and Flax models call the same code and users get
the same message whichever framework they picked. Shapes are static in every framework (also under
``tf.function`` and ``jax.jit``), so the shape and dtype checks run at trace time; only the label
*values* need concrete data (:func:`check_label_values`; each framework documents what happens when
they are traced).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import ViTConfig

__all__ = [
    "check_config_type", "check_pixel_values", "check_bool_masked_pos", "head_mask_layers", "check_mim_mask_allowed",
    "dtype_name", "dtype_kind", "check_labels", "check_label_values", "label_range_message", "IGNORE_INDEX",
]

#: Single-label targets equal to this are ignored by the cross-entropy (PyTorch's and HF's ``ignore_index``).
IGNORE_INDEX = -100


def dtype_name(x: Any) -> str:
    """The dtype of an array / tensor (torch, TF, JAX, numpy, or a Python list) as numpy spells it."""
    d = getattr(x, "dtype", None)
    if d is None:
        d = np.asarray(x).dtype
    name = getattr(d, "name", None)
    return (name if isinstance(name, str) else str(d)).removeprefix("torch.")


def dtype_kind(name: str) -> str:
    """"b" (bool), "i" (signed or unsigned integer), "f" (floating, bfloat16 included), "c" (complex), else "?"."""
    if name == "bool":
        return "b"
    if name.startswith(("int", "uint")):
        return "i"
    if name.startswith(("float", "bfloat", "half", "double")):
        return "f"
    return "c" if name.startswith("complex") else "?"


def check_config_type(owner: str, config: object, config_class: type[ViTConfig]) -> None:
    """A model accepts its own config class only: a ``ViTHybridConfig`` (a ``ViTConfig`` subclass) does
    not build a plain ``ViTModel``, whose patch embedding would be a pixel convolution."""
    if not isinstance(config, config_class) or type(config).model_type != config_class.model_type:
        raise TypeError(f"{owner}: config must be a {config_class.__name__}, got {type(config).__name__}")


def check_pixel_values(shape: Sequence[int], config: ViTConfig, interpolate_pos_encoding: bool) -> tuple[int, int]:
    """Validate NCHW ``pixel_values``; return the patch grid (``config.feature_grid``: (H // p, W // p) for
    the ViT, the backbone's output grid over p for the hybrid)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        hint = "; a single image? add a batch axis" if len(shape) == 3 else ""
        raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {shape}{hint}")
    _, c, h, w = shape
    if c != config.num_channels:
        hint = ""
        if shape[3] == config.num_channels:
            hint = (": this looks like NHWC (channels last); transpose it to (batch, channels, height, width), "
                    "e.g. x.transpose(0, 3, 1, 2)")
        raise ValueError(
            f"pixel_values has {c} channels (shape {shape}), but config.num_channels is "
            f"{config.num_channels}; inputs are NCHW{hint}"
        )
    if not interpolate_pos_encoding and (h, w) != config.image_hw:
        raise ValueError(
            f"Input image size ({h}*{w}) doesn't match model ({config.image_hw[0]}*{config.image_hw[1]}); "
            "pass interpolate_pos_encoding=True to run at another resolution"
        )
    gh, gw = config.feature_grid(h, w)
    p = config.patch_size
    if gh < 1 or gw < 1:
        raise ValueError(
            f"pixel_values of size {h}*{w} is too small: its patch grid is {gh}*{gw} (patch_size {p})"
        )
    fh, fw = config.feature_map_hw(h, w)
    if fh % p or fw % p:  # HF's conv would drop the remainder silently
        where = "" if (fh, fw) == (h, w) else f" (it gives {config.feature_map_name()} of {fh}*{fw})"
        raise ValueError(
            f"pixel_values of size {h}*{w} is not a whole number of patches{where}: {fh % p} rows and {fw % p} "
            f"columns would be dropped by patch_size {p}; resize, crop or pad it so that the size is a multiple "
            f"of {p}"
        )
    return gh, gw


def check_bool_masked_pos(
    shape: Sequence[int], batch: int, num_patches: int, use_mask_token: bool, dtype: str | None = None
) -> None:
    """``bool_masked_pos``: (batch, num_patches), boolean or integer (1 masks a patch); ``dtype`` a
    :func:`dtype_name` (None: not checked)."""
    if not use_mask_token:
        raise ValueError("bool_masked_pos needs a model built with use_mask_token=True")
    if tuple(int(s) for s in shape) != (batch, num_patches):
        raise ValueError(
            f"bool_masked_pos must have shape (batch, num_patches) = {(batch, num_patches)}, got {tuple(shape)}"
        )
    if dtype is not None and dtype_kind(dtype) not in "bi":
        raise ValueError(f"bool_masked_pos must be boolean (or integer 0/1), got dtype {dtype}")


def head_mask_layers(shape: Sequence[int], config: ViTConfig) -> bool:
    """Validate a head mask's shape; True if it is per layer (layers, heads), False if (heads,)."""
    shape = tuple(int(s) for s in shape)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if shape == (heads,):
        return False
    if shape == (layers, heads):
        return True
    raise ValueError(
        f"head_mask must have shape (num_heads,) = ({heads},) or (num_layers, num_heads) = "
        f"({layers}, {heads}), got {shape}"
    )


def check_mim_mask_allowed(config: ViTConfig) -> None:
    if config.patch_size != config.encoder_stride:
        raise ValueError(
            "When `bool_masked_pos` is provided, `patch_size` must be equal to `encoder_stride` so that the "
            f"reconstruction has the input's size. Got patch_size={config.patch_size}, "
            f"encoder_stride={config.encoder_stride}."
        )


def check_labels(shape: Sequence[int], dtype: str, config: ViTConfig, batch: int) -> str:
    """Validate ``labels`` for a classifier of ``config.num_labels`` outputs over ``batch`` images (-1: not known
    when tracing) and return the problem type (:meth:`ViTConfig.resolve_problem_type`):

    * ``regression``: floating, (batch,) or (batch, 1) for one label, else (batch, num_labels);
    * ``single_label_classification``: integer class indices, (batch,) (or (batch, 1)); values in
      ``[0, num_labels)`` or ``IGNORE_INDEX``, checked by :func:`check_label_values` where they are concrete;
    * ``multi_label_classification``: (batch, num_labels) targets (float, integer or boolean).
    """
    shape = tuple(int(s) for s in shape)
    n = int(config.num_labels or 0)
    kind = dtype_kind(dtype)
    if n == 0:
        raise ValueError("labels need a classification head, but config.num_labels is 0 (the head is the identity)")
    if kind not in "bif":
        raise ValueError(f"labels must be a real-valued array (integer, float or bool), got dtype {dtype}")
    problem = config.resolve_problem_type(kind in "bi")
    b = "batch" if batch < 0 else batch
    fits = lambda *want: any(len(w) == len(shape) and all(x == y or -1 in (x, y) for x, y in zip(w, shape)) for w in want)  # noqa: E731
    if problem == "regression":
        if kind != "f":
            raise ValueError(f"labels for regression must be floating point, got dtype {dtype}")
        want = [(batch,), (batch, 1)] if n == 1 else [(batch, n)]
    elif problem == "single_label_classification":
        if kind == "f":
            raise ValueError(
                f"labels for single_label_classification must be integer class indices, got dtype {dtype}"
            )
        want = [(batch,), (batch, 1)]
    else:
        want = [(batch, n)]
    if not fits(*want):
        spelled = " or ".join(str(tuple(b if x == batch else x for x in w)).replace("'", "") for w in want)
        hint = ""
        if problem == "single_label_classification" and len(shape) == 2 and shape[1] == n:
            hint = "; for multi-label targets pass float labels or set problem_type='multi_label_classification'"
        raise ValueError(f"labels for {problem} must have shape {spelled}, got {shape}{hint}")
    return problem


def label_range_message(num_labels: int) -> str:
    """The first part of the out-of-range error, the same eager and in graphs (which append the values)."""
    return (
        f"labels must be class indices in [0, num_labels) = [0, {num_labels}) (or {IGNORE_INDEX} to ignore an "
        "example) for single_label_classification"
    )


def check_label_values(labels: np.ndarray, num_labels: int) -> None:
    """Concrete single-label ``labels``: every value in ``[0, num_labels)`` or ``IGNORE_INDEX``."""
    values = np.asarray(labels).reshape(-1)
    bad = (values != IGNORE_INDEX) & ((values < 0) | (values >= num_labels))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{label_range_message(num_labels)}; got {values[i]} at position {i} (labels {values.tolist()[:16]})"
        )
