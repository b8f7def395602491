"""The shared equivalence suite for the hybrid ViT (BiT backbone): every output, every framework, fp32 atol.

As in ``test_equivalence.py``: for ``pt`` the reference is HF transformers 4.x's ``ViTHybrid*`` (eager
attention; the test-only oracle), for ``tf`` and ``flax`` it is ``vit_torch``. Every case saves one random
checkpoint with ``vit_torch`` and loads it on both sides through ``from_pretrained``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vit_torch
from conftest import FRAMEWORKS, assert_outputs_close
from frameworks import ADAPTERS
from settings import ATOL
from test_equivalence import ALL_OUT, Case, make_checkpoint, make_inputs, reference_adapter
from tolerances import HYBRID_FULL_SIZE_ATOL, HYBRID_SCALE_BY_MAGNITUDE
from vit_core.config import ConfigError
from vit_core.config_hybrid import BitConfig, ViTHybridConfig
from vit_core.interpolation import resize_matrix

#: 3 stages (stride 4, 8, 16 after the stem): a 48-px image gives a 3×3 token grid.
BIT = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4, layer_type="bottleneck",
           global_padding="SAME", embedding_dynamic_padding=True)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=48)
MODEL, CLS = "ViTHybridModel", "ViTHybridForImageClassification"


def hybrid_config(case: Case) -> ViTHybridConfig:
    """``case.config`` holds ViT fields, and backbone fields under ``"bit"``."""
    fields = dict(case.config)
    bit = {**BIT, **fields.pop("bit", {})}
    fields.setdefault("num_channels", bit.get("num_channels", 3))
    bit["num_channels"] = fields["num_channels"]
    return ViTHybridConfig(**{**TINY, **fields}, backbone_config=bit)


CASES = [
    Case("bottleneck-same-dynamic", MODEL, call=ALL_OUT),
    Case("bottleneck-none-static", MODEL, dict(bit=dict(global_padding=None, embedding_dynamic_padding=False)),
         call=ALL_OUT),
    Case("bottleneck-none-dynamic", MODEL, dict(bit=dict(global_padding=None)), hw=None, call=ALL_OUT),
    Case("bottleneck-same-static", MODEL, dict(bit=dict(embedding_dynamic_padding=False)), call=ALL_OUT),
    Case("preact-none-static", MODEL, dict(bit=dict(layer_type="preactivation", global_padding=None,
                                                    embedding_dynamic_padding=False, hidden_sizes=[32, 64, 128])),
         call=ALL_OUT),
    Case("preact-same-dynamic", MODEL, dict(bit=dict(layer_type="preactivation")), call=ALL_OUT),
    Case("out-stem-nopool", MODEL, dict(bit=dict(out_features=["stem"])), flags=dict(add_pooling_layer=False),
         call=ALL_OUT),
    Case("out-stage1-stage2", MODEL, dict(bit=dict(out_features=["stage1", "stage2"])), call=ALL_OUT),
    Case("width2-output-stride8-dilated", MODEL,
         dict(bit=dict(width_factor=2, output_stride=8, depths=[1, 1, 2]), image_size=32), call=ALL_OUT),
    Case("preact-output-stride8", MODEL,
         dict(bit=dict(layer_type="preactivation", output_stride=8, depths=[1, 1, 2]), image_size=32), call=ALL_OUT),
    Case("1ch-gelu-backbone", MODEL, dict(num_channels=1, bit=dict(hidden_act="gelu")), call=ALL_OUT),
    Case("4ch-silu-both", MODEL, dict(num_channels=4, hidden_act="silu", bit=dict(hidden_act="silu")), call=ALL_OUT),
    Case("patch2-nonsquare-config", MODEL, dict(patch_size=2, image_size=(64, 96)), call=ALL_OUT),
    Case("relu-eps1e-6-noqkvbias", MODEL, dict(hidden_act="relu", layer_norm_eps=1e-6, qkv_bias=False), call=ALL_OUT),
    Case("head-mask-heads", MODEL, head_mask="heads", call=ALL_OUT),
    Case("head-mask-layers", MODEL, head_mask="layers", call=ALL_OUT),
    Case("mask-token", MODEL, flags=dict(use_mask_token=True), mask=True, call=ALL_OUT),
    Case("interp-same-size", MODEL, call=dict(interpolate_pos_encoding=True)),
    # HF's hybrid resizes the position embeddings to a pixel grid (it divides by patch_size 1), so at any other
    # size it is wrong: tf/flax are compared with pt; pt is checked in test_pt_interpolation_matches_hf_at_that_size.
    Case("interp-up-nonsquare", MODEL, hw=(64, 96), call=dict(interpolate_pos_encoding=True, **ALL_OUT),
         beyond_hf=True),
    Case("interp-down-nonsquare", MODEL, dict(image_size=64), hw=(48, 32), call=dict(interpolate_pos_encoding=True),
         beyond_hf=True),
    Case("cls-logits", CLS, dict(num_labels=5), call=ALL_OUT),
    Case("cls-logits-only", CLS, dict(num_labels=5)),
    Case("cls-single-label", CLS, dict(num_labels=5), labels="int", batch=4),
    Case("cls-regression", CLS, dict(num_labels=1), labels="float", batch=4),
    Case("cls-multi-label", CLS, dict(num_labels=3), labels="float", batch=4),
    Case("cls-preact-head-mask", CLS, dict(num_labels=3, bit=dict(layer_type="preactivation")), head_mask="layers",
         labels="int", call=ALL_OUT),
    Case("cls-interp-nonsquare", CLS, dict(num_labels=3), hw=(80, 48), labels="int",
         call=dict(interpolate_pos_encoding=True), beyond_hf=True),
]


def _run_case(fw: str, case: Case, tmp_path, config: ViTHybridConfig | None = None, seed: int = 0, **kwargs):
    framework = ADAPTERS[fw]()
    config = config or hybrid_config(case)
    path = make_checkpoint(tmp_path, case, config, seed=seed)
    inputs = make_inputs(case, config, seed=seed)
    reference = reference_adapter(framework)
    expected = reference.run(reference.load(case.model, path, **case.flags), inputs, **case.call)
    actual = framework.run(framework.load(case.model, path, **case.flags), inputs, **case.call)
    # Magnitude-scaled: see HYBRID_SCALE_BY_MAGNITUDE in tolerances.py for the measurements.
    assert_outputs_close(actual, expected, where=f"hybrid {framework.name} vs {reference.name}, magnitude-scaled "
                         f"[{case.id}]", scale_by_magnitude=HYBRID_SCALE_BY_MAGNITUDE, **kwargs)


@pytest.mark.parametrize(
    "fw, case",
    [(fw, c) for fw in FRAMEWORKS for c in CASES if not (c.beyond_hf and fw == "pt")],
    ids=lambda x: x.id if isinstance(x, Case) else x,
)
def test_every_hybrid_output_matches_reference(fw: str, case: Case, tmp_path):
    _run_case(fw, case, tmp_path)


@pytest.mark.parametrize("hw", [(64, 96), (32, 80)])
def test_pt_interpolation_matches_hf_at_that_size(hw, tmp_path):
    """The correct ``interpolate_pos_encoding``: the position grid resized to the backbone's output grid.

    Oracle: HF's hybrid built *at* the target size (no interpolation needed), given position embeddings
    resized here with numpy's bicubic matrices (``resize_matrix``, an implementation independent of torch's).
    """
    case = Case("interp-oracle", MODEL, hw=hw, call=ALL_OUT)
    config = hybrid_config(case)
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    ours = ADAPTERS["pt"]()
    actual = ours.run(ours.load(MODEL, path), inputs, interpolate_pos_encoding=True, **ALL_OUT)

    model = vit_torch.ViTHybridModel.from_pretrained(path)
    old, new = config.feature_grid(*config.image_hw), config.feature_grid(*hw)
    pos = model.embeddings.position_embeddings.detach().numpy()[0].astype(np.float64)
    grid = pos[1:].reshape(*old, -1)
    grid = np.einsum("Hh,hwd->Hwd", resize_matrix(old[0], new[0]), grid)
    grid = np.einsum("Ww,Hwd->HWd", resize_matrix(old[1], new[1]), grid)
    resized = np.concatenate([pos[:1], grid.reshape(-1, pos.shape[1])])[None].astype(np.float32)
    at_size = config.copy(image_size=hw, backbone_featmap_shape=None)
    target = vit_torch.ViTHybridModel(at_size)
    state = dict(model.state_dict(), **{"embeddings.position_embeddings": torch.from_numpy(resized)})
    target.load_state_dict(state)
    target.save_pretrained(tmp_path / "at-size")
    hf = ADAPTERS["hf"]()
    expected = hf.run(hf.load(MODEL, tmp_path / "at-size"), inputs, **ALL_OUT)
    assert_outputs_close(actual, expected, where=f"hybrid pt interpolate vs hf at size [{hw}]")


def test_vit_hybrid_base_bit_384_sized(framework, tmp_path):
    """google/vit-hybrid-base-bit-384's config (R50 stages (3, 4, 9) + ViT-B, 577 tokens) at 384 px."""
    case = Case("hybrid-384", MODEL, batch=1, call=ALL_OUT)
    config = ViTHybridConfig(image_size=384)
    assert config.backbone_featmap_shape == [1, 1024, 24, 24] and config.num_patches == 576
    reference = reference_adapter(framework)
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    expected = reference.run(reference.load(case.model, path), inputs, **case.call)
    actual = framework.run(framework.load(case.model, path), inputs, **case.call)
    # fp32's own error at this size exceeds 1e-5: see HYBRID_FULL_SIZE_ATOL in tolerances.py for the measurements.
    atol = ATOL if framework.name == "pt" else HYBRID_FULL_SIZE_ATOL  # pt vs HF: the same kernels on both sides
    assert_outputs_close(actual, expected, atol=atol, where=f"hybrid {framework.name} vs {reference.name} at 384, "
                         f"magnitude-scaled, atol {atol:g} [384]", scale_by_magnitude=True)


