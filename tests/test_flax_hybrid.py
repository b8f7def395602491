"""Flax hybrid ViT (BiT backbone): parity with HF 4.x ViTHybrid and BitBackbone (the test oracle), with
vit_torch where HF is wrong (interpolate_pos_encoding), and what only Flax has: jit, grad, remat,
scan_layers, bf16 compute, drop path from the ``dropout`` rng, the optax train step, the param tree.

The shared suite (test_hybrid_equivalence.py) runs the broad case matrix through ``FlaxAdapter``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import vit_flax  # noqa: E402
import vit_torch  # noqa: E402
from conftest import assert_outputs_close  # noqa: E402
from frameworks import HFTorchAdapter, TorchAdapter, _patch_hf_hybrid_init  # noqa: E402
from frameworks_flax import FlaxAdapter  # noqa: E402
from settings import ATOL  # noqa: E402  (fp32, per device)
from test_equivalence import _randomise  # noqa: E402
from tolerances import GRAD_RTOL, HYBRID_SCALE_BY_MAGNITUDE  # noqa: E402
from vit_core.checkpoint import read_checkpoint  # noqa: E402
from vit_core.config import ViTConfig  # noqa: E402
from vit_core.config_hybrid import BitConfig, ViTHybridConfig  # noqa: E402
from vit_core.weights import bit_specs, to_kernel_layout  # noqa: E402
from vit_flax.modeling_flax_bit import FlaxBitBackbone, FlaxBitDropPath  # noqa: E402
from vit_flax.modeling_flax_utils import _get, _set, unstack_layers  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

#: 3 stages after the stem (strides 4, 4, 8, 16): a 48-px image gives a 3×3 token grid.
BIT = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4, layer_type="bottleneck",
           global_padding="SAME", embedding_dynamic_padding=True)
PREACT = dict(layer_type="preactivation", global_padding=None, embedding_dynamic_padding=False)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=48,
            num_labels=3)
MODEL, CLS = "ViTHybridModel", "ViTHybridForImageClassification"
ALL_OUT = dict(output_attentions=True, output_hidden_states=True)
HF, PT, FX = HFTorchAdapter(), TorchAdapter(), FlaxAdapter()


def tiny(bit: dict | None = None, **vit) -> ViTHybridConfig:
    return ViTHybridConfig(**{**TINY, **vit}, backbone_config={**BIT, **(bit or {})})


def pixels(b: int = 2, h: int = 48, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, 3, h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(class_name, writer, bit=None, **vit) -> folder``: a randomised checkpoint written by HF
    (``writer="hf"``, independent of trivit) or vit_torch (``"pt"``), cached per module."""
    cache: dict = {}

    def make(class_name: str, writer: str = "hf", bit: dict | None = None, **vit):
        key = (class_name, writer, tuple(sorted((bit or {}).items())), tuple(sorted(vit.items())))
        if key not in cache:
            config = tiny(bit, **vit)
            torch.manual_seed(0)
            if writer == "hf":
                _patch_hf_hybrid_init()
                model = getattr(transformers, class_name)(transformers.ViTHybridConfig.from_dict(config.to_dict()))
            else:
                model = getattr(vit_torch, class_name)(config)
            _randomise(model, 0)
            cache[key] = tmp_path_factory.mktemp(f"{class_name}-{writer}")
            model.save_pretrained(cache[key])
        return cache[key]

    return make


def assert_close(actual: dict, expected: dict, where: str) -> None:
    """The hybrid's bound (tolerances.HYBRID_SCALE_BY_MAGNITUDE: ATOL scaled by the magnitude of the BiT's
    O(10) maps and tokens, with the measurements), and ATOL absolute on the unit-scale outputs (pooler,
    logits, loss, attention probabilities), which that scaling would loosen."""
    assert_outputs_close(actual, expected, where=where, scale_by_magnitude=HYBRID_SCALE_BY_MAGNITUDE)
    bounded = [k for k in ("pooler_output", "logits", "loss", "attentions") if k in expected]
    if bounded:
        assert_outputs_close({k: actual[k] for k in bounded}, {k: expected[k] for k in bounded}, atol=ATOL,
                             where=where.replace(" [", ", unit-scale outputs ["))


