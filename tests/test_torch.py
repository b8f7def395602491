"""PyTorch-only behaviour: API surface, errors, init, gradient checkpointing, dtypes, MIM loss beyond HF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit_core.config import ViTConfig
from vit_core.outputs import ImageClassifierOutput
from vit_torch import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            image_size=32, patch_size=8, encoder_stride=8)


def tiny(**kw) -> ViTConfig:
    return ViTConfig(**{**TINY, **kw})


def test_output_access_like_hf():
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny(num_labels=3)).eval()
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    assert isinstance(out, ImageClassifierOutput)
    assert list(out.keys()) == ["loss", "logits"]  # None fields are not keys
    assert out[0] is out.loss and out["logits"] is out.logits and out[1] is out.logits
    assert out.to_tuple() == (out.loss, out.logits)
    assert "hidden_states" not in out and out.get("hidden_states") is None
    with pytest.raises(KeyError):
        out["attentions"]
    model.config.return_dict = False
    assert isinstance(model(torch.randn(1, 3, 32, 32)), tuple)


def test_sdpa_and_eager_agree_and_sdpa_still_returns_attentions():
    torch.manual_seed(0)
    model = ViTModel(tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        with_attn = model(x, output_attentions=True)
        model.config.attn_implementation = "eager"
        eager = model(x, output_attentions=True)
    torch.testing.assert_close(fast.last_hidden_state, eager.last_hidden_state, rtol=0, atol=1e-6)
    assert len(with_attn.attentions) == 2 and with_attn.attentions[0].shape == (2, 4, 17, 17)
    for a, b in zip(with_attn.attentions, eager.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_bf16_attention_path_matches_an_fp32_softmax_and_trains():
    """bf16 on the CPU skips SDPA for matmuls and a bf16 softmax: same numbers as SDPA-free fp32-softmax attention."""
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny(num_labels=3, hidden_size=64, num_attention_heads=4)).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    attention = model.vit.encoder.layer[0].attention.attention
    with torch.no_grad():
        h = torch.randn(2, 17, 64, dtype=torch.bfloat16)
        got, _ = attention(h)
        split = lambda t: t.view(2, 17, 4, 16).transpose(1, 2)  # noqa: E731
        q, k, v = split(attention.query(h)), split(attention.key(h)), split(attention.value(h))
        probs = torch.softmax((q @ k.transpose(-1, -2) * attention.scaling).float(), -1).to(torch.bfloat16)
        want = (probs @ v).transpose(1, 2).reshape(2, 17, 64)
    # One bf16 rounding apart at most (the softmax is rounded once either way; 1 in ~1e5 probabilities differs
    # by an ulp): 2**-7 relative to the largest context value.
    assert float((got.float() - want.float()).abs().max()) <= 2**-7 * float(want.float().abs().max())
    model.train()
    loss = model(x, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert torch.isfinite(loss) and attention.query.weight.grad is not None
    assert attention.query.weight.grad.abs().sum() > 0


def test_mim_loss_at_another_size_matches_the_formula():
    """HF's loss only works at the config's size; ours uses the real grid. Checked against numpy."""
    torch.manual_seed(0)
    model = ViTForMaskedImageModeling(tiny()).eval()
    x = torch.randn(2, 3, 48, 24)
    mask = torch.rand(2, 6 * 3) < 0.5
    with torch.no_grad():
        out = model(x, bool_masked_pos=mask, interpolate_pos_encoding=True)
    rec, px, m = out.reconstruction.numpy(), x.numpy(), mask.numpy().reshape(2, 6, 3)
    pixel_mask = np.kron(m, np.ones((8, 8)))[:, None]  # each patch flag covers its 8x8 pixels, all channels
    expected = (np.abs(px - rec) * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
    assert rec.shape == (2, 3, 48, 24)
    assert abs(float(out.loss) - expected) < 1e-6


def test_init_follows_hf_scheme():
    torch.manual_seed(0)
    model = ViTForMaskedImageModeling(ViTConfig.from_variant("S/16", num_hidden_layers=2))
    sd = model.state_dict()
    w = sd["vit.encoder.layer.0.intermediate.dense.weight"]
    assert abs(float(w.std()) - 0.02) < 1e-3 and float(w.abs().max()) <= 2.0
    assert float(sd["vit.embeddings.position_embeddings"].std()) == pytest.approx(0.02, abs=2e-3)
    assert torch.all(sd["vit.encoder.layer.1.layernorm_before.weight"] == 1)
    assert torch.all(sd["vit.encoder.layer.1.attention.attention.query.bias"] == 0)
    assert torch.all(sd["vit.embeddings.mask_token"] == 0)


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny(num_labels=3))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    grads = []
    for enabled in (False, True):
        model.gradient_checkpointing_enable() if enabled else model.gradient_checkpointing_disable()
        assert model.is_gradient_checkpointing == enabled
        model.zero_grad()
        model(x, labels=y).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = ViTModel(tiny(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3))
    x = torch.randn(1, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)
    model.eval()
    assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("kwarg", ["dtype", "torch_dtype"])
def test_from_pretrained_dtype(tmp_path, kwarg):
    ViTModel(tiny()).save_pretrained(tmp_path)
    model = ViTModel.from_pretrained(tmp_path, **{kwarg: torch.float16})
    assert model.dtype == torch.float16
    assert model(torch.randn(1, 3, 32, 32)).last_hidden_state.dtype == torch.float16  # input cast like HF
    with pytest.raises(ValueError, match="dtype"):
        ViTModel.from_pretrained(tmp_path, dtype="float8")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.randn(1, 4, 32, 32)), r"4 channels .*num_channels is 3"),
        (lambda m: m(torch.randn(1, 3, 64, 32)), r"Input image size \(64\*32\) doesn't match model \(32\*32\)"),
        (lambda m: m(torch.randn(3, 32, 32)), r"pixel_values must be \(batch, channels, height, width\)"),
        (lambda m: m(torch.randn(1, 3, 32, 32), head_mask=torch.ones(3)), r"head_mask must have shape"),
        (lambda m: m(torch.randn(1, 3, 32, 32), bool_masked_pos=torch.ones(1, 16, dtype=torch.bool)),
         "use_mask_token=True"),
        (lambda m: m(None), "specify pixel_values"),
    ],
)
def test_bad_input_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call(ViTModel(tiny()))


def test_mim_mask_shape_and_stride_errors():
    model = ViTForMaskedImageModeling(tiny())
    with pytest.raises(ValueError, match=r"bool_masked_pos must have shape \(batch, num_patches\) = \(1, 16\)"):
        model(torch.randn(1, 3, 32, 32), bool_masked_pos=torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="encoder_stride"):
        ViTForMaskedImageModeling(tiny(encoder_stride=4))(
            torch.randn(1, 3, 32, 32), bool_masked_pos=torch.ones(1, 16, dtype=torch.bool)
        )


def test_from_pretrained_rejects_unknown_kwargs(tmp_path):
    ViTModel(tiny()).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="num_label"):
        ViTModel.from_pretrained(tmp_path, num_label=3)
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        ViTModel({"hidden_size": 32})
    with pytest.raises(ValueError, match="safetensors only"):
        ViTModel(tiny()).save_pretrained(tmp_path, safe_serialization=False)


def test_num_labels_zero_gives_identity_head():
    model = ViTForImageClassification(tiny(num_labels=0)).eval()
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 32)
