"""Flax-specific tests: parity with vit_torch from one saved folder, jit/grad, training, checkpoints.

The shared cross-framework suite (test_equivalence.py) uses ``frameworks_flax.FlaxAdapter`` too;
these tests cover what only Flax has (pure functions of params, remat, sharded training).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

import vit_flax  # noqa: E402
import vit_torch  # noqa: E402
from conftest import assert_outputs_close  # noqa: E402
from frameworks import TorchAdapter  # noqa: E402
from frameworks_flax import FlaxAdapter  # noqa: E402
from tolerances import GRAD_RTOL  # noqa: E402
from vit_core.checkpoint import read_checkpoint  # noqa: E402
from vit_core.config import SUPPORTED_ACTIVATIONS, ViTConfig  # noqa: E402
from vit_core.weights import Init, Kind, ParamSpec, to_kernel_layout  # noqa: E402

# XLA's default fp32 matmul precision may use fewer passes on accelerators; parity needs full fp32.
jax.config.update("jax_default_matmul_precision", "highest")

from settings import ATOL  # noqa: E402  (fp32, per device)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, encoder_stride=8, num_labels=3)
PT, FX = TorchAdapter(), FlaxAdapter()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(class_name, **config_overrides) -> folder`` written by vit_torch (seeded), cached."""
    cache: dict = {}

    def make(class_name: str, **overrides) -> Path:
        key = (class_name, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(0)
            model = getattr(vit_torch, class_name)(ViTConfig(**{**TINY, **overrides}))
            cache[key] = tmp_path_factory.mktemp(class_name)
            model.save_pretrained(cache[key])
        return cache[key]

    return make


def pixels(b: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 3, h, w)).astype(np.float32)


