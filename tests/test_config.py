"""ViTConfig: HF defaults, config.json both ways, validation errors that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

from vit_core.config import SUPPORTED_ACTIVATIONS, ConfigError, ViTConfig

HF_FIELDS = [
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size",
    "patch_size", "num_channels", "qkv_bias", "encoder_stride", "pooler_output_size", "pooler_act",
    "num_labels", "id2label", "label2id", "problem_type", "output_attentions", "output_hidden_states",
    "return_dict", "architectures",
]


@pytest.mark.parametrize("name", HF_FIELDS)
def test_defaults_equal_hf(name):
    assert getattr(ViTConfig(), name) == getattr(transformers.ViTConfig(), name)


def test_hf_reads_ours_and_we_read_hf(tmp_path):
    ours = ViTConfig(hidden_size=48, num_attention_heads=6, image_size=64, patch_size=8,
                     id2label={0: "cat", 1: "dog", 2: "emu"}, problem_type="single_label_classification")
    ours.save_pretrained(tmp_path / "a")
    hf = transformers.ViTConfig.from_pretrained(tmp_path / "a")
    for name in HF_FIELDS:
        assert getattr(hf, name) == getattr(ours, name), name
    hf.save_pretrained(tmp_path / "b")
    back = ViTConfig.from_pretrained(tmp_path / "b")
    for name in HF_FIELDS:
        assert getattr(back, name) == getattr(ours, name), name
    assert back.id2label == {0: "cat", 1: "dog", 2: "emu"}  # int keys again
    assert "transformers_version" in back.extra  # unknown keys are kept ...
    back.save_pretrained(tmp_path / "c")
    assert "transformers_version" in json.loads((tmp_path / "c" / "config.json").read_text())  # ... and written


def test_round_trips(tmp_path):
    c = ViTConfig(image_size=(32, 48), patch_size=16, hidden_act="quick_gelu", extra={"custom_key": [1, 2]})
    assert ViTConfig.from_dict(c.to_dict()) == c
    assert ViTConfig.from_dict(json.loads(c.to_json_string())) == c
    c.save_pretrained(tmp_path)
    assert ViTConfig.from_pretrained(tmp_path) == c
    assert ViTConfig.from_pretrained(tmp_path / "config.json") == c
    assert ViTConfig.from_pretrained(tmp_path).extra == {"custom_key": [1, 2]}


def test_attn_implementation_is_not_serialised():
    c = ViTConfig(attn_implementation="eager")
    assert "attn_implementation" not in c.to_dict()
    assert c.copy().attn_implementation == "eager"


def test_overrides_and_num_labels():
    c = ViTConfig(num_labels=3)
    assert c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and c.label2id["LABEL_2"] == 2
    d = ViTConfig.from_dict(c.to_dict(), num_labels=7)
    assert d.num_labels == 7 and len(d.id2label) == 7
    c.set_num_labels(1)
    assert c.id2label == {0: "LABEL_0"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=100, num_attention_heads=12), "hidden_size"),
        (dict(image_size=225), "image_size"),
        (dict(image_size=(224, 100)), "image_size"),
        (dict(hidden_act="swish2"), "hidden_act"),
        (dict(pooler_act="softmax"), "pooler_act"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(problem_type="ranking"), "problem_type"),
        (dict(num_labels=2, id2label={0: "a"}), "num_labels"),
        (dict(interpolate_pos_mode="area"), "interpolate_pos_mode"),
        (dict(attn_implementation="flash"), "attn_implementation"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ViTConfig(**kwargs)


def test_every_supported_activation_builds():
    for act in SUPPORTED_ACTIVATIONS:
        assert ViTConfig(hidden_act=act).hidden_act == act


def test_wrong_model_type_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        ViTConfig.from_dict({"model_type": "bert"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ViTConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ViTConfig.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name, width, depth, heads, patch",
    [("Ti/16", 192, 12, 3, 16), ("s/32", 384, 12, 6, 32), ("B/16", 768, 12, 12, 16), ("L/14", 1024, 24, 16, 14),
     ("H/14", 1280, 32, 16, 14), ("B-8", 768, 12, 12, 8)],
)
def test_variants(name, width, depth, heads, patch):
    c = ViTConfig.from_variant(name)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size) == (width, depth, heads, patch)
    assert c.intermediate_size == 4 * width and c.encoder_stride == patch


def test_variant_errors_and_overrides():
    assert ViTConfig.from_variant("B/16", image_size=384).num_patches == 24 * 24
    with pytest.raises(ConfigError, match="unknown ViT variant"):
        ViTConfig.from_variant("XL/16")
    with pytest.raises(ConfigError, match="patch size"):
        ViTConfig.from_variant("B/15")


def test_resolve_problem_type():
    assert ViTConfig(num_labels=1).resolve_problem_type(True) == "regression"
    assert ViTConfig(num_labels=3).resolve_problem_type(True) == "single_label_classification"
    assert ViTConfig(num_labels=3).resolve_problem_type(False) == "multi_label_classification"
    assert ViTConfig(num_labels=3, problem_type="regression").resolve_problem_type(True) == "regression"
