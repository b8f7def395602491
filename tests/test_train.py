"""``trivit train`` and :mod:`trivit.training`: the verb on a tiny generated image folder (3 classes, one
unreadable file), resume equivalence, a new image size, bf16 + gradient checkpointing, and clear errors.
Tiny configs only (16-32 px, width 32, 2 layers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from settings import ATOL
from tolerances import RESUME_ATOL
from trivit import training
from trivit.cli import main
from vit_core.checkpoint import read_checkpoint
from vit_core.config import ViTConfig

CLASSES = ("cat", "dog", "fox")
#: Training on 3 classes from a 5-label checkpoint swaps the head on purpose; the loaders say so.
pytestmark = pytest.mark.filterwarnings("ignore:.*re-initialised because of a shape mismatch:UserWarning")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 class folders, 5 images each (PNG / JPEG, different sizes and modes), plus one unreadable file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(5):
            size = (20 + 3 * i, 18 + 2 * i)
            base = np.zeros((size[1], size[0], 3), np.uint8)
            base[..., c] = 200
            img = np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8)
            mode = "L" if i == 4 else "RGB"
            Image.fromarray(img).convert(mode).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "dog" / "broken.png").write_bytes(b"this is not a png")
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 16 px, 5-label ViT checkpoint (so training on 3 classes swaps the head)."""
    from vit_torch import ViTForImageClassification

    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


def _data(folder, size):
    processor = training.make_processor(ViTConfig(image_size=size, patch_size=4), size)
    return training.load_data(str(folder), processor, val_fraction=0.25, log=print)


def test_train_verb_on_image_folder(image_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(image_folder), "--model", str(tiny_checkpoint), "--framework", "torch",
               "--epochs", "2", "--batch-size", "4", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "broken.png" in text and "skipping unreadable image" in text
    assert "epoch 2:" in text
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
    state = json.loads((out / training.STATE_FILE).read_text())
    assert state["epoch"] == 2 and len(state["history"]) == 2 and (out / "optimizer.pt").is_file()
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 16, "width": 16}

    import torch
    import transformers

    hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
    from vit_torch import ViTForImageClassification

    ours = ViTForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert float((hf(x).logits - ours(x).logits).abs().max()) <= ATOL


@pytest.mark.parametrize("framework", ["torch", "flax", "tf"])
def test_resume_equals_straight_run(framework, image_folder, tiny_checkpoint, tmp_path):
    train, val = _data(image_folder, 16)
    kw = dict(batch_size=4, lr=1e-3, progress=False, seed=3)
    straight = training.fit(framework, tiny_checkpoint, train, val, epochs=2, out=tmp_path / "a", **kw)
    training.fit(framework, tiny_checkpoint, train, val, epochs=1, out=tmp_path / "b", **kw)
    resumed = training.fit(framework, "ignored-on-resume", train, val, epochs=2, out=tmp_path / "b", resume=True, **kw)
    a, b = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")
    assert sorted(a) == sorted(b)
    worst = max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k])).max()) for k in a)
    assert worst <= RESUME_ATOL, f"{framework}: resumed weights differ by {worst:.3g}"
    # the resumed run's history continues the first run's, and matches the straight run
    assert [r.epoch for r in resumed.records] == [1, 2]
    assert np.allclose(straight.val_loss, resumed.val_loss, atol=RESUME_ATOL)


def test_resize_position_embeddings_matches_runtime_interpolation(tiny_checkpoint, tmp_path):
    """Resizing once on the weights == vit_torch's interpolate_pos_encoding at run time (HF's bicubic)."""
    import torch

    from vit_torch import ViTForImageClassification

    training.resize_position_embeddings(tiny_checkpoint, tmp_path / "r", 32)
    assert ViTConfig.from_pretrained(tmp_path / "r").image_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        runtime = ViTForImageClassification.from_pretrained(tiny_checkpoint)(x, interpolate_pos_encoding=True).logits
        resized = ViTForImageClassification.from_pretrained(tmp_path / "r")(x).logits
    assert float((runtime - resized).abs().max()) <= ATOL


def test_train_at_new_image_size(image_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "big"
    rc = main(["train", "--data", str(image_folder), "--model", str(tiny_checkpoint), "--framework", "flax",
               "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["image_size"] == 32
    pe = read_checkpoint(out)["vit.embeddings.position_embeddings"]
    assert pe.shape == (1, 1 + 8 * 8, 32)


@pytest.mark.parametrize("framework", ["torch", "tf", "flax"])
def test_bf16_and_gradient_checkpointing_smoke(framework, image_folder, tiny_checkpoint, tmp_path):
    train, val = _data(image_folder, 16)
    history = training.fit(framework, tiny_checkpoint, train, val, epochs=1, out=tmp_path / "o", batch_size=8,
                           dtype="bf16", gradient_checkpointing=True, progress=False)
    assert np.isfinite(history.train_loss[0]) and np.isfinite(history.val_loss[0])
    assert 0.0 <= history.val_accuracy[0] <= 1.0
    assert str(read_checkpoint(tmp_path / "o")["classifier.weight"].dtype) == "float32"  # fp32 master weights


def test_metrics_match_torch_cross_entropy():
    import torch

    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((7, 4)).astype(np.float32) * 3, rng.integers(0, 4, 7)
    loss, acc = training.classification_metrics(logits, labels)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert abs(loss - ref) <= ATOL
    assert acc == float(np.mean(np.argmax(logits, 1) == labels))


def test_epoch_order_and_augmentation_depend_only_on_seed_and_epoch(image_folder):
    train, _ = _data(image_folder, 16)
    x1, y1 = training.epoch_arrays(train, 1, seed=0, do_augment=True)
    x2, y2 = training.epoch_arrays(train, 1, seed=0, do_augment=True)
    x3, _ = training.epoch_arrays(train, 2, seed=0, do_augment=True)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    assert x1.shape == train.pixel_values.shape and x1.dtype == np.float32


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--framework", "mxnet"], "--framework 'mxnet'"),
    (["--distributed"], "torchrun"),  # --framework torch outside torchrun
])
def test_clear_errors(argv, message, image_folder, tmp_path, capsys):
    base = ["train", "--data", str(image_folder), "--model", "Ti/16", "--out", str(tmp_path / "o"), "--no-progress"]
    rc = main(base + argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err


def test_one_class_only_is_refused(image_folder, tmp_path, capsys):
    single = tmp_path / "single"
    (single / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(single / "cat" / "a.png")
    rc = main(["train", "--data", str(single), "--model", "Ti/16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "at least two" in err and str(single) in err


def test_resume_with_another_framework_is_refused(image_folder, tiny_checkpoint, tmp_path):
    train, val = _data(image_folder, 16)
    training.fit("torch", tiny_checkpoint, train, val, epochs=1, out=tmp_path / "o", batch_size=8, progress=False)
    with pytest.raises(training.TrainingError, match="--framework torch"):
        training.fit("flax", tiny_checkpoint, train, val, epochs=2, out=tmp_path / "o", batch_size=8, resume=True,
                     progress=False)
