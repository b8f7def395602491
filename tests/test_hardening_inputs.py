"""Bad model inputs give one clear error, worded by ``vit_core.checks``, identical in every framework (issue #14).

Each test runs the same call in vit_torch, vit_tf and vit_flax (the ``framework`` fixture) on the ViT and the
hybrid, and asserts the exact message. NaN / inf pixels are not an error: they propagate as in HF.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

import vit_torch
from conftest import assert_outputs_close
from frameworks import ADAPTERS
from settings import ATOL
from test_hybrid_equivalence import BIT
from vit_core.checks import label_range_message
from vit_core.config import ViTConfig
from vit_core.config_hybrid import ViTHybridConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, encoder_stride=8, num_labels=3)
#: The hybrid's backbone maps 48 px to a 3×3 map (stride 16, SAME padding); patch_size 3 cuts it into one token,
#: so a 64 px input (a 4×4 map) is not a whole number of patches.
HYBRID = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=48,
              patch_size=3, num_labels=3, backbone_config=BIT)
CONFIGS = {
    "ViTForImageClassification": lambda: ViTConfig(**TINY),
    "ViTForMaskedImageModeling": lambda: ViTConfig(**TINY),
    "ViTHybridForImageClassification": lambda: ViTHybridConfig(**HYBRID),
}
VIT, MIM, HYB = "ViTForImageClassification", "ViTForMaskedImageModeling", "ViTHybridForImageClassification"
SIZE = {VIT: 32, MIM: 32, HYB: 48}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One torch checkpoint per class (every framework loads the same weights)."""
    out = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        out[name] = tmp_path_factory.mktemp(name)
        getattr(vit_torch, name)(make()).save_pretrained(out[name])
    return out


_MODELS: dict[tuple[str, str], object] = {}


@pytest.fixture
def load(folders):
    """``load(adapter, class_name)``: the model, built once per module and framework."""

    def get(adapter, name):
        key = (adapter.name, name)
        if key not in _MODELS:
            _MODELS[key] = adapter.load(name, folders[name])
        return _MODELS[key]

    yield get


def teardown_module():
    _MODELS.clear()


def pixels(b=2, h=32, w=None, c=3, seed=0):
    return np.random.default_rng(seed).standard_normal((b, c, h, h if w is None else w)).astype(np.float32)


def forward(framework, model, inputs: dict, **kwargs) -> dict:
    """A forward pass that must succeed; Flax's under ``jax.jit`` (one compilation instead of op-by-op dispatch:
    the tiny hybrid took 28 s eagerly on the shared CI box). Errors are tested eagerly (``error_of``)."""
    if framework.name != "flax":
        return framework.run(model, inputs, **kwargs)
    import jax

    out = jax.jit(lambda inputs: framework._call(model, inputs, **kwargs))(inputs)
    return {key: framework._np(out[key]) for key in out.keys()}


