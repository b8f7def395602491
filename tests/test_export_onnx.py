"""vit_torch.export_onnx / run_onnx: every class exported, run by onnxruntime, compared with the live PyTorch model.

Every output at the fp32 bound (hybrid: the magnitude-scaled bound of test_hybrid_equivalence), at batch 1 and 3
and, with ``dynamic_size``, at several sizes, non-square included. The default run exports each class once with
the exporter that is cheap to run here (TorchScript, ~1 s a graph) and the classifier at its own size with dynamo
(the default exporter, 5-50 s a graph on a shared CPU); ``-m slow`` exports every class with dynamo too, dynamic
sizes included.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import vit_torch
from conftest import assert_outputs_close
from test_equivalence import TINY, _randomise
from tolerances import HYBRID_SCALE_BY_MAGNITUDE
from vit_core.config import ViTConfig
from vit_core.config_hybrid import ViTHybridConfig
from vit_torch.export import export_onnx, run_onnx

pytest.importorskip("onnxruntime")  # the [export] extra; installed in the test environment
pytest.importorskip("onnxscript")

#: The hybrids' BiT: "SAME" pads by the input size (static size only); None pads statically (dynamic sizes work).
BIT_SAME = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4,
                layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True)
BIT_STATIC = {**BIT_SAME, "global_padding": None, "embedding_dynamic_padding": False}
HYBRID = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=48)
VIT_SIZES = [(32, 32), (32, 48), (48, 32), (64, 64)]
HYBRID_SIZES = [(48, 48), (64, 48)]  # its BiT dominates the test's time: the config's size and a non-square one


def build(model: str, padding: str = "static", flags: dict | None = None, **fields) -> torch.nn.Module:
    torch.manual_seed(0)
    if "Hybrid" in model:
        bit = BIT_SAME if padding == "same" else BIT_STATIC
        config = ViTHybridConfig(**{**HYBRID, **fields}, backbone_config=bit)
    else:
        config = ViTConfig(**{**TINY, **fields})
    m = getattr(vit_torch, model)(config, **(flags or {}))
    _randomise(m, 0)
    return m.eval()


def expected(model: torch.nn.Module, names: list[str], inputs: dict[str, np.ndarray], interpolate: bool) -> dict:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, interpolate_pos_encoding=interpolate)
    return {name: out[name].numpy() for name in names}


def check(model, path, sizes, batches=(1, 3), interpolate=False, mask=False) -> None:
    """run_onnx(path) equals the model on random inputs of every size and batch."""
    bare = ["last_hidden_state"] + (["pooler_output"] if getattr(model, "pooler", None) is not None else [])
    names = {"ViTModel": bare, "ViTHybridModel": bare, "ViTForMaskedImageModeling": ["reconstruction"]}.get(
        type(model).__name__, ["logits"])
    rng = np.random.default_rng(1)
    for h, w in sizes:
        for b in batches:
            inputs = {"pixel_values": rng.standard_normal((b, model.config.num_channels, h, w)).astype(np.float32)}
            if mask:
                gh, gw = model.config.feature_grid(h, w)
                inputs["bool_masked_pos"] = rng.random((b, gh * gw)) < 0.5
            actual = run_onnx(path, **inputs)
            assert list(actual) == names
            hybrid = "Hybrid" in type(model).__name__
            # Hybrid: magnitude-scaled, as in test_hybrid_equivalence (HYBRID_SCALE_BY_MAGNITUDE's measurements).
            assert_outputs_close(actual, expected(model, names, inputs, interpolate),
                                 where=f"onnx vs pt [{type(model).__name__} {b}x{h}x{w}]",
                                 scale_by_magnitude=hybrid and HYBRID_SCALE_BY_MAGNITUDE)


# (class, hybrid padding, exporter, dynamic_size); the MIM case resizes its position embeddings bilinearly.
CASES = [
    ("ViTModel", "-", "torchscript", True),
    ("ViTForImageClassification", "-", "auto", False),  # the default exporter (dynamo) in the default run
    ("ViTForMaskedImageModeling", "-", "torchscript", True),
    ("ViTHybridModel", "same", "torchscript", False),
    ("ViTHybridForImageClassification", "static", "torchscript", True),
]
SLOW_CASES = [(c, p, "dynamo", d) for c, p, e, d in CASES if e != "auto"] + [
    ("ViTForImageClassification", "-", "dynamo", True),
    ("ViTHybridModel", "static", "dynamo", True),
    ("ViTHybridForImageClassification", "same", "dynamo", False),
]


def _export_and_check(cls, padding, exporter, dynamic, tmp_path) -> None:
    mode = "bilinear" if cls == "ViTForMaskedImageModeling" else "bicubic"
    model = build(cls, padding, num_labels=3, interpolate_pos_mode=mode)
    path = export_onnx(model, tmp_path / "m.onnx", dynamic_size=dynamic, exporter=exporter)
    hybrid = "Hybrid" in cls
    sizes = (HYBRID_SIZES if hybrid else VIT_SIZES) if dynamic else [model.config.image_hw]
    check(model, path, sizes, interpolate=dynamic)
    if cls == "ViTForMaskedImageModeling":  # the mask input: random masks, and omitted (all False)
        check(model, path, sizes[:2], interpolate=dynamic, mask=True)


@pytest.mark.parametrize("cls, padding, exporter, dynamic", CASES, ids=lambda x: str(x))
def test_export_matches_torch(cls, padding, exporter, dynamic, tmp_path):
    _export_and_check(cls, padding, exporter, dynamic, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("cls, padding, exporter, dynamic", SLOW_CASES, ids=lambda x: str(x))
def test_export_matches_torch_dynamo_every_class(cls, padding, exporter, dynamic, tmp_path):
    _export_and_check(cls, padding, exporter, dynamic, tmp_path)


def test_fixed_batch_static_size_and_file_contents(tmp_path):
    import onnx

    model = build("ViTModel", flags=dict(add_pooling_layer=False))
    path = export_onnx(model, tmp_path / "sub" / "m.onnx", batch_size=3, exporter="torchscript")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]  # no temporary file left beside it
    proto = onnx.load(path)
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 3, 32, 32]
    check(model, path, [(32, 32)], batches=(3,))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(3, 3, 32, 32\).*got \(1, 3, 32, 32\)"):
        run_onnx(path, np.zeros((1, 3, 32, 32), np.float32))
    assert model.training is False


def test_real_photo_through_the_processor(tmp_path):
    from sklearn.datasets import load_sample_image

    from vit_core.image_processing import ViTImageProcessor

    model = build("ViTForImageClassification", num_labels=4, image_size=64)
    path = export_onnx(model, tmp_path / "m.onnx", exporter="torchscript")
    images = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    pixels = ViTImageProcessor(size={"height": 64, "width": 64})(images).pixel_values
    actual = run_onnx(path, pixels)
    assert_outputs_close(actual, expected(model, ["logits"], {"pixel_values": pixels}, False), where="onnx vs pt [photo]")
    assert np.array_equal(actual["logits"].argmax(-1), expected(model, ["logits"], {"pixel_values": pixels},
                                                                False)["logits"].argmax(-1))


@pytest.fixture(scope="module")
def dynamic_mim(tmp_path_factory):
    model = build("ViTForMaskedImageModeling")
    return export_onnx(model, tmp_path_factory.mktemp("mim") / "m.onnx", dynamic_size=True, exporter="torchscript")


@pytest.mark.parametrize("inputs, error, message", [
    (dict(pixel_values=np.zeros((2, 4, 32, 32), np.float32)), ValueError,
     r"pixel_values must have shape \('batch', 3, 'height', 'width'\).*got \(2, 4, 32, 32\)"),
    (dict(pixel_values=np.zeros((2, 3, 32), np.float32)), ValueError, r"pixel_values must have shape"),
    (dict(pixel_values=np.zeros((2, 3, 8, 32), np.float32)), ValueError, r"8\*32 is below the exported graph's "
     r"minimum 16\*16"),
    (dict(pixel_values=np.zeros((2, 3, 36, 32), np.float32)), ValueError, r"multiples of the patch size 8, got 36\*32"),
    (dict(pixel_values=np.zeros((2, 3, 32, 32), np.int64)), TypeError, r"pixel_values must be a float array"),
    (dict(pixel_values=np.zeros((2, 3, 32, 32), np.float32), bool_masked_pos=np.zeros((2, 15), bool)), ValueError,
     r"bool_masked_pos must have shape \(batch, num_patches\) = \(2, 16\).*got \(2, 15\)"),
    (dict(pixel_values=np.zeros((2, 3, 32, 32), np.float32), bool_masked_pos=np.full((2, 16), 0.5)), TypeError,
     r"bool_masked_pos must be a bool array"),
    (dict(pixel_values=np.zeros((2, 3, 32, 32), np.float32), head_mask=np.ones(4, np.float32)), ValueError,
     r"unknown input\(s\) \['head_mask'\]; this graph takes \['pixel_values', 'bool_masked_pos'\]"),
], ids=["channels", "rank", "too-small", "not-whole-patches", "int-pixels", "mask-shape", "mask-dtype", "unknown"])
def test_run_onnx_rejects_bad_inputs_readably(dynamic_mim, inputs, error, message):
    with pytest.raises(error, match=message):
        run_onnx(dynamic_mim, **inputs)


def test_run_onnx_casts_float64_and_accepts_int_masks(dynamic_mim):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 48))
    mask = (np.arange(24) % 2)[None]
    a = run_onnx(dynamic_mim, x, bool_masked_pos=mask)["reconstruction"]
    b = run_onnx(dynamic_mim, x.astype(np.float32), bool_masked_pos=mask.astype(bool))["reconstruction"]
    assert np.array_equal(a, b)


def test_run_onnx_without_onnxruntime_names_the_extra(dynamic_mim, monkeypatch):
    import vit_torch.export as export

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(export, "_SESSIONS", {})
    with pytest.raises(ImportError, match=r"run_onnx needs onnxruntime: pip install 'trivit\[export\]'"):
        run_onnx(dynamic_mim, np.zeros((1, 3, 32, 32), np.float32))


def test_run_onnx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        run_onnx(tmp_path / "nope.onnx", np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(exporter="jit"), ValueError, r"exporter must be one of \['auto', 'dynamo', 'torchscript'\], got 'jit'"),
    (dict(opset=12, exporter="torchscript"), ValueError, r"opset must be an int in 17\.\.20 for exporter="
     r"'torchscript'.*got 12"),
    (dict(opset=17, exporter="dynamo"), ValueError, r"opset must be an int in 18\.\.23 for exporter='dynamo'"),
    (dict(opset="18"), ValueError, r"opset must be an int in 17\.\.23.*got '18'"),
    (dict(batch_size=0), ValueError, r"batch_size must be a positive int or None \(dynamic\), got 0"),
    (dict(batch_size=True), ValueError, r"batch_size must be a positive int or None"),
], ids=["exporter", "opset-torchscript", "opset-dynamo", "opset-str", "batch-0", "batch-bool"])
def test_export_rejects_bad_arguments(kwargs, error, message, tmp_path):
    with pytest.raises(error, match=message):
        export_onnx(build("ViTModel"), tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()


def test_export_rejects_non_trivit_models_and_other_dtypes(tmp_path):
    with pytest.raises(TypeError, match=r"model must be a vit_torch model \(torch.nn.Module\), got Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"exports float32 models; got torch.bfloat16 \(call model.float\(\) first\)"):
        export_onnx(build("ViTModel").to(torch.bfloat16), tmp_path / "m.onnx")


def test_hybrid_with_size_dependent_padding_refuses_dynamic_size(tmp_path):
    with pytest.raises(ValueError, match=r"dynamic_size=True is not supported for this hybrid: its BiT backbone pads "
                       r"by the input's size \(backbone_config.global_padding='SAME', embedding_dynamic_padding=True\)"):
        export_onnx(build("ViTHybridModel", "same"), tmp_path / "m.onnx", dynamic_size=True)


def test_auto_falls_back_to_torchscript_loudly_and_explicit_exporters_do_not(tmp_path, monkeypatch):
    import json

    import onnx

    import vit_torch.export as export

    def broken(*args, **kwargs):
        raise RuntimeError("no graph today")

    monkeypatch.setattr(export, "_export_dynamo", broken)
    model = build("ViTForImageClassification", num_labels=3)
    with pytest.warns(RuntimeWarning, match=r"dynamo exporter failed for ViTForImageClassification \(RuntimeError: "
                      r"no graph today\); exported with TorchScript instead"):
        path = export_onnx(model, tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["trivit"])["exporter"] == "torchscript"
    check(model, path, [(32, 32)], batches=(2,))
    with pytest.raises(RuntimeError, match=r"export_onnx \(dynamo\) failed for ViTForImageClassification: no graph"):
        export_onnx(model, tmp_path / "n.onnx", exporter="dynamo")
    assert not (tmp_path / "n.onnx").exists()
