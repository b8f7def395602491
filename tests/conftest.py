"""Shared fixtures: the framework under test, the device, tiny configs, and the output comparer.

Device: ``TRIVIT_TEST_DEVICE`` = ``cpu`` | ``cuda`` | ``auto`` (default ``auto``: CUDA when
torch sees a GPU, else CPU). Tolerances per device live in ``tests/tolerances.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from frameworks import ADAPTERS
from settings import ATOL, DEVICE

#: Frameworks of the shared equivalence suite, in this order; each has an adapter in ``frameworks*.py``.
FRAMEWORKS = [name for name in ("pt", "tf", "flax") if name in ADAPTERS]


#: Largest difference seen per comparison group ("pt vs hf", "tf vs pt", ...), printed at the end.
MAX_DIFFS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if MAX_DIFFS:
        terminalreporter.write_sep("-", "max abs differences measured (fp32)")
        for group, diff in sorted(MAX_DIFFS.items()):
            terminalreporter.write_line(f"{group}: {diff:.3g}")


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
    return ADAPTERS[request.param]()


@pytest.fixture
def device() -> str:
    return DEVICE


def assert_outputs_close(
    actual: dict, expected: dict, atol: float = ATOL, where: str = "", scale_by_magnitude: bool = False
) -> float:
    """Compare two output dicts field by field (same field names required); returns the max abs diff.

    ``where`` reads "GROUP [detail]"; the worst difference per GROUP is printed after the run.
    ``scale_by_magnitude``: the bound for a tensor is ``atol * max(1, max|tensor|, max|first field|)``
    (a head's rounding error grows with the activations it reads) — see ``tolerances.py`` for when
    that is warranted. Returns the worst difference in units of ``atol``
    then, else in absolute terms.
    """
    assert list(actual) == list(expected), f"{where}: output fields differ: {list(actual)} vs {list(expected)}"
    worst = 0.0
    first = next(iter(expected.values()))  # e.g. last_hidden_state: what heads like the pooler consume
    floor = float(np.max(np.abs(np.asarray(first[-1] if isinstance(first, tuple) else first))))
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
            bound = atol * max(1.0, float(np.max(np.abs(y))), floor) if scale_by_magnitude and y.size else atol
            assert diff <= bound, f"{where}: {name} differs by {diff:.3g} > {bound:g}"
            worst = max(worst, diff)
    group = where.partition(" [")[0]  # "tf vs pt [case]" -> "tf vs pt"
    if group:
        MAX_DIFFS[group] = max(MAX_DIFFS.get(group, 0.0), worst)
    return worst
