"""vit_tf.export: SavedModel (NCHW + in-graph-preprocessing signatures), TFLite fp32 / dynamic-range via LiteRT.

Exports are slow (tracing, TFLite conversion), so every artifact is made once per module and shared. The
SavedModels are reloaded in a fresh interpreter that never imports trivit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_image  # noqa: E402

import vit_tf  # noqa: E402
from settings import ATOL  # noqa: E402  (fp32, per device)
from tolerances import (  # noqa: E402
    HYBRID_SCALE_BY_MAGNITUDE, PIXEL_VALUES_GRAPH_ATOL, TFLITE_ATOL, TFLITE_DYNAMIC_RANGE_RTOL,
)
from vit_core.config import ViTConfig  # noqa: E402
from vit_core.config_hybrid import ViTHybridConfig  # noqa: E402
from vit_core.image_processing import ViTImageProcessor  # noqa: E402
from vit_core.image_processing_vit_hybrid import ViTHybridImageProcessor  # noqa: E402
from vit_tf.export import (  # noqa: E402
    _staged_folder, default_image_processor, export_saved_model, export_tflite, image_preprocessor, run_tflite,
)

CLASSES = ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling",
           "ViTHybridModel", "ViTHybridForImageClassification")
PHOTOS = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]  # (427, 640, 3) uint8


def vit_config(**overrides) -> ViTConfig:
    # initializer_range 0.2 (not HF's 0.02): logits of order 1, so that differences are seen at their scale
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                patch_size=8, encoder_stride=8, num_labels=3, initializer_range=0.2)
    return ViTConfig(**{**base, **overrides})


def hybrid_config() -> ViTHybridConfig:
    bit = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 2, 1], num_groups=4, out_features=["stage3"],
               layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True)
    return ViTHybridConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=64, num_labels=3, initializer_range=0.2, backbone_config=bit)


def build(class_name: str):
    np.random.seed(0)  # post_init draws from np.random
    return getattr(vit_tf, f"TF{class_name}")(hybrid_config() if "Hybrid" in class_name else vit_config())


def pixels(model, b: int = 3, seed: int = 0) -> np.ndarray:
    h, w = model.config.image_hw
    return np.random.RandomState(seed).randn(b, 3, h, w).astype(np.float32)


def live(model, x: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model.serve(tf.constant(x)).items()}


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def fp32_bound(name: str, expected: dict) -> float:
    """ATOL; for hybrids ATOL x max(1, largest |output|) (tolerances.HYBRID_SCALE_BY_MAGNITUDE: the SavedModel's
    graph-optimised convolutions vs eager ones put 1.2e-5 on a last_hidden_state of magnitude ~4, measured)."""
    if "Hybrid" in name and HYBRID_SCALE_BY_MAGNITUDE:
        return ATOL * max(1.0, *(float(np.abs(v).max()) for v in expected.values()))
    return ATOL


# ----------------------------------------------------------------------------------------------- shared artifacts
@pytest.fixture(scope="module")
def models():
    return {name: build(name) for name in CLASSES}


@pytest.fixture(scope="module")
def saved_models(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    paths = {}
    for name, model in models.items():
        if name == "ViTForMaskedImageModeling":  # model.export delegates to export_saved_model
            model.export(str(root / name))
            paths[name] = root / name
        else:
            paths[name] = export_saved_model(model, root / name)
    return paths


_RELOAD = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    spec = json.load(open(sys.argv[1]))
    results = {}
    for name, path in spec["paths"].items():
        loaded = tf.saved_model.load(path)
        sigs = loaded.signatures
        ins = {key: str(sigs[key].structured_input_signature[1]) for key in ("serving_default", "serve_images")}
        x = np.load(spec["inputs"][name])
        results[name] = {"signatures": sorted(sigs), "inputs": ins}
        nchw = sigs["serving_default"](pixel_values=tf.constant(x["pixels"]))
        out = {"nchw/" + k: v.numpy() for k, v in nchw.items()}
        out.update({"serve/" + k: v.numpy() for k, v in loaded.serve(tf.constant(x["pixels"])).items()})
        for key in [k for k in x.files if k.startswith("images")]:
            got = sigs["serve_images"](images=tf.constant(x[key]))
            out.update({key + "/" + k: v.numpy() for k, v in got.items()})
        np.savez(os.path.join(spec["out"], name + ".npz"), **out)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("trivit", "vit_core", "vit_tf", "conversion"))
    json.dump({"results": results, "leaked": leaked}, open(os.path.join(spec["out"], "report.json"), "w"))
""")


