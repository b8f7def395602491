"""TF-specific tests of ``vit_tf``'s ViT Hybrid (BiT backbone + ViT): HF 4.x as the oracle, checkpoints, Keras.

The shared suite (tests/test_hybrid_equivalence.py) runs the broad matrix through ``frameworks_tf.TFAdapter``;
these tests cover the TF side's own concerns (backbone maps, drop path, XLA, bf16, ``fit``, ``.keras``,
build without a forward pass). Tiny configs only.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

import vit_tf  # noqa: E402
from conftest import assert_outputs_close  # noqa: E402
from frameworks import HFTorchAdapter, TorchAdapter  # noqa: E402
from frameworks_tf import TFAdapter  # noqa: E402
from settings import ATOL  # noqa: E402  (fp32, per device)
from tolerances import GRAD_RTOL  # noqa: E402
from vit_core.config import ViTConfig  # noqa: E402
from vit_core.config_hybrid import BitConfig, ViTHybridConfig  # noqa: E402
from vit_core.weights import bit_specs, param_specs, to_kernel_layout  # noqa: E402
from vit_tf.modeling_tf_bit import TFBitDropPath, TFBitStage  # noqa: E402
from vit_tf.modeling_tf_utils import resolve_variable  # noqa: E402

HF, PT, TF = HFTorchAdapter(), TorchAdapter(), TFAdapter()
CLASSES = ("ViTHybridModel", "ViTHybridForImageClassification")

#: bottleneck, global_padding "SAME", dynamic (TF-SAME) stem pool: the layout of google/vit-hybrid-base-bit-384.
SAME_DYNAMIC = dict(layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True)
#: pre-activation, symmetric static padding, unpadded stem pool.
PREACT_STATIC = dict(layer_type="preactivation", global_padding=None, embedding_dynamic_padding=False)


def bit_config(**overrides) -> dict:
    base = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4, out_features=["stage3"])
    return {**base, **SAME_DYNAMIC, **overrides}


def tiny_config(bit: dict | None = None, **overrides) -> ViTHybridConfig:
    """64 px → stem 16×16 → stages 16, 8, 4: a 4×4 token grid (17 tokens)."""
    base = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=64,
        num_labels=3, backbone_config=bit or bit_config(),
    )
    return ViTHybridConfig(**{**base, **overrides})


def images(b: int = 2, h: int = 64, w: int = 64, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(b, c, h, w).astype(np.float32)


def _perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """GroupNorm / LayerNorm weights away from (1, 0), so a swapped γ/β or a skipped norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def save_torch(path, class_name: str, config: ViTHybridConfig, seed: int = 0):
    """A random vit_torch checkpoint (norms perturbed) in ``path``."""
    import vit_torch

    torch.manual_seed(seed)
    model = getattr(vit_torch, class_name)(config)
    _perturb_norms(model, seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf_hybrid")
    return {
        (name, layout): save_torch(root / f"{name}-{layout}", name, tiny_config(bit_config(**kwargs)))
        for name in CLASSES
        for layout, kwargs in (("same", SAME_DYNAMIC), ("preact", PREACT_STATIC))
    }


def compare_hf(folder, class_name: str, inputs: dict, where: str, **kwargs) -> float:
    expected = HF.run(HF.load(class_name, folder), inputs, **kwargs)
    actual = TF.run(TF.load(class_name, folder), inputs, **kwargs)
    return assert_outputs_close(actual, expected, atol=ATOL, where=f"tf vs hf [{where}]")


# ----------------------------------------------------------------------------- HF 4.x as the oracle
@pytest.mark.parametrize("layout", ["same", "preact"])
def test_model_matches_hf_all_outputs(folders, layout):
    inputs = {"pixel_values": images(), "head_mask": np.array([1, 0, 1, 1], np.float32)}
    compare_hf(folders["ViTHybridModel", layout], "ViTHybridModel", inputs, layout,
               output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("labels", [np.array([0, 2]), np.array([[1, 0, 1], [0, 0, 1]], np.float32)],
                         ids=["cross_entropy", "bce"])
def test_classifier_with_labels_matches_hf(folders, labels):
    folder = folders["ViTHybridForImageClassification", "same"]
    inputs = {"pixel_values": images(), "labels": labels}
    compare_hf(folder, "ViTHybridForImageClassification", inputs, "classifier")
    compare_hf(folder, "ViTHybridForImageClassification", inputs, "classifier", output_hidden_states=True)


def test_interpolate_pos_encoding_non_square_matches_torch(tmp_path):
    """HF's hybrid resizes to the *pixel* grid (wrong); vit_torch resizes the token grid, as trivit specifies."""
    folder = save_torch(tmp_path, "ViTHybridModel", tiny_config(interpolate_pos_mode="bicubic"))
    x = images(h=96, w=80)  # token grid 4×4 → 6×5
    pt, tfm = PT.load("ViTHybridModel", folder), TF.load("ViTHybridModel", folder)
    out = assert_outputs_close(
        TF.run(tfm, {"pixel_values": x}, interpolate_pos_encoding=True, output_hidden_states=True),
        PT.run(pt, {"pixel_values": x}, interpolate_pos_encoding=True, output_hidden_states=True),
        atol=ATOL, where="tf vs pt [hybrid interpolate]",
    )
    assert TF.run(tfm, {"pixel_values": x}, interpolate_pos_encoding=True)["last_hidden_state"].shape == (2, 31, 32)
    assert out <= ATOL


def test_numerics_knobs_match_torch(tmp_path):
    """``std_eps`` weight standardisation and the eps knobs (HF hard-codes var_eps, 1e-8, 1e-5): vs vit_torch.
    Large eps values, so that each knob moves the outputs by far more than the tolerance."""
    knobs = dict(weight_standardization="std_eps", weight_standardization_eps=1e-2, group_norm_eps=1e-1)
    x = {"pixel_values": images()}
    outs = []
    for extra in (knobs, {}):
        config = tiny_config(bit_config(**PREACT_STATIC, **extra))
        folder = save_torch(tmp_path / str(len(outs)), "ViTHybridModel", config)
        out = TF.run(TF.load("ViTHybridModel", folder), x)
        assert_outputs_close(out, PT.run(PT.load("ViTHybridModel", folder), x), atol=ATOL, where="tf vs pt [knobs]")
        outs.append(out["last_hidden_state"])
    assert np.abs(outs[0] - outs[1]).max() > 1e-2  # the knobs are live


def _hf_backbone_and_ours(bit: BitConfig, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    hf = transformers.BitBackbone(transformers.BitConfig.from_dict(bit.to_dict())).eval()
    _perturb_norms(hf, seed)
    ours = vit_tf.TFBitBackbone(bit)
    ours.build((None, bit.num_channels, 64, 64))
    state = hf.state_dict()
    for spec in bit_specs(bit, prefix="bit."):
        resolve_variable(ours, spec).assign(to_kernel_layout(spec.kind, state[spec.name].numpy()))
    return hf, ours


@pytest.mark.parametrize("layout", ["same", "preact"])
def test_backbone_feature_maps_match_hf_bit_backbone(layout):
    layout_fields = SAME_DYNAMIC if layout == "same" else PREACT_STATIC
    bit = BitConfig(**bit_config(**layout_fields, out_features=["stage1", "stage2"]))
    hf, ours = _hf_backbone_and_ours(bit)
    x = images()
    with torch.no_grad():
        expected = tuple(m.numpy() for m in hf(torch.from_numpy(x)).feature_maps)
    maps = tuple(m.numpy() for m in ours(x))
    assert [m.shape for m in maps] == [(2, 32, 16, 16), (2, 64, 8, 8)] and ours.channels == [32, 64]
    # Raw BiT maps are large (a weight-standardised 7×7 conv sums 147 unit-variance terms: |x| up to ~50 in
    # the pre-activation stem) and are not normalised before the stage output, so 1e-5 absolute is about one
    # fp32 ulp there. Bound: ATOL·max(1, max|map|). Measured (CPU): TF and torch fp32 are equally far from a
    # float64 run of HF (e.g. 3.9e-5 vs 3.8e-5 on the pre-activation stage2 of |x| ~ 25); TF vs HF here 2.3e-5.
    assert_outputs_close(dict(enumerate(maps)), dict(enumerate(expected)), atol=ATOL,
                         where="tf vs hf bit maps (scaled)", scale_by_magnitude=True)
    nhwc = ours(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), channels_last=True)
    for a, b in zip(nhwc, maps):
        np.testing.assert_array_equal(a.numpy().transpose(0, 3, 1, 2), b)


def test_gradient_wrt_pixels_matches_torch(folders):
    """The backbone's backward (autodiff through the standardised kernels and the group norms)."""
    name, x, labels = "ViTHybridForImageClassification", images(), np.array([1, 2])
    for layout in ("same", "preact"):
        pt, tfm = PT.load(name, folders[name, layout]), TF.load(name, folders[name, layout])
        xt = torch.from_numpy(x).requires_grad_(True)
        (expected,) = torch.autograd.grad(pt(xt, labels=torch.from_numpy(labels)).loss, xt)
        xv = tf.Variable(x)
        with tf.GradientTape() as tape:
            loss = tfm(xv, labels=labels, training=True).loss
        np.testing.assert_allclose(tape.gradient(loss, xv).numpy(), expected.numpy(), rtol=0,
                                   atol=GRAD_RTOL * float(expected.abs().max()), err_msg=layout)


# ----------------------------------------------------------------------------- weights, checkpoints
def test_build_creates_every_variable_without_a_forward_pass():
    for name in CLASSES:
        for layout in (SAME_DYNAMIC, PREACT_STATIC):
            model = getattr(vit_tf, f"TF{name}")(tiny_config(bit_config(**layout)))
            table = model.variables_by_name()
            assert list(table) == [s.name for s in param_specs(name, model.config)]
            assert len({id(v) for _, v in table.values()}) == len(table) == len(model.trainable_weights)
            for spec, var in table.values():  # Keras layouts of the canonical shapes
                assert tuple(var.shape) == to_kernel_layout(spec.kind, np.empty(spec.shape)).shape, spec.name


def test_save_pretrained_loads_in_hf(tmp_path):
    keras.utils.set_random_seed(0)
    tfm = vit_tf.TFViTHybridForImageClassification(tiny_config(bit_config(**PREACT_STATIC)))
    tfm.save_pretrained(tmp_path)
    inputs = {"pixel_values": images()}
    assert_outputs_close(
        TF.run(tfm, inputs), HF.run(HF.load("ViTHybridForImageClassification", tmp_path), inputs),
        atol=ATOL, where="tf vs hf [saved by tf]",
    )
    reloaded = TF.load("ViTHybridForImageClassification", tmp_path)
    assert_outputs_close(TF.run(reloaded, inputs), TF.run(tfm, inputs), atol=0.0)


def test_config_class_and_input_errors(folders):
    with pytest.raises(TypeError, match="config must be a ViTHybridConfig"):
        vit_tf.TFViTHybridModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=4))
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        vit_tf.TFViTModel(tiny_config())
    model = TF.load("ViTHybridModel", folders["ViTHybridModel", "same"])
    with pytest.raises(ValueError, match=r"Input image size \(64\*48\) doesn't match model \(64\*64\)"):
        model(images(w=48))
    with pytest.raises(ValueError, match="has 1 channels"):
        model(images(c=1))


