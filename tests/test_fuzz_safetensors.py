"""Fuzzing vit_core's safetensors reader with mutations of one valid small file (issue #14).

A seeded mutator damages the header's JSON values (offsets, shapes, dtypes, entry structure, metadata), the
header's length field, the header text, and the raw bytes (flips, cuts, insertions, junk). For every case the
reader must either open the file and then read every tensor consistently (``f[k]``, ``f.read(k)`` and
``f.mapped(k)`` agree), or refuse it with a documented error (``CheckpointError``; ``FileNotFoundError``):
nothing else, within a time bound per case, and without allocating what a header merely claims (a traced
allocation bound per case; the file itself is a few KB). The default run takes ~300 cases; ``-m slow``
runs 10,000.
"""

from __future__ import annotations

import json
import random
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from vit_core.safetensors_io import CheckpointError, RawTensor, SafetensorsFile, write_safetensors

#: Per case: a valid file opens and reads in ~1 ms; the bound leaves room for a loaded CI machine.
CASE_SECONDS = 2.0
#: Per case, bytes traced by tracemalloc (numpy reports its buffers): the file is ~3 KB, a lying header claims up
#: to terabytes. 16 MB is far above any honest read of this file and far below any claim worth making.
CASE_ALLOC_BYTES = 16 * 2**20

INTERESTING_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**53, 2**62, 2**63 - 1,
                    2**63, 2**64 - 1, 2**64, 2**100, -1, -2, -(2**31), -(2**63)]
INTERESTING_VALUES = [None, True, False, 1.5, -0.0, 1e308, float("nan"), "", "F32", "1", [], {}, [[]], [1, 2],
                      [-1], [0.5], ["1"], [None], {"a": 1}, [2**40, 2**40], [0, 2**62], [1] * 40, [0] * 33]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
          "F8_E4M3", "F8_E5M2", "C64", "f32", "", "F32 ", "U1"]


def _valid_file(path: Path) -> bytes:
    """A small valid file: several dtypes, a scalar, an empty tensor, bf16 bits, metadata."""
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((4, 6)).astype(np.float32),
        "a.bias": rng.standard_normal(6).astype(np.float16),
        "b": RawTensor(rng.integers(0, 2**16, (3, 2), dtype=np.uint16), "BF16"),
        "c": np.arange(5, dtype=np.int64),
        "d": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(2.5, np.float64),
        "u8": np.arange(7, dtype=np.uint8),
    }
    with open(path, "wb") as fh:
        write_safetensors(fh, tensors, metadata={"format": "pt", "note": "fuzz"})
    return path.read_bytes()


