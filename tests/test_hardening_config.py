"""Bad configs fail at once with a ConfigError naming the field, the expected type or range, and the value (issue #14).

Every row runs through the constructor and through a config.json read by ``from_pretrained``, for ViTConfig,
ViTHybridConfig and the backbone's BitConfig (nested as ``backbone_config``).
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from vit_core.config import MAX_PARAMETERS, SUPPORTED_ACTIVATIONS, ConfigError, ViTConfig
from vit_core.config_hybrid import BitConfig, ViTHybridConfig
from vit_core.weights import param_specs

BIT = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4, layer_type="bottleneck",
           global_padding="SAME", embedding_dynamic_padding=True)
HYBRID = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=48)


def via_json(tmp_path, cls, fields: dict):
    """``cls.from_pretrained`` of a folder whose config.json holds ``fields`` (plus the model_type)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": cls.model_type, **fields}))
    return cls.from_pretrained(tmp_path)


def both_ways(tmp_path, cls, fields: dict, match: str) -> str:
    """The same ConfigError from the constructor and from config.json; returns its message."""
    with pytest.raises(ConfigError, match=match) as direct:
        cls(**fields)
    with pytest.raises(ConfigError, match=match) as from_file:
        via_json(tmp_path, cls, fields)
    assert str(direct.value) == str(from_file.value)
    return str(direct.value)


# ------------------------------------------------------------------------------------- sizes and ranges
VIT_SIZES = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
             "num_channels", "encoder_stride"]


@pytest.mark.parametrize("value", [0, -4])
@pytest.mark.parametrize("name", VIT_SIZES)
def test_vit_sizes_must_be_positive(tmp_path, name, value):
    msg = both_ways(tmp_path, ViTConfig, {name: value}, name)
    assert msg == f"{name} must be a positive int, got {value}"


@pytest.mark.parametrize("fields, message", [
    (dict(image_size=0), "image_size must be a positive int or (height, width), got 0"),
    (dict(image_size=[224, -16]), "image_size must be a positive int or (height, width), got (224, -16)"),
    (dict(num_labels=-1), "num_labels must be an int >= 0, got -1"),
    (dict(pooler_output_size=-3), "pooler_output_size must be a positive int, got -3"),
    (dict(layer_norm_eps=-1e-6), "layer_norm_eps must be a positive finite number, got -1e-06"),
    (dict(initializer_range=0), "initializer_range must be a positive finite number, got 0"),
    (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob must be a float in [0, 1), got 1.0"),
])
def test_vit_ranges(tmp_path, fields, message):
    assert both_ways(tmp_path, ViTConfig, fields, re.escape(message)) == message


@pytest.mark.parametrize("name", ["embedding_size", "num_groups", "output_stride", "width_factor"])
def test_bit_sizes_must_be_positive(tmp_path, name):
    fields = {**HYBRID, "backbone_config": {**BIT, name: 0}}
    assert both_ways(tmp_path, ViTHybridConfig, fields, name) == f"backbone_config.{name} must be a positive int, got 0"


@pytest.mark.parametrize("name", ["hidden_sizes", "depths"])
@pytest.mark.parametrize("value", [[], [32, 0, 128], [-1]])
def test_bit_stage_lists(tmp_path, name, value):
    fields = {**HYBRID, "backbone_config": {**BIT, name: value}}
    msg = both_ways(tmp_path, ViTHybridConfig, fields, name)
    assert msg == f"backbone_config.{name} must be a non-empty list of positive ints, got {value}"


def test_hidden_size_divisible_by_heads(tmp_path):
    msg = both_ways(tmp_path, ViTConfig, dict(hidden_size=100, num_attention_heads=12), "hidden_size")
    assert msg == "hidden_size (100) must be divisible by num_attention_heads (12)"


def test_image_size_divisible_by_patch_hf_floors_we_refuse(tmp_path):
    """HF 4.57 accepts image_size 225 with patch 16 (its conv floors 225 to 14 patches, one pixel row and column
    of every image unused); trivit refuses it, as it refuses such inputs at run time."""
    import transformers

    assert transformers.ViTConfig(image_size=225).image_size == 225
    msg = both_ways(tmp_path, ViTConfig, dict(image_size=225), "image_size")
    assert msg == "image_size 225 must be divisible by patch_size (16)"
    msg = both_ways(tmp_path, ViTConfig, dict(image_size=8), "image_size")
    assert msg == "image_size 8 gives the image of 8×8, smaller than one 16×16 patch; use a larger image_size"


def test_hybrid_feature_map_divisible_by_patch(tmp_path):
    """The hybrid's patches are cut from the backbone map: 48 px → 3×3 map, not a multiple of patch_size 2."""
    msg = both_ways(tmp_path, ViTHybridConfig, {**HYBRID, "patch_size": 2, "backbone_config": BIT}, "image_size")
    assert msg == "image_size 48 must be divisible by patch_size (2) (it gives a backbone feature map of 3×3)"


@pytest.mark.parametrize("field", ["hidden_act", "pooler_act"])
def test_unknown_activation_lists_the_known(tmp_path, field):
    msg = both_ways(tmp_path, ViTConfig, {field: "swish2"}, field)
    known = list(SUPPORTED_ACTIVATIONS) if field == "hidden_act" else ["tanh", *SUPPORTED_ACTIVATIONS]
    assert msg == f"{field} 'swish2' is not supported; choose one of {known}"


def test_unknown_backbone_activation(tmp_path):
    fields = {**HYBRID, "backbone_config": {**BIT, "hidden_act": "swish2"}}
    msg = both_ways(tmp_path, ViTHybridConfig, fields, "hidden_act")
    assert msg == f"backbone_config.hidden_act 'swish2' is not supported; choose one of {list(SUPPORTED_ACTIVATIONS)}"


# ----------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize("value, shown", [("768", "'768' (str)"), (768.5, "768.5 (float)"), (True, "True (bool)"),
                                          (None, "None (NoneType)"), ([768], "[768] (list)"), ({"a": 1}, "{'a': 1} (dict)")])
