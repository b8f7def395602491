"""``trivit predict``: every framework gives HF transformers 4.x's probabilities on the same preprocessed pixels.

Fixtures: a tiny random ViT classifier (and a tiny hybrid) saved by vit_torch with a non-default
``preprocessor_config.json``, and a folder of scikit-learn's real photos as JPEG / PNG / grayscale /
extension-less files, plus a text file named ``bad.jpg``. The oracle preprocesses with the processor
object the test built (not the saved file), runs ``transformers.ViT*ForImageClassification`` (eager)
and takes a float64 softmax of its logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import vit_torch
from frameworks import ADAPTERS
from settings import ATOL
from test_hybrid_equivalence import BIT, TINY as HYBRID_TINY
from trivit.cli import main
from vit_core import ViTConfig, ViTHybridConfig, ViTHybridImageProcessor, ViTImageProcessor

LABELS = ["tabby cat", "pagoda", "tulip", "sports car", "volcano", "daisy", "harbour"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8)
#: The images ``predict`` must find in the photo folder, in its order (sorted by path, recursively).
FOUND = ["bad.jpg", "china.jpg", "flower_noext", "sub/deeper/gray.png", "sub/flower.png"]
READABLE = [name for name in FOUND if name != "bad.jpg"]
FRAMEWORK_NAMES = ["torch", "tf", "flax"]


def _spread_head(model: torch.nn.Module, seed: int) -> None:
    """A head with larger weights, so probabilities are far from uniform and the ranking means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.3)
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    china = Image.fromarray(load_sample_image("china.jpg")).resize((160, 107))
    flower = Image.fromarray(load_sample_image("flower.jpg")).resize((120, 80))
    china.save(root / "china.jpg", quality=90)
    flower.save(root / "sub" / "flower.png")
    china.convert("L").save(root / "sub" / "deeper" / "gray.png")
    flower.save(root / "flower_noext", format="PNG")        # no extension: found because Pillow opens it
    flower.save(root / ".cache" / "hidden.png")             # hidden folders are not walked
    (root / "bad.jpg").write_text("this is text, not a JPEG\n")  # image extension, unreadable: skipped
    (root / "notes.txt").write_text("not an image\n")       # neither image extension nor image: ignored
    return root


def _processor() -> ViTImageProcessor:
    """Not the defaults (bicubic, 32 px, own mean/std): the saved file must really be used."""
    return ViTImageProcessor(size=32, resample=Image.BICUBIC, image_mean=[0.45, 0.5, 0.55], image_std=[0.2, 0.3, 0.25])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vit_torch.ViTForImageClassification(ViTConfig(**TINY, id2label=dict(enumerate(LABELS))))
    _spread_head(model, 0)
    folder = tmp_path_factory.mktemp("ckpt") / "vit"
    model.save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


def _pixels(processor: ViTImageProcessor, root: Path, names: list[str]) -> np.ndarray:
    """(N, 3, H, W) float32, each file read by Pillow and preprocessed on its own."""
    out = []
    for name in names:
        with Image.open(root / name) as im:
            out.append(processor(im, return_tensors="np").pixel_values)
    return np.concatenate(out)


def _oracle(class_name: str, folder: Path, pixels: np.ndarray, **call) -> np.ndarray:
    """(N, num_labels) float64 softmax of transformers 4.x's logits."""
    model = ADAPTERS["hf"]().load(class_name, folder).cpu()
    with torch.no_grad():
        logits = model(torch.from_numpy(pixels), **call).logits.double()
    return torch.softmax(logits, dim=-1).numpy()