def _image_inputs(model) -> dict[str, np.ndarray]:
    """uint8 NHWC batches for ``serve_images``: photos (resized in the graph) and model-size random images."""
    h, w = model.config.image_hw
    rng = np.random.RandomState(1)
    return {"images_photo0": PHOTOS[0][None], "images_photo1": PHOTOS[1].transpose(1, 0, 2)[None],  # portrait
            "images_model_size": rng.randint(0, 256, (2, h, w, 3)).astype(np.uint8)}


@pytest.fixture(scope="module")
def reloaded(models, saved_models, tmp_path_factory):
    """Run both signatures of every SavedModel in a fresh interpreter that imports only TF and numpy."""
    work = tmp_path_factory.mktemp("reload")
    inputs = {}
    for name, model in models.items():
        inputs[name] = str(work / f"{name}_in.npz")
        np.savez(inputs[name], pixels=pixels(model), **_image_inputs(model))
    spec = {"paths": {k: str(v) for k, v in saved_models.items()}, "inputs": inputs, "out": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(work / "spec.json")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    outputs = {name: dict(np.load(work / f"{name}.npz")) for name in models}
    return report, outputs


def _fields(outputs: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in outputs.items() if k.startswith(prefix + "/")}


# ----------------------------------------------------------------------------------------------- SavedModel
@pytest.mark.parametrize("name", CLASSES)
def test_saved_model_both_signatures_in_fresh_process(name, models, reloaded):
    report, outputs = reloaded
    assert report["leaked"] == [], "the reloading process imported trivit"
    result, out, model = report["results"][name], outputs[name], models[name]
    assert {"serving_default", "serve", "serve_images"} <= set(result["signatures"])
    h, w = model.config.image_hw
    assert f"shape=(None, 3, {h}, {w}), dtype=tf.float32, name='pixel_values'" in result["inputs"]["serving_default"]
    assert "shape=(None, None, None, None), dtype=tf.uint8, name='images'" in result["inputs"]["serve_images"]
    expected = live(model, pixels(model))
    assert max_diff(_fields(out, "nchw"), expected) <= fp32_bound(name, expected)
    assert max_diff(_fields(out, "serve"), expected) <= fp32_bound(name, expected)
    processor = default_image_processor(model.config)
    for key, images in _image_inputs(model).items():
        # The in-graph resize is Pillow's own arithmetic: pixel_values agree to float32 rounding (see
        # test_in_graph_preprocessing_matches_the_processor), so the outputs agree at the fp32 bound.
        expected = live(model, processor(list(images)).pixel_values)
        assert max_diff(_fields(out, key), expected) <= fp32_bound(name, expected), key


def test_saved_model_keeps_the_processor_settings(saved_models, models):
    path = saved_models["ViTHybridForImageClassification"] / "assets.extra" / "preprocessor_config.json"
    loaded = ViTHybridImageProcessor.from_pretrained(path)
    assert loaded.to_dict() == default_image_processor(models["ViTHybridForImageClassification"].config).to_dict()


# ----------------------------------------------------------------------------------------------- preprocessing
def _cases():
    """(processor, model config, images): every resampling filter, portrait and landscape photos (Pillow 13
    runs their passes in different orders), crops with padding, no resize, 1/2/4-channel inputs."""
    gray = PHOTOS[0][..., :1]
    rgba = np.concatenate([PHOTOS[1], PHOTOS[0][..., :1]], axis=-1)
    small = np.random.RandomState(2).randint(0, 256, (20, 50, 3)).astype(np.uint8)
    cfg32, cfg24 = vit_config(), vit_config(image_size=(40, 24))
    for resample in range(6):
        proc = ViTImageProcessor(size=32, resample=resample, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.5])
        yield proc, cfg32, [PHOTOS[0], PHOTOS[1].transpose(1, 0, 2), small]
    yield ViTImageProcessor(size=(40, 24), do_normalize=False), cfg24, [PHOTOS[1], gray, rgba]
    yield ViTImageProcessor(size=32, do_rescale=False), cfg32, [small]
    hybrid = ViTHybridImageProcessor(size=30, crop_size=32)  # shortest edge 30 < crop 32: zero padding
    yield hybrid, cfg32, [PHOTOS[0], PHOTOS[1].transpose(1, 0, 2), small]
    yield ViTHybridImageProcessor(do_resize=False, crop_size=32), cfg32, [small, gray[:31, :45]]
    yield ViTImageProcessor(do_resize=False), cfg32, [PHOTOS[0][:32, :32]]


