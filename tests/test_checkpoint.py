"""The checkpoint contract: names and layouts equal HF's, strict loading, formats, atomic saves."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import vit_core.checkpoint
import vit_torch
from vit_core.checkpoint import read_checkpoint, write_checkpoint
from vit_core.config import ViTConfig
from vit_core.safetensors_io import CheckpointError, SafetensorsFile
from vit_core.weights import param_specs

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            image_size=32, patch_size=8, encoder_stride=8)
CLASSES = [
    ("ViTModel", {}),
    ("ViTModel", {"add_pooling_layer": False, "use_mask_token": True}),
    ("ViTForImageClassification", {}),
    ("ViTForMaskedImageModeling", {}),
]


def hf_config(config: ViTConfig) -> transformers.ViTConfig:
    return transformers.ViTConfig(**{k: v for k, v in config.to_dict().items() if k != "interpolate_pos_mode"})


@pytest.mark.parametrize("cls, flags", CLASSES)
@pytest.mark.parametrize("extra", [{}, {"qkv_bias": False, "num_labels": 7, "num_channels": 1}])
def test_table_equals_hf_state_dict(cls, flags, extra):
    """The canonical table has exactly HF PyTorch's names and shapes, in every variant."""
    config = ViTConfig(**{**TINY, **extra})
    hf = getattr(transformers, cls)(hf_config(config), **flags)
    ours = {s.name: s.shape for s in param_specs(cls, config, **flags)}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}


def _save(tmp_path, cls="ViTForImageClassification", name="ckpt", seed=0, **config):
    torch.manual_seed(seed)
    model = getattr(vit_torch, cls)(ViTConfig(**{**TINY, **config}))
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _same_params(a: torch.nn.Module, b: torch.nn.Module, prefix_a: str = "", prefix_b: str = "") -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if k.startswith(prefix_a):
            torch.testing.assert_close(v, sb[prefix_b + k.removeprefix(prefix_a)], rtol=0, atol=0)


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_reads_what_hf_writes(tmp_path, safe, shard):
    config = ViTConfig(**TINY, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(hf_config(config))
    hf.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size=shard or "5GB")
    if shard:
        assert len(list(tmp_path.glob("*-of-*"))) > 1, "the fixture did not shard"
    ours = vit_torch.ViTForImageClassification.from_pretrained(tmp_path)
    _same_params(hf, ours)


def test_hf_reads_what_we_write_including_shards(tmp_path):
    model, path = _save(tmp_path, num_labels=4)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    for folder in (path, tmp_path / "sharded"):
        hf = transformers.ViTForImageClassification.from_pretrained(folder)
        _same_params(model, hf)
        assert hf.config.num_labels == 4


def test_safetensors_library_reads_our_file_bit_exactly(tmp_path):
    model, path = _save(tmp_path)
    theirs = safetensors.numpy.load_file(path / "model.safetensors")
    ours = model.state_dict()
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        np.testing.assert_array_equal(v, ours[k].numpy())


def test_bf16_save_and_load(tmp_path):
    model, _ = _save(tmp_path)
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    f = SafetensorsFile(tmp_path / "bf16" / "model.safetensors")
    assert {f.dtype(k) for k in f} == {"BF16"}
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    _same_params(model, hf)
    auto = vit_torch.ViTForImageClassification.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert auto.dtype == torch.bfloat16
    _same_params(model, auto)
    widened = vit_torch.ViTForImageClassification.from_pretrained(tmp_path / "bf16")
    assert widened.dtype == torch.float32  # bf16 -> fp32 is exact
    _same_params(model.float(), widened)


def test_strict_loading_reports_everything_at_once(tmp_path):
    _, path = _save(tmp_path)
    state = dict(read_checkpoint(path))
    state["vit.encoder.layer.5.output.dense.weight"] = np.zeros((3, 3), np.float32)  # unexpected
    del state["vit.encoder.layer.1.layernorm_after.bias"]  # missing
    state["vit.layernorm.weight"] = np.zeros((31,), np.float32)  # wrong shape
    write_checkpoint(tmp_path / "bad", state, json.loads((path / "config.json").read_text()))
    with pytest.raises(CheckpointError) as err:
        vit_torch.ViTForImageClassification.from_pretrained(tmp_path / "bad")
    msg = str(err.value)
    for needle in ("layer.5.output.dense.weight", "layer.1.layernorm_after.bias",
                   "vit.layernorm.weight: checkpoint [31] vs model [32]", str(tmp_path / "bad")):
        assert needle in msg


