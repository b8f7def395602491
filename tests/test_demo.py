"""``trivit demo`` in-process, tiny setting (300 digits, 1 epoch) with each trainer: the printed table is
consistent (the three accuracies equal, logits within the demo's bar), the PNG is a PNG, the checkpoint loads
in HF transformers 4.x with the same logits, and the exit code follows the accuracy bar."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from settings import ATOL
from tolerances import DEMO_LOGIT_ATOL
from trivit.cli import main


@pytest.mark.parametrize("framework", ["tf", "torch", "flax"])
def test_demo_tiny(framework, tmp_path, capsys):
    out = tmp_path / "demo-out"
    # torch: an impossible bar, to check the exit code says so (the table still prints)
    bar = "1.01" if framework == "torch" else "0"
    rc = main(["demo", "--framework", framework, "--epochs", "1", "--limit", "300", "--out", str(out),
               "--no-progress", "--min-accuracy", bar])
    text = capsys.readouterr().out
    assert rc == (1 if framework == "torch" else 0), text
    acc = {m[1]: float(m[2]) for m in re.finditer(r"^(torch|tf|flax)\s+([\d.]+)%$", text, re.M)}
    assert set(acc) == {"torch", "tf", "flax"}, text
    assert len(set(acc.values())) == 1, f"accuracies differ: {acc}"
    diff = float(re.search(r"max \|logit difference\| between frameworks: (\S+)", text)[1])
    assert diff <= DEMO_LOGIT_ATOL
    assert f"checkpoint (HF-loadable): {out.resolve()}" in text

    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()

    import torch
    import transformers

    from vit_torch import ViTForImageClassification

    hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
    ours = ViTForImageClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {i: str(i) for i in range(10)}
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert float((hf(x).logits - ours(x).logits).abs().max()) <= ATOL