def test_in_graph_preprocessing_matches_the_processor():
    worst = 0.0
    for processor, config, images in _cases():
        fn = image_preprocessor(processor, config)  # eagerly: the SavedModel test runs it as a graph
        for image in images:
            expected = processor(image).pixel_values
            got = fn(tf.constant(image[None])).numpy()
            assert got.shape == expected.shape
            worst = max(worst, float(np.abs(got - expected).max()))
            assert worst <= PIXEL_VALUES_GRAPH_ATOL, (processor, image.shape)
    # resizing itself is byte-exact: the uint8 images before rescaling are identical to Pillow's
    resize = ViTImageProcessor(size=(37, 300), resample=Image.BICUBIC, do_rescale=False, do_normalize=False)
    got = image_preprocessor(resize, vit_config(image_size=(37, 300), patch_size=1))(PHOTOS[1][None])
    np.testing.assert_array_equal(got.numpy(), resize(PHOTOS[1]).pixel_values)


# ----------------------------------------------------------------------------------------------- TFLite
@pytest.fixture(scope="module")
def tflite_files(models, tmp_path_factory):
    """The classifier as fp32 with a dynamic batch (through model.export) and dynamic-range quantised, batch 1."""
    root = tmp_path_factory.mktemp("tflite")
    classifier = models["ViTForImageClassification"]
    files = {"fp32": root / "fp32.tflite",
             "dynamic_range": export_tflite(classifier, root / "dr.tflite", quantize="dynamic_range")}
    classifier.export(str(files["fp32"]), format="litert", batch_size=None)  # delegates to export_tflite
    return files


def test_tflite_fp32_matches_the_model(models, tflite_files):
    classifier = models["ViTForImageClassification"]
    x = pixels(classifier, b=5)  # any batch: the file's batch is dynamic
    # measured 3e-8 (HF init) .. 1.5e-6 (logits ~2.4): XNNPACK's own fp32 kernels; TFLITE_ATOL is the bound
    assert max_diff(run_tflite(tflite_files["fp32"], x), live(classifier, x)) <= TFLITE_ATOL


def test_tflite_dynamic_range_quantised(models, tflite_files):
    classifier = models["ViTForImageClassification"]
    photos = default_image_processor(classifier.config)(PHOTOS).pixel_values
    sizes = {k: os.path.getsize(v) for k, v in tflite_files.items()}
    assert sizes["dynamic_range"] < 0.7 * sizes["fp32"]  # int8 weights: measured 70 kB vs 122 kB (tiny: overhead)
    for x in (photos, pixels(classifier, b=4)):
        fp32 = run_tflite(tflite_files["fp32"], x)["logits"]
        quantised = run_tflite(tflite_files["dynamic_range"], x)["logits"]  # batch 1: run image by image
        diff = float(np.abs(quantised - fp32).max())
        assert 0 < diff <= TFLITE_DYNAMIC_RANGE_RTOL * float(np.abs(fp32).max())


