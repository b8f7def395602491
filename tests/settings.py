"""Run-wide test settings: the device under test and its fp32 tolerance.

``TRIVIT_TEST_DEVICE`` = ``cpu`` | ``cuda`` | ``auto`` (default ``auto``: CUDA when torch sees a
GPU, else CPU). Tolerances per device live in ``tolerances.py``.
"""

from __future__ import annotations

import os

from tolerances import FP32_ATOL


def _device() -> str:
    want = os.environ.get("TRIVIT_TEST_DEVICE", "auto")
    if want not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"TRIVIT_TEST_DEVICE must be auto, cpu or cuda, got {want!r}")
    if want == "cpu":
        return "cpu"
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TRIVIT_TEST_DEVICE=cuda but torch sees no GPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE = _device()
ATOL = FP32_ATOL[DEVICE]
