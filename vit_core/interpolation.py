"""Resize matrices that reproduce PyTorch's ``F.interpolate`` (align_corners=False, no antialias).

Resizing a (h, w) grid to (H, W) is ``Wy @ grid @ Wx.T`` with ``Wy = resize_matrix(h, H)`` and
``Wx = resize_matrix(w, W)``: separable, so any framework applies it with two matmuls and gets
PyTorch's numbers (HF TF's ``tf.image.resize`` differs from them by ~2e-2). Used for
``interpolate_pos_encoding`` by the TF and Flax models.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["resize_matrix"]

_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution coefficient


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, mode: str = "bicubic") -> np.ndarray:
    """(out_size, in_size) float64 matrix M with ``resized = M @ signal`` along one axis."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if mode == "bicubic":
        src = (dst + 0.5) * scale - 0.5  # not clamped, as in PyTorch's cubic path
        x0 = np.floor(src).astype(np.int64)
        t = src - x0
        for k in range(-1, 3):  # taps x0-1 .. x0+2, indices clamped to the border
            np.add.at(m, (rows, np.clip(x0 + k, 0, in_size - 1)), _cubic(t - k))
    elif mode == "bilinear":
        src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
        x0 = np.floor(src).astype(np.int64)
        lam = src - x0
        np.add.at(m, (rows, np.minimum(x0, in_size - 1)), 1.0 - lam)
        np.add.at(m, (rows, np.minimum(x0 + 1, in_size - 1)), lam)
    else:
        raise ValueError(f"unknown interpolation mode {mode!r}; expected 'bicubic' or 'bilinear'")
    m.setflags(write=False)
    return m
