"""``torch.compile`` is a supported path (docs/torch.md): the compiled model gives the eager model's numbers.

One inductor compile (the real CPU code path: C++ kernels are generated and built, the suite's costliest few
seconds here) of the ViT classifier's inference; its training step through ``aot_eager``; the hybrid captured as
one graph (``fullgraph=True``, eager backend), which proves dynamo traces it without a graph break.
"""

from __future__ import annotations

import pytest
import torch

from settings import ATOL
from test_hybrid_equivalence import BIT, TINY as HYBRID_TINY
from vit_core import ViTConfig, ViTHybridConfig
from vit_torch import ViTForImageClassification, ViTHybridForImageClassification

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, num_labels=5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_inductor_classifier_equals_eager():
    """Inference, as benchmarked: eval mode, no autograd, the default inductor backend."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY)).eval()
    x = torch.randn(3, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=0, atol=ATOL)


def test_compiled_training_step_equals_eager():
    """Loss and every gradient through AOTAutograd's traced forward/backward (``aot_eager``: the graphs inductor
    would compile, run by eager kernels, so the autograd capture is checked without a second C++ build)."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY, hidden_dropout_prob=0.0)).train()
    x, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager = model(x, labels=labels)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = compiled(x, labels=labels)
    got.loss.backward()
    torch.testing.assert_close(got.loss, eager.loss, rtol=0, atol=ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=0, atol=ATOL, msg=name)


def test_hybrid_is_one_graph():
    torch.manual_seed(0)
    config = ViTHybridConfig(backbone_config=BIT, **HYBRID_TINY, num_labels=3)
    model = ViTHybridForImageClassification(config).eval()
    x = torch.randn(2, 3, 48, 48)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # raises on any graph break
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(compiled(x).logits, expected, rtol=0, atol=ATOL)


def test_compiled_loss_is_nan_for_an_out_of_range_label():
    """Eager raises the ValueError (test_hardening_inputs); a compiled graph cannot see the values on the host, so the
    loss is NaN (documented in docs/torch.md), and an in-range batch with an ignored (-100) example is unchanged."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY)).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isnan(compiled(x, labels=torch.tensor([1, 5])).loss)
        good = torch.tensor([1, -100])
        torch.testing.assert_close(compiled(x, labels=good).loss, model(x, labels=good).loss, rtol=0, atol=ATOL)