@pytest.mark.parametrize("model", [MODEL, CLS])
def test_hybrid_return_dict_false_gives_the_same_tuple(framework, model, tmp_path):
    case = Case(f"tuple-{model}", model, dict(num_labels=3), labels="int" if model == CLS else None)
    config = hybrid_config(case)
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    loaded = framework.load(model, path)
    as_dict = framework.run(loaded, inputs, **ALL_OUT)
    as_tuple = framework.run_tuple(loaded, inputs, **ALL_OUT)
    assert len(as_tuple) == len(as_dict)
    for (key, expected), actual in zip(as_dict.items(), as_tuple):
        assert_outputs_close({key: actual}, {key: expected}, atol=0.0, where=f"hybrid return_dict=False [{key}]")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hybrid_real_photo_through_processor(framework, attn, tmp_path):
    """Real photos through ViTHybridImageProcessor and a classifier: same logits and attentions."""
    from sklearn.datasets import load_sample_image

    from vit_core.image_processing_vit_hybrid import ViTHybridImageProcessor

    case = Case(f"photo-{attn}", CLS, dict(num_labels=4, image_size=64))
    config = hybrid_config(case)
    path = make_checkpoint(tmp_path, case, config)
    images = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    pixels = ViTHybridImageProcessor(size={"shortest_edge": 64}, crop_size=64)(images).pixel_values
    reference = reference_adapter(framework)
    for call in ({}, ALL_OUT):
        expected = reference.run(reference.load(case.model, path), {"pixel_values": pixels}, **call)
        actual = framework.run(framework.load(case.model, path, attn_implementation=attn), {"pixel_values": pixels},
                               **call)
        assert_outputs_close(actual, expected, where=f"hybrid {framework.name} vs {reference.name}, magnitude-scaled "
                             f"[photo {attn}]", scale_by_magnitude=HYBRID_SCALE_BY_MAGNITUDE)


