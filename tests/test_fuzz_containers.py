"""Foreign containers that are not what they claim (issue #14): tf_model.h5, flax_model.msgpack, .npz, timm.

1. A table of broken files (random bytes, truncated, valid container with wrong contents / keys / shapes)
   gives ONE clear CheckpointError naming the file in every path that reads it: ``conversion.read_source``,
   ``trivit convert`` (exit 2, one ``error:`` line, no traceback) and each framework's ``from_pretrained``.
2. A fuzz run over mutated valid files and random bytes: only CheckpointError escapes, each case within a
   time bound, and no case allocates beyond a bound (tracemalloc peak; numpy reports its buffers to it).
   The default run has ~300 cases; ``-m slow`` runs 10,000+. The cases run in a child process, so a crash of
   a C library (libhdf5) is a failing test that names the case, not a dead test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

FUZZ_FORMATS = ("npz", "h5", "msgpack")
#: Per-case bounds of the fuzz run: wall time, and traced heap peak over the input's size.
FUZZ_CASE_SECONDS = 2.0
FUZZ_PEAK_BYTES = lambda size: 8 * 2**20 + 8 * size  # noqa: E731  (reading ~1-3 copies of a <200 KB input)

D, HEADS = 32, 4
TINY = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=48, image_size=32,
            patch_size=8, encoder_stride=8)


# ------------------------------------------------------------------------------------------- valid files
def _canonical(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny ViTForImageClassification checkpoint (random weights) written with the canonical writer."""
    from vit_core.checkpoint import write_checkpoint
    from vit_core.config import ViTConfig
    from vit_core.pretrained import saved_config_dict
    from vit_core.weights import param_specs

    config = ViTConfig(**{**TINY, **overrides}, num_labels=3)
    rng = np.random.default_rng(seed)
    tensors = {s.name: rng.standard_normal(s.shape).astype(np.float32)
               for s in param_specs("ViTForImageClassification", config)}
    write_checkpoint(folder, tensors, saved_config_dict(config, "ViTForImageClassification", "float32"))
    return folder


def _foreign(root: Path, fmt: str, **overrides) -> Path:
    """``root/<fmt>``: config.json + tf_model.h5 / flax_model.msgpack converted from a canonical tiny model."""
    from conversion import convert_to
    from conversion.detect import read_hf

    convert_to(read_hf(_canonical(root / f"canon-{fmt}", **overrides)), root / fmt, fmt)
    return root / fmt


def _npz_params() -> dict[str, np.ndarray]:
    from test_conversion import jax_params

    return jax_params(0, big_vision=False)


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _npz_with(path: Path, cls_member: bytes) -> Path:
    """A valid vision_transformer .npz whose ``cls`` member is replaced by ``cls_member``."""
    members = {f"{k}.npy": _npy_bytes(v) for k, v in _npz_params().items()}
    return _write_zip(path, {**members, "cls.npy": cls_member})


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _h5(path: Path, build) -> Path:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        build(f)
    return path


def _config_only(folder: Path) -> Path:
    """A folder with a valid config.json (no weights): the broken weight file goes beside it."""
    from vit_core.config import ViTConfig

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**ViTConfig(**TINY, num_labels=3).to_dict(),
                                                   "architectures": ["ViTForImageClassification"]}))
    return folder


def _msgpack(path: Path, obj) -> Path:
    from flax import serialization

    path.write_bytes(serialization.msgpack_serialize(obj))
    return path


def _truncated(src: Path, dst: Path, keep: float) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes()[: int(src.stat().st_size * keep)])
    return dst


def _h5_layers(names):
    def build(f):
        f.attrs["layer_names"] = names
    return build


def _h5_weight(make):
    """A Keras-layout h5 whose one listed weight ``m/vit/embeddings/cls_token:0`` is what ``make(group)`` puts."""
    def build(f):
        f.attrs["layer_names"] = np.array([b"vit"])
        g = f.create_group("vit")
        g.attrs["weight_names"] = np.array([b"m/vit/embeddings/cls_token:0"])
        make(g, "m/vit/embeddings/cls_token:0")
    return build


