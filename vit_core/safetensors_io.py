"""A small, strict safetensors reader/writer on numpy, memory-mapped and streaming.

Why our own: the ``safetensors`` numpy API cannot hold bfloat16, loads whole files, and its
errors do not name the file. The format is simple: an 8-byte little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian bytes. Files we write load in the ``safetensors`` library and HF.

bfloat16 tensors are read as float32 (an exact widening); they are written from a
:class:`RawTensor` holding the raw 16-bit patterns, or from an array whose dtype is named
``bfloat16`` (ml_dtypes, as jax and tensorflow return).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["CheckpointError", "RawTensor", "SafetensorsFile", "TensorInfo", "tensor_info", "write_safetensors"]

_NP_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ITEMSIZE = {**{k: v.itemsize for k, v in _NP_DTYPES.items()}, "BF16": 2}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, or does not fit the model; the message names file and key."""


@dataclass(frozen=True)
class RawTensor:
    """Raw element bits plus the safetensors dtype they stand for (e.g. uint16 bits as ``"BF16"``)."""

    data: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def _st_dtype(arr: Any) -> str:
    if isinstance(arr, RawTensor):
        return arr.dtype
    dt = np.dtype(arr.dtype)
    if dt.name == "bfloat16":
        return "BF16"
    for name, ref in _NP_DTYPES.items():
        if dt.kind == ref.kind and dt.itemsize == ref.itemsize:
            return name
    raise CheckpointError(f"dtype {dt} cannot be stored in safetensors")


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header records of one tensor."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


def tensor_info(arr: Any) -> TensorInfo:
    """Header entry of an array, :class:`RawTensor`, or zero-argument callable returning one."""
    a = arr() if callable(arr) else arr
    return TensorInfo(_st_dtype(a), tuple(int(s) for s in a.shape))


def _raw_bytes(arr: Any) -> memoryview:
    data = arr.data if isinstance(arr, RawTensor) else np.asarray(arr)
    if data.dtype.name == "bfloat16":  # ml_dtypes' bf16 cannot be exported as a buffer; its bits can
        data = data.view(np.uint16)
    if data.dtype.byteorder == ">":
        data = data.byteswap().view(data.dtype.newbyteorder("<"))
    return memoryview(np.ascontiguousarray(data)).cast("B")


def write_safetensors(
    fh: BinaryIO,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    infos: Mapping[str, TensorInfo] | None = None,
) -> None:
    """Stream ``tensors`` (name → numpy array or :class:`RawTensor`) into the open file ``fh``.

    Values may also be zero-argument callables returning the array, so a converter can produce
    one tensor at a time. The header needs every dtype and shape first: pass ``infos`` (from
    :func:`tensor_info`) if known, else each callable is called once for it and once for its data.
    """
    infos = {name: tensor_info(arr) for name, arr in tensors.items()} if infos is None else infos
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in tensors:
        info = infos[name]
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as the reference writer does
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for name, arr in tensors.items():
        a = arr() if callable(arr) else arr
        if tensor_info(a) != infos[name]:
            raise CheckpointError(f"tensor {name!r} is {tensor_info(a)}, but its header says {infos[name]}")
        fh.write(_raw_bytes(a))


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only, memory-mapped view of one ``.safetensors`` file; tensors load lazily on access.

    Every structural problem (truncated file, bad header, overlapping or out-of-range offsets,
    unknown dtype) raises :class:`CheckpointError` naming the file and, where relevant, the key.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{self.path}: file is {size} bytes, too short to be safetensors")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(size - 8, _MAX_HEADER):
                    raise CheckpointError(
                        f"{self.path}: header length {n} exceeds the file ({size} bytes); truncated or not safetensors"
                    )
                raw = f.read(n)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        spans = []
        for key, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for key {key!r}: {info!r}") from None
            if dtype not in _ITEMSIZE:
                raise CheckpointError(f"{self.path}: key {key!r} has unsupported dtype {dtype!r}")
            want = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
            if not (0 <= begin <= end) or end - begin != want:
                raise CheckpointError(
                    f"{self.path}: key {key!r} with shape {list(shape)} {dtype} needs {want} bytes, "
                    f"but its offsets are [{begin}, {end}]"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{self.path}: key {key!r} ends at byte {end} of the data section, which has only "
                    f"{data_len} bytes (the file is truncated)"
                )
            self._entries[key] = (dtype, shape, begin, end)
            spans.append((begin, end, key))
        spans.sort()
        for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: keys {k0!r} and {k1!r} overlap in the data section")

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            dtype, shape, begin, end = self._entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None
        if end == begin:
            return np.zeros(shape, _NP_DTYPES.get(dtype, np.float32))
        assert self._mmap is not None
        buf = memoryview(self._mmap)[self._data_start + begin : self._data_start + end]
        if dtype == "BF16":  # widen exactly: bf16 is the top half of an fp32
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        return np.frombuffer(buf, dtype=_NP_DTYPES[dtype]).reshape(shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        return self._entries[key][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