# ------------------------------------------------------------------------------ parity with HF 4.x
@pytest.mark.parametrize(
    "class_name, bit, inputs",
    [
        (MODEL, {}, {}),  # bottleneck, SAME padding, dynamic (zero-padded) stem pool
        (MODEL, PREACT, {}),  # pre-activation, symmetric static padding, unpadded stem pool
        (CLS, {}, {"labels": np.array([2, -100])}),  # the classifier with labels (cross-entropy, ignore_index)
    ],
    ids=["bottleneck-same-dynamic", "preact-none-static", "classifier-labels"],
)
def test_every_output_matches_hf(saved, class_name, bit, inputs, request):
    folder = saved(class_name, "hf", bit)
    inputs = {"pixel_values": pixels(), **inputs}
    expected = HF.run(HF.load(class_name, folder), inputs, **ALL_OUT)
    actual = FX.run(FX.load(class_name, folder), inputs, **ALL_OUT)
    assert_close(actual, expected, where=f"flax hybrid vs hf {request.node.callspec.id} [every output]")


@pytest.mark.parametrize("layer", ["bottleneck", "preactivation"])
def test_backbone_feature_maps_match_hf_bit_backbone(layer):
    """FlaxBitBackbone with out_features ["stage1", "stage2"] against HF's BitBackbone, from HF's own
    state_dict through the canonical names (``bit_specs``) and the layout rule."""
    config = BitConfig.from_dict({**BIT, **(PREACT if layer == "preactivation" else {}),
                                  "out_features": ["stage1", "stage2"]})
    hf_fields = {k: v for k, v in config.to_dict().items() if k not in ("stage_names", "model_type")}
    torch.manual_seed(0)
    hf = transformers.BitBackbone(transformers.BitConfig(**hf_fields)).eval()
    _randomise(hf, 1)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    specs = bit_specs(config, prefix="bit.")
    assert [s.name for s in specs] == list(state)
    params: dict = {}
    for spec in specs:
        _set(params, vit_flax.param_path(spec), jnp.asarray(to_kernel_layout(spec.kind, state[spec.name])))
    x = pixels(h=48, w=40)  # non-square: both axes' padding rules
    with torch.no_grad():
        expected = tuple(m.numpy() for m in hf(torch.from_numpy(x)).feature_maps)
    maps = FlaxBitBackbone(config).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    actual = tuple(np.asarray(m).transpose(0, 3, 1, 2) for m in maps)
    assert [m.shape for m in actual] == [(2, 32, 12, 10), (2, 64, 6, 5)]
    assert_close({"feature_maps": actual}, {"feature_maps": expected},
                 where=f"flax bit backbone vs hf {layer} [feature maps]")


def test_interpolate_pos_encoding_non_square_vs_torch(saved):
    """HF's hybrid resizes to a pixel grid (wrong); vit_torch resizes the feature grid, as flax must."""
    folder = saved(CLS, "pt")
    inputs = {"pixel_values": pixels(h=64, w=32), "labels": np.array([0, 2])}
    expected = PT.run(PT.load(CLS, folder), inputs, interpolate_pos_encoding=True, **ALL_OUT)
    actual = FX.run(FX.load(CLS, folder), inputs, interpolate_pos_encoding=True, **ALL_OUT)
    assert_close(actual, expected, where="flax hybrid vs pt interpolate 64x32 [every output]")
    assert len(actual["hidden_states"]) == 3 and actual["hidden_states"][0].shape == (2, 4 * 2 + 1, 32)