# ----------------------------------------------------------------------------------------------- errors, atomicity
def test_clear_errors(tmp_path, models, tflite_files):
    torch_like = type("ViTModel", (), {})()
    with pytest.raises(TypeError, match="export_saved_model exports vit_tf models.*ViTModel"):
        export_saved_model(torch_like, tmp_path / "x")
    with pytest.raises(TypeError, match="export_tflite exports vit_tf models"):
        export_tflite(torch_like, tmp_path / "x.tflite")
    classifier = models["ViTForImageClassification"]
    with pytest.raises(ValueError, match=r"quantize must be one of \(None, 'dynamic_range'\), got 'int8'"):
        export_tflite(classifier, tmp_path / "x.tflite", quantize="int8")
    with pytest.raises(ValueError, match="batch_size must be a positive int or None"):
        export_saved_model(classifier, tmp_path / "x", batch_size=0)
    with pytest.raises(ValueError, match=r"processor makes 224x224 images but the model takes 32x32"):
        export_saved_model(classifier, tmp_path / "x", processor=ViTImageProcessor())
    with pytest.raises(ValueError, match="keeps the aspect ratio"):
        image_preprocessor(ViTImageProcessor(size={"shortest_edge": 32}), classifier.config)
    with pytest.raises(TypeError, match="processor must be a vit_core ViTImageProcessor, got dict"):
        image_preprocessor({"size": 32}, classifier.config)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; a SavedModel is written as a folder"):
        export_saved_model(classifier, tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty folder that is not a SavedModel"):
        export_saved_model(classifier, tmp_path / "mine")
    with pytest.raises(TypeError, match="input_signature"):
        classifier.export(str(tmp_path / "x"), input_signature=[tf.TensorSpec((1, 3, 32, 32))])
    with pytest.raises(TypeError, match="quantize applies to format='litert'"):
        classifier.export(str(tmp_path / "x"), quantize="dynamic_range")
    with pytest.raises(TypeError, match=r"\['processor'\] apply to format='tf_saved_model' / 'litert' only"):
        classifier.export(str(tmp_path / "x.onnx"), format="onnx", processor=ViTImageProcessor(size=32))
    batch_1 = tflite_files["dynamic_range"]
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(1, 3, 32, 32\).*got \(2, 3, 16, 16\)"):
        run_tflite(batch_1, np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(TypeError, match="pixel_values must be a float array, got dtype uint8"):
        run_tflite(batch_1, np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(FileNotFoundError, match="no .tflite file"):
        run_tflite(tmp_path / "missing.tflite", np.zeros((1, 3, 32, 32), np.float32))
    fn = image_preprocessor(ViTImageProcessor(do_resize=False), classifier.config)
    with pytest.raises(tf.errors.InvalidArgumentError, match="32"):  # no resize: the model's size only
        fn(tf.zeros((1, 30, 32, 3), tf.uint8))


def test_staged_folder_replaces_atomically(tmp_path):
    target = tmp_path / "sm"
    target.mkdir()
    (target / "saved_model.pb").write_text("old")
    with pytest.raises(RuntimeError), _staged_folder(target) as tmp:
        (tmp / "saved_model.pb").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (target / "saved_model.pb").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["sm"]
    with _staged_folder(target) as tmp:
        (tmp / "saved_model.pb").write_text("new")
    assert (target / "saved_model.pb").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["sm"]


def test_run_tflite_without_litert_falls_back_with_a_warning(monkeypatch, models, tflite_files):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails as if not installed
    classifier = models["ViTForImageClassification"]
    x = pixels(classifier, b=1)
    with pytest.warns(UserWarning, match="ai-edge-litert is not installed: running the .tflite file with tf.lite"):
        got = run_tflite(tflite_files["fp32"], x)
    assert max_diff(got, live(classifier, x)) <= TFLITE_ATOL
