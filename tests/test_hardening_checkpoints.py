"""Bad checkpoints give one clear error, worded by vit_core, identical in every framework (issue #14).

Every row runs ``from_pretrained`` of vit_torch, vit_tf and vit_flax (the ``framework`` fixture) on a damaged
copy of one tiny checkpoint and asserts the exception type (vit_core's ``CheckpointError``, a ValueError, or
``FileNotFoundError``), the problem it names, and that its message is exactly the one vit_core itself raises
for that folder: the frameworks add nothing and lose nothing. The hybrid classes run the rows whose path
differs (their own config class and weight table).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vit_torch
from conversion import loading
from vit_core.checkpoint import WEIGHT_FILES, read_checkpoint, write_checkpoint
from vit_core.config import ViTConfig
from vit_core.config_hybrid import ViTHybridConfig
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import param_specs

from test_hardening_inputs import HYBRID, TINY  # the same tiny ViT and hybrid as the input checks

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VIT, HYB = "ViTForImageClassification", "ViTHybridForImageClassification"
CONFIGS = {VIT: lambda: ViTConfig(**TINY), HYB: lambda: ViTHybridConfig(**HYBRID)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One valid torch-written checkpoint per class; each test damages a copy."""
    out = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        out[name] = tmp_path_factory.mktemp(name)
        getattr(vit_torch, name)(make()).save_pretrained(out[name])
    return out


def _copy(saved: dict[str, Path], tmp_path: Path, name: str = VIT) -> Path:
    return Path(shutil.copytree(saved[name], tmp_path / "ckpt"))


def _core_error(path: Path, name: str = VIT) -> BaseException:
    """What vit_core raises for ``path`` on its own (reading, then matching against ``name``'s table)."""
    try:
        loading.match_checkpoint(param_specs(name, CONFIGS[name]()), path, owner="core")
    except (CheckpointError, FileNotFoundError) as e:
        return e
    raise AssertionError(f"vit_core accepts {path}")


def _raises(framework, name: str, path: Path, kind: type[BaseException], *needles: str) -> str:
    """``framework``'s from_pretrained fails with ``kind``, naming every needle; returns the message."""
    with pytest.raises(kind) as err:
        framework.load(name, path)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert err.value.__cause__ is None, f"a deeper error leaked through: {err.value.__cause__!r}"
    return msg


def _same_as_core(framework, name: str, path: Path, kind: type[BaseException], *needles: str) -> None:
    core = _core_error(path, name)
    assert isinstance(core, kind)
    assert _raises(framework, name, path, kind, *needles) == str(core)


# ------------------------------------------------------------------------------------------ files and folders
def test_missing_folder(framework, tmp_path):
    _raises(framework, VIT, tmp_path / "nowhere", FileNotFoundError, str(tmp_path / "nowhere"), "does not exist")


def test_missing_weight_file(framework, saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "model.safetensors").unlink()
    _raises(framework, VIT, path / "model.safetensors", FileNotFoundError, str(path / "model.safetensors"))


def test_folder_without_recognisable_weights_lists_every_name(framework, saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "model.safetensors").rename(path / "weights.ckpt")
    msg = _raises(framework, VIT, path, FileNotFoundError, str(path), "weights.ckpt")
    for name in WEIGHT_FILES:
        assert repr(name) in msg
    assert msg == str(_core_error(path))