def test_hybrid_class_token_only_is_row_zero(framework, tmp_path):
    case = Case("cls-token-only", MODEL, batch=3)
    config = hybrid_config(case)
    path = make_checkpoint(tmp_path, case, config)
    inputs = make_inputs(case, config)
    model = framework.load(MODEL, path)
    full = framework.run(model, inputs)
    short = framework.run(model, inputs, class_token_only=True)
    expected = {"last_hidden_state": full["last_hidden_state"][:, :1], "pooler_output": full["pooler_output"]}
    assert_outputs_close(short, expected, where=f"hybrid {framework.name} class_token_only vs full, magnitude-scaled",
                         scale_by_magnitude=HYBRID_SCALE_BY_MAGNITUDE)


# ------------------------------------------------------------------------------------------- config
def test_hybrid_config_json_round_trips_with_hf(tmp_path):
    import transformers

    ours = ViTHybridConfig(image_size=384, num_labels=3)
    ours.save_pretrained(tmp_path)
    theirs = transformers.ViTHybridConfig.from_pretrained(tmp_path)
    assert theirs.backbone_featmap_shape == [1, 1024, 24, 24]
    assert theirs.backbone_config.out_features == ["stage3"] and theirs.backbone_config.depths == [3, 4, 9]
    assert theirs.backbone_config.layer_type == "bottleneck" and theirs.backbone_config.global_padding == "SAME"
    theirs.save_pretrained(tmp_path / "hf")
    back = ViTHybridConfig.from_pretrained(tmp_path / "hf")
    for name in ViTHybridConfig._field_names() - {"backbone_config", "attn_implementation", "architectures"}:
        assert getattr(back, name) == getattr(ours, name), name
    for name in BitConfig._field_names():
        assert getattr(back.bit, name) == getattr(ours.bit, name), name


