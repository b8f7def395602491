"""vision_transformer ``.npz`` files in both block spellings (issue #14).

The published files come from the pre-Linen ``flax.nn`` API, which numbers a block's submodules
across all of them (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``,
``MlpBlock_3``); the same code under current (Linen) flax numbers them per module type
(``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``). The Linen
spelling is proved here, not assumed: a small Linen ViT written in this file with the original
code's module structure and explicit names is initialised with the installed flax and saved as the
original code saves ``variables["params"]`` (``'/'``-joined names, ``np.savez``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from conversion import convert_to, read_npz, read_source
from test_conversion import DEPTH, HEADS, IMG, MLP, P, C, D, _pt_out, _record, jax_reference
from trivit.cli import main
from settings import ATOL
from vit_core.safetensors_io import CheckpointError

CLASSES = 5
#: The block roles' names in each spelling (written out here, independently of conversion.npz.SPELLINGS).
PUBLISHED = {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_1", "ln2": "LayerNorm_2", "mlp": "MlpBlock_3"}
LINEN = {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0", "ln2": "LayerNorm_1", "mlp": "MlpBlock_0"}


def respell(params: dict[str, np.ndarray], src: dict[str, str], dst: dict[str, str]) -> dict[str, np.ndarray]:
    """The same arrays with every encoder block's submodule renamed from spelling ``src`` to ``dst``."""
    rename = {src[role]: dst[role] for role in src}

    def key(k: str) -> str:
        m = re.match(r"^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$", k)
        return k if m is None else m.group(1) + rename[m.group(2)] + m.group(3)

    return {key(k): v for k, v in params.items()}


def linen_vit_params(representation: int | None = None, seed: int = 0):
    """(flattened ``params`` of a Linen ViT built with the installed flax, ``apply(nchw) -> logits``)."""
    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class MlpBlock(nn.Module):  # the class names matter: Linen derives auto names from them
        @nn.compact
        def __call__(self, x):
            y = nn.Dropout(0.0, deterministic=True)(nn.gelu(nn.Dense(MLP)(x)))
            return nn.Dropout(0.0, deterministic=True)(nn.Dense(x.shape[-1])(y))

    class Encoder1DBlock(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            x = nn.LayerNorm()(inputs)
            x = nn.MultiHeadDotProductAttention(num_heads=HEADS)(x, x)
            x = nn.Dropout(0.0, deterministic=True)(x) + inputs
            return x + MlpBlock()(nn.LayerNorm()(x))

    class AddPositionEmbs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = AddPositionEmbs(name="posembed_input")(x)
            for i in range(DEPTH):
                x = Encoder1DBlock(name=f"encoderblock_{i}")(x)
            return nn.LayerNorm(name="encoder_norm")(x)

    class VisionTransformer(nn.Module):
        @nn.compact
        def __call__(self, x):  # NHWC, as the original
            x = nn.Conv(D, (P, P), strides=(P, P), padding="VALID", name="embedding")(x)
            n, h, w, c = x.shape
            x = x.reshape(n, h * w, c)
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = Encoder(name="Transformer")(jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1))[:, 0]
            if representation is not None:
                x = jnp.tanh(nn.Dense(representation, name="pre_logits")(x))
            return nn.Dense(CLASSES, name="head")(x)

    model = VisionTransformer()
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, IMG, IMG, C)))["params"]
    rng = np.random.default_rng(seed)  # init gives zero biases, unit scales: perturb every leaf
    params = jax.tree_util.tree_map(lambda a: np.asarray(a) + (rng.standard_normal(a.shape) * 0.1).astype(np.float32),
                                    params)
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}

    def apply(pixels: np.ndarray) -> np.ndarray:
        tree = flax.traverse_util.unflatten_dict(flat, sep="/")
        return np.asarray(model.apply({"params": tree}, jnp.asarray(pixels.transpose(0, 2, 3, 1))))

    return flat, apply


@pytest.fixture(scope="module")
def linen():
    return linen_vit_params()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((2, C, IMG, IMG)).astype(np.float32)


def test_current_flax_writes_the_per_type_spelling(linen):
    """The fixture's names are what the brief says current flax writes (and the reader's 'linen' spelling)."""
    flat, _ = linen
    block = sorted({k.split("/")[2] for k in flat if k.startswith("Transformer/encoderblock_0/")})
    assert block == sorted(LINEN.values())
    assert {k.split("/")[0] for k in flat} == {"cls", "embedding", "Transformer", "head"}
    assert {"Transformer/posembed_input/pos_embedding", "Transformer/encoder_norm/scale",
            "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel",
            "Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"} <= set(flat)