def test_errors_match_torch(saved):
    folder = saved(MODEL, "pt")
    for kwargs in ({"pixel_values": pixels()[:, :2]}, {"pixel_values": pixels(h=40)},
                   {"pixel_values": pixels(), "bool_masked_pos": np.zeros((2, 9), bool)}):
        with pytest.raises(ValueError) as pt_err:
            PT.run(PT.load(MODEL, folder), kwargs)
        with pytest.raises(ValueError) as fx_err:
            FX.run(FX.load(MODEL, folder), kwargs)
        assert str(fx_err.value).split("(")[0] == str(pt_err.value).split("(")[0]
    with pytest.raises(TypeError, match="config must be a ViTHybridConfig, got ViTConfig"):
        vit_flax.FlaxViTHybridModel(ViTConfig(), _do_init=False)
    with pytest.raises(TypeError, match="config must be a ViTConfig, got ViTHybridConfig"):
        vit_flax.FlaxViTModel(tiny(), _do_init=False)


# ------------------------------------------------------------------------------------------- weights
def test_param_tree_is_the_table_and_saves_for_torch(saved, tmp_path):
    model = vit_flax.FlaxViTHybridForImageClassification(tiny(PREACT), _do_init=False)
    model._check_tree(model.input_shape)  # what init and from_pretrained check: the module's tree is the table
    params = jax.eval_shape(model._init_table, jax.random.PRNGKey(0))  # the table's tree, in Flax layouts
    bit = params["vit"]["embeddings"]["patch_embeddings"]["backbone"]["bit"]
    assert bit["embedder"]["convolution"]["kernel"].shape == (7, 7, 3, 16)
    assert bit["encoder"]["stages_1"]["layers_1"]["conv2"]["kernel"].shape == (3, 3, 16, 16)
    assert bit["encoder"]["stages_0"]["layers_0"]["norm1"]["scale"].shape == (16,)
    assert bit["norm"]["scale"].shape == (128,)  # the pre-activation final norm: in the checkpoint, never applied
    assert params["vit"]["embeddings"]["patch_embeddings"]["projection"]["kernel"].shape == (1, 1, 128, 32)

    folder = saved(CLS, "pt")
    model = FX.load(CLS, folder)
    model.params = jax.tree_util.tree_map(lambda p: p + 0.01, model.params)  # differ from the source checkpoint
    model.save_pretrained(tmp_path / "out")
    inputs = {"pixel_values": pixels(), "labels": np.array([1, 0])}
    assert_close(PT.run(PT.load(CLS, tmp_path / "out"), inputs), FX.run(model, inputs),
                 where="pt vs flax hybrid saved by flax [every output]")
    src, out = read_checkpoint(folder), read_checkpoint(tmp_path / "out")
    assert list(src) == list(out)
    name = "vit.embeddings.patch_embeddings.backbone.bit.encoder.stages.0.layers.0.conv2.weight"
    np.testing.assert_array_equal(out[name], src[name] + np.float32(0.01))


# ------------------------------------------------------------------------------ functional transforms
X, Y = pixels(), np.array([0, 2])


def _loss_grads(model, **flags):
    """jit(value_and_grad) of the classifier's loss on (X, Y): ((loss, outputs), grads)."""
    def loss(p):
        out = model(X, params=p, labels=Y, **flags)
        return out.loss, out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(model.params)


@pytest.fixture(scope="module")
def reference_grads(saved):
    """(folder, gradients of the unrolled fp32 classifier saved by vit_torch), compiled once for the module."""
    folder = saved(CLS, "pt")
    return folder, _loss_grads(FX.load(CLS, folder))[1]


def _max_diff(a, b) -> float:
    return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


def _max_abs(tree) -> float:
    return max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(tree))