def test_hf_default_hybrid_config_loads():
    """HF's own defaults (backbone_config omitted) give its R50 backbone; HF's default featmap shape
    [1, 1024, 24, 24] belongs to 384 px, and at HF's default image_size 224 it disagrees: a clear error."""
    import transformers

    theirs = transformers.ViTHybridConfig(image_size=384).to_dict()
    ours = ViTHybridConfig.from_dict(theirs)
    assert ours.bit.depths == [3, 4, 9] and ours.num_patches == 576
    with pytest.raises(ConfigError, match="backbone_featmap_shape"):
        ViTHybridConfig.from_dict(transformers.ViTHybridConfig().to_dict())


@pytest.mark.parametrize("fields, message", [
    (dict(backbone="google/bit-50"), "never downloads"),
    (dict(use_pretrained_backbone=True), "use_pretrained_backbone"),
    (dict(use_timm_backbone=True), "use_timm_backbone"),
    (dict(backbone_kwargs={"out_indices": [1]}), "backbone_kwargs"),
    (dict(backbone_config=dict(num_groups=5)), "num_groups"),
    (dict(backbone_config=dict(global_padding="valid")), "global_padding='VALID'"),
    (dict(backbone_config=dict(global_padding="reflect")), "global_padding"),
    (dict(backbone_config=dict(layer_type="basic")), "layer_type"),
    (dict(backbone_config=dict(out_features=["stage9"])), "out_features"),
    (dict(backbone_config=dict(out_features=["stage2"], out_indices=[1])), "name different stages"),
    (dict(backbone_config=dict(model_type="resnet")), "only the BiT backbone"),
    (dict(backbone_config=dict(layer_type="preactivation", depths=[3, 4, 9])), r"hidden_sizes\[-1\]"),
    (dict(image_size=8, patch_size=2), "smaller than one"),
    (dict(num_channels=4), "num_channels"),
])
def test_bad_hybrid_configs_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ViTHybridConfig(**fields)


def test_hf_rejects_valid_padding_too():
    """trivit refuses global_padding='VALID' at config time because HF's BitModel cannot run it either."""
    import transformers

    config = transformers.BitConfig(global_padding="valid", layer_type="bottleneck", depths=[1], hidden_sizes=[32],
                                    embedding_size=16, num_groups=4)
    with pytest.raises(RuntimeError, match="size of tensor"):
        transformers.BitModel(config)(torch.zeros(1, 3, 32, 32))


def test_vit_classes_refuse_a_hybrid_config():
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        vit_torch.ViTModel(ViTHybridConfig(image_size=384))


@pytest.mark.parametrize("layer_type", ["bottleneck", "preactivation"])
@pytest.mark.parametrize("padding, dynamic", [(None, False), (None, True), ("SAME", False), ("SAME", True)])
def test_backbone_geometry_matches_hf(layer_type, padding, dynamic):
    """``BitConfig.feature_shapes`` (the one geometry every framework sizes its position embeddings and checks
    from) equals the shapes HF's BitBackbone produces, at odd and non-square sizes and with dilation."""
    import transformers

    for output_stride in (8, 32):
        fields = dict(global_padding=padding, embedding_dynamic_padding=dynamic, layer_type=layer_type,
                      depths=[1, 2, 1], hidden_sizes=[32, 64, 128], embedding_size=16, num_groups=4,
                      out_features=["stage2", "stage3"], output_stride=output_stride)
        hf = transformers.BitBackbone(transformers.BitConfig(**fields)).eval()
        for hw in [(64, 64), (37, 53), (33, 20)]:
            with torch.no_grad():
                theirs = [tuple(x.shape[1:]) for x in hf(torch.zeros(1, 3, *hw), output_hidden_states=True).hidden_states]
            assert BitConfig(**fields).feature_shapes(*hw) == theirs, (fields, hw)