@pytest.mark.parametrize("name", VIT_SIZES)
def test_wrong_types_name_field_type_and_value(tmp_path, name, value, shown):
    assert both_ways(tmp_path, ViTConfig, {name: value}, name) == f"{name} must be an int, got {shown}"


@pytest.mark.parametrize("name, value, message", [
    ("hidden_act", 3, "hidden_act must be a string, got 3 (int)"),
    ("layer_norm_eps", "1e-12", "layer_norm_eps must be a number, got '1e-12' (str)"),
    ("layer_norm_eps", False, "layer_norm_eps must be a number, got False (bool)"),
    ("qkv_bias", 1, "qkv_bias must be a boolean (true/false), got 1 (int)"),
    ("qkv_bias", "true", "qkv_bias must be a boolean (true/false), got 'true' (str)"),
    ("image_size", "224", "image_size must be an int or a list of 2 ints, got '224' (str)"),
    ("image_size", [224, 224, 3], "image_size must be an int or a list of 2 ints, got [224, 224, 3] (list)"),
    ("image_size", [224.0, 224], "image_size must be an int or a list of 2 ints, got [224.0, 224] (list)"),
    ("num_labels", "10", "num_labels must be an int or null, got '10' (str)"),
    ("id2label", ["cat", "dog"], "id2label must be an object mapping integer keys to strings or null, got ['cat', "
                                 "'dog'] (list)"),
    ("id2label", {"zero": "cat"}, "id2label must be an object mapping integer keys to strings or null, got "
                                  "{'zero': 'cat'} (dict)"),
    ("label2id", {"cat": "0"}, "label2id must be an object mapping strings to ints or null, got {'cat': '0'} (dict)"),
    ("problem_type", 1, "problem_type must be a string or null, got 1 (int)"),
    ("architectures", "ViTModel", "architectures must be a list of strings or null, got 'ViTModel' (str)"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps must be a positive finite number, got nan"),
    ("initializer_range", float("inf"), "initializer_range must be a positive finite number, got inf"),
])
def test_wrong_types_other_fields(tmp_path, name, value, message):
    assert both_ways(tmp_path, ViTConfig, {name: value}, re.escape(name)) == message


@pytest.mark.parametrize("fields, message", [
    (dict(backbone_config=[1, 2]), "backbone_config must be a BitConfig or an object or null, got [1, 2] (list)"),
    (dict(backbone_config={**BIT, "depths": "3,4,9"}), "backbone_config.depths must be a list of ints, got '3,4,9' (str)"),
    (dict(backbone_config={**BIT, "depths": [1, 2.5, 1]}),
     "backbone_config.depths must be a list of ints, got [1, 2.5, 1] (list)"),
    (dict(backbone_config={**BIT, "global_padding": 1}),
     "backbone_config.global_padding must be a string or null, got 1 (int)"),
    (dict(backbone_config={**BIT, "embedding_dynamic_padding": "yes"}),
     "backbone_config.embedding_dynamic_padding must be a boolean (true/false), got 'yes' (str)"),
    (dict(backbone_featmap_shape="1,128,3,3"), "backbone_featmap_shape must be a list of ints or null, got '1,128,3,3' (str)"),
    (dict(backbone_config={**BIT, "out_features": []}),
     "backbone_config.out_features must name at least one stage of ['stem', 'stage1', 'stage2', 'stage3'], got []"),
    (dict(backbone_config={**BIT, "out_indices": []}),
     "backbone_config.out_indices must name at least one stage of ['stem', 'stage1', 'stage2', 'stage3'], got []"),
])
def test_wrong_types_hybrid(tmp_path, fields, message):
    assert both_ways(tmp_path, ViTHybridConfig, {**HYBRID, "backbone_config": BIT, **fields}, ".") == message


def test_long_values_are_shortened_in_messages():
    with pytest.raises(ConfigError) as err:
        ViTConfig(architectures=list(range(10_000)))
    assert len(str(err.value)) < 200 and "..." in str(err.value)


# ------------------------------------------------------------------------------------------ model_type
@pytest.mark.parametrize("cls, model_type, supported", [
    (ViTConfig, "bert", "not supported"), (ViTConfig, "vit-hybrid", "supported"), (ViTHybridConfig, "vit", "supported"),
    (ViTConfig, ["vit"], "not supported"),
])
def test_unknown_model_type_lists_the_supported(tmp_path, cls, model_type, supported):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ConfigError) as err:
        cls.from_pretrained(tmp_path)
    assert str(err.value) == (
        f"model_type is {model_type!r} ({supported}), but {cls.__name__} expects {cls.model_type!r}; trivit reads "
        "model_type ['vit', 'vit-hybrid']"
    )


