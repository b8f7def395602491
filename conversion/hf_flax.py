"""HF transformers 4.x Flax weights (``flax_model.msgpack``) ↔ canonical, with flax.serialization only.

The file is the model's parameter tree in flax's msgpack encoding. ``FlaxViTModel`` stores the
backbone at the top (``embeddings``, ``encoder/layer/{i}/...``, ``layernorm``, ``pooler``);
``FlaxViTForImageClassification`` nests it under ``vit`` beside ``classifier``. Leaf names map as
``kernel`` → ``weight`` (transposed, see :func:`vit_core.weights.from_kernel_layout`),
``scale`` → LayerNorm ``weight``; paths join with ``.``, which gives canonical names directly.
msgpack has no random access, so reading decodes the whole file once (not memory-mapped).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit_core.atomic import staged_files
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.pretrained import saved_config_dict
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import Kind, from_kernel_layout, to_kernel_layout

from .common import LazyState, check_array, float_array, kinds_of, require_hf_legacy_class

__all__ = ["FLAX_WEIGHTS_NAME", "read_flax_msgpack_state", "write_flax_msgpack"]

FLAX_WEIGHTS_NAME = "flax_model.msgpack"
_FLAX_CLASSES = ("ViTModel", "ViTForImageClassification")


def _serialization() -> Any:
    try:
        from flax import serialization
    except ImportError:
        raise CheckpointError("reading or writing flax_model.msgpack needs flax (pip install 'trivit[flax]')") from None
    return serialization


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def read_flax_msgpack_state(path: str | os.PathLike[str]) -> LazyState:
    """Decode ``flax_model.msgpack`` into ``{canonical name: array in PyTorch layout}``.

    Decoding allocates no more than the file's bytes (msgpack lengths are checked against the
    buffer; flax's array leaves are views of it); leaves must be numeric arrays.
    """
    serialization = _serialization()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        tree = serialization.msgpack_restore(data)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # msgpack raises several types (ExtraData, ValueError, ...) on corrupt data
        raise CheckpointError(f"{path}: corrupt or truncated flax msgpack ({type(e).__name__}: {e})") from None
    if isinstance(tree, Mapping) and set(tree) == {"params"}:
        tree = tree["params"]
    if not isinstance(tree, Mapping) or not tree:
        raise CheckpointError(f"{path}: expected a parameter tree (a map of names), found {type(tree).__name__}")
    entries = {}
    for keys, leaf in _flatten(tree).items():
        if not isinstance(leaf, np.ndarray) and not hasattr(leaf, "shape"):
            raise CheckpointError(f"{path}: leaf {'/'.join(keys)!r} is a {type(leaf).__name__}, not an array")
        arr = np.asarray(leaf)
        check_array(path, "/".join(keys), arr.shape, arr.dtype, len(data))
        arr = float_array(arr)
        parts = list(keys)
        kind = Kind.EMBEDDING
        if parts[-1] == "kernel":
            kind, parts[-1] = (Kind.CONV_WEIGHT if arr.ndim == 4 else Kind.LINEAR_WEIGHT), "weight"
        elif parts[-1] == "scale":
            kind, parts[-1] = Kind.NORM_WEIGHT, "weight"
        value = np.ascontiguousarray(from_kernel_layout(kind, arr))
        entries[".".join(parts)] = (tuple(value.shape), lambda v=value: v)
    return LazyState(path, entries)


def _ndarray_ext(packer: Any, arr: np.ndarray) -> tuple[bytes, memoryview]:
    """msgpack header bytes + raw data of one array leaf, as flax encodes it: an ext value of type
    1 whose payload is the msgpack array ``[shape, dtype name, bin(C-order bytes)]``."""
    raw = memoryview(arr.reshape(-1)).cast("B")
    n = len(raw)
    bin_head = (b"\xc4" + struct.pack(">B", n) if n < 2**8 else b"\xc5" + struct.pack(">H", n) if n < 2**16
                else b"\xc6" + struct.pack(">I", n))
    payload_head = b"\x93" + packer.pack(list(arr.shape)) + packer.pack(arr.dtype.name) + bin_head
    size = len(payload_head) + n
    fixext = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    if size in fixext:
        ext_head = fixext[size]
    elif size < 2**8:
        ext_head = b"\xc7" + struct.pack(">B", size)
    elif size < 2**16:
        ext_head = b"\xc8" + struct.pack(">H", size)
    else:
        ext_head = b"\xc9" + struct.pack(">I", size)
    return ext_head + b"\x01" + payload_head, raw


def write_flax_msgpack(
    folder: str | os.PathLike[str],
    state: Mapping[str, Any],
    config: ViTConfig,
    model_class: str,
    flags: Mapping[str, bool] | None = None,
) -> list[Path]:
    """Write ``config.json`` + ``flax_model.msgpack`` that HF 4.x ``FlaxViT*.from_pretrained`` loads.

    Atomic (both files or neither) and streaming: the parameter tree's structure comes from the
    names alone, then each leaf is loaded, its msgpack header written and its bytes written
    straight from the array, before the next is loaded (bfloat16 leaves and leaves above flax's
    1 GiB chunk size go through flax's own ``msgpack_serialize``, which chunks them as flax does).
    msgpack is self-delimiting, so the file is byte for byte what
    ``flax.serialization.msgpack_serialize(tree)`` gives (keys sorted, as flax's tree_map does),
    without ever holding the whole model or the whole byte string. Only ``ViTModel`` (no mask token) and ``ViTForImageClassification``
    exist in HF Flax.
    """
    serialization = _serialization()
    import msgpack  # a dependency of flax

    flags = dict(flags or {})
    require_hf_legacy_class(model_class, flags, "Flax", _FLAX_CLASSES)
    kinds = kinds_of(model_class, config, flags)
    tree: dict[str, Any] = {}  # flax path → canonical name (no data yet)
    for name in state:
        if name not in kinds:
            raise CheckpointError(f"tensor {name!r} is not in the {model_class} table; cannot write {FLAX_WEIGHTS_NAME}")
        parts = name.split(".")
        if parts[-1] == "weight":
            parts[-1] = "scale" if kinds[name] is Kind.NORM_WEIGHT else "kernel"
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"tensor {name!r} nests under another tensor; cannot write {FLAX_WEIGHTS_NAME}")
        node[parts[-1]] = name
    packer = msgpack.Packer(use_bin_type=True)

    def emit(fh: Any, node: dict[str, Any]) -> None:
        fh.write(packer.pack_map_header(len(node)))
        for key, value in sorted(node.items()):  # flax's tree_map orders dict keys
            fh.write(packer.pack(key))
            if isinstance(value, dict):
                emit(fh, value)
                continue
            loaded = state[value]
            arr = np.ascontiguousarray(to_kernel_layout(kinds[value], np.asarray(loaded() if callable(loaded) else loaded)))
            if arr.dtype.kind in "fiub" and arr.dtype.name != "bfloat16" and arr.nbytes <= serialization.MAX_CHUNK_SIZE:
                head, raw = _ndarray_ext(packer, arr)
                fh.write(head)
                fh.write(raw)  # straight from the array: no bytes copy of the tensor
                del raw
            else:  # bfloat16 (no buffer export) or above flax's chunk size: flax's own encoder for this leaf
                fh.write(serialization.msgpack_serialize(arr))
            del arr

    folder = Path(folder)
    config_dict = saved_config_dict(config, model_class, "float32")
    with staged_files(folder) as open_staged:
        with open_staged(CONFIG_NAME) as fh:
            fh.write((json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        with open_staged(FLAX_WEIGHTS_NAME) as fh:
            emit(fh, tree)
    return [folder / CONFIG_NAME, folder / FLAX_WEIGHTS_NAME]