# ------------------------------------------------------------------------------------------ safetensors bytes
def _split(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _first_two(header: dict) -> tuple[str, str]:
    """The two tensors at the start of the data section, in offset order."""
    keys = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    return keys[0][1], keys[1][1]


def test_truncated_safetensors(framework, saved, tmp_path):
    path = _copy(saved, tmp_path)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    _same_as_core(framework, VIT, path, CheckpointError, str(file), "(the file is truncated)", "key '")


def _lie(header: dict, data: bytes, how: str) -> tuple[dict | bytes, bytes, int | None, str]:
    """Damage a header; returns (header, data, header length or None, what the message must say)."""
    a, b = _first_two(header)
    ea, eb = header[a], header[b]
    if how == "offset past EOF":
        ea["data_offsets"] = [len(data) + 8, len(data) + 8 + ea["data_offsets"][1] - ea["data_offsets"][0]]
        return header, data, None, f"key {a!r} ends at byte"
    if how == "overlapping":
        eb["data_offsets"] = [ea["data_offsets"][0], ea["data_offsets"][0] + eb["data_offsets"][1]
                              - eb["data_offsets"][0]]
        return header, data, None, "overlap in the data section"
    if how == "shape x dtype != bytes":
        ea["shape"] = [*ea["shape"][:-1], ea["shape"][-1] + 1]
        return header, data, None, f"key {a!r} with shape {ea['shape']} F32 needs"
    if how == "negative offset":
        ea["data_offsets"] = [-4, ea["data_offsets"][1]]
        return header, data, None, f"key {a!r}: data_offsets must be [begin, end], integers 0 <= begin <= end"
    if how == "non-integer offset":
        ea["data_offsets"] = [float(ea["data_offsets"][0]), ea["data_offsets"][1]]
        return header, data, None, f"key {a!r}: data_offsets must be [begin, end]"
    if how == "negative dimension":
        ea["shape"] = [-1, *ea["shape"][1:]]
        return header, data, None, f"key {a!r}: shape must be a list of at most 32 non-negative integers"
    if how == "1 TB tensor":
        ea["shape"], ea["data_offsets"] = [2**38], [0, 2**40]
        return header, data, None, f"key {a!r} ends at byte {2**40}"
    if how == "gap":
        del header[a]
        return header, data, None, f"before key {b!r} belong to no tensor"
    if how == "header length larger than file":
        return header, data, 10**9, "header length 1000000000 exceeds the file"
    if how == "header not JSON":
        return b"{this is not json" + b" " * 7, data, None, "corrupt safetensors header"
    if how == "header not a dict":
        return b"[1, 2, 3]", data, None, "header is a JSON list, not an object"
    if how == "duplicate key":
        raw = json.dumps(header).encode()
        entry = json.dumps({a: ea})[1:-1].encode()
        return raw[:-1] + b", " + entry + b"}", data, None, f"duplicate keys [{a!r}]"
    if how == "metadata not strings":
        header["__metadata__"] = {"format": 1}
        return header, data, None, "__metadata__ must be an object of strings"
    raise KeyError(how)


LIES = ["offset past EOF", "overlapping", "shape x dtype != bytes", "negative offset", "non-integer offset",
        "negative dimension", "1 TB tensor", "gap", "header length larger than file", "header not JSON",
        "header not a dict", "duplicate key", "metadata not strings"]


@pytest.mark.parametrize("how", LIES)
def test_header_that_lies(framework, saved, tmp_path, how):
    path = _copy(saved, tmp_path)
    file = path / "model.safetensors"
    header, data, length, needle = _lie(*_split(file), how)
    _join(file, header, data, length)
    _same_as_core(framework, VIT, path, CheckpointError, str(file), needle)


def test_unsupported_dtype(framework, saved, tmp_path):
    path = _copy(saved, tmp_path)
    file = path / "model.safetensors"
    header, data = _split(file)
    a, _ = _first_two(header)
    header[a]["dtype"] = "F8_E4M3"  # a real safetensors dtype (and size), one trivit does not read
    _join(file, header, data)
    _same_as_core(framework, VIT, path, CheckpointError, str(file), f"key {a!r} has unsupported dtype 'F8_E4M3'")


# ------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize("name", [VIT, HYB])
def test_missing_extra_and_misshaped_keys_in_one_error(framework, saved, tmp_path, name):
    path = _copy(saved, tmp_path, name)
    state = dict(read_checkpoint(path))
    config = json.loads((path / "config.json").read_text())
    state["vit.encoder.layer.7.output.dense.weight"] = np.zeros((3, 3), np.float32)  # extra
    del state["vit.encoder.layer.1.layernorm_after.bias"]  # missing
    state["vit.layernorm.weight"] = np.zeros((31,), np.float32)  # wrong shape
    write_checkpoint(path, state, config)
    _same_as_core(framework, name, path, CheckpointError, str(path / "model.safetensors"),
                  "missing keys (1): ['vit.encoder.layer.1.layernorm_after.bias']",
                  "unexpected keys (1): ['vit.encoder.layer.7.output.dense.weight']",
                  "vit.layernorm.weight: checkpoint [31] vs model [32]")


@pytest.mark.parametrize("name", [VIT, HYB])
def test_truncated_hybrid_and_vit(framework, saved, tmp_path, name):
    path = _copy(saved, tmp_path, name)
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    _same_as_core(framework, name, path, CheckpointError, str(file), "(the file is truncated)")


# ------------------------------------------------------------------------------------------ pickles
class _Payload:
    """Unpickling this would run ``open(target, "w")``: creating the file is the proof that code ran."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("container", ["bare pickle", "torch.save zip"])
def test_pickle_with_code_is_refused_and_never_run(framework, saved, tmp_path, container):
    path = _copy(saved, tmp_path)
    (path / "model.safetensors").unlink()
    target = tmp_path / "code-ran"
    file = path / "pytorch_model.bin"
    evil = {"vit.layernorm.weight": _Payload(target)}
    if container == "bare pickle":
        file.write_bytes(pickle.dumps(evil, protocol=2))
        needle = "not a zip-format torch.save file"
    else:
        torch.save({"vit.layernorm.weight": torch.ones(3)}, file)
        with zipfile.ZipFile(file) as z:
            entries = {n: z.read(n) for n in z.namelist()}
        (pkl,) = [n for n in entries if n.endswith("/data.pkl")]
        entries[pkl] = pickle.dumps(evil, protocol=2)
        with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as z:
            for n, data in entries.items():
                z.writestr(n, data)
        needle = "the pickle asks for io.open, which a state dict never needs; refused (no pickled code is ever run)"
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control"))).close()  # the payload works when really unpickled
    assert (tmp_path / "control").exists()
    _same_as_core(framework, VIT, path, CheckpointError, str(file), needle)
    assert not target.exists()


# ------------------------------------------------------------------------------------------ sharded index
@pytest.mark.parametrize("how", ["missing shard", "not JSON", "no weight_map", "key not in its shard"])
def test_bad_sharded_index(framework, saved, tmp_path, how):
    path = _copy(saved, tmp_path)
    state = dict(read_checkpoint(path))
    config = json.loads((path / "config.json").read_text())
    write_checkpoint(path, state, config, max_shard_size=20_000)
    index = path / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shards = sorted(set(doc["weight_map"].values()))
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    if how == "missing shard":
        (path / shards[-1]).unlink()
        needles = (str(index), f"shard {shards[-1]!r} is listed but missing")
    elif how == "not JSON":
        index.write_text(index.read_text()[:-3])
        needles = (str(index), "the sharded-checkpoint index is not valid JSON")
    elif how == "no weight_map":
        index.write_text(json.dumps({"metadata": doc["metadata"]}))
        needles = (str(index), "needs a 'weight_map' object")
    else:
        doc["weight_map"]["vit.layernorm.weight"] = shards[0] if doc["weight_map"]["vit.layernorm.weight"] != \
            shards[0] else shards[1]
        index.write_text(json.dumps(doc))
        needles = (str(index), "the index lists keys their shards do not hold: ['vit.layernorm.weight (in")
    _same_as_core(framework, VIT, path, CheckpointError, *needles)


# ------------------------------------------------------------------------------------------ lean loading (#13)
def test_full_checkpoint_runs_no_initialiser(framework, saved, monkeypatch):
    """Every weight is in the checkpoint: from_pretrained draws nothing (the values would be overwritten)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an initialiser ran for a weight that is loaded")

    if framework.name == "pt":
        import vit_torch.modeling_utils as torch_utils

        monkeypatch.setattr(torch_utils.TorchPreTrainedModel, "_init_param", refuse)
        monkeypatch.setattr(torch.nn.init, "trunc_normal_", refuse)
        monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", refuse)
    elif framework.name == "tf":
        import keras

        import vit_tf.modeling_tf_utils as tf_utils

        monkeypatch.setattr(tf_utils, "initial_value", refuse)
        monkeypatch.setattr(keras.initializers.GlorotUniform, "__call__", refuse)
    else:
        import vit_flax.modeling_flax_utils as flax_utils

        monkeypatch.setattr(flax_utils, "init_param", refuse)
    import importlib

    module, prefix = {"pt": ("vit_torch", ""), "tf": ("vit_tf", "TF"), "flax": ("vit_flax", "Flax")}[framework.name]
    cls = getattr(importlib.import_module(module), prefix + VIT)
    model, info = cls.from_pretrained(saved[VIT], output_loading_info=True)
    assert not (info["missing_keys"] or info["mismatched_keys"]) and model is not None


def test_missing_head_is_initialised_exactly_as_the_constructor_does(saved, tmp_path):
    """A head absent from the checkpoint gets the values a freshly built model gets under the same seed (torch's
    and Keras' global RNGs), and the backbone is the checkpoint's, bit for bit."""
    import keras

    import vit_tf

    base = tmp_path / "base"
    torch.manual_seed(1)
    vit_torch.ViTModel(ViTConfig(**TINY), add_pooling_layer=False).save_pretrained(base)
    state = read_checkpoint(base)
    torch.manual_seed(7)
    ref = vit_torch.ViTForImageClassification(ViTConfig(**TINY))
    torch.manual_seed(7)
    got = vit_torch.ViTForImageClassification.from_pretrained(base)
    assert torch.equal(got.classifier.weight, ref.classifier.weight) and torch.equal(got.classifier.bias, ref.classifier.bias)
    np.testing.assert_array_equal(got.vit.layernorm.weight.detach().numpy(), state["layernorm.weight"])
    keras.utils.set_random_seed(7)
    ref = vit_tf.TFViTForImageClassification(ViTConfig(**TINY))
    keras.utils.set_random_seed(7)
    got = vit_tf.TFViTForImageClassification.from_pretrained(base)
    np.testing.assert_array_equal(got.classifier.kernel.numpy(), ref.classifier.kernel.numpy())
    np.testing.assert_array_equal(got.vit.layernorm.gamma.numpy(), state["layernorm.weight"])


def test_torch_weights_are_private_copy_on_write_views(saved, tmp_path):
    """vit_torch maps the file instead of copying it; writing to a loaded weight (training) changes neither the
    file nor a second model loaded from it."""
    path = _copy(saved, tmp_path)
    before = (path / "model.safetensors").read_bytes()
    a = vit_torch.ViTForImageClassification.from_pretrained(path)
    b = vit_torch.ViTForImageClassification.from_pretrained(path)
    want = read_checkpoint(path)["vit.layernorm.weight"].copy()
    with torch.no_grad():
        a.vit.layernorm.weight.add_(1.0)
    np.testing.assert_array_equal(a.vit.layernorm.weight.detach().numpy(), want + 1.0)
    np.testing.assert_array_equal(b.vit.layernorm.weight.detach().numpy(), want)
    assert (path / "model.safetensors").read_bytes() == before
    assert a.vit.layernorm.weight.requires_grad and a.training is False
    a.classifier(torch.zeros(1, 32)).sum().backward()  # parameters are ordinary leaf tensors
    assert a.classifier.weight.grad is not None
