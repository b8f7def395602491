"""Shared fixtures: the framework under test, the device, tiny configs, and the output comparer.

Device: ``TRIVIT_TEST_DEVICE`` = ``cpu`` | ``cuda`` | ``auto`` (default ``auto``: CUDA when
torch sees a GPU, else CPU). Tolerances per device live in ``tests/tolerances.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tolerances import FP32_ATOL

#: Frameworks of the shared equivalence suite. Each has an adapter in ``frameworks.py``.
FRAMEWORKS = ["pt"]


def _device() -> str:
    want = os.environ.get("TRIVIT_TEST_DEVICE", "auto")
    if want not in ("auto", "cpu", "cuda"):
        raise pytest.UsageError(f"TRIVIT_TEST_DEVICE must be auto, cpu or cuda, got {want!r}")
    if want == "cpu":
        return "cpu"
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("TRIVIT_TEST_DEVICE=cuda but torch sees no GPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE = _device()
ATOL = FP32_ATOL[DEVICE]


def pytest_report_header(config):  # noqa: ARG001
    return f"trivit: device={DEVICE}, fp32 atol={ATOL}, frameworks={FRAMEWORKS}"


def pytest_configure(config):  # noqa: ARG001
    if DEVICE == "cuda":  # fp32 must mean fp32 for 1e-5 checks
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


@pytest.fixture(params=FRAMEWORKS)
def framework(request):
    from frameworks import ADAPTERS

    return ADAPTERS[request.param]()


@pytest.fixture
def device() -> str:
    return DEVICE


def assert_outputs_close(actual: dict, expected: dict, atol: float = ATOL, where: str = "") -> float:
    """Compare two output dicts field by field (same field names required); returns the max abs diff."""
    assert list(actual) == list(expected), f"{where}: output fields differ: {list(actual)} vs {list(expected)}"
    worst = 0.0
    for key in expected:
        a, e = actual[key], expected[key]
        if isinstance(e, tuple):
            assert isinstance(a, tuple) and len(a) == len(e), f"{where}: {key} has {len(a)} entries, expected {len(e)}"
            pairs = [(f"{key}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, e))]
        else:
            pairs = [(key, a, e)]
        for name, x, y in pairs:
            x, y = np.asarray(x), np.asarray(y)
            assert x.shape == y.shape, f"{where}: {name} shape {x.shape} vs {y.shape}"
            diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
            assert diff <= atol, f"{where}: {name} differs by {diff:.3g} > {atol:g}"
            worst = max(worst, diff)
    return worst
