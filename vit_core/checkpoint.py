"""Checkpoint directories: read every supported weight file, write the canonical one atomically.

Canonical layout (what every framework writes, and HF transformers 4.x PyTorch reads)::

    DIR/config.json
    DIR/model.safetensors                     # or, sharded:
    DIR/model.safetensors.index.json          #   {"metadata": {...}, "weight_map": {key: shard}}
    DIR/model-00001-of-0000N.safetensors

Reading also accepts ``pytorch_model.bin`` (+ ``.index.json``), read by :mod:`.torch_pickle` with numpy
and an allow-list unpickler: no pickled code ever runs, and torch is not needed. HF 4.x TensorFlow
(``tf_model.h5``) and Flax (``flax_model.msgpack``) folders need converting to canonical names and
layouts; the core does not convert (it imports no converter), so :func:`read_checkpoint` opens them
only through readers its caller passes (the conversion layer's ``read_checkpoint`` does, and the
frameworks' ``from_pretrained`` use that). Preference when several are present:
``model.safetensors``, its index, ``pytorch_model.bin``, its index, ``tf_model.h5``, ``flax_model.msgpack``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import staged_files
from .config import CONFIG_NAME
from .torch_pickle import load_torch_file
from .safetensors_io import CheckpointError, MappedTensor, SafetensorsFile, TensorInfo, tensor_info, write_safetensors

__all__ = [
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "PT_WEIGHTS_NAME",
    "PT_WEIGHTS_INDEX_NAME",
    "TF_WEIGHTS_NAME",
    "FLAX_WEIGHTS_NAME",
    "CheckpointState",
    "find_weights",
    "read_checkpoint",
    "write_checkpoint",
    "load_torch_file",
    "parse_size",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
TF_WEIGHTS_NAME = "tf_model.h5"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"
#: Weight files in order of preference.
WEIGHT_FILES: tuple[str, ...] = (
    SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME, TF_WEIGHTS_NAME, FLAX_WEIGHTS_NAME
)


class CheckpointState(Mapping[str, np.ndarray]):
    """Lazy ``{canonical name: numpy array}`` over one or several files; ``shapes()`` reads no data."""

    def __init__(self, source: Path, parts: list[Mapping[str, np.ndarray]]):
        self.source = source
        self._where: dict[str, Mapping[str, np.ndarray]] = {}
        for part in parts:
            for key in part:
                if key in self._where:
                    raise CheckpointError(f"{source}: key {key!r} appears in more than one shard")
                self._where[key] = part

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def read(self, key: str) -> np.ndarray:
        """``key``'s tensor as a fresh, writable, C-contiguous array owned by the caller; from a safetensors
        file it is read straight into that array (no memory map left resident: see
        :meth:`~vit_core.safetensors_io.SafetensorsFile.read`), from any other part copied once."""
        part = self._where[key]
        if isinstance(part, SafetensorsFile):
            return part.read(key)
        return np.array(part[key], order="C")

    def mapped(self, key: str) -> MappedTensor | None:
        """Where ``key``'s bytes lie in a private copy-on-write map of a safetensors file, for zero-copy
        wrapping; None for tensors of other formats (or unaligned ones): :meth:`read` those."""
        part = self._where[key]
        return part.mapped(key) if isinstance(part, SafetensorsFile) else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for key, part in self._where.items():
            out[key] = tuple(part.shape(key)) if callable(getattr(part, "shape", None)) else tuple(part[key].shape)
        return out


def find_weights(folder: str | os.PathLike[str]) -> Path:
    """The preferred weight file in ``folder`` (see :data:`WEIGHT_FILES`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory (trivit never downloads; pass a local folder)")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    shown = present[:20] + ([f"... {len(present) - 20} more"] if len(present) > 20 else [])
    raise FileNotFoundError(f"no weight file in {folder}; looked for {list(WEIGHT_FILES)}, found {shown}")


def _read_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    """A sharded checkpoint's index: (``weight_map`` key → shard name, the shard paths), all checked."""
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: cannot read the sharded-checkpoint index ({e})") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: the sharded-checkpoint index is not valid JSON ({e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: a sharded-checkpoint index needs a 'weight_map' object of key -> shard file name, got "
            f"{type(doc).__name__ if not isinstance(doc, dict) else repr(doc.get('weight_map'))[:200]}"
        )
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name")
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard!r} is listed but missing (expected at {index.parent / shard})")
    return weight_map, [index.parent / s for s in shards]