#: name → (builder(tmp) -> (path to read, --from value or None, file name the error must name)).
BROKEN = {
    # tf_model.h5
    "h5 random bytes": lambda t: (_config_only(t / "d"), None, "tf_model.h5", (t / "d" / "tf_model.h5").write_bytes(
        np.random.default_rng(0).bytes(4096))),
    "h5 truncated": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                               _truncated(_foreign(t, "tf-h5") / "tf_model.h5", t / "d" / "tf_model.h5", 0.6)),
    "h5 no layer_names": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                                    _h5(t / "d" / "tf_model.h5", lambda f: f.create_dataset("x", data=[1.0]))),
    "h5 layer_names not names": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                                           _h5(t / "d" / "tf_model.h5", _h5_layers(np.int64(5)))),
    "h5 listed layer missing": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                                          _h5(t / "d" / "tf_model.h5", _h5_layers(np.array([b"vit"])))),
    "h5 weight is a group": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                                       _h5(t / "d" / "tf_model.h5", _h5_weight(lambda g, n: g.create_group(n)))),
    "h5 weight of strings": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                                       _h5(t / "d" / "tf_model.h5", _h5_weight(
                                           lambda g, n: g.create_dataset(n, data=np.array([b"ab", b"cd"]))))),
    "h5 weight claims 8 GB": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                                        _h5(t / "d" / "tf_model.h5", _h5_weight(
                                            lambda g, n: g.create_dataset(n, shape=(2**31,), dtype="f4",
                                                                          chunks=(1024,))))),
    "h5 wrong shapes": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"),
                                  os.replace(_foreign(t, "tf-h5", intermediate_size=64) / "tf_model.h5",
                                             t / "d" / "tf_model.h5")),
    "h5 wrong keys": lambda t: (t / "d", None, "tf_model.h5", _config_only(t / "d"), _h5(
        t / "d" / "tf_model.h5", lambda f: (f.attrs.__setitem__("layer_names", np.array([b"vit"])),
                                            f.create_group("vit").attrs.__setitem__("weight_names",
                                                                                    np.array([b"m/foo/bar:0"])),
                                            f["vit"].create_dataset("m/foo/bar:0", data=np.zeros(3, "f4"))))),
    # flax_model.msgpack
    "msgpack random bytes": lambda t: (_config_only(t / "d"), None, "flax_model.msgpack",
                                       (t / "d" / "flax_model.msgpack").write_bytes(np.random.default_rng(1).bytes(4096))),
    "msgpack truncated": lambda t: (t / "d", None, "flax_model.msgpack", _config_only(t / "d"), _truncated(
        _foreign(t, "flax-msgpack") / "flax_model.msgpack", t / "d" / "flax_model.msgpack", 0.6)),
    "msgpack a list": lambda t: (t / "d", None, "flax_model.msgpack", _config_only(t / "d"),
                                 (t / "d" / "flax_model.msgpack").write_bytes(b"\x93\x01\x02\x03")),
    "msgpack params not a tree": lambda t: (t / "d", None, "flax_model.msgpack", _config_only(t / "d"),
                                            _msgpack(t / "d" / "flax_model.msgpack", {"params": 3})),
    "msgpack leaf a string": lambda t: (t / "d", None, "flax_model.msgpack", _config_only(t / "d"),
                                        _msgpack(t / "d" / "flax_model.msgpack", {"vit": {"cls_token": "x"}})),
    "msgpack complex leaf": lambda t: (t / "d", None, "flax_model.msgpack", _config_only(t / "d"),
                                       _msgpack(t / "d" / "flax_model.msgpack", {"vit": {"cls_token": np.ones(2, "c8")}})),
    "msgpack wrong shapes": lambda t: (t / "d", None, "flax_model.msgpack", _config_only(t / "d"), os.replace(
        _foreign(t, "flax-msgpack", intermediate_size=64) / "flax_model.msgpack", t / "d" / "flax_model.msgpack")),
    "msgpack wrong keys": lambda t: (t / "d", None, "flax_model.msgpack", _config_only(t / "d"),
                                     _msgpack(t / "d" / "flax_model.msgpack", {"foo": {"kernel": np.ones((2, 2), "f4")}})),
    # .npz
    "npz random bytes": lambda t: (t / "v.npz", None, "v.npz", (t / "v.npz").write_bytes(np.random.default_rng(2).bytes(4096))),
    "npz truncated": lambda t: (t / "v.npz", "npz", "v.npz", np.savez(t / "full.npz", **_npz_params()),
                                _truncated(t / "full.npz", t / "v.npz", 0.5)),
    "npz is a .npy": lambda t: (t / "v.npz", None, "v.npz", (t / "v.npz").write_bytes(_npy_bytes(np.ones(3, "f4")))),
    "npz member not .npy": lambda t: (t / "v.npz", None, "v.npz", _npz_with(t / "v.npz", b"hello")),
    "npz member claims 40 GB": lambda t: (t / "v.npz", None, "v.npz", _npz_with(
        t / "v.npz", _npy_bytes(np.ones((1, 1, D), "f4")).replace(b"(1, 1, 32)", b"(1, 1, 10000000000)"))),
    # found by the slow fuzz run: numpy re-parses a bad header with tokenize, which raised TokenError
    "npz garbled .npy header": lambda t: (t / "v.npz", None, "v.npz", _npz_with(
        t / "v.npz", _npy_bytes(np.ones((1, 1, D), "f4")).replace(b"}", b" "))),
    "npz object member": lambda t: (t / "v.npz", None, "v.npz", _npz_with(t / "v.npz", _npy_bytes(np.array([{}], object)))),
    "npz wrong keys": lambda t: (t / "v.npz", None, "v.npz", np.savez(t / "v.npz", foo=np.ones(3, "f4"))),
    "npz wrong shapes": lambda t: (t / "v.npz", None, "v.npz", np.savez(t / "v.npz", **{
        **_npz_params(), "Transformer/encoder_norm/scale": np.ones(7, "f4")})),
    # timm
    "timm wrong keys": lambda t: (t / "v.safetensors", "timm", "v.safetensors", _safetensors(t / "v.safetensors", {
        "patch_embed.proj.weight": np.ones((D, 3, 8, 8), "f4"), "foo.weight": np.ones(3, "f4")})),
    "timm no blocks": lambda t: (t / "v.safetensors", "timm", "v.safetensors", _safetensors(t / "v.safetensors", {
        "patch_embed.proj.weight": np.ones((D, 3, 8, 8), "f4"), "cls_token": np.ones((1, 1, D), "f4")})),
    "timm wrong shapes": lambda t: (t / "v.pth", "timm", "v.pth", _timm_pth(t / "v.pth")),
}


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from vit_core.safetensors_io import write_safetensors

    with open(path, "wb") as f:
        write_safetensors(f, tensors)
    return path