def error_of(framework, model, inputs, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        framework.run(model, inputs, **kwargs)
    return str(err.value)


@contextlib.contextmanager
def problem_type(model, value):
    """Run with ``config.problem_type`` set (every framework reads the config at call time)."""
    config = model.config
    old, config.problem_type = config.problem_type, value
    try:
        yield
    finally:
        config.problem_type = old


# ------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("name", [VIT, HYB])
def test_wrong_channel_count(framework, load, name):
    s = SIZE[name]
    msg = error_of(framework, load(framework, name), {"pixel_values": pixels(h=s, c=2)})
    assert msg == (f"pixel_values has 2 channels (shape (2, 2, {s}, {s})), but config.num_channels is 3; "
                   "inputs are NCHW")


@pytest.mark.parametrize("name", [VIT, HYB])
def test_wrong_rank(framework, load, name):
    s = SIZE[name]
    msg = error_of(framework, load(framework, name), {"pixel_values": pixels(h=s)[0]})
    assert msg == (f"pixel_values must be (batch, channels, height, width), got shape (3, {s}, {s}); "
                   "a single image? add a batch axis")


@pytest.mark.parametrize("name", [VIT, HYB])
def test_nhwc_is_named(framework, load, name):
    s = SIZE[name]
    nhwc = np.ascontiguousarray(pixels(h=s).transpose(0, 2, 3, 1))
    msg = error_of(framework, load(framework, name), {"pixel_values": nhwc})
    assert msg == (f"pixel_values has {s} channels (shape (2, {s}, {s}, 3)), but config.num_channels is 3; inputs "
                   "are NCHW: this looks like NHWC (channels last); transpose it to (batch, channels, height, width), "
                   "e.g. x.transpose(0, 3, 1, 2)")


@pytest.mark.parametrize("name", [VIT, HYB])
def test_size_must_match_without_interpolation(framework, load, name):
    s = SIZE[name]
    msg = error_of(framework, load(framework, name), {"pixel_values": pixels(h=s + 16, w=s)})
    assert msg == (f"Input image size ({s + 16}*{s}) doesn't match model ({s}*{s}); "
                   "pass interpolate_pos_encoding=True to run at another resolution")


def test_interpolation_refuses_remainder_pixels(framework, load):
    """HF 4.57 drops the last H % p rows silently (its conv floors); trivit refuses."""
    msg = error_of(framework, load(framework, VIT), {"pixel_values": pixels(h=36, w=40)}, interpolate_pos_encoding=True)
    assert msg == ("pixel_values of size 36*40 is not a whole number of patches: 4 rows and 0 columns would be "
                   "dropped by patch_size 8; resize, crop or pad it so that the size is a multiple of 8")


def test_hybrid_interpolation_follows_the_backbone_grid(framework, load):
    """The hybrid's tokens are patch_size cells of the backbone map: 64 px → a 4×4 map, not a multiple of 3."""
    model = load(framework, HYB)
    msg = error_of(framework, model, {"pixel_values": pixels(h=64)}, interpolate_pos_encoding=True)
    assert msg == ("pixel_values of size 64*64 is not a whole number of patches (it gives a backbone feature map "
                   "of 4*4): 1 rows and 1 columns would be dropped by patch_size 3; resize, crop or pad it so that "
                   "the size is a multiple of 3")


def test_interpolation_check_agrees_with_hf_on_divisible_sizes(load):
    """Where the size is a whole number of patches trivit runs as HF (and HF, unchecked, floors elsewhere)."""
    hf, pt = ADAPTERS["hf"](), ADAPTERS["pt"]()
    x = {"pixel_values": pixels(h=40, w=48)}
    assert_outputs_close(pt.run(load(pt, VIT), x, interpolate_pos_encoding=True),
                         hf.run(load(hf, VIT), x, interpolate_pos_encoding=True), where="hardening pt vs hf")
    floored = hf.run(load(hf, VIT), {"pixel_values": pixels(h=44, w=48)}, interpolate_pos_encoding=True)
    assert floored["logits"].shape == (2, 3)  # HF: no error, 4 rows dropped


# ------------------------------------------------------------------------------- bool_masked_pos, head_mask
def test_bool_masked_pos_wrong_length(framework, load):
    msg = error_of(framework, load(framework, MIM), {"pixel_values": pixels(), "bool_masked_pos": np.zeros((2, 15), bool)})
    assert msg == "bool_masked_pos must have shape (batch, num_patches) = (2, 16), got (2, 15)"


def test_bool_masked_pos_wrong_dtype(framework, load):
    mask = np.full((2, 16), 0.5, np.float32)
    msg = error_of(framework, load(framework, MIM), {"pixel_values": pixels(), "bool_masked_pos": mask})
    assert msg == "bool_masked_pos must be boolean (or integer 0/1), got dtype float32"


@pytest.mark.parametrize("name", [VIT, HYB])
@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 1)])
def test_head_mask_wrong_shape(framework, load, name, shape):
    inputs = {"pixel_values": pixels(h=SIZE[name]), "head_mask": np.ones(shape, np.float32)}
    msg = error_of(framework, load(framework, name), inputs)
    assert msg == f"head_mask must have shape (num_heads,) = (4,) or (num_layers, num_heads) = (2, 4), got {shape}"


# ------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("name", [VIT, HYB])
@pytest.mark.parametrize("labels, position, value", [([0, 3], 1, 3), ([-1, 2], 0, -1), ([2**40, 0], 0, 2**40)])
def test_labels_out_of_range(framework, load, name, labels, position, value):
    """PyTorch raised a bare IndexError from inside the loss, TF an InvalidArgumentError, Flax gave a wrong loss."""
    inputs = {"pixel_values": pixels(h=SIZE[name]), "labels": np.array(labels, np.int64)}
    msg = error_of(framework, load(framework, name), inputs)
    assert msg == f"{label_range_message(3)}; got {value} at position {position} (labels {labels})"


def test_ignored_labels_are_in_range(framework, load):
    out = forward(framework, load(framework, VIT), {"pixel_values": pixels(), "labels": np.array([-100, 2])})
    assert np.isfinite(out["loss"])


@pytest.mark.parametrize("problem, labels, message", [
    (None, np.array([[0, 1, 2], [1, 0, 0]]),
     "labels for single_label_classification must have shape (2,) or (2, 1), got (2, 3); for multi-label targets "
     "pass float labels or set problem_type='multi_label_classification'"),
    (None, np.array([0, 1, 2]), "labels for single_label_classification must have shape (2,) or (2, 1), got (3,)"),
    (None, np.zeros(2, np.float32), "labels for multi_label_classification must have shape (2, 3), got (2,)"),
    ("single_label_classification", np.zeros(2, np.float32),
     "labels for single_label_classification must be integer class indices, got dtype float32"),
    ("regression", np.zeros((2, 3), np.int64), "labels for regression must be floating point, got dtype int64"),
    ("regression", np.zeros(2, np.float32), "labels for regression must have shape (2, 3), got (2,)"),
    ("multi_label_classification", np.zeros((2, 4), np.float32),
     "labels for multi_label_classification must have shape (2, 3), got (2, 4)"),
    (None, np.zeros(2, np.complex64), "labels must be a real-valued array (integer, float or bool), got dtype complex64"),
])
@pytest.mark.parametrize("name", [VIT, HYB])
def test_labels_wrong_dtype_or_shape_for_the_problem(framework, load, name, problem, labels, message):
    model = load(framework, name)
    with problem_type(model, problem):
        assert error_of(framework, model, {"pixel_values": pixels(h=SIZE[name]), "labels": labels}) == message