def both(folder: Path, class_name: str, inputs: dict, **kwargs) -> float:
    """Run torch and flax on the same folder and inputs; assert every output within ATOL; return max diff."""
    expected = PT.run(PT.load(class_name, folder), inputs, **kwargs)
    actual = FX.run(FX.load(class_name, folder), inputs, **kwargs)
    return assert_outputs_close(actual, expected, atol=ATOL, where=f"flax vs pt [{class_name}]")


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("class_name", ["ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling"])
def test_parity_all_outputs(saved, class_name):
    folder = saved(class_name)
    both(folder, class_name, {"pixel_values": pixels()})  # fused attention path
    both(folder, class_name, {"pixel_values": pixels()}, output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("shape", [(4,), (2, 4)])
def test_head_mask(saved, shape):
    mask = (np.random.default_rng(1).random(shape) > 0.4).astype(np.float32)
    both(saved("ViTModel"), "ViTModel", {"pixel_values": pixels(), "head_mask": mask}, output_attentions=True)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_interpolate_pos_encoding_non_square(saved, mode):
    folder = saved("ViTModel", interpolate_pos_mode=mode)
    both(folder, "ViTModel", {"pixel_values": pixels(h=48, w=24)}, interpolate_pos_encoding=True)


@pytest.mark.parametrize("act", [*SUPPORTED_ACTIVATIONS])
def test_activations(saved, act):
    both(saved("ViTModel", hidden_act=act, pooler_act=act if act != "gelu" else "tanh"), "ViTModel",
         {"pixel_values": pixels()})


@pytest.mark.parametrize(
    "overrides, labels",
    [
        ({"num_labels": 1}, np.array([0.5, -1.0], np.float32)),  # regression, num_labels == 1 squeeze
        ({}, np.array([2, -100], np.int64)),  # cross-entropy with ignore_index
        ({}, np.array([[1, 0, 1], [0, 0, 1]], np.float32)),  # multi-label BCE
    ],
    ids=["regression", "single_label", "multi_label"],
)
def test_classification_losses(saved, overrides, labels):
    both(saved("ViTForImageClassification", **overrides), "ViTForImageClassification",
         {"pixel_values": pixels(), "labels": labels})


def test_masked_image_modeling_loss(saved):
    mask = np.random.default_rng(2).random((2, 16)) > 0.5
    both(saved("ViTForMaskedImageModeling"), "ViTForMaskedImageModeling",
         {"pixel_values": pixels(), "bool_masked_pos": mask}, output_hidden_states=True)


def test_return_dict_false_is_complete_tuple(saved):
    model = FX.load("ViTModel", saved("ViTModel"))
    out = model(pixels(), output_attentions=True, output_hidden_states=True)
    tup = model(pixels(), output_attentions=True, output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 4 and len(tup[2]) == 3 and len(tup[3]) == 2
    np.testing.assert_array_equal(np.asarray(tup[0]), np.asarray(out.last_hidden_state))


@pytest.mark.parametrize(
    "class_name, kwargs",
    [
        ("ViTModel", {"pixel_values": pixels()[:, :2]}),  # wrong channels
        ("ViTModel", {"pixel_values": pixels(h=40)}),  # wrong size without interpolation
        ("ViTModel", {"pixel_values": pixels(), "bool_masked_pos": np.zeros((2, 16), bool)}),  # no mask token
        ("ViTModel", {"pixel_values": pixels(), "head_mask": np.ones((3, 4), np.float32)}),
        ("ViTForMaskedImageModeling", {"pixel_values": pixels(), "bool_masked_pos": np.zeros((2, 15), bool)}),
    ],
)
def test_errors_match_torch(saved, class_name, kwargs):
    folder = saved(class_name)
    with pytest.raises(ValueError) as pt_err:
        PT.run(PT.load(class_name, folder), kwargs)
    with pytest.raises(ValueError) as fx_err:
        FX.run(FX.load(class_name, folder), kwargs)
    assert str(fx_err.value).split("(")[0] == str(pt_err.value).split("(")[0]


def test_not_4d_error(saved):
    # (vit_torch fails earlier with an unpacking ValueError here; reported to the lead)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, channels, height, width\)"):
        FX.load("ViTModel", saved("ViTModel"))(pixels()[0])


def test_unknown_input_keyword_is_a_type_error(saved):
    model = FX.load("ViTForImageClassification", saved("ViTForImageClassification"))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['bool_masked_pos'\]"):
        model(pixels(), bool_masked_pos=np.zeros((2, 16), bool))


def test_linen_module_checks_name_the_nchw_shape():
    """The modules validate (once, with vit_core.checks) also when applied directly on NHWC input."""
    module = vit_flax.FlaxViTModel(ViTConfig(**TINY), _do_init=False).module
    x = jnp.zeros((2, 32, 32, 2))  # NHWC with 2 channels
    with pytest.raises(ValueError, match=r"pixel_values has 2 channels \(shape \(2, 2, 32, 32\)\)"):
        jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)


def test_mim_stride_error(saved):
    folder = saved("ViTForMaskedImageModeling", encoder_stride=4)
    model = FX.load("ViTForMaskedImageModeling", folder)
    with pytest.raises(ValueError, match="patch_size` must be equal to `encoder_stride"):
        model(pixels(), bool_masked_pos=np.zeros((2, 16), bool))


# ------------------------------------------------------------------------------------- weights
def test_param_tree_is_the_table_and_init_like_hf():
    config = ViTConfig(**{**TINY, "intermediate_size": 256})
    params = vit_flax.FlaxViTForMaskedImageModeling(config, seed=3).params  # checks tree == table on init
    layer0 = params["vit"]["encoder"]["layer_0"]
    assert layer0["attention"]["attention"]["query"]["kernel"].shape == (32, 32)
    assert params["decoder_0"]["kernel"].shape == (1, 1, 32, 8 * 8 * 3)
    spec = ParamSpec("vit.encoder.layer.1.layernorm_after.weight", (32,), Kind.NORM_WEIGHT, Init.ONES)
    assert vit_flax.param_path(spec) == ("vit", "encoder", "layer_1", "layernorm_after", "scale")
    kernel = np.asarray(layer0["intermediate"]["dense"]["kernel"])  # trunc-normal, std initializer_range
    assert abs(kernel.std() - config.initializer_range) < 1e-3 and abs(kernel.mean()) < 1e-3
    norm = params["vit"]["layernorm"]
    assert not np.asarray(norm["bias"]).any() and (np.asarray(norm["scale"]) == 1).all()
    assert not np.asarray(params["vit"]["embeddings"]["mask_token"]).any()


def test_save_pretrained_loads_in_torch(saved, tmp_path):
    folder = saved("ViTForImageClassification")
    flax_model = FX.load("ViTForImageClassification", folder)
    params = jax.tree_util.tree_map(lambda p: p + 0.01, flax_model.params)  # differ from the source checkpoint
    flax_model.save_pretrained(tmp_path / "out", params=params)
    flax_model.params = params
    inputs = {"pixel_values": pixels()}
    expected = FX.run(flax_model, inputs)
    assert_outputs_close(PT.run(PT.load("ViTForImageClassification", tmp_path / "out"), inputs), expected, atol=ATOL,
                         where="pt vs flax [saved by flax]")
    # bf16 params save as BF16 and read back exactly
    flax_model.save_pretrained(tmp_path / "bf16", params=flax_model.to_bf16(params))
    back = vit_flax.FlaxViTForImageClassification.from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(back.params["classifier"]["kernel"]),
                                  np.asarray(params["classifier"]["kernel"].astype(jnp.bfloat16)).astype(np.float32))