def test_jit_and_gradients_vs_hf(saved):
    """jit gives the eager numbers; d(loss)/d(pixels) and d(loss)/d(every param) equal HF's autograd."""
    folder = saved(CLS, "hf", PREACT)
    model = FX.load(CLS, folder)

    def loss(p, x):
        out = model(x, params=p, labels=Y)
        return out.loss, out.logits

    (value, logits), (g_p, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(model.params, X)
    eager = model(X, labels=Y)
    assert_outputs_close({"loss": np.asarray(value), "logits": np.asarray(logits)},
                         {"loss": np.asarray(eager.loss), "logits": np.asarray(eager.logits)}, atol=1e-6,
                         where="flax eager vs jit")

    hf = HF.load(CLS, folder)
    device = next(hf.parameters()).device
    tx = torch.from_numpy(X).to(device).requires_grad_(True)
    hf(tx, labels=torch.from_numpy(Y).to(device)).loss.backward()
    ref = {n: p.grad.cpu() for n, p in hf.named_parameters() if p.grad is not None}
    assert set(ref) == {s.name for s in model.param_specs()} - {
        "vit.embeddings.patch_embeddings.backbone.bit.norm.weight",
        "vit.embeddings.patch_embeddings.backbone.bit.norm.bias"}  # the final norm never reaches the features
    scale = max(float(g.abs().max()) for g in ref.values())  # GRAD_RTOL: relative to the largest entry
    for spec in model.param_specs():
        got = np.asarray(_get(g_p, vit_flax.param_path(spec)))
        want = to_kernel_layout(spec.kind, ref[spec.name].numpy()) if spec.name in ref else np.zeros_like(got)
        assert np.abs(got - want).max() <= GRAD_RTOL * scale, spec.name
    ref_x = tx.grad.cpu().numpy()
    assert np.abs(np.asarray(g_x) - ref_x).max() <= GRAD_RTOL * np.abs(ref_x).max()


def test_gradient_checkpointing_same_outputs_and_grads(reference_grads):
    folder, ref = reference_grads
    remat = vit_flax.FlaxViTHybridForImageClassification.from_pretrained(folder, gradient_checkpointing=True)
    jaxpr = str(jax.make_jaxpr(lambda p: remat(X, params=p, labels=Y).loss)(remat.params))
    assert len(re.findall(r"\b(?:remat\d*|checkpoint)\[", jaxpr)) == 3 + 2  # each BiT stage, each encoder layer
    (_, out), grads = _loss_grads(remat)
    plain = FX.load(CLS, folder)
    assert np.abs(np.asarray(out.logits) - np.asarray(plain(X).logits)).max() <= 1e-6
    # same math, rematerialised: only XLA's fusion (rounding order) differs (measured 6e-7 of the largest gradient)
    assert _max_diff(grads, ref) <= 1e-5 * _max_abs(ref)


def test_scan_layers_same_checkpoint_same_numbers(reference_grads, tmp_path):
    """The ViT layers scan (stacked params), the BiT stays unrolled; the checkpoint is unchanged."""
    folder, ref = reference_grads
    plain = FX.load(CLS, folder)
    scan = vit_flax.FlaxViTHybridForImageClassification.from_pretrained(folder, scan_layers=True)
    assert scan.params["vit"]["encoder"]["layer"]["output"]["dense"]["kernel"].shape == (2, 37, 32)
    assert "layers_0" in scan.params["vit"]["embeddings"]["patch_embeddings"]["backbone"]["bit"]["encoder"]["stages_0"]
    inputs = {"pixel_values": X, "labels": Y}
    # same params; scanned vs unrolled XLA programs may round differently at the 1e-8 level
    assert_outputs_close(FX.run(scan, inputs, **ALL_OUT), FX.run(plain, inputs, **ALL_OUT), atol=1e-6,
                         where="flax hybrid scan vs unrolled")
    # another XLA program for the same math: measured 1.0e-6 of the largest gradient (a BiT stem-side kernel,
    # whose cotangent has passed every GroupNorm and standardisation backward)
    assert _max_diff(unstack_layers(_loss_grads(scan)[1], 2), ref) <= 1e-5 * _max_abs(ref)
    scan.save_pretrained(tmp_path / "scan")
    src, out = read_checkpoint(folder), read_checkpoint(tmp_path / "scan")
    assert list(src) == list(out)
    for name in src:
        np.testing.assert_array_equal(out[name], src[name], err_msg=name)  # bit-exact round trip


def test_bf16_compute_close_to_fp32(reference_grads):
    folder, _ = reference_grads
    fp32 = FX.load(CLS, folder)
    bf16 = vit_flax.FlaxViTHybridForImageClassification.from_pretrained(folder, dtype=jnp.bfloat16)
    (_, out), grads = _loss_grads(bf16, output_hidden_states=True)
    assert out.logits.dtype == jnp.bfloat16 and out.hidden_states[0].dtype == jnp.bfloat16
    ref = np.asarray(fp32(X).logits)
    # bf16 keeps 8 mantissa bits (relative step 2**-8 ≈ 0.4%); through 16 convs, 16 GroupNorms and 2 layers the
    # rounding of activations reaches 1.8% of max|logit| here (measured); 5% catches a wrong path (a skipped
    # norm or a mis-cast branch moves logits by their own scale). GroupNorm statistics and the kernel
    # standardisation stay fp32.
    assert np.abs(np.asarray(out.logits, np.float32) - ref).max() <= 5e-2 * np.abs(ref).max()
    assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}  # fp32 master params