def _predict(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _check_document(doc: dict, root: Path, probs: np.ndarray, top_k: int) -> None:
    """Paths in order, top-k ids by the oracle's ranking, labels from id2label, probabilities to ATOL."""
    assert [r["path"] for r in doc["results"]] == [str(root / n) for n in READABLE]
    for result, expected in zip(doc["results"], probs):
        preds = result["predictions"]
        assert len(preds) == top_k
        assert [p["id"] for p in preds] == list(np.argsort(-expected, kind="stable")[:top_k]), result["path"]
        assert [p["label"] for p in preds] == [LABELS[p["id"]] for p in preds]
        got = np.array([p["probability"] for p in preds])
        diff = float(np.max(np.abs(got - expected[[p["id"] for p in preds]])))
        assert diff <= ATOL, f"{result['path']}: probabilities differ from HF's by {diff:.3g}"


@pytest.mark.parametrize("framework", FRAMEWORK_NAMES)
def test_json_matches_hf_oracle(framework, photos, checkpoint, capsys):
    probs = _oracle("ViTForImageClassification", checkpoint, _pixels(_processor(), photos, READABLE))
    assert probs.max() > 0.4, "the fixture's head should give peaked probabilities"
    code, out, err = _predict(capsys, photos, "--model", checkpoint, "--framework", framework, "--top-k", 3,
                              "--batch-size", 2, "--json")
    assert code == 3, err  # bad.jpg was skipped
    doc = json.loads(out)  # stdout is exactly one JSON document: no progress bar, no notes
    assert doc["skipped"] == [{"path": str(photos / "bad.jpg"), "error": "not an image Pillow can read"}]
    assert f"skipped {photos / 'bad.jpg'}: not an image Pillow can read" in err
    _check_document(doc, photos, probs, top_k=3)
    if framework != "torch":  # and the same labels as the torch run, to ATOL
        _, torch_out, _ = _predict(capsys, photos, "--model", checkpoint, "--top-k", 3, "--json")
        for a, b in zip(json.loads(torch_out)["results"], doc["results"]):
            assert [p["id"] for p in a["predictions"]] == [p["id"] for p in b["predictions"]]
            assert np.allclose([p["probability"] for p in a["predictions"]],
                               [p["probability"] for p in b["predictions"]], rtol=0, atol=ATOL)


def test_table_is_aligned_and_clamps_top_k(photos, checkpoint, capsys):
    probs = _oracle("ViTForImageClassification", checkpoint, _pixels(_processor(), photos, READABLE))
    files = [photos / "china.jpg", photos / "sub"]  # a file and a folder
    code, out, err = _predict(capsys, *files, "--model", checkpoint, "--top-k", 50)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "rank", "label", "id", "probability"]
    rows = lines[1:]
    assert len(rows) == 3 * len(LABELS)  # top-k clamped to num_labels
    assert len({len(line) for line in lines}) == 1, "columns are padded to one width"
    starts = [rows[i * len(LABELS)] for i in range(3)]
    assert [r.split()[0] for r in starts] == [str(photos / n) for n in ("china.jpg", "sub/deeper/gray.png",
                                                                        "sub/flower.png")]
    for image, expected in zip(range(3), probs[[READABLE.index(n) for n in ("china.jpg", "sub/deeper/gray.png",
                                                                               "sub/flower.png")]]):
        block = rows[image * len(LABELS):(image + 1) * len(LABELS)]
        printed = np.array([float(r.split()[-1]) for r in block])
        ids = [int(r.split()[-2]) for r in block]
        assert ids == list(np.argsort(-expected, kind="stable"))
        assert np.max(np.abs(printed - expected[ids])) <= 5e-5  # printed with 4 decimals


def test_without_processor_config_falls_back_and_says_so(photos, checkpoint, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, bare / name)
    probs = _oracle("ViTForImageClassification", bare, _pixels(ViTImageProcessor(size=32), photos, ["china.jpg"]))
    code, out, err = _predict(capsys, photos / "china.jpg", "--model", bare, "--json", "--top-k", 2)
    assert code == 0, err
    assert "no preprocessor_config.json" in err and "32x32" in err
    doc = json.loads(out)
    assert doc["skipped"] == []
    assert [p["id"] for p in doc["results"][0]["predictions"]] == list(np.argsort(-probs[0], kind="stable")[:2])
    got = [p["probability"] for p in doc["results"][0]["predictions"]]
    assert np.allclose(got, np.sort(probs[0])[::-1][:2], rtol=0, atol=ATOL)