def test_bf16_compute_with_fp32_params(saved):
    folder, x, y = _classifier_and_batch(saved)
    fp32 = FX.load("ViTForImageClassification", folder)
    bf16 = vit_flax.FlaxViTForImageClassification.from_pretrained(folder, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree_util.tree_leaves(bf16.params)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lambda p: bf16(x, params=p, labels=y))(bf16.params)
    assert out.logits.dtype == jnp.bfloat16
    ref = np.asarray(fp32(x).logits)
    # bf16 keeps 8 mantissa bits (rel. step 2**-8 ≈ 0.4%); over 2 layers the rounding of activations
    # accumulates to ~1% of the logits' scale here, so 5% of max|logit| is loose but catches a wrong path.
    assert np.abs(np.asarray(out.logits, np.float32) - ref).max() <= 5e-2 * np.abs(ref).max()
    grads = jax.jit(jax.grad(lambda p: bf16(x, params=p, labels=y).loss.astype(jnp.float32)))(bf16.params)
    assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}  # master params stay fp32


def test_scan_layers_same_checkpoint_same_numbers(saved, tmp_path):
    """scan_layers=True stacks params per layer (nn.scan) but loads / saves the same canonical table exactly."""
    folder = saved("ViTForImageClassification", num_hidden_layers=3)
    plain = FX.load("ViTForImageClassification", folder)
    scan = vit_flax.FlaxViTForImageClassification.from_pretrained(folder, scan_layers=True)
    assert "layer_0" not in scan.params["vit"]["encoder"]
    assert scan.params["vit"]["encoder"]["layer"]["attention"]["attention"]["query"]["kernel"].shape == (3, 32, 32)
    head_mask = (np.random.default_rng(1).random((3, 4)) > 0.4).astype(np.float32)
    inputs = {"pixel_values": pixels(), "labels": np.array([0, 2], np.int64), "head_mask": head_mask}
    kw = dict(output_attentions=True, output_hidden_states=True)
    # same params; scanned vs unrolled XLA programs may round differently at the 1e-8 level
    assert_outputs_close(FX.run(scan, inputs, **kw), FX.run(plain, inputs, **kw), atol=1e-6, where="scan vs unrolled")
    scan.save_pretrained(tmp_path / "scan")
    src, out = read_checkpoint(folder), read_checkpoint(tmp_path / "scan")
    assert sorted(src) == sorted(out)
    for name in src:
        np.testing.assert_array_equal(out[name], src[name], err_msg=name)  # bit-exact round trip
    x, y = inputs["pixel_values"], inputs["labels"]
    remat = vit_flax.FlaxViTForImageClassification.from_pretrained(folder, scan_layers=True,
                                                                   gradient_checkpointing=True)
    g_scan = jax.jit(jax.grad(lambda p: remat(x, params=p, labels=y).loss))(remat.params)
    g_plain = jax.jit(jax.grad(lambda p: plain(x, params=p, labels=y).loss))(plain.params)
    g_scan = vit_flax.modeling_flax_utils.unstack_layers(g_scan, 3)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), g_scan, g_plain)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-6


def test_scan_layers_class_token_only_same_contract(saved):
    """With scanned layers every token is computed, but class_token_only still returns (B, 1, D)."""
    folder = saved("ViTModel", num_hidden_layers=3)
    plain = FX.load("ViTModel", folder)
    scan = vit_flax.FlaxViTModel.from_pretrained(folder, scan_layers=True)
    x = pixels()
    short = scan(x, class_token_only=True)
    assert short.last_hidden_state.shape == (2, 1, 32)
    assert_outputs_close({"last_hidden_state": np.asarray(short.last_hidden_state)},
                         {"last_hidden_state": np.asarray(plain(x).last_hidden_state)[:, :1]}, atol=1e-6,
                         where="scan vs unrolled [class_token_only]")


def test_load_backbone_into_head_reports_missing(saved):
    with pytest.warns(UserWarning, match="newly initialised"):
        _, info = vit_flax.FlaxViTForImageClassification.from_pretrained(saved("ViTModel"), output_loading_info=True)
    assert info["missing_keys"] == ["classifier.weight", "classifier.bias"]
    assert "pooler.dense.weight" in info["unexpected_keys"]


# ------------------------------------------------------------------------ functional transforms
def _classifier_and_batch(saved):
    folder = saved("ViTForImageClassification")
    return folder, pixels(), np.array([0, 2], np.int64)


