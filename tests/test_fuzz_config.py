"""Property and fuzz tests of the configs (issue #14).

* Round trips with HF transformers 4.57: ours → config.json → HF's ViTConfig / ViTHybridConfig → config.json →
  ours gives the same config; HF's ``to_dict`` → ours gives HF's values, field by field.
* Fuzz: config.json files with random JSON values in random fields (nested ones too) and random extra keys.
  The only exception that may escape is :class:`ConfigError`; every case finishes within ``CASE_SECONDS``.
  A short run is part of the default suite; ``-m slow`` runs 10,000+ cases.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vit_core.config import PROBLEM_TYPES, SUPPORTED_ACTIVATIONS, ConfigError, ViTConfig
from vit_core.config_hybrid import BitConfig, ViTHybridConfig

#: Wall-clock bound of one fuzz case (parse + validate, or refuse). Measured: < 5 ms each on an idle CPU; the
#: bound leaves room for a loaded 2-core CI box. A config that walked its layers or allocated would blow it.
CASE_SECONDS = 1.0
#: HF ViTConfig fields trivit models (the rest of HF's PretrainedConfig is kept in ``extra``).
VIT_FIELDS = [
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size",
    "patch_size", "num_channels", "qkv_bias", "encoder_stride", "pooler_output_size", "pooler_act", "num_labels",
    "id2label", "label2id", "problem_type", "output_attentions", "output_hidden_states", "return_dict",
]
BIT_FIELDS = ["num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act", "global_padding",
              "num_groups", "drop_path_rate", "embedding_dynamic_padding", "output_stride", "width_factor",
              "out_features", "out_indices"]
HF_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------- valid configs
@st.composite
def vit_fields(draw) -> dict:
    heads = draw(st.integers(1, 6))
    patch = draw(st.sampled_from([1, 2, 4, 8, 16]))
    side = lambda: draw(st.integers(1, 6)) * patch  # noqa: E731
    fields = dict(
        hidden_size=heads * draw(st.integers(1, 16)), num_hidden_layers=draw(st.integers(1, 24)),
        num_attention_heads=heads, intermediate_size=draw(st.integers(1, 4096)),
        hidden_act=draw(st.sampled_from(SUPPORTED_ACTIVATIONS)),
        hidden_dropout_prob=draw(st.floats(0.0, 0.9)), attention_probs_dropout_prob=draw(st.floats(0.0, 0.9)),
        initializer_range=draw(st.floats(1e-4, 1.0)), layer_norm_eps=draw(st.floats(1e-12, 1e-3)),
        image_size=draw(st.one_of(st.just(side()), st.just([side(), side()]))), patch_size=patch,
        num_channels=draw(st.integers(1, 5)), qkv_bias=draw(st.booleans()), encoder_stride=draw(st.integers(1, 32)),
        pooler_output_size=draw(st.one_of(st.none(), st.integers(1, 64))),
        pooler_act=draw(st.sampled_from(["tanh", *SUPPORTED_ACTIVATIONS])),
        problem_type=draw(st.one_of(st.none(), st.sampled_from(PROBLEM_TYPES))),
        output_attentions=draw(st.booleans()), output_hidden_states=draw(st.booleans()),
        return_dict=draw(st.booleans()),
    )
    labels = draw(st.one_of(st.integers(0, 12).map(lambda n: {"num_labels": n}),
                            st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=6, unique=True).map(
                                lambda names: {"id2label": dict(enumerate(names))})))
    return {**fields, **labels}


@st.composite
def bit_fields(draw) -> dict:
    """BiT backbones that validate: widths multiples of 32 · num_groups-friendly (num_groups | 8)."""
    stages = draw(st.integers(1, 4))
    layer_type = draw(st.sampled_from(["bottleneck", "preactivation"]))
    fields = dict(
        embedding_size=8 * draw(st.integers(1, 8)), hidden_sizes=[32 * draw(st.integers(1, 8)) for _ in range(stages)],
        depths=[draw(st.integers(1, 4)) for _ in range(stages)], layer_type=layer_type,
        hidden_act=draw(st.sampled_from(SUPPORTED_ACTIVATIONS)), global_padding=draw(st.sampled_from([None, "SAME"])),
        num_groups=draw(st.sampled_from([1, 2, 4, 8])), drop_path_rate=draw(st.floats(0.0, 0.5)),
        embedding_dynamic_padding=draw(st.booleans()), output_stride=draw(st.sampled_from([8, 16, 32])),
        width_factor=1,
    )
    fields["out_features"] = [f"stage{draw(st.integers(1, stages))}"]
    return fields


#: ViT fields HF's ViTHybridConfig has no notion of (its pooler is hidden_size wide, tanh; no MIM head).
NOT_IN_HF_HYBRID = ("encoder_stride", "pooler_output_size", "pooler_act")
HYBRID_FIELDS = [n for n in VIT_FIELDS if n not in NOT_IN_HF_HYBRID] + ["backbone_featmap_shape"]


def _hybrid_kwargs(draw_vit: dict, bit: dict, image: int) -> dict:
    vit = {k: v for k, v in draw_vit.items() if k not in ("image_size", "patch_size", *NOT_IN_HF_HYBRID)}
    return {**vit, "image_size": image, "patch_size": 1, "backbone_config": {**bit, "num_channels": vit["num_channels"]}}


def _same(ours, hf, names) -> None:
    for name in names:
        theirs = getattr(hf, name)
        mine = getattr(ours, name)
        if name == "image_size" and isinstance(theirs, list):
            theirs = tuple(theirs)
        if name == "id2label":
            theirs = {int(k): v for k, v in theirs.items()}
        if name == "label2id" and theirs is None:  # HF given id2label alone leaves label2id None; trivit inverts
            theirs = {v: k for k, v in getattr(hf, "id2label").items()}
        assert mine == theirs, (name, mine, theirs)


@HF_SETTINGS
@given(vit_fields())
def test_ours_to_hf_and_back(fields):
    ours = ViTConfig(**fields)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(Path(tmp) / "a")
        hf = transformers.ViTConfig.from_pretrained(Path(tmp) / "a")
        _same(ours, hf, VIT_FIELDS)
        hf.save_pretrained(Path(tmp) / "b")
        back = ViTConfig.from_pretrained(Path(tmp) / "b")
    for name in ViTConfig._field_names():
        assert getattr(back, name) == getattr(ours, name), name
    assert {k: v for k, v in back.extra.items() if k != "transformers_version"} == ours.extra


@HF_SETTINGS
@given(vit_fields())
def test_hf_to_dict_to_ours(fields):
    hf = transformers.ViTConfig(**fields)
    ours = ViTConfig.from_dict(hf.to_dict())
    _same(ours, hf, VIT_FIELDS)


@settings(HF_SETTINGS, max_examples=10)
@given(vit_fields(), bit_fields(), st.sampled_from([32, 48, 64, 96]))
def test_hybrid_round_trips_with_hf(vit, bit, image):
    try:
        ours = ViTHybridConfig(**_hybrid_kwargs(vit, bit, image))
    except ConfigError as err:  # e.g. an image too small for a deep backbone: refused, with a message
        assert "smaller than one" in str(err), err
        return
    hf = transformers.ViTHybridConfig(**{**_hybrid_kwargs(vit, bit, image),
                                         "backbone_featmap_shape": ours.backbone_featmap_shape})
    for source in (hf.to_dict(), json.loads(json.dumps(hf.to_dict()))):
        back = ViTHybridConfig.from_dict(source)
        _same(back, hf, HYBRID_FIELDS)
        _same(back.bit, hf.backbone_config, BIT_FIELDS)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.ViTHybridConfig.from_pretrained(tmp)
        _same(ours, theirs, HYBRID_FIELDS)
        _same(ours.bit, theirs.backbone_config, BIT_FIELDS)
        theirs.save_pretrained(tmp)
        assert ViTHybridConfig.from_pretrained(tmp).to_dict() == {**ours.to_dict(), "transformers_version":
                                                                   transformers.__version__}


# -------------------------------------------------------------------------------------------------- fuzz
JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-(2**63), 2**63),
    st.sampled_from([0, 1, 2, 16, 2**31, 10**9, 768, 0.5, 1e-12]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["gelu", "SAME", "valid", "vit", "bit", "stage1", "stage9", "768", "regression"]),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES, lambda children: st.one_of(st.lists(children, max_size=4),
                                            st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12,
)
BASE_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                patch_size=8, encoder_stride=8, num_labels=3)
BASE_BIT = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4, layer_type="bottleneck",
                global_padding="SAME", embedding_dynamic_padding=True)
KEYS = sorted(ViTHybridConfig._field_names() | {"model_type", "extra", "transformers_version"})
BIT_KEYS = sorted(BitConfig._field_names() | {"model_type", "stage_names", "extra"})


@st.composite
def fuzzed_config_json(draw) -> tuple[type, dict]:
    hybrid = draw(st.booleans())
    data = {**BASE_VIT, "model_type": "vit"}
    if hybrid:
        data = {**data, "model_type": "vit-hybrid", "image_size": 48, "patch_size": 1,
                "backbone_config": {**BASE_BIT, "model_type": "bit"}}
    for key in draw(st.lists(st.sampled_from(KEYS) | st.text(max_size=10), max_size=4)):
        data[key] = draw(JSON_VALUES)
    if hybrid and isinstance(data.get("backbone_config"), dict):
        for key in draw(st.lists(st.sampled_from(BIT_KEYS) | st.text(max_size=10), max_size=3)):
            data["backbone_config"][key] = draw(JSON_VALUES)
    cls = draw(st.sampled_from([ViTConfig, ViTHybridConfig]))
    return cls, json.loads(json.dumps(data))  # what json.load gives (NaN and Infinity included, as Python reads them)


def _one_case(cls: type, data: dict) -> str:
    """Parse one fuzzed config.json; returns "ok" or "refused"; any other exception fails the test."""
    start = time.perf_counter()
    try:
        config = cls.from_dict(data)
        outcome = "ok"
    except ConfigError as err:
        assert str(err), "a ConfigError must say what is wrong"
        outcome = "refused"
    if outcome == "ok":  # an accepted config serialises and reads back to itself
        assert cls.from_dict(json.loads(config.to_json_string())) == config
    elapsed = time.perf_counter() - start
    assert elapsed < CASE_SECONDS, f"{elapsed:.2f} s for {data!r:.300}"
    return outcome


def _fuzz(n: int):
    outcomes: dict[str, int] = {}

    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(fuzzed_config_json())
    def run(case):
        outcome = _one_case(*case)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    run()
    return outcomes


def test_fuzz_config_json_short():
    outcomes = _fuzz(300)
    assert outcomes.get("refused", 0) > 0 and outcomes.get("ok", 0) > 0, outcomes  # both kinds were exercised


@pytest.mark.slow
def test_fuzz_config_json_long():
    start = time.perf_counter()
    outcomes = _fuzz(10_000)
    print(f"fuzz: {sum(outcomes.values())} cases, {outcomes}, {time.perf_counter() - start:.1f} s")
    assert sum(outcomes.values()) >= 10_000


def test_fuzz_file_path_too(tmp_path):
    """The same contract through a config.json file (from_pretrained reads it with json.load)."""
    hybrid = {**BASE_VIT, "model_type": "vit-hybrid", "image_size": 48, "patch_size": 1, "backbone_config": BASE_BIT}
    cases = [(ViTConfig, {**BASE_VIT, "hidden_size": "768"}, "hidden_size must be an int, got '768'"),
             (ViTConfig, {**BASE_VIT, "id2label": {"x": 1}}, "id2label must be an object"),
             (ViTHybridConfig, {**hybrid, "backbone_config": {**BASE_BIT, "depths": [[1]]}},
              "backbone_config.depths must be a list of ints, got"),
             (ViTHybridConfig, {**hybrid, "backbone_config": "bit"}, "backbone_config must be a BitConfig")]
    for cls, data, message in cases:
        (tmp_path / "config.json").write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=re.escape(message)):
            cls.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE_VIT, "model_type": "vit", "depths": [1, None]}))
    assert ViTConfig.from_pretrained(tmp_path).extra["depths"] == [1, None]  # an unknown key: kept, not judged