def test_drop_path_in_training(saved):
    """Stochastic depth per sample from the ``dropout`` rng in training; off in evaluation."""
    drop = FlaxBitDropPath(0.5)
    x = jnp.ones((64, 2, 2, 3))
    y = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
    kept = y[:, 0, 0, 0] != 0
    assert set(np.unique(y)) == {0.0, 2.0} and (y == y[:, :1, :1, :1]).all()  # whole samples, scaled 1/keep
    assert 16 < kept.sum() < 48
    np.testing.assert_array_equal(np.asarray(drop.apply({}, x)), np.asarray(x))

    folder = saved(CLS, "pt", {"drop_path_rate": 0.5})
    model = FX.load(CLS, folder)
    inputs = {"pixel_values": X}
    assert_close(FX.run(model, inputs), PT.run(PT.load(CLS, folder), inputs),
                 where="flax hybrid vs pt drop-path eval [every output]")
    a = model(inputs["pixel_values"], train=True, dropout_rng=jax.random.PRNGKey(0)).logits
    b = model(inputs["pixel_values"], train=True, dropout_rng=jax.random.PRNGKey(0)).logits
    c = model(inputs["pixel_values"], train=True, dropout_rng=jax.random.PRNGKey(1)).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(model(inputs["pixel_values"]).logits)).max() > 1e-3


def test_train_step_equals_torch_sgd_step(saved):
    """vit_flax.training's jitted optax step on the hybrid classifier = one torch SGD step of vit_torch."""
    import optax

    from vit_flax.training import make_train_step

    folder = saved(CLS, "pt")
    lr, x, y = 0.1, X, Y
    model = FX.load(CLS, folder)
    tx = optax.sgd(lr)
    step = make_train_step(model, tx)
    params, opt_state, loss = step(model.params, tx.init(model.params), {"pixel_values": x, "labels": y})

    tm = PT.load(CLS, folder).train()
    device = next(tm.parameters()).device
    opt = torch.optim.SGD(tm.parameters(), lr=lr)
    ref_loss = tm(torch.from_numpy(x).to(device), labels=torch.from_numpy(y).to(device)).loss
    ref_loss.backward()
    opt.step()
    assert abs(float(loss) - ref_loss.item()) <= ATOL
    state = tm.state_dict()
    for spec in model.param_specs():
        ref = to_kernel_layout(spec.kind, state[spec.name].cpu().numpy())
        assert np.abs(np.asarray(_get(params, vit_flax.param_path(spec))) - ref).max() <= ATOL, spec.name
    _, _, loss2 = step(params, opt_state, {"pixel_values": x, "labels": y})
    assert float(loss2) < float(loss)