def test_other_pixel_size_interpolates_position_embeddings(photos, checkpoint, tmp_path, capsys):
    folder = tmp_path / "wide"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, folder / name)
    processor = ViTImageProcessor(size={"height": 40, "width": 56})
    processor.save_pretrained(folder)
    probs = _oracle("ViTForImageClassification", folder, _pixels(processor, photos, ["china.jpg"]),
                    interpolate_pos_encoding=True)
    code, out, err = _predict(capsys, photos / "china.jpg", "--model", folder, "--framework", "tf", "--json",
                              "--top-k", 3)
    assert code == 0, err
    assert "40x56 pixels" in err and "interpolating" in err
    preds = json.loads(out)["results"][0]["predictions"]
    assert [p["id"] for p in preds] == list(np.argsort(-probs[0], kind="stable")[:3])
    assert np.allclose([p["probability"] for p in preds], np.sort(probs[0])[::-1][:3], rtol=0, atol=ATOL)


def test_hybrid_matches_hf_oracle(photos, tmp_path, capsys):
    torch.manual_seed(1)
    config = ViTHybridConfig(**{**HYBRID_TINY, "id2label": dict(enumerate(LABELS))}, backbone_config=dict(BIT))
    model = vit_torch.ViTHybridForImageClassification(config)
    _spread_head(model, 1)
    folder = tmp_path / "hybrid"
    model.save_pretrained(folder)
    processor = ViTHybridImageProcessor(size={"shortest_edge": 56}, crop_size=48)
    processor.save_pretrained(folder)
    probs = _oracle("ViTHybridForImageClassification", folder, _pixels(processor, photos, READABLE))
    code, out, err = _predict(capsys, photos, "--model", folder, "--framework", "flax", "--top-k", 4, "--json")
    assert code == 3, err
    _check_document(json.loads(out), photos, probs, top_k=4)


def test_usage_errors_and_missing_inputs(photos, checkpoint, tmp_path, capsys):
    code, _, err = _predict(capsys, photos, "--model", tmp_path / "nowhere")
    assert code == 2 and f"--model {tmp_path / 'nowhere'}: no such folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _predict(capsys, tmp_path / "empty", "--model", checkpoint)
    assert code == 2 and "no images found" in err
    code, _, err = _predict(capsys, photos, "--model", checkpoint, "--top-k", 0)
    assert code == 2 and "--top-k must be at least 1" in err
    headless = tmp_path / "headless"
    vit_torch.ViTModel(ViTConfig(**TINY)).save_pretrained(headless)
    code, _, err = _predict(capsys, photos / "china.jpg", "--model", headless)
    assert code == 2 and "no trained classification head" in err and "classifier.weight" in err
    code, out, err = _predict(capsys, photos / "china.jpg", tmp_path / "gone.png", "--model", checkpoint, "--json")
    assert code == 3
    assert json.loads(out)["skipped"] == [{"path": str(tmp_path / "gone.png"), "error": "no such file or folder"}]


_SUBPROCESS = """
import sys
from trivit.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in ("torch", "tensorflow", "jax") if m in sys.modules)
print("LOADED", ",".join(loaded), "EXIT", code, file=sys.stderr)
"""


#: What each framework may bring along: TensorFlow 2.21 itself imports jax when it is installed.
@pytest.mark.parametrize("framework, loads", [("torch", "torch"), ("tf", "jax,tensorflow")])
def test_loads_only_its_framework_and_keeps_stderr_quiet(framework, loads, photos, checkpoint):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, "predict", str(photos / "china.jpg"),
                           "--model", str(checkpoint), "--framework", framework, "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["path"] == str(photos / "china.jpg")
    assert proc.stderr.splitlines() == [f"LOADED {loads} EXIT 0"], "only the asked framework, and no log chatter"
