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
import math
import mmap
import os
import struct
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["ALIGNMENT", "CheckpointError", "MappedTensor", "aligned_empty", "RawTensor", "SafetensorsFile", "TensorInfo", "tensor_info", "write_safetensors"]

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
    if data.size == 0:  # memoryview cannot cast a view with a zero in its shape
        return memoryview(b"")
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


#: Largest rank a header may give a tensor (numpy's own limit is 64; no checkpoint needs near 32).
_MAX_NDIM = 32


@dataclass(frozen=True)
class MappedTensor:
    """Where one tensor's bytes lie in a private, copy-on-write memory map of its file.

    For a framework that can wrap a buffer without copying (``torch.frombuffer(buffer, dtype, count, offset)``):
    pages are read from the file on first touch only, and writes to them stay in this process (the file never
    changes). ``dtype`` is the safetensors name (``"F32"``, ``"BF16"``, ...).
    """

    buffer: mmap.mmap
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)


#: Byte alignment of the arrays :meth:`SafetensorsFile.read` returns: what XLA's CPU client needs to adopt a
#: host buffer without copying it (``jax.device_put``), and a cache line for everyone else.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts at a multiple of :data:`ALIGNMENT` bytes."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate keys {dup}")
    return dict(pairs)


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, key: str, info: Any, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry checked against the format and the file: (dtype, shape, begin, end)."""
    where = f"{path}: key {key!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{where}: header entry must be an object with dtype, shape and data_offsets, got {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise CheckpointError(f"{where} has unsupported dtype {dtype!r}; supported: {sorted(_ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_index(s) for s in shape) or len(shape) > _MAX_NDIM:
        raise CheckpointError(
            f"{where}: shape must be a list of at most {_MAX_NDIM} non-negative integers, got {shape!r}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end], integers 0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    if math.prod(s for s in shape if s) * _ITEMSIZE[dtype] >= 2**62:
        raise CheckpointError(f"{where}: shape {shape} {dtype} is impossibly large")
    want = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != want:
        raise CheckpointError(
            f"{where} with shape {shape} {dtype} needs {want} bytes, but its offsets are [{begin}, {end}] "
            f"({end - begin} bytes)"
        )
    if end > data_len:
        raise CheckpointError(
            f"{where} ends at byte {end} of the data section, which has only {data_len} bytes (the file is truncated)"
        )
    return dtype, tuple(shape), begin, end


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only view of one ``.safetensors`` file; tensors load lazily on access.

    Three ways to get a tensor: ``f[key]`` (a read-only numpy view of a shared memory map),
    :meth:`read` (a fresh array owned by the caller, read from the file without mapping it, so the
    process holds the bytes once), :meth:`mapped` (where the bytes lie in a private copy-on-write
    map, for zero-copy wrapping).

    The header is checked completely on opening, before any tensor is touched; every structural
    problem (truncated file, header length past the end, header not a JSON object, duplicate keys,
    malformed or unsupported entries, offsets that overlap, leave gaps or run past the end, sizes
    that disagree with shape × dtype) raises :class:`CheckpointError` naming the file and, where
    relevant, the key. Nothing is allocated from header claims: a tensor said to be 1 TB is refused
    because the file does not hold it.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open: reads see this inode
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        weakref.finalize(self, self._file.close)
        f = self._file
        try:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{self.path}: file is {size} bytes, too short to be safetensors")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path}: header length {n} exceeds the file ({size} bytes); truncated or not safetensors"
                )
            if n > _MAX_HEADER:
                raise CheckpointError(f"{self.path}: header length {n} exceeds the format's limit of {_MAX_HEADER} bytes")
            raw = f.read(n)
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self._cow: mmap.mmap | None = None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
            if not isinstance(header, dict):
                raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ must be an object of strings, got {metadata!r}")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries = {key: _entry(self.path, key, info, data_len) for key, info in header.items()}
        expected, previous = 0, None
        for begin, end, key in sorted((b, e, k) for k, (_, _, b, e) in self._entries.items()):
            if begin < expected:
                raise CheckpointError(f"{self.path}: keys {previous!r} and {key!r} overlap in the data section")
            if begin > expected:
                raise CheckpointError(f"{self.path}: bytes [{expected}, {begin}) before key {key!r} belong to no tensor")
            expected, previous = end, key
        if expected != data_len:
            raise CheckpointError(
                f"{self.path}: {data_len - expected} bytes after the last tensor belong to no tensor "
                "(the header's offsets do not cover the data section)"
            )

    def _info(self, key: str) -> tuple[str, tuple[int, ...], int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {self.path}") from None

    def __getitem__(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self._info(key)
        if end == begin:
            return np.zeros(shape, _NP_DTYPES.get(dtype, np.float32))
        assert self._mmap is not None
        buf = memoryview(self._mmap)[self._data_start + begin : self._data_start + end]
        if dtype == "BF16":  # widen exactly: bf16 is the top half of an fp32
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        return np.frombuffer(buf, dtype=_NP_DTYPES[dtype]).reshape(shape)

    def read(self, key: str) -> np.ndarray:
        """The tensor as a fresh, writable, C-contiguous array owned by the caller (bf16 widened to float32),
        read straight into it from the file: no memory map stays resident, so loading a checkpoint this
        way holds its bytes once."""
        dtype, shape, begin, end = self._info(key)
        out = aligned_empty(shape, np.dtype("<u2") if dtype == "BF16" else _NP_DTYPES[dtype])
        view, pos, fd = memoryview(out).cast("B") if out.size else memoryview(b""), 0, self._file.fileno()
        while pos < end - begin:
            got = os.preadv(fd, [view[pos:]], self._data_start + begin + pos)
            if got <= 0:
                raise CheckpointError(f"{self.path}: key {key!r}: the file ended while reading it (truncated since opened)")
            pos += got
        if dtype == "BF16":  # widen exactly, as __getitem__
            wide = aligned_empty(shape, np.dtype("<u4"))
            wide[...] = out
            wide <<= 16
            return wide.view(np.float32)
        return out

    def mapped(self, key: str) -> MappedTensor | None:
        """The tensor's place in a private copy-on-write map of the file (see :class:`MappedTensor`), or None
        when it cannot be wrapped in place (empty, or not aligned to its element size)."""
        dtype, shape, begin, end = self._info(key)
        offset = self._data_start + begin
        if end == begin or offset % _ITEMSIZE[dtype]:
            return None
        if self._cow is None:
            self._cow = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return MappedTensor(self._cow, offset, dtype, shape)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key)[1]

    def dtype(self, key: str) -> str:
        return self._info(key)[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