# ----------------------------------------------------------------------------- drop path
def test_drop_path_per_sample_in_training_only():
    x = np.ones((64, 3, 2, 5), np.float32)
    layer = TFBitDropPath(0.25)
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
    y = layer(x, training=True).numpy()
    per_sample = y.reshape(64, -1)
    assert np.all(per_sample == per_sample[:, :1])  # a whole sample is kept or dropped
    assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}


def test_model_drop_path_identity_at_inference_active_in_training():
    keras.utils.set_random_seed(0)
    config = tiny_config(bit_config(drop_path_rate=0.5, depths=[2, 2, 2]))
    model = vit_tf.TFViTHybridModel(config)
    plain = vit_tf.TFViTHybridModel(tiny_config(bit_config(depths=[2, 2, 2])))
    for (_, src), (_, dst) in zip(model.variables_by_name().values(), plain.variables_by_name().values()):
        dst.assign(src)
    x = images(b=8)
    inference = model(x, training=False).last_hidden_state.numpy()
    np.testing.assert_array_equal(inference, plain(x).last_hidden_state.numpy())
    trained = model(x, training=True).last_hidden_state.numpy()
    assert np.abs(trained - inference).max() > 1e-2


# ----------------------------------------------------------------------------- keras: XLA, bf16, fit, .keras
def test_xla_jit_classifier_matches_eager():
    keras.utils.set_random_seed(0)  # small (compile time): 32 px, one unit per stage, one block
    config = tiny_config(bit_config(depths=[1, 1, 1]), image_size=32, num_hidden_layers=1)
    model = vit_tf.TFViTHybridForImageClassification(config)
    x, labels = images(h=32, w=32), np.array([1, 2])
    forward = tf.function(lambda x, y: model(x, labels=y, training=False, return_dict=False), jit_compile=True)
    (loss, logits), expected = forward(tf.constant(x), tf.constant(labels)), model(x, labels=labels)
    np.testing.assert_allclose(logits.numpy(), expected.logits.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(loss.numpy(), expected.loss.numpy(), atol=ATOL, rtol=0)


def test_mixed_bfloat16_close_to_float32(folders):
    folder = folders["ViTHybridForImageClassification", "same"]
    x = images()
    expected = TF.load("ViTHybridForImageClassification", folder)(x).logits.numpy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = TF.load("ViTHybridForImageClassification", folder)
        out = model(x, labels=np.array([0, 1]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.compute_dtype == "bfloat16" and {v.dtype for v in model.weights} == {"float32"}
    assert out.logits.dtype == "bfloat16" and out.loss.dtype == "float32"
    stem = model.vit.embeddings.patch_embeddings.backbone(x)[0]
    assert stem.dtype == "bfloat16"  # the backbone computes in bf16 too
    logits = out.logits.numpy().astype(np.float32)
    # bf16 rounds each conv / matmul input to 8 significant bits (2^-9 ≈ 2e-3 relative); the backbone adds
    # 13 convolutions before the 2 ViT blocks (GroupNorm, LayerNorm, softmax in fp32). Measured (CPU): 8.2e-4
    # here on logits of magnitude 0.19; 3.1e-3 at worst over 6 seeds × both layer types. Bound: 1e-2 ·
    # max(1, max|logits|), the ViT's bf16 bound, 3x the worst measurement, far below any real bug.
    diff = np.abs(logits - expected).max()
    assert np.all(np.isfinite(logits)) and diff <= 1e-2 * max(1.0, np.abs(expected).max()), diff


def test_fit_reduces_loss():
    # Tracing the train step dominates (~4 s): a small model, SGD (Adam's per-variable update graph doubles it).
    keras.utils.set_random_seed(0)
    model = vit_tf.TFViTHybridForImageClassification(tiny_config(bit_config(depths=[1, 1, 1]), image_size=32,
                                                                 num_hidden_layers=1))
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    rng = np.random.RandomState(0)
    x, y = rng.randn(8, 3, 32, 32).astype(np.float32), rng.randint(0, 3, size=8)
    ds = tf.data.Dataset.from_tensor_slices({"pixel_values": x, "labels": y}).batch(4)
    losses = model.fit(ds, epochs=10, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_keras_file_round_trip(tmp_path, folders):
    x = {"pixel_values": images()}
    for name in CLASSES:
        model = TF.load(name, folders[name, "preact"])
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        assert type(loaded) is type(model) and loaded.config == model.config
        assert_outputs_close(TF.run(loaded, x), TF.run(model, x), atol=0.0)
    stage = TFBitStage(BitConfig(**bit_config()), 1, name="stage")  # backbone layers serialize on their own
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(stage))
    assert type(clone) is TFBitStage and clone.config == stage.config and clone.stage_index == 1


@pytest.mark.parametrize("class_name", ["ViTForImageClassification", "ViTHybridForImageClassification"])
def test_gradient_checkpointing_gives_the_same_gradients(class_name, monkeypatch):
    """``gradient_checkpointing_enable`` recomputes each encoder layer (and BiT stage) in the backward pass:
    the same loss and gradients as storing the activations."""
    keras.utils.set_random_seed(0)
    if class_name.startswith("ViTHybrid"):
        config = tiny_config(bit_config(drop_path_rate=0.0))
    else:
        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=32, patch_size=8, num_labels=3)
    model = getattr(vit_tf, f"TF{class_name}")(config)
    x = tf.constant(images(h=config.image_hw[0], w=config.image_hw[1]))
    labels = tf.constant([0, 2])

    def grads() -> tuple[float, list[np.ndarray]]:
        with tf.GradientTape() as tape:
            loss = model(x, labels=labels, training=True).loss
        return float(loss), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]

    plain_loss, plain = grads()
    import vit_tf.modeling_tf_bit as bit_module
    import vit_tf.modeling_tf_vit as vit_module

    wrapped = []  # the rematerialised path must really be taken: count the wrapped blocks
    for module in (vit_module, bit_module):
        monkeypatch.setattr(module, "rematerialized", lambda fn, m=module.rematerialized: wrapped.append(fn) or m(fn))
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss, checkpointed = grads()
    expected_blocks = config.num_hidden_layers + (config.bit.num_stages if class_name.startswith("ViTHybrid") else 0)
    assert len(wrapped) == expected_blocks
    assert loss == pytest.approx(plain_loss, abs=ATOL)
    scale = max(float(np.abs(g).max()) for g in plain)
    for a, b in zip(checkpointed, plain):
        assert float(np.abs(a - b).max()) <= GRAD_RTOL * scale
