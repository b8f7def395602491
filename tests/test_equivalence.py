"""The shared equivalence suite: every output of every class, every framework, at fp32 atol.

For ``pt`` the reference is HF transformers 4.x PyTorch (eager attention), the test-only oracle;
for ``tf`` and ``flax`` it is ``vit_torch`` (proven equal to HF here). Each case saves one random
checkpoint with ``vit_torch`` and loads it on both sides through ``from_pretrained``, so the
canonical checkpoint contract is exercised on every comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import vit_torch
from conftest import assert_outputs_close
from conftest import FRAMEWORKS
from frameworks import ADAPTERS
from tolerances import SCALE_BY_MAGNITUDE_FOR_FULL_SIZE
from vit_core.config import ViTConfig

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            image_size=32, patch_size=8, encoder_stride=8)


@dataclass
class Case:
    id: str
    model: str  # ViTModel | ViTForImageClassification | ViTForMaskedImageModeling
    config: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)  # constructor flags (ViTModel only)
    hw: tuple[int, int] | None = None  # input size; None = config's image size
    batch: int = 2
    mask: bool = False
    head_mask: str | None = None  # "heads" | "layers"
    labels: str | None = None  # "int" | "float"
    call: dict[str, Any] = field(default_factory=dict)
    #: HF 4.x cannot compute this case (trivit goes beyond it): compared for tf/flax against pt only;
    #: pt itself is checked against an independent formula in test_torch.py.
    beyond_hf: bool = False


ALL_OUT = dict(output_attentions=True, output_hidden_states=True)
CASES = [
    Case("base-gelu", "ViTModel", call=ALL_OUT),
    Case("base-nopool", "ViTModel", flags=dict(add_pooling_layer=False), call=ALL_OUT),
    Case("base-defaults-only", "ViTModel"),
    Case("relu-eps1e-6-noqkvbias", "ViTModel", dict(hidden_act="relu", layer_norm_eps=1e-6, qkv_bias=False), call=ALL_OUT),
    Case("selu-1ch", "ViTModel", dict(hidden_act="selu", num_channels=1), call=ALL_OUT),
    Case("gelu_new-4ch", "ViTModel", dict(hidden_act="gelu_new", num_channels=4), call=ALL_OUT),
    Case("gelu_pytorch_tanh", "ViTModel", dict(hidden_act="gelu_pytorch_tanh"), call=ALL_OUT),
    Case("quick_gelu-pooler", "ViTModel", dict(hidden_act="quick_gelu", pooler_output_size=24, pooler_act="relu"), call=ALL_OUT),
    Case("silu-nonsquare-config", "ViTModel", dict(hidden_act="silu", image_size=(32, 48)), call=ALL_OUT),
    Case("interp-up-nonsquare", "ViTModel", hw=(48, 64), call=dict(interpolate_pos_encoding=True, **ALL_OUT)),
    Case("interp-down-nonsquare", "ViTModel", hw=(24, 40), call=dict(interpolate_pos_encoding=True)),
    Case("interp-same-size", "ViTModel", call=dict(interpolate_pos_encoding=True)),
    Case("head-mask-heads", "ViTModel", head_mask="heads", call=ALL_OUT),
    Case("head-mask-layers", "ViTModel", head_mask="layers", call=ALL_OUT),
    Case("cls-logits", "ViTForImageClassification", dict(num_labels=5), call=ALL_OUT),
    Case("cls-single-label", "ViTForImageClassification", dict(num_labels=5), labels="int", batch=4),
    Case("cls-regression", "ViTForImageClassification", dict(num_labels=1), labels="float", batch=4),
    Case("cls-multi-label", "ViTForImageClassification", dict(num_labels=3), labels="float", batch=4),
    Case("cls-problem-type-regression", "ViTForImageClassification",
         dict(num_labels=3, problem_type="regression"), labels="float"),
    Case("cls-head-mask-interp", "ViTForImageClassification", dict(num_labels=3), hw=(40, 24), head_mask="layers",
         labels="int", call=dict(interpolate_pos_encoding=True, **ALL_OUT)),
    Case("mim-loss", "ViTForMaskedImageModeling", mask=True, call=ALL_OUT),
    Case("mim-no-mask", "ViTForMaskedImageModeling"),
    Case("mim-interp-square", "ViTForMaskedImageModeling", hw=(48, 48), call=dict(interpolate_pos_encoding=True)),
    # HF's MIM loss reshapes the mask to the config's grid and fails at any other size.
    Case("mim-loss-interp-nonsquare", "ViTForMaskedImageModeling", hw=(48, 24), mask=True,
         call=dict(interpolate_pos_encoding=True), beyond_hf=True),
    Case("mim-2ch-headmask", "ViTForMaskedImageModeling", dict(num_channels=2), mask=True, head_mask="heads"),
]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (norms, biases, tokens too) non-trivial values, so no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def make_checkpoint(tmp_path, case: Case, config: ViTConfig, seed: int = 0):
    torch.manual_seed(seed)  # the initial values too: every run compares the same checkpoint
    model = getattr(vit_torch, case.model)(config, **case.flags)
    _randomise(model, seed)
    path = tmp_path / case.id
    model.save_pretrained(path)
    return path


def make_inputs(case: Case, config: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = case.hw or config.image_hw
    inputs = {"pixel_values": rng.standard_normal((case.batch, config.num_channels, h, w)).astype(np.float32)}
    gh, gw = config.feature_grid(h, w)  # the token grid (the hybrid's is the backbone's output grid)
    n = gh * gw
    if case.mask:
        inputs["bool_masked_pos"] = rng.random((case.batch, n)) < 0.5
    if case.head_mask == "heads":
        inputs["head_mask"] = np.array([1, 0, 1, 1], np.float32)[: config.num_attention_heads]
    elif case.head_mask == "layers":
        hm = rng.random((config.num_hidden_layers, config.num_attention_heads)).astype(np.float32)
        hm[0, 1] = 0.0
        inputs["head_mask"] = hm
    if case.labels == "int":
        labels = rng.integers(0, config.num_labels, case.batch)
        labels[0] = -100  # ignored by cross-entropy
        inputs["labels"] = labels
    elif case.labels == "float":
        shape = (case.batch,) if config.num_labels == 1 else (case.batch, config.num_labels)
        inputs["labels"] = rng.random(shape).astype(np.float32)
    return inputs


def reference_adapter(framework):
    return ADAPTERS["hf" if framework.name == "pt" else "pt"]()


@pytest.mark.parametrize(
    "fw, case",
    [(fw, c) for fw in FRAMEWORKS for c in CASES if not (c.beyond_hf and fw == "pt")],
    ids=lambda x: x.id if isinstance(x, Case) else x,
)
def test_every_output_matches_reference(fw: str, case: Case, tmp_path):
    framework = ADAPTERS[fw]()
    config = ViTConfig(**{**TINY, **case.config})
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    reference = reference_adapter(framework)
    expected = reference.run(reference.load(case.model, path, **case.flags), inputs, **case.call)
    actual = framework.run(framework.load(case.model, path, **case.flags), inputs, **case.call)
    assert_outputs_close(actual, expected, where=f"{framework.name} vs {reference.name} [{case.id}]")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_real_photo_through_processor(framework, attn, tmp_path):
    """A real photo, preprocessed by our processor, through a classifier: same logits and attentions."""
    from sklearn.datasets import load_sample_image

    from vit_core.image_processing import ViTImageProcessor

    case = Case(f"photo-{attn}", "ViTForImageClassification", dict(num_labels=4, image_size=64))
    config = ViTConfig(**{**TINY, **case.config})
    path = make_checkpoint(tmp_path, case, config)
    images = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    pixels = ViTImageProcessor(size={"height": 64, "width": 64})(images).pixel_values
    reference = reference_adapter(framework)
    for call in ({}, ALL_OUT):
        expected = reference.run(reference.load(case.model, path), {"pixel_values": pixels}, **call)
        model = framework.load(case.model, path, attn_implementation=attn)
        actual = framework.run(model, {"pixel_values": pixels}, **call)
        assert_outputs_close(actual, expected, where=f"{framework.name} vs {reference.name} [photo {attn} {call}]")


def test_vit_b16_sized(framework, tmp_path):
    """The real ViT-B/16 shape (86M parameters, 197 tokens), every output of the bare model."""
    case = Case("b16", "ViTModel", batch=1, call=ALL_OUT)
    config = ViTConfig.from_variant("B/16")
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    reference = reference_adapter(framework)
    expected = reference.run(reference.load(case.model, path), inputs, **case.call)
    actual = framework.run(framework.load(case.model, path), inputs, **case.call)
    # Magnitude-scaled bound: see SCALE_BY_MAGNITUDE_FOR_FULL_SIZE in tolerances.py for the measurements.
    assert_outputs_close(actual, expected, where=f"{framework.name} vs {reference.name} at B/16, magnitude-scaled [B/16]",
                         scale_by_magnitude=SCALE_BY_MAGNITUDE_FOR_FULL_SIZE)


@pytest.mark.parametrize("model", ["ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling"])
def test_return_dict_false_gives_the_same_tuple(framework, model, tmp_path):
    case = Case(f"tuple-{model}", model, mask=model == "ViTForMaskedImageModeling")
    config = ViTConfig(**TINY)
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    loaded = framework.load(model, path)
    as_dict = framework.run(loaded, inputs, **ALL_OUT)
    as_tuple = framework.run_tuple(loaded, inputs, **ALL_OUT)
    assert len(as_tuple) == len(as_dict)
    for (key, expected), actual in zip(as_dict.items(), as_tuple):
        assert_outputs_close({key: actual}, {key: expected}, atol=0.0, where=f"{framework.name} return_dict=False vs True [{key}]")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_class_token_only_is_row_zero_of_the_full_model(framework, attn, tmp_path):
    """``class_token_only=True`` (what the classifier uses when it returns no hidden states or
    attentions) computes the last block for the class token alone: row 0 of the full model, and the
    same pooler output. The classifiers' own cases above check it against HF's full computation."""
    case = Case("cls-token-only", "ViTModel", batch=3)
    config = ViTConfig(**TINY)
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    model = framework.load(case.model, path, attn_implementation=attn)
    full = framework.run(model, inputs)
    short = framework.run(model, inputs, class_token_only=True)
    assert short["last_hidden_state"].shape == (3, 1, config.hidden_size)
    expected = {"last_hidden_state": full["last_hidden_state"][:, :1], "pooler_output": full["pooler_output"]}
    assert_outputs_close(short, expected, where=f"{framework.name} class_token_only vs full [{attn}]")