def test_backbone_model_type():
    with pytest.raises(ConfigError, match=re.escape("backbone_config.model_type is 'resnet'; trivit's hybrid supports "
                                                    "only the BiT backbone (model_type ['bit'])")):
        ViTHybridConfig(**HYBRID, backbone_config={**BIT, "model_type": "resnet"})


@pytest.mark.parametrize("data", ["[1, 2]", '"vit"', "3"])
def test_config_json_must_be_an_object(tmp_path, data):
    (tmp_path / "config.json").write_text(data)
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        ViTConfig.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ parameter bound
@pytest.mark.parametrize("config", [
    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
              patch_size=8, encoder_stride=8, num_labels=3),
    ViTConfig(qkv_bias=False, num_labels=1000, pooler_output_size=50, image_size=(64, 96), num_channels=1),
    ViTConfig(num_labels=0),
])
def test_parameter_estimate_is_the_largest_weight_table(config):
    """``num_parameters_estimate`` is closed-form; it equals the weight table's count of the largest class."""
    tables = [param_specs("ViTModel", config, add_pooling_layer=True, use_mask_token=True),
              param_specs("ViTForImageClassification", config), param_specs("ViTForMaskedImageModeling", config)]
    counts = [sum(math.prod(s.shape) for s in t) for t in tables]
    assert config.num_parameters_estimate() == max(counts)


@pytest.mark.parametrize("bit", [BIT, {**BIT, "layer_type": "preactivation", "global_padding": None,
                                       "embedding_dynamic_padding": False}, {**BIT, "depths": [3, 1, 5], "width_factor": 2,
                                                                            "hidden_sizes": [32, 64, 256]}])