def test_jit_and_input_grad_vs_torch(saved):
    folder, x, y = _classifier_and_batch(saved)
    model = FX.load("ViTForImageClassification", folder)
    eager = model(x, labels=y)
    jitted = jax.jit(lambda p, x, y: model(x, params=p, labels=y))(model.params, x, y)
    assert_outputs_close(FX.run(model, {"pixel_values": x, "labels": y}),
                         {k: np.asarray(v) for k, v in jitted.items()}, atol=1e-6, where="flax eager vs jit [jit]")
    assert float(jitted.loss) == pytest.approx(float(eager.loss), abs=1e-6)
    grad = jax.jit(jax.grad(lambda x: model(x, labels=y).loss))(jnp.asarray(x))

    tm = PT.load("ViTForImageClassification", folder)
    tx = torch.from_numpy(x).requires_grad_(True)
    tm(tx, labels=torch.from_numpy(y)).loss.backward()
    ref = tx.grad.numpy()
    assert np.abs(np.asarray(grad) - ref).max() <= GRAD_RTOL * np.abs(ref).max()


def test_sgd_step_vs_torch(saved):
    folder, x, y = _classifier_and_batch(saved)
    lr = 0.1
    model = FX.load("ViTForImageClassification", folder)
    grads = jax.jit(jax.grad(lambda p: model(x, params=p, labels=y).loss))(model.params)
    new_params = jax.tree_util.tree_map(lambda p, g: p - lr * g, model.params, grads)

    tm = PT.load("ViTForImageClassification", folder).train()
    opt = torch.optim.SGD(tm.parameters(), lr=lr)
    tm(torch.from_numpy(x), labels=torch.from_numpy(y)).loss.backward()
    opt.step()
    flax_tensors = {s.name: np.asarray(vit_flax.modeling_flax_utils._get(new_params, vit_flax.param_path(s)))
                    for s in model.param_specs()}
    for spec in model.param_specs():
        ref = to_kernel_layout(spec.kind, tm.state_dict()[spec.name].numpy())
        assert np.abs(flax_tensors[spec.name] - ref).max() <= ATOL, spec.name


@pytest.mark.parametrize("queries", [5, 1])  # 1: the class-token-only last block
def test_attention_paths_agree_with_autodiff(queries):
    """The CPU attention core (hand-written backward) and the jax.nn.dot_product_attention branch used
    on other platforms give autodiff's explicit softmax attention, forward and gradients. Both branches
    run here on CPU, so the one the suite's CPU runs do not take is still checked."""
    from vit_flax.modeling_flax_vit import _dot_product_attention, attention_core

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (2, 3, queries, 8))
    k, v = (jax.random.normal(key, (2, 3, 5, 8)) for key in keys[1:3])
    probe = jax.random.normal(keys[3], (2, 3, queries, 8))
    scale = 8**-0.5

    def explicit(q, k, v, scale):
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale, -1), v)

    def value_and_grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, scale)) * probe)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    ref_loss, ref_grads = value_and_grads(explicit)
    for name, fn in (("core", attention_core), ("dot_product_attention", _dot_product_attention)):
        loss, grads = value_and_grads(fn)
        assert abs(float(loss) - float(ref_loss)) <= ATOL, name
        for label, g, r in zip("qkv", grads, ref_grads):
            assert float(jnp.abs(g - r).max()) <= ATOL, f"{name} d/d{label}"


