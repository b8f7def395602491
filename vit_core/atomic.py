"""Atomic file writes: a crash mid-save never leaves a half-written file in place of a good one.

Every file trivit writes goes through :func:`atomic_write` (or :func:`replace_all`, for a set of
files that belong together): the bytes go to a temporary file in the destination's own folder,
are flushed and fsynced, and only then renamed over the destination (``os.replace`` is atomic on
POSIX and Windows). If anything fails before the rename, the temporary file is removed and the
old destination is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_json", "staged_files"]


def _default_file_mode() -> int:
    """0666 minus the process umask: what ``open(path, "w")`` would give the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not every platform lets a folder be opened.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike[str]) -> Iterator[Callable[[str], BinaryIO]]:
    """Stage several files in ``folder`` and put them all in place only if every write succeeds.

    Usage::

        with staged_files(d) as open_staged:
            with open_staged("config.json") as f: f.write(...)
            with open_staged("model.safetensors") as f: f.write(...)
        # here both files are in place; on an exception neither was touched

    Files are renamed into place one after another once all are complete and fsynced, so a crash
    can at worst leave some new and some old *complete* files, never a truncated one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, str]] = []  # (temp path, final name)
    handles: list[BinaryIO] = []

    def open_staged(name: str) -> BinaryIO:
        if os.sep in name or (os.altsep and os.altsep in name):
            raise ValueError(f"staged file name must be a plain file name, got {name!r}")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a checkpoint gets a normal file's permissions
        staged.append((tmp, name))
        fh = os.fdopen(fd, "wb")
        handles.append(fh)
        return fh

    try:
        yield open_staged
        for fh in handles:
            if not fh.closed:
                fh.close()
        for tmp, _ in staged:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for tmp, name in staged:
            os.replace(tmp, folder / name)
        _fsync_dir(folder)
    except BaseException:
        for fh in handles:
            with contextlib.suppress(Exception):
                fh.close()
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    with staged_files(path.parent) as open_staged, open_staged(path.name) as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as indented, key-sorted JSON (HF's ``config.json`` style) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode("utf-8"))