def test_hybrid_parameter_estimate_is_the_largest_weight_table(bit):
    if bit.get("width_factor") == 2:
        bit = {**bit, "layer_type": "bottleneck"}
    config = ViTHybridConfig(**HYBRID, num_labels=7, backbone_config=bit)
    tables = [param_specs("ViTHybridModel", config, add_pooling_layer=True, use_mask_token=True),
              param_specs("ViTHybridForImageClassification", config)]
    assert config.num_parameters_estimate() == max(sum(math.prod(s.shape) for s in t) for t in tables)
    backbone = [s for s in tables[1] if ".backbone.bit." in s.name]
    assert config.bit.num_parameters_estimate() == sum(math.prod(s.shape) for s in backbone)


def table_count(monkeypatch, fields: dict) -> int:
    """The largest weight table's parameter count (vit_core.weights, shapes only), the bound lifted to build the
    config; depth by linearity (count(L) = count(1) + (L - 1) · one layer), so 2**40 layers need no 2**40 rows."""
    import vit_core.config as config_module

    monkeypatch.setattr(config_module, "MAX_PARAMETERS", math.inf)
    depth = fields.get("num_hidden_layers", 12)

    def count(layers: int) -> int:
        config = ViTConfig(**{**fields, "num_hidden_layers": layers})
        tables = [param_specs("ViTModel", config, add_pooling_layer=True, use_mask_token=True),
                  param_specs("ViTForImageClassification", config), param_specs("ViTForMaskedImageModeling", config)]
        return max(sum(math.prod(s.shape) for s in t) for t in tables)

    one = count(1)
    total = one + (depth - 1) * (count(2) - one)
    monkeypatch.undo()
    return total


@pytest.mark.parametrize("fields", [
    dict(hidden_size=2**31, num_attention_heads=1),
    dict(num_hidden_layers=2**40),
    dict(image_size=2**20, patch_size=1, encoder_stride=1),
    dict(hidden_size=8192, num_attention_heads=64, intermediate_size=32768, num_hidden_layers=64),
])
def test_huge_configs_fail_fast_with_the_estimate(tmp_path, monkeypatch, fields):
    """Refused before anything is built (no table, no allocation): well under a second each way."""
    start = time.perf_counter()
    msg = both_ways(tmp_path, ViTConfig, fields, "parameters")
    assert time.perf_counter() - start < 1.0
    count = table_count(monkeypatch, fields)
    assert count > MAX_PARAMETERS
    assert msg == (f"ViTConfig describes a model of about {count:.3g} parameters ({4 * count / 2**30:.3g} GiB in "
                   f"float32), above trivit's bound of {MAX_PARAMETERS:.3g} (vit_core.config.MAX_PARAMETERS); "
                   "check its sizes")


def test_huge_backbones_and_label_counts_fail_fast(tmp_path):
    start = time.perf_counter()
    both_ways(tmp_path, ViTHybridConfig, {**HYBRID, "backbone_config": {**BIT, "depths": [1, 2, 10**9]}},
              r"^backbone_config describes a model of about .* parameters")
    both_ways(tmp_path, ViTHybridConfig, {**HYBRID, "backbone_config": {**BIT, "hidden_sizes": [32, 64, 2**30]}},
              r"^backbone_config describes a model")
    both_ways(tmp_path, ViTConfig, {"num_labels": 2**31},
              re.escape("num_labels=2147483648 is above trivit's bound of 1000000"))
    assert time.perf_counter() - start < 1.0


def test_deep_backbones_below_the_bound_are_quick():
    """Geometry is O(stages): a 100000-unit stage (valid, 0.2e9 parameters) is checked without walking it."""
    start = time.perf_counter()
    config = ViTHybridConfig(**HYBRID, backbone_config={**BIT, "depths": [1, 2, 100_000]})
    assert config.num_patches == 9 and time.perf_counter() - start < 1.0


def test_a_model_from_a_huge_config_json_fails_before_reading_weights(tmp_path):
    import vit_torch

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 2**31, "num_attention_heads": 1}))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="parameters"):
        vit_torch.ViTModel.from_pretrained(tmp_path)  # no weights file: the config is refused first
    assert time.perf_counter() - start < 1.0


def test_bound_is_a_knob(monkeypatch):
    import vit_core.config as config_module

    monkeypatch.setattr(config_module, "MAX_PARAMETERS", 10_000)
    with pytest.raises(ConfigError, match="above trivit's bound of 1e\\+04"):
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                  patch_size=8, encoder_stride=8)
    assert BitConfig is not None