def test_hand_written_backwards_agree_with_autodiff():
    """GELU (erf recomputed in the backward), the dense layer (kernel and bias gradients on one 2-D
    view) and the patch projection (a convolution as one matmul) against autodiff of the plain
    formulas / ``jax.lax.conv``, forward and every gradient, on 3-D inputs as the model feeds them."""
    from vit_flax.modeling_flax_utils import ACT2FN
    from vit_flax.modeling_flax_vit import FlaxViTDense, FlaxViTPatchProjection

    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    x = 3.0 * jax.random.normal(keys[0], (2, 7, 6))  # |x| up to ~9: both tails of erf
    probe = jax.random.normal(keys[1], (2, 7, 6))
    gelu = lambda x: 0.5 * x * (1.0 + jax.lax.erf(x / jnp.sqrt(2.0)))  # noqa: E731
    assert float(jnp.abs(ACT2FN["gelu"](x) - gelu(x)).max()) <= ATOL
    got, ref = (jax.grad(lambda x, f=f: jnp.sum(f(x) * probe))(x) for f in (ACT2FN["gelu"], gelu))
    assert float(jnp.abs(got - ref).max()) <= ATOL, "gelu"

    dense = FlaxViTDense(5)
    params = dense.init(keys[2], x)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(keys[3], p.shape), params)
    plain = lambda p, x: x @ p["params"]["kernel"] + p["params"]["bias"]  # noqa: E731
    out_probe = jax.random.normal(keys[4], (2, 7, 5))
    for argnums in (0, 1):
        got = jax.grad(lambda p, x: jnp.sum(jnp.sin(dense.apply(p, x)) * out_probe), argnums)(params, x)
        ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(plain(p, x)) * out_probe), argnums)(params, x)
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            assert float(jnp.abs(g - r).max()) <= ATOL, f"dense d/d{'params' if argnums == 0 else 'x'}"

    proj = FlaxViTPatchProjection(4, patch_size=3)
    pixels = jax.random.normal(keys[5], (2, 7, 10, 3))  # 7×10: VALID drops the last row / column
    params = proj.init(keys[2], pixels)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(keys[3], p.shape), params)

    def conv(p: dict, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x, p["params"]["kernel"], (3, 3), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
        return (y + p["params"]["bias"]).reshape(2, -1, 4)

    patch_probe = jax.random.normal(keys[4], (2, 6, 4))
    assert float(jnp.abs(proj.apply(params, pixels) - conv(params, pixels)).max()) <= ATOL
    got, ref = (jax.grad(lambda p, f=f: jnp.sum(jnp.sin(f(p, pixels)) * patch_probe))(params)
                for f in (proj.apply, conv))
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        assert float(jnp.abs(g - r).max()) <= ATOL, "patch projection d/dparams"


def test_gradient_checkpointing_same_grads(saved):
    folder, x, y = _classifier_and_batch(saved)
    plain = FX.load("ViTForImageClassification", folder)
    remat = vit_flax.FlaxViTForImageClassification.from_pretrained(folder, gradient_checkpointing=True)
    loss = lambda m: jax.jit(jax.grad(lambda p: m(x, params=p, labels=y).loss))(m.params)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(lambda p: remat(x, params=p, labels=y).loss)(remat.params))
    assert len(re.findall(r"\b(?:remat\d*|checkpoint)\[", jaxpr)) == 2  # one rematerialised block per layer
    g1, g2 = loss(plain), loss(remat)
    plain.enable_gradient_checkpointing()
    assert plain.module.gradient_checkpointing
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), g1, g2)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-6


def test_dropout_train_mode(saved):
    folder = saved("ViTModel", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = FX.load("ViTModel", folder)
    x = pixels()
    a = model(x, train=True, dropout_rng=jax.random.PRNGKey(0)).last_hidden_state
    b = model(x, train=True, dropout_rng=jax.random.PRNGKey(0)).last_hidden_state
    c = model(x).last_hidden_state
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


_DATA_PARALLEL = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh
jax.config.update("jax_default_matmul_precision", "highest")
import vit_flax
from vit_flax.training import make_train_step, replicate, shard_batch
assert jax.device_count() == 8, jax.devices()
model = vit_flax.FlaxViTForImageClassification.from_pretrained(sys.argv[1])
rng = np.random.default_rng(0)
batch = {"pixel_values": rng.standard_normal((16, 3, 32, 32)).astype(np.float32),
         "labels": rng.integers(0, 3, 16)}
# Adam's first update is lr * g / (|g| + eps): an entry whose gradient is near eps (1e-8) turns a
# 1e-9 summation-order difference into ~lr/40. lr=1e-4 bounds that at ~2.5e-6 < 1e-5, while an
# unsynchronised (wrong) gradient would still move params by up to 2*lr = 2e-4 and fail.
tx = optax.adamw(1e-4)
p1, _, l1 = make_train_step(model, tx)(model.params, tx.init(model.params), batch)
mesh = Mesh(np.array(jax.devices()), ("data",))
params = replicate(model.params, mesh)
assert len(jax.tree_util.tree_leaves(params)[0].sharding.device_set) == 8
p8, _, l8 = make_train_step(model, tx, mesh)(params, replicate(tx.init(model.params), mesh), shard_batch(batch, mesh))
diff = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), p1, p8)))
changed = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), p1,
                                                               model.params)))
print(json.dumps({"loss_diff": abs(float(l1) - float(l8)), "param_diff": diff, "changed": changed,
                  "batch_sharded": len(shard_batch(batch, mesh)["pixel_values"].sharding.device_set)}))
"""


def test_data_parallel_train_step_matches_single_device(saved):
    folder = saved("ViTForImageClassification")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_DATA_PARALLEL), str(folder)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["batch_sharded"] == 8 and result["changed"] > 5e-5
    assert result["loss_diff"] <= ATOL and result["param_diff"] <= ATOL, result