def test_ignore_mismatched_sizes_reinitialises_the_head(tmp_path):
    model, path = _save(tmp_path, num_labels=5)
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \[5, 32\] vs model \[3, 32\]"):
        vit_torch.ViTForImageClassification.from_pretrained(path, num_labels=3)
    with pytest.warns(UserWarning, match="shape mismatch"):
        new, info = vit_torch.ViTForImageClassification.from_pretrained(
            path, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert new.classifier.weight.shape == (3, 32) and new.config.num_labels == 3
    assert info["mismatched_keys"] == [("classifier.weight", (5, 32), (3, 32)), ("classifier.bias", (5,), (3,))]
    _same_params(model.vit, new.vit)
    assert 0.005 < float(new.classifier.weight.detach().std()) < 0.04  # freshly drawn with std initializer_range


def test_base_checkpoint_into_task_model_and_back(tmp_path):
    base, path = _save(tmp_path, cls="ViTModel")
    with pytest.warns(UserWarning, match="newly initialised"):
        clf, info = vit_torch.ViTForImageClassification.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == ["classifier.weight", "classifier.bias"]
    assert info["unexpected_keys"] == ["pooler.dense.weight", "pooler.dense.bias"]
    _same_params(clf.vit, base, prefix_b="")  # backbone loaded through the added "vit." prefix
    clf.save_pretrained(tmp_path / "clf")
    back, info = vit_torch.ViTModel.from_pretrained(tmp_path / "clf", add_pooling_layer=False, output_loading_info=True)
    assert info["unexpected_keys"] == ["classifier.weight", "classifier.bias"] and not info["missing_keys"]
    _same_params(back, clf.vit)
    mim = vit_torch.ViTForMaskedImageModeling.from_pretrained(tmp_path / "clf")
    assert float(mim.vit.embeddings.mask_token.detach().abs().max()) == 0.0  # HF initialises it to zeros


def test_formats_and_preference(tmp_path):
    model, path = _save(tmp_path)
    torch.save({k: v * 0 for k, v in model.state_dict().items()}, path / "pytorch_model.bin")
    assert vit_core.checkpoint.find_weights(path).name == "model.safetensors"  # preferred over the pickle
    (path / "model.safetensors").unlink()
    loaded = vit_torch.ViTForImageClassification.from_pretrained(path)
    assert float(loaded.classifier.weight.detach().abs().max()) == 0.0  # read from pytorch_model.bin


def test_pickle_code_never_runs(tmp_path):
    _, path = _save(tmp_path)
    (path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(path / "pytorch_model.bin", "wb") as f:  # a bare pickle, as torch's legacy format
        pickle.dump({"vit.layernorm.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="not a zip-format torch.save file"):
        vit_torch.ViTForImageClassification.from_pretrained(path)
    # The same code inside a real torch.save archive: the allow-list unpickler refuses the global by name.
    torch.save({"vit.layernorm.weight": torch.ones(3)}, path / "pytorch_model.bin")
    with zipfile.ZipFile(path / "pytorch_model.bin") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    (pkl,) = [n for n in entries if n.endswith("/data.pkl")]
    entries[pkl] = pickle.dumps({"vit.layernorm.weight": Evil()}, protocol=2)
    with zipfile.ZipFile(path / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"asks for posix\.system.*refused"):
        vit_torch.ViTForImageClassification.from_pretrained(path)
    assert not (tmp_path / "pwned").exists()


def test_torch_files_read_without_torch_equal_torch_load(tmp_path):
    """vit_core.torch_pickle (numpy only) gives torch.load's values: every dtype, views of shared storages,
    transposed (non-contiguous) tensors, parameters, bf16 widened exactly, empty tensors."""
    from vit_core.torch_pickle import load_torch_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    state = {"f32": base, "view": base[1:3, 2:], "t": base.t(), "f64": torch.randn(3, generator=g).double(),
             "f16": torch.randn(5, generator=g).half(), "bf16": torch.randn(2, 3, generator=g).bfloat16(),
             "i64": torch.arange(7), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(4, dtype=torch.uint8),
             "bool": torch.tensor([True, False]), "param": torch.nn.Parameter(torch.ones(2)), "empty": torch.zeros(0, 3),
             "scalar": torch.tensor(2.5)}
    torch.save(state, tmp_path / "w.bin")
    got = load_torch_file(tmp_path / "w.bin")
    assert list(got) == list(state)
    for key, t in state.items():
        want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    # ... and it needs no torch at all: in a fresh interpreter where importing torch fails.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from vit_core.torch_pickle import load_torch_file\n"
            f"print(float(load_torch_file({str(tmp_path / 'w.bin')!r})['t'].sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) == pytest.approx(float(base.sum()), abs=1e-5)


def test_torch_file_with_a_storage_cut_short_is_refused(tmp_path):
    from vit_core.torch_pickle import load_torch_file

    torch.save({"w": torch.ones(8)}, tmp_path / "w.bin")
    with zipfile.ZipFile(tmp_path / "w.bin") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    (key,) = [n for n in entries if n.endswith("/data/0")]
    entries[key] = entries[key][:16]
    with zipfile.ZipFile(tmp_path / "w.bin", "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    with pytest.raises(CheckpointError, match="storage '0' holds 16 bytes"):
        load_torch_file(tmp_path / "w.bin")


def test_corrupt_files_are_named(tmp_path):
    _, path = _save(tmp_path)
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key '.*' ends at byte \d+ .* truncated"):
        vit_torch.ViTForImageClassification.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\xff" * 8 + b"junk")
    with pytest.raises(CheckpointError, match="header length"):
        read_checkpoint(path)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard 'model-00001-of-00002.safetensors' is listed but missing"):
        read_checkpoint(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight file"):
        read_checkpoint(tmp_path / "empty")


def test_save_is_atomic(tmp_path, monkeypatch):
    model, path = _save(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(fh, tensors, metadata=None, infos=None):
        fh.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(vit_core.checkpoint, "write_safetensors", crash)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # nothing changed, no temp files left
    monkeypatch.undo()
    model.save_pretrained(path)
    reloaded = vit_torch.ViTForImageClassification.from_pretrained(path)
    _same_params(model, reloaded)


def test_resave_switches_layout_cleanly(tmp_path):
    model, path = _save(tmp_path)
    model.save_pretrained(path, max_shard_size="40KB")
    assert not (path / "model.safetensors").exists() and (path / "model.safetensors.index.json").exists()
    model.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_saved_files_get_normal_permissions(tmp_path):
    """Atomic writes stage through mkstemp (0600); the files in place have open()'s usual 0666 & ~umask."""
    _, path = _save(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
