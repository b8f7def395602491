"""Every script under examples/ runs as a user would run it, and says what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES} == set(CLAIMS), "a new example needs its claim checked here"


def _hybrid(out: str) -> None:
    diffs = [float(d) for d in re.findall(r"max \|diff vs torch\| ([0-9.e+-]+)", out)]
    assert len(diffs) == 3 and max(diffs) <= 1e-4, out  # the README's cross-framework bar


def _timm(out: str) -> None:
    assert "as timm" in out and "['config.json', 'model.safetensors']" in out, out
    assert float(re.search(r"agree: max \|diff\| ([0-9.e+-]+)", out).group(1)) == 0.0, out  # the same weights


CLAIMS = {"same_checkpoint_three_frameworks.py": _hybrid, "convert_timm_style_file.py": _timm}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    CLAIMS[script.name](proc.stdout)
