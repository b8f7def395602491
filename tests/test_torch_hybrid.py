"""PyTorch-only behaviour of the hybrid: gradients against HF, gradient checkpointing, drop path, bf16, errors."""

from __future__ import annotations

import pytest
import torch

import vit_torch
from frameworks import _patch_hf_hybrid_init
from test_equivalence import _randomise
from tolerances import GRAD_RTOL
from vit_core.config_hybrid import ViTHybridConfig

BIT = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4, layer_type="bottleneck",
           global_padding="SAME", embedding_dynamic_padding=True)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=48)


def tiny(bit=None, **kw) -> ViTHybridConfig:
    return ViTHybridConfig(**{**TINY, **kw}, backbone_config={**BIT, **(bit or {})})


@pytest.mark.parametrize("layer_type", ["bottleneck", "preactivation"])
def test_gradients_match_hf(layer_type, tmp_path):
    """d(loss)/d(every parameter) and d(loss)/d(pixels) equal HF's autograd through its own BiT code."""
    import transformers

    _patch_hf_hybrid_init()
    model = vit_torch.ViTHybridForImageClassification(tiny(dict(layer_type=layer_type), num_labels=3))
    _randomise(model, 0)
    model.save_pretrained(tmp_path)
    hf = transformers.ViTHybridForImageClassification.from_pretrained(tmp_path, attn_implementation="eager")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    grads = []
    for m in (model, hf):
        m.train()  # dropout rates are 0: training mode changes nothing but must work
        pixels = x.clone().requires_grad_(True)
        m(pixels, labels=labels).loss.backward()
        grads.append({"pixels": pixels.grad, **{n: p.grad for n, p in m.named_parameters()}})
    ours, theirs = grads
    assert ours.keys() == theirs.keys()
    # The pre-activation final norm never reaches the feature map: no gradient on either side.
    unused = {n for n, g in theirs.items() if g is None}
    assert unused == {n for n, g in ours.items() if g is None}
    assert unused == ({"vit.embeddings.patch_embeddings.backbone.bit.norm.weight",
                       "vit.embeddings.patch_embeddings.backbone.bit.norm.bias"} if layer_type == "preactivation" else set())
    ours, theirs = ({n: g for n, g in d.items() if n not in unused} for d in (ours, theirs))
    # Relative to the largest entry of all gradients (GRAD_RTOL's definition): some are zero in exact arithmetic
    # (the key bias cannot change a softmax), so a per-tensor relative bound would compare rounding noise.
    scale = max(float(g.abs().max()) for g in theirs.values())
    for name in ours:
        diff = float((ours[name] - theirs[name]).abs().max())
        assert diff <= GRAD_RTOL * scale, f"{name}: {diff:.3g} > {GRAD_RTOL} * {scale:.3g}"


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = vit_torch.ViTHybridForImageClassification(tiny(num_labels=3)).train()
    x, labels = torch.randn(2, 3, 48, 48), torch.tensor([1, 2])
    model(x, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.vit.embeddings.patch_embeddings.backbone.bit.encoder.gradient_checkpointing
    model(x, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=0, atol=1e-6, msg=n)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = vit_torch.ViTHybridModel(tiny(dict(drop_path_rate=0.5)))
    x = torch.randn(4, 3, 48, 48)
    model.eval()
    with torch.no_grad():
        a, b = model(x).last_hidden_state, model(x).last_hidden_state
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c = model(x).last_hidden_state
    assert not torch.allclose(a, c)


def test_bf16_compute_is_close_to_fp32(tmp_path):
    torch.manual_seed(0)
    model = vit_torch.ViTHybridForImageClassification(tiny(num_labels=4)).eval()
    model.save_pretrained(tmp_path)
    bf16 = vit_torch.ViTHybridForImageClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want, got = model(x).logits, bf16(x).logits.float()
    # bf16 keeps 8 mantissa bits: ~0.4% per rounding; over ~20 layers of rounding a few percent of the scale.
    assert float((got - want).abs().max()) <= 0.05 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 40, 48), r"Input image size \(40\*48\) doesn't match model \(48\*48\)"),
    ((2, 1, 48, 48), "pixel_values has 1 channels"),
    ((2, 48, 48, 3), "pixel_values has 48 channels"),
    ((3, 48, 48), r"pixel_values must be \(batch, channels, height, width\)"),
])
def test_bad_pixels_name_the_problem(shape, match):
    model = vit_torch.ViTHybridModel(tiny()).eval()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_too_small_for_the_backbone_with_interpolation():
    model = vit_torch.ViTHybridModel(tiny(patch_size=3)).eval()  # a 3×3 map at 48 px: one token
    with pytest.raises(ValueError, match="too small: its patch grid is 0\\*0"):
        model(torch.zeros(1, 3, 16, 16), interpolate_pos_encoding=True)


def test_cached_standardised_weights_follow_every_change(tmp_path):
    """Inference caches each standardised kernel; in-place updates, load_state_dict and dtype changes
    must all invalidate it (compared with a model that never cached)."""
    torch.manual_seed(0)
    model = vit_torch.ViTHybridModel(tiny()).eval()
    x = torch.randn(2, 3, 48, 48)
    conv = model.embeddings.patch_embeddings.backbone.bit.embedder.convolution
    with torch.no_grad():
        before = model(x).last_hidden_state
        assert conv._cached is not None
        conv.weight.mul_(-1.5)
        after = model(x).last_hidden_state
    model.save_pretrained(tmp_path)
    fresh = vit_torch.ViTHybridModel.from_pretrained(tmp_path)
    with torch.no_grad():
        want = fresh(x).last_hidden_state
    assert not torch.allclose(before, after)
    assert torch.equal(after, want)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    state["embeddings.patch_embeddings.backbone.bit.embedder.convolution.weight"] *= 2.0
    model.load_state_dict(state)
    fresh.load_state_dict(state)
    fresh.train()  # training mode never caches (dropout rates are 0, so the numbers are the same)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, fresh(x).last_hidden_state, rtol=0, atol=0)
    model.to(torch.bfloat16)
    with torch.no_grad():
        assert model(x.bfloat16()).last_hidden_state.dtype == torch.bfloat16


@pytest.mark.parametrize("layer_type", ["bottleneck", "preactivation"])
def test_bit_backbone_feature_maps_match_hf(layer_type):
    """vit_torch's BitBackbone with HF's BitBackbone weights: the same feature maps for several out_features."""
    import transformers

    from vit_core.config_hybrid import BitConfig
    from vit_torch.modeling_bit import BitBackbone

    fields = dict(BIT, layer_type=layer_type, out_features=["stem", "stage1", "stage3"])
    torch.manual_seed(0)
    hf = transformers.BitBackbone(transformers.BitConfig(**fields)).eval()
    _randomise(hf, 0)
    ours = BitBackbone(BitConfig(**fields)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        want, got = hf(x).feature_maps, ours(x)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        # fp32 maps of |x| up to ~50: the bound scales with the map (see HYBRID_SCALE_BY_MAGNITUDE).
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, float(b.abs().max())))