def test_linen_npz_converts_and_matches_flax_and_numpy(tmp_path, linen, pixels):
    """The Linen-spelled file converts; the vit_torch model equals flax's own forward of the same module, the
    float64 numpy reference, and the published-spelling conversion of the same weights (bit for bit)."""
    flat, apply = linen
    np.savez(tmp_path / "linen.npz", **flat)
    fmt, conv = read_source(tmp_path / "linen.npz")
    assert fmt == "npz" and "Linen names" in conv.description
    convert_to(conv, tmp_path / "hf")
    got = _pt_out(tmp_path / "hf", "ViTForImageClassification", pixels, "logits")
    assert _record("npz linen vs flax apply", got, apply(pixels)) <= ATOL
    published = respell(flat, LINEN, PUBLISHED)
    assert _record("npz linen vs reference", got, jax_reference(published, pixels, big_vision=False)) <= ATOL
    np.savez(tmp_path / "published.npz", **published)
    ref = read_npz(tmp_path / "published.npz")
    assert "pre-Linen" in ref.description and ref.config == conv.config
    assert set(ref.state) == set(conv.state)
    for k in ref.state:
        assert ref.state[k].tobytes() == conv.state[k].tobytes(), k


def test_linen_pre_logits_becomes_pooler(tmp_path):
    from test_conversion import jax_params

    published = jax_params(2, big_vision=False, pre_logits=24)
    np.savez(tmp_path / "linen.npz", **respell(published, PUBLISHED, LINEN))
    np.savez(tmp_path / "published.npz", **published)
    a, b = (read_npz(tmp_path / f"{n}.npz", num_labels=0) for n in ("linen", "published"))
    assert a.flags == b.flags == {"add_pooling_layer": True} and a.config.pooler_output_size == 24
    assert all(np.array_equal(a.state[k], b.state[k]) for k in b.state) and set(a.state) == set(b.state)


def test_cli_says_which_spelling_it_read(tmp_path, linen, capsys):
    np.savez(tmp_path / "linen.npz", **linen[0])
    assert main(["convert", str(tmp_path / "linen.npz"), str(tmp_path / "out")]) == 0
    assert "Linen names, counted per module type" in capsys.readouterr().out


def test_hybrid_both_spellings_same_tensors(tmp_path):
    """R+ViT hybrids: Linen block names and (C,) GroupNorm params (current flax), pre-Linen block names and the
    (1, 1, 1, C) GroupNorm params the published pre-Linen files hold: every combination, the same tensors."""
    from test_conversion_hybrid import npz_hybrid_params, resnet_params

    published = npz_hybrid_params(resnet_params((2, 1)), 1, 16)
    np.savez(tmp_path / "ref.npz", **published)
    ref = read_npz(tmp_path / "ref.npz")
    gn = re.compile(r"^(gn_root|block\d+/unit\d+/gn\w*)/(scale|bias)$")
    for names in (PUBLISHED, LINEN):
        for old_gn in (False, True):
            params = respell(published, PUBLISHED, names)
            if old_gn:
                params = {k: (v.reshape(1, 1, 1, -1) if gn.match(k) else v) for k, v in params.items()}
            np.savez(tmp_path / "v.npz", **params)
            conv = read_npz(tmp_path / "v.npz")
            assert ("(1, 1, 1, C)" in conv.description) == old_gn
            assert ("pre-Linen names" in conv.description) == (names is PUBLISHED)
            assert set(conv.state) == set(ref.state) and conv.config == ref.config
            for k in ref.state:
                assert conv.state[k].tobytes() == ref.state[k].tobytes(), (k, names, old_gn)


@pytest.mark.parametrize("change, match", [
    # block 1 in the other spelling than block 0: its keys are unexpected
    (lambda p: {**{k: v for k, v in p.items() if "encoderblock_1/" not in k},
                **respell({k: v for k, v in p.items() if "encoderblock_1/" in k}, LINEN, PUBLISHED)},
     r"encoderblock_1/ uses the pre-linen spelling but encoderblock_0/ the linen one; first unexpected: "
     r"Transformer/encoderblock_1/LayerNorm_2"),
    (lambda p: {(k.replace("LayerNorm_1", "LayerNorm_7") if "encoderblock_0/" in k else k): v for k, v in p.items()},
     r"first unexpected: Transformer/encoderblock_0/LayerNorm_7; first missing: Transformer/encoderblock_0/LayerNorm_1"),
    (lambda p: {**p, "Transformer/encoderblock_0/MlpBlock_0/Dense_2/kernel": np.zeros((D, D), np.float32)},
     r"first unexpected: 'Transformer/encoderblock_0/MlpBlock_0/Dense_2/kernel'"),
    (lambda p: {**p, "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel": np.zeros((D, MLP), np.float32)},
     r"'Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel' has shape \[32, 48\], expected \[48, 32\]"),
    (lambda p: {k: v for k, v in p.items() if k != "Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"},
     r"'Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias' is missing"),
])
def test_other_spellings_refused_by_name(tmp_path, linen, change, match):
    np.savez(tmp_path / "bad.npz", **change(dict(linen[0])))
    with pytest.raises(CheckpointError, match=match) as e:
        read_npz(tmp_path / "bad.npz")
    if "unexpected" in match:
        assert "MultiHeadDotProductAttention_1" in str(e.value) and "MultiHeadDotProductAttention_0" in str(e.value)
