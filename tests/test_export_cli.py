"""``trivit export``: each format written from a checkpoint folder, run by its own runtime, equals HF's logits.

Fixture: a tiny random classifier saved by vit_torch with a non-default ``preprocessor_config.json``. The
oracle is transformers 4.x's PyTorch classifier on the pixels our processor gives the real photo; the
artifact is run by onnxruntime / ``jax.export`` / TF / LiteRT through the frameworks' public runners.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import vit_torch
from frameworks import ADAPTERS
from settings import ATOL
from tolerances import TFLITE_ATOL
from trivit import export as export_verb
from trivit.cli import main
from vit_core import ViTConfig, ViTImageProcessor

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, num_labels=5)
#: format -> bound on |artifact logits - HF logits| (TFLite runs XNNPACK kernels: TFLITE_ATOL, see tolerances.py).
BOUNDS = {"onnx": ATOL, "stablehlo": ATOL, "savedmodel": ATOL, "tflite": TFLITE_ATOL}
OUT_NAMES = {"onnx": "m.onnx", "stablehlo": "m.stablehlo", "savedmodel": "sm", "tflite": "m.tflite"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vit_torch.ViTForImageClassification(ViTConfig(**TINY))
    out = tmp_path_factory.mktemp("export-cli") / "vit"
    model.save_pretrained(out)
    ViTImageProcessor(size=32, resample=Image.BICUBIC, image_mean=[0.4, 0.5, 0.6],
                      image_std=[0.2, 0.3, 0.25]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def photo_pixels(folder) -> np.ndarray:
    processor = ViTImageProcessor.from_pretrained(folder)
    return processor(Image.fromarray(load_sample_image("china.jpg")), return_tensors="np").pixel_values


def _hf_logits(folder: Path, pixels: np.ndarray) -> np.ndarray:
    model = ADAPTERS["hf"]().load("ViTForImageClassification", folder).cpu()
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).logits.numpy()


def _export(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", list(export_verb.FORMATS))
def test_each_format_equals_hf_and_verify_reports_it(fmt, folder, photo_pixels, tmp_path, capsys):
    out_path = tmp_path / OUT_NAMES[fmt]
    code, out, err = _export(capsys, folder, out_path, "--format", fmt, "--verify")
    assert code == 0, err
    assert out_path.exists() and f"wrote {out_path}" in out
    reported = [float(x) for x in re.findall(r"logits max \|difference\| ([0-9.e+-]+) \(bound", out)]
    assert reported and all(d <= ATOL for d in reported), out  # the artifact vs the live model, as printed
    got = export_verb._run_artifact(fmt, out_path, photo_pixels)["logits"]
    diff = float(np.max(np.abs(got - _hf_logits(folder, photo_pixels))))
    assert diff <= BOUNDS[fmt], f"{fmt}: logits differ from HF's by {diff:.3g}"
    assert not [p for p in tmp_path.iterdir() if p != out_path and not p.name.startswith(out_path.name)], \
        f"stray files beside the artifact: {sorted(tmp_path.iterdir())}"


def test_verify_fails_when_the_artifact_differs(folder, tmp_path, capsys, monkeypatch):
    real = export_verb._run_artifact

    def off_by_a_bit(fmt, path, pixels):
        return {k: v + 1e-3 for k, v in real(fmt, path, pixels).items()}

    monkeypatch.setattr(export_verb, "_run_artifact", off_by_a_bit)
    code, out, err = _export(capsys, folder, tmp_path / "m.onnx", "--format", "onnx", "--verify")
    assert code == export_verb.EXIT_MISMATCH
    assert "TOO FAR" in out and "differs from the model by more than" in err


def test_dynamic_size_onnx_verifies_a_second_non_square_size(folder, tmp_path, capsys):
    code, out, err = _export(capsys, folder, tmp_path / "d.onnx", "--format", "onnx", "--dynamic-size", "--verify")
    assert code == 0, err
    assert "at 32x32" in out and "at 48x64" in out, out


def test_quantised_tflite_is_reported_not_judged(folder, tmp_path, capsys):
    code, out, err = _export(capsys, folder, tmp_path / "q.tflite", "--format", "tflite", "--quantize",
                             "dynamic-range", "--verify")
    assert code == 0, err
    assert "reported, not judged (quantised)" in out


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx", "--framework", "tf"], "--format onnx is written by torch, not --framework tf"),
    (["--format", "tflite", "--dynamic-size"], "--dynamic-size: only --format onnx has dynamic height and width"),
    (["--format", "onnx", "--quantize", "dynamic-range"], "--quantize dynamic-range: only --format tflite"),
    (["--format", "onnx", "--image", "x.jpg"], "--image is the photo --verify uses; add --verify"),
])
def test_flags_that_do_not_apply_are_refused(argv, message, folder, tmp_path, capsys):
    code, _, err = _export(capsys, folder, tmp_path / "x", *argv)
    assert code == export_verb.EXIT_USAGE and message in err, err
    assert not list(tmp_path.iterdir())


def test_bad_folders_are_usage_errors(tmp_path, capsys):
    code, _, err = _export(capsys, tmp_path / "nope", tmp_path / "m.onnx", "--format", "onnx")
    assert code == 2 and "no such folder" in err
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "vit", "architectures": ["BertModel"]}')
    code, _, err = _export(capsys, tmp_path / "cfg", tmp_path / "m.onnx", "--format", "onnx")
    assert code == 2 and "architectures[0] is 'BertModel'" in err, err
