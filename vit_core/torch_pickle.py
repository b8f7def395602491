"""Read PyTorch's ``torch.save`` state-dict files (``pytorch_model.bin``, timm ``.pth``) with numpy only.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` (a pickle that describes the tensors) and one
raw little-endian buffer per storage, ``<name>/data/<key>``. This module unpickles ``data.pkl`` with an
allow-list of exactly the globals a state dict needs (``collections.OrderedDict``, the typed storage
classes, ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``), each mapped to a numpy stand-in:
no pickled code can run, whatever the file holds, and torch is not needed. A tensor becomes a read-only
numpy view of its (memory-mapped) storage with the saved offset, shape and strides; bfloat16 arrives as
``uint16`` bits and is returned widened to float32 (exact).

Refused with :class:`~vit_core.safetensors_io.CheckpointError`: legacy (pre-1.6, non-zip) files, any
other global, storages the archive lacks, offsets or strides that run past a storage.
"""

from __future__ import annotations

import collections
import mmap
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors_io import CheckpointError

__all__ = ["load_torch_file"]

#: torch's typed storage classes → numpy dtype of one element (bf16 as its raw bits).
_STORAGES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"), "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _Storage:
    def __init__(self, kind: str):
        self.kind = kind


class _Tensor:
    """What ``_rebuild_tensor_v2`` describes: a strided view of a storage."""

    def __init__(self, storage: np.ndarray, kind: str, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.kind, self.offset, self.size, self.stride = storage, kind, offset, size, stride


def _rebuild_tensor(storage: tuple[np.ndarray, str], offset: int, size: tuple, stride: tuple, *_: Any) -> _Tensor:
    return _Tensor(storage[0], storage[1], int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(tensor: _Tensor, *_: Any) -> _Tensor:
    return tensor


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _Storage(name) for name in _STORAGES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, buffer: mmap.mmap | bytes, path: Path):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.buffer, self.path = archive, prefix, buffer, path
        self.storages: dict[str, tuple[np.ndarray, str]] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[module, name]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: the pickle asks for {module}.{name}, which a state dict never needs; refused "
                "(no pickled code is ever run)"
            ) from None

    def persistent_load(self, pid: Any) -> tuple[np.ndarray, str]:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
        _, storage, key, _, numel = pid
        if key not in self.storages:
            try:
                info = self.archive.getinfo(f"{self.prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{self.path}: storage {key!r} is missing from the archive") from None
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{self.path}: storage {key!r} is compressed; torch.save never does that")
            dtype = _STORAGES[storage.kind]
            start = info.header_offset + 30 + len(info.filename.encode()) + _extra_length(self.buffer, info)
            if info.file_size != int(numel) * dtype.itemsize or start + info.file_size > len(self.buffer):
                raise CheckpointError(f"{self.path}: storage {key!r} holds {info.file_size} bytes, not "
                                      f"{numel} × {dtype.itemsize}")
            array = np.frombuffer(self.buffer, dtype=dtype, count=int(numel), offset=start)
            self.storages[key] = (array, storage.kind)
        return self.storages[key]


def _extra_length(buffer: mmap.mmap | bytes, info: zipfile.ZipInfo) -> int:
    """The local header's extra-field length (it may differ from the central directory's)."""
    at = info.header_offset + 28
    return int.from_bytes(buffer[at:at + 2], "little")


def _to_numpy(t: _Tensor, key: str, path: Path) -> np.ndarray:
    flat = t.storage
    item = flat.dtype.itemsize
    if any(s < 0 for s in t.size + t.stride) or len(t.size) != len(t.stride):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {t.size} and strides {t.stride}")
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if all(t.size) else t.offset - 1
    if t.offset < 0 or last >= len(flat):
        raise CheckpointError(f"{path}: tensor {key!r} runs past its storage ({len(flat)} elements)")
    view = np.lib.stride_tricks.as_strided(flat[t.offset:] if all(t.size) else flat[:0], t.size,
                                           [s * item for s in t.stride], writeable=False)
    if t.kind == "BFloat16Storage":  # bf16 bits → float32, exact
        return (view.astype(np.uint32) << 16).view(np.float32)
    return view


def load_torch_file(path: str | Path, wrappers: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """``{name: numpy array}`` from a ``torch.save`` state dict, without torch and without running pickled
    code. A state nested under one of ``wrappers`` (e.g. ``{"model": state}``) is unwrapped."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buffer: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e})") from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a zip-format torch.save file (a legacy pre-1.6 pickle, or not a torch file at all); "
            "re-save it with a current torch, or convert it to model.safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: expected one <name>/data.pkl in the archive, found {len(pkl)}")
            prefix = pkl[0][: -len("data.pkl")]
            state = _Unpickler(archive.read(pkl[0]), archive, prefix, buffer, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt or hostile archive / pickle
        raise CheckpointError(f"{path}: cannot be read as a torch state dict ({type(e).__name__}: {e})") from None
    for wrapper in wrappers:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, _Tensor):
            raise CheckpointError(f"{path}: key {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = _to_numpy(value, str(key), path)
    return out