def _timm_pth(path: Path) -> Path:
    import torch

    from test_conversion import timm_state

    sd = timm_state()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(3 * D, D + 1)
    torch.save(sd, path)
    return path


def _build(name: str, tmp: Path) -> tuple[Path, str | None, str]:
    src, fmt, fname, *_ = BROKEN[name](tmp)
    return src, fmt, fname


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_container_one_clear_error(tmp_path, capsys, name):
    """read_source and ``trivit convert`` both give one CheckpointError naming the file (and the CLI no DST)."""
    from conversion import read_source
    from trivit.cli import main
    from vit_core.safetensors_io import CheckpointError

    src, fmt, fname = _build(name, tmp_path)
    options = {"num_heads": HEADS} if fmt == "timm" else {}
    with pytest.raises(CheckpointError, match=fname.replace(".", r"\.")):
        _, conv = read_source(src, fmt, **options)
        for k in conv.state:  # a lazy reader's corruption shows when the tensors are read
            conv.state[k]
    capsys.readouterr()
    argv = ["convert", str(src), str(tmp_path / "out")] + (["--from", fmt] if fmt else []) + (
        ["--num-heads", str(HEADS)] if fmt == "timm" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("trivit convert: error: ") and fname in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


#: One broken file of each kind and failure class, for every framework's from_pretrained.
FROM_PRETRAINED = ["h5 truncated", "msgpack wrong keys", "npz member claims 40 GB", "timm wrong shapes"]


@pytest.mark.parametrize("fw", ["pt", "tf", "flax"])
@pytest.mark.parametrize("name", FROM_PRETRAINED)
def test_broken_container_from_pretrained(tmp_path, fw, name):
    from frameworks import ADAPTERS
    from vit_core.safetensors_io import CheckpointError

    src, fmt, fname = _build(name, tmp_path)
    flags = {"num_heads": HEADS} if src.is_file() else {}
    with pytest.raises(CheckpointError, match=fname.replace(".", r"\.")):
        ADAPTERS[fw]().load("ViTForImageClassification", src, **flags)


# ------------------------------------------------------------------------------------------------ fuzz
def _mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One random mutation of a valid file: flipped bytes, a clobbered 1-8 byte field (length and offset
    fields are where readers over-allocate), a truncation, an inserted / deleted / duplicated span."""
    b = bytearray(data)
    op = rng.integers(6)
    if op == 0:
        for _ in range(rng.integers(1, 9)):
            b[rng.integers(len(b))] ^= 1 << rng.integers(8)
    elif op == 1:
        at, n = rng.integers(len(b)), rng.integers(1, 9)
        b[at:at + n] = rng.choice([b"\xff" * n, b"\x00" * n, b"\x7f" + b"\xff" * (n - 1), rng.bytes(n)])
    elif op == 2:
        b = b[: rng.integers(len(b))]
    elif op == 3:
        at = rng.integers(len(b))
        b[at:at] = rng.bytes(rng.integers(1, 64))
    elif op == 4:
        at = rng.integers(len(b))
        del b[at:at + rng.integers(1, 256)]
    else:
        at, n = rng.integers(len(b)), rng.integers(1, 512)
        b[at:at] = b[at:at + n]
    return bytes(b)


_MAGIC = {"npz": b"PK\x03\x04", "h5": b"\x89HDF\r\n\x1a\n", "msgpack": b"\x82\xa3vit"}


def run_fuzz(root: Path, cases: int, seed: int) -> dict:
    """Run ``cases`` fuzz cases (spread over :data:`FUZZ_FORMATS`) and return counts and worst bounds.

    ``root`` holds the valid files (``valid.npz``, ``tf-h5/tf_model.h5``, ``flax-msgpack/flax_model.msgpack``).
    Each case writes one candidate file (a mutated valid file, 1 in 8 random bytes, 1 in 16 random bytes
    after the format's magic), reads it completely through ``conversion.read_source`` and records what
    happened. Escapes (any exception but CheckpointError) are returned with the case's seed.
    """
    import flax.serialization  # noqa: F401  (the readers import these lazily: not inside a timed case)
    import h5py  # noqa: F401

    from conversion import read_source
    from vit_core.safetensors_io import CheckpointError

    valid = {"h5": (root / "tf-h5" / "tf_model.h5").read_bytes(),
             "msgpack": (root / "flax-msgpack" / "flax_model.msgpack").read_bytes(),
             "npz": (root / "valid.npz").read_bytes()}
    targets = {"npz": root / "case.npz", "h5": _config_only(root / "h5case") / "tf_model.h5",
               "msgpack": _config_only(root / "mpcase") / "flax_model.msgpack"}
    stats = {"cases": 0, "ok": 0, "refused": 0, "escapes": [], "max_seconds": 0.0, "max_peak_over_bound": 0.0,
             "by_format": {f: 0 for f in FUZZ_FORMATS}, "seconds": 0.0}
    progress = root / "current_case"
    start = time.perf_counter()
    for i in range(cases):
        fmt = FUZZ_FORMATS[i % len(FUZZ_FORMATS)]
        rng = np.random.default_rng([seed, i])
        kind = rng.integers(16)
        data = (rng.bytes(rng.integers(0, 4096)) if kind < 2 else
                _MAGIC[fmt] + rng.bytes(rng.integers(0, 4096)) if kind == 2 else _mutate(rng, valid[fmt]))
        targets[fmt].write_bytes(data)
        progress.write_text(f"{seed} {i} {fmt}")
        src = targets[fmt] if fmt == "npz" else targets[fmt].parent
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            _, conv = read_source(src, "npz" if fmt == "npz" else "hf")
            for k in conv.state:
                conv.state[k]
            stats["ok"] += 1
        except CheckpointError:
            stats["refused"] += 1
        except Exception as e:  # noqa: BLE001  (what the test is about: nothing else may escape)
            stats["escapes"].append(f"case {seed}/{i} ({fmt}): {type(e).__name__}: {e}"[:400])
        finally:
            elapsed = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        stats["cases"] += 1
        stats["by_format"][fmt] += 1
        stats["max_seconds"] = max(stats["max_seconds"], elapsed)
        stats["max_peak_over_bound"] = max(stats["max_peak_over_bound"], peak / FUZZ_PEAK_BYTES(len(data)))
    stats["seconds"] = time.perf_counter() - start
    return stats


def _prepare(root: Path) -> None:
    """The valid files :func:`run_fuzz` mutates."""
    _foreign(root, "tf-h5")
    _foreign(root, "flax-msgpack")
    np.savez(root / "valid.npz", **_npz_params())


def _fuzz_in_child(tmp_path: Path, cases: int, seed: int) -> dict:
    """:func:`run_fuzz` in a fresh interpreter (the valid files made here): a C-level crash fails the test
    naming the case."""
    _prepare(tmp_path)
    out = tmp_path / "stats.json"
    code = (f"import json, sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_fuzz_containers as t; root = pathlib.Path({str(tmp_path)!r}); "
            f"pathlib.Path({str(out)!r}).write_text(json.dumps(t.run_fuzz(root, {cases}, {seed})))")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60 + cases * FUZZ_CASE_SECONDS)
    current = (tmp_path / "current_case").read_text() if (tmp_path / "current_case").exists() else "?"
    assert run.returncode == 0, f"fuzz child died (rc {run.returncode}) at case {current}: {run.stderr[-2000:]}"
    stats = json.loads(out.read_text())
    print(f"fuzz: {stats['cases']} cases {stats['by_format']} in {stats['seconds']:.1f}s: {stats['ok']} read, "
          f"{stats['refused']} refused, worst case {stats['max_seconds'] * 1e3:.0f} ms, "
          f"worst heap peak {stats['max_peak_over_bound']:.2f} of the bound")
    return stats


def _check(stats: dict, cases: int) -> None:
    assert stats["cases"] == cases and not stats["escapes"], stats["escapes"][:10]
    assert stats["max_seconds"] <= FUZZ_CASE_SECONDS, stats["max_seconds"]
    assert stats["max_peak_over_bound"] <= 1.0, stats["max_peak_over_bound"]
    assert stats["refused"] > 0 and stats["ok"] > 0  # the mutations reach both outcomes


def test_fuzz_containers_short(tmp_path):
    """The default run, in this process (a child's imports would cost more than the cases)."""
    _prepare(tmp_path)
    stats = run_fuzz(tmp_path, 300, seed=0)
    print(f"fuzz: {stats}")
    _check(stats, 300)


@pytest.mark.slow
def test_fuzz_containers_long(tmp_path):
    _check(_fuzz_in_child(tmp_path, 10_200, seed=1), 10_200)