def test_regression_with_one_label_takes_b_or_b1(framework, load):
    model = load(framework, VIT)
    with problem_type(model, "regression"):
        model.config.num_labels = 1  # the check reads num_labels; the (B, 3) logits are not used past it
        try:
            msg = error_of(framework, model, {"pixel_values": pixels(), "labels": np.zeros((2, 2), np.float32)})
        finally:
            model.config.num_labels = 3
    assert msg == "labels for regression must have shape (2,) or (2, 1), got (2, 2)"


# --------------------------------------------------------------------------------------- NaN / inf pixels
@pytest.mark.parametrize("name", [VIT, HYB])
def test_nan_and_inf_pixels_propagate_like_hf(framework, load, name):
    """Not an error: image 0 holds a NaN, image 1 an inf, image 2 is clean. Every output has NaN exactly where
    HF's has, and the same finite numbers elsewhere."""
    x = pixels(b=3, h=SIZE[name])
    x[0, 1, 5, 7], x[1, 0, 0, 0] = np.nan, np.inf
    hf = ADAPTERS["hf"]()
    ours = forward(framework, load(framework, name), {"pixel_values": x}, output_hidden_states=True)
    theirs = hf.run(load(hf, name), {"pixel_values": x}, output_hidden_states=True)
    assert list(ours) == list(theirs)
    for key in theirs:
        a, e = ours[key], theirs[key]
        for i, (x_, y_) in enumerate(zip(a, e) if isinstance(e, tuple) else [(a, e)]):
            assert np.array_equal(np.isnan(x_), np.isnan(y_)), f"{key}[{i}]: NaN pattern differs from HF's"
            assert np.isnan(y_[0]).any() and np.isfinite(y_[2]).all()  # the test means something
            finite = np.isfinite(y_)
            assert np.array_equal(np.isfinite(x_), finite), f"{key}[{i}]: inf pattern differs from HF's"
            # the suite's fp32 bound; the hybrid's magnitude-scaled, as tolerances.HYBRID_SCALE_BY_MAGNITUDE says
            scale = max(1.0, float(np.abs(y_[finite]).max())) if name == HYB else 1.0
            assert np.abs(x_[finite] - y_[finite]).max() <= ATOL * scale, f"{key}[{i}]"


# ------------------------------------------------------------------------------ labels in compiled code
def test_flax_labels_out_of_range_under_jit_give_nan(load):
    """Inside ``jax.jit`` label values are unknown when tracing: the loss is NaN (documented), never a number;
    in-range labels give the torch loss. The eager wrapper raises (test_labels_out_of_range)."""
    if "flax" not in ADAPTERS:
        pytest.skip("jax/flax not installed")
    import jax

    model, pt = load(ADAPTERS["flax"](), VIT), ADAPTERS["pt"]()
    loss = jax.jit(lambda p, x, y: model(x, params=p, labels=y).loss)
    x = pixels()
    assert np.isnan(loss(model.params, x, np.array([0, 3])))
    assert np.isnan(loss(model.params, x, np.array([-5, -100])))
    good = np.array([2, -100])
    want = pt.run(load(pt, VIT), {"pixel_values": x, "labels": good})["loss"]
    assert abs(float(loss(model.params, x, good)) - float(want)) <= ATOL
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, num_labels\) = \[0, 3\)"):
        jax.jit(lambda p, x: model(x, params=p, labels=np.array([0, 3])).loss)(model.params, x)  # concrete: checked


def test_tf_labels_out_of_range_in_graphs(load, folders):
    """tf.function and model.fit: the assertion's message starts with ours (XLA would drop it: NaN there)."""
    pytest.importorskip("tensorflow")
    import keras
    import tensorflow as tf

    import vit_tf

    model = vit_tf.TFViTForImageClassification.from_pretrained(folders[VIT])
    x = pixels()
    step = tf.function(lambda x, y: model(x, labels=y, training=False).loss)
    with pytest.raises(tf.errors.InvalidArgumentError, match=label_range_message(3).replace("[", r"\[").replace(
            "(", r"\(").replace(")", r"\)")):
        step(x, tf.constant([0, 7], tf.int64))
    assert np.isfinite(step(x, tf.constant([0, 2], tf.int64)))
    xla = tf.function(lambda x, y: model(x, labels=y, training=False).loss, jit_compile=True)
    assert np.isnan(xla(x, tf.constant([0, 7], tf.int64)))
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        model.fit({"pixel_values": x, "labels": np.array([1, 9])}, epochs=1, batch_size=2, verbose=0, shuffle=False)
    assert label_range_message(3) in err.value.message and "[1 9]" in err.value.message