def _parts(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _pack(header: dict | str | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode(
        "utf-8", "surrogatepass")
    return struct.pack("<Q", (len(raw) if length is None else length) % 2**64) + raw + data


def _mutate(blob: bytes, rng: random.Random) -> bytes:
    """One random damage of a valid file (sometimes two stacked)."""
    header, data = _parts(blob)
    keys = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(10)
    if kind <= 3:  # a header value
        key = rng.choice(keys)
        entry = header[key]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if field == "dtype" and rng.random() < 0.6:
            entry["dtype"] = rng.choice(DTYPES)
        elif field == "data_offsets" and rng.random() < 0.6:
            begin, end = entry["data_offsets"]
            choice = rng.randrange(5)
            if choice == 0:
                entry["data_offsets"] = [end, begin]
            elif choice == 1:
                delta = rng.choice(INTERESTING_INTS)
                entry["data_offsets"] = [begin + delta, end + delta]
            elif choice == 2:
                entry["data_offsets"] = [rng.choice(INTERESTING_INTS), rng.choice(INTERESTING_INTS)]
            elif choice == 3:
                other = header[rng.choice(keys)]["data_offsets"]
                entry["data_offsets"] = list(other)
            else:
                entry["data_offsets"] = [begin, end, end]
        elif field == "shape" and rng.random() < 0.6:
            shape = list(entry["shape"]) or [1]
            i = rng.randrange(len(shape))
            shape[i] = rng.choice(INTERESTING_INTS)
            if rng.random() < 0.3:
                shape.append(rng.choice(INTERESTING_INTS))
            entry["shape"] = shape
        else:
            entry[field] = rng.choice(INTERESTING_VALUES + INTERESTING_INTS)
    elif kind == 4:  # the entry's structure
        key = rng.choice(keys)
        choice = rng.randrange(5)
        if choice == 0:
            del header[key][rng.choice(["dtype", "shape", "data_offsets"])]
        elif choice == 1:
            header[key] = rng.choice(INTERESTING_VALUES)
        elif choice == 2:
            header[key]["extra"] = rng.choice(INTERESTING_VALUES)
        elif choice == 3:
            del header[key]
        else:
            header["__metadata__"] = rng.choice(INTERESTING_VALUES + [{"format": 1}, {"a": None}])
    elif kind == 5:  # the header length field
        n = len(json.dumps(header))
        return _pack(header, data, rng.choice([n + rng.randint(-9, 9), rng.choice(INTERESTING_INTS), 0,
                                               n + len(data), n + len(data) + 1, rng.getrandbits(64)]))
    elif kind == 6:  # the header text
        text = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text))
            op = rng.randrange(3)
            if op == 0:
                del text[at]
            elif op == 1:
                text.insert(at, rng.choice(b'{}[]",:0123456789-.eE \\ntfu\xff\x00'))
            else:
                text[at] = rng.randrange(256)
        return _pack(bytes(text), data)
    elif kind == 7:  # nesting / size extremes in valid JSON
        choice = rng.randrange(3)
        if choice == 0:
            depth = rng.choice([100, 2000, 50_000])
            return _pack("[" * depth + "]" * depth, data)
        if choice == 1:  # same element count, so only the rank or the dimensions themselves can be wrong
            key = rng.choice(keys)
            ones = [1] * rng.choice([1, 16, 31, 32, 33, 64, 65, 1000])
            header[key]["shape"] = ones + list(header[key]["shape"]) if rng.random() < 0.5 else \
                [0, *(rng.choice(INTERESTING_INTS) for _ in range(rng.randint(1, 3)))] + ones[:rng.randint(0, 40)]
            if header[key]["shape"][0] == 0:  # an empty tensor: must sit where 'empty' does, holding no bytes
                header[key]["data_offsets"] = list(header["empty"]["data_offsets"])
                if key != "empty":
                    del header["empty"]
        else:
            raw = json.dumps(header)
            key = rng.choice(keys)
            dup = json.dumps({key: header[key]})[1:-1]
            return _pack(raw[:-1] + ", " + dup + "}", data)
    else:  # raw bytes
        out = bytearray(blob)
        choice = rng.randrange(4)
        if choice == 0:
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice == 1:
            del out[rng.randrange(len(out) + 1):]
        elif choice == 2:
            at = rng.randrange(len(out))
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        return bytes(out)
    return _pack(header, data)


def _exercise(path: Path) -> str:
    """Open and read everything; returns "ok" or "refused" (a documented error); anything else propagates."""
    try:
        f = SafetensorsFile(path)
    except (CheckpointError, FileNotFoundError):
        return "refused"
    for key in f:
        view, owned = f[key], f.read(key)
        assert view.shape == owned.shape == f.shape(key), key
        np.testing.assert_array_equal(view, owned, err_msg=key)
        assert owned.flags.writeable and owned.flags.c_contiguous
        mapped = f.mapped(key)
        if mapped is not None:
            assert mapped.count == owned.size and mapped.offset + owned.nbytes <= len(mapped.buffer)
    return "ok"


def _fuzz(tmp_path: Path, cases: int, seed: int) -> dict[str, int]:
    blob = _valid_file(tmp_path / "valid.safetensors")
    assert _exercise(tmp_path / "valid.safetensors") == "ok"
    rng = random.Random(seed)
    counts = {"ok": 0, "refused": 0}
    path = tmp_path / "case.safetensors"
    tracemalloc.start()
    try:
        for case in range(cases):
            mutated = _mutate(blob, rng)
            if rng.random() < 0.2:  # stack a second damage where the first left a header the mutator can edit
                try:
                    mutated = _mutate(mutated, rng)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error, RecursionError):
                    pass
            path.write_bytes(mutated)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            try:
                counts[_exercise(path)] += 1
            except Exception as e:  # noqa: BLE001 - the point: report which case broke and how
                raise AssertionError(f"case {case} (seed {seed}): {type(e).__name__}: {e}; bytes {mutated[:300]!r}")
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] - base
            assert elapsed < CASE_SECONDS, f"case {case} (seed {seed}) took {elapsed:.2f} s"
            assert peak < CASE_ALLOC_BYTES, f"case {case} (seed {seed}) allocated {peak} bytes"
    finally:
        tracemalloc.stop()
    return counts


def test_fuzz_short(tmp_path):
    counts = _fuzz(tmp_path, cases=300, seed=1234)
    assert counts["refused"] > 150 and counts["ok"] > 0, counts  # the mutator does reach both outcomes


@pytest.mark.slow
def test_fuzz_long(tmp_path):
    counts = _fuzz(tmp_path, cases=10_000, seed=20261202)
    print(f"safetensors fuzz: {counts}")
    assert counts["refused"] > 5000 and counts["ok"] > 0, counts