#: Per-suffix readers for weight files the core cannot decode itself: ``{suffix: reader(path)}``.
ForeignReaders = Mapping[str, Callable[[Path], Mapping[str, np.ndarray]]]


def _read_foreign(path: Path, readers: ForeignReaders | None) -> Mapping[str, np.ndarray]:
    """HF TF / Flax weights, through a reader the caller passed (the core has none of its own)."""
    reader = (readers or {}).get(path.suffix)
    if reader is None:
        raise CheckpointError(
            f"{path}: HF TensorFlow / Flax weights need converting to canonical names; open them with "
            "conversion.loading.read_checkpoint (vit_core.checkpoint reads safetensors and pytorch_model.bin only)"
        )
    return reader(path)


def read_checkpoint(path: str | os.PathLike[str], *, readers: ForeignReaders | None = None) -> CheckpointState:
    """Open a checkpoint directory (or one weight file) for lazy reading.

    ``readers`` decode the weight files the core cannot (``{".h5": ..., ".msgpack": ...}``); without
    them such a file is a :class:`CheckpointError`.
    """
    p = Path(path)
    file = find_weights(p) if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    weight_map, shards = _read_index(file) if file.name.endswith(".index.json") else (None, [file])
    parts: list[Mapping[str, np.ndarray]] = [
        SafetensorsFile(s) if s.suffix == ".safetensors"
        else _read_foreign(s, readers) if s.suffix in (".h5", ".msgpack")
        else load_torch_file(s)
        for s in shards
    ]
    if weight_map is not None:
        by_name = dict(zip((s.name for s in shards), parts))
        absent = [f"{k} (in {v})" for k, v in weight_map.items() if k not in by_name[v]]
        if absent:
            raise CheckpointError(f"{file}: the index lists keys their shards do not hold: {absent[:20]}"
                                  + (f" and {len(absent) - 20} more" if len(absent) > 20 else ""))
    return CheckpointState(file, parts)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5_000_000_000 (HF's units: KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB' or '200MB'")


def _shards(infos: Mapping[str, TensorInfo], max_bytes: int | None) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name, info in infos.items():
        if max_bytes is not None and groups[-1] and used + info.nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += info.nbytes
    return groups


def write_checkpoint(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    config_dict: Mapping[str, Any] | None = None,
    *,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Write ``config.json`` and the weights into ``folder`` atomically, all or nothing.

    Returns the files written. Weight files of the other layout (sharded vs. single) left by an
    earlier save are removed after the new ones are in place, so a folder never mixes two saves.
    """
    folder = Path(folder)
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    infos = {name: tensor_info(arr) for name, arr in tensors.items()}  # each lazy tensor: once here, once for data
    groups = _shards(infos, max_bytes)
    written: list[str] = []
    with staged_files(folder) as open_staged:
        if config_dict is not None:
            with open_staged(CONFIG_NAME) as fh:
                fh.write((json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode("utf-8"))
            written.append(CONFIG_NAME)
        if len(groups) == 1:
            with open_staged(SAFE_WEIGHTS_NAME) as fh:
                write_safetensors(fh, tensors, infos=infos)
            written.append(SAFE_WEIGHTS_NAME)
        else:
            weight_map = {}
            for i, names in enumerate(groups, 1):
                shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                with open_staged(shard) as fh:
                    write_safetensors(fh, {n: tensors[n] for n in names}, infos=infos)
                written.append(shard)
                weight_map.update(dict.fromkeys(names, shard))
            index = {"metadata": {"total_size": sum(i.nbytes for i in infos.values())}, "weight_map": weight_map}
            with open_staged(SAFE_WEIGHTS_INDEX_NAME) as fh:
                fh.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
            written.append(SAFE_WEIGHTS_INDEX_NAME)
    # Remove weights of an earlier save that the new files do not replace.
    for stale in folder.glob("model*.safetensors*"):
        if stale.name not in written and (stale.name == SAFE_WEIGHTS_NAME or stale.name.startswith("model-")
                                          or stale.name == SAFE_WEIGHTS_INDEX_NAME):
            stale.unlink()
    return [folder / w for w in written]
