"""Atomic file writes: a crash mid-save never leaves a half-written file in place of a good one.

Every file trivit writes goes through :func:`atomic_write` (or :func:`replace_all`, for a set of
files that belong together): the bytes go to a temporary file in the destination's own folder,
are flushed and fsynced, and only then renamed over the destination (``os.replace`` is atomic on
POSIX and Windows). If anything fails before the rename, the temporary file is removed and the
old destination is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "atomic_write_json", "os_error_cause", "staged_files", "stale_temporaries", "temp_prefix"]


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


#: Temporary files are ``.{final name}.trivit-{pid}-{random}.tmp``: hidden (no loader looks at them: they
#: read exact file names), and marked with the writer's process id, so that a save which finds
#: temporaries of a process that no longer runs (killed mid-save) removes them.
_TEMP = re.compile(r"^\.(?P<name>.+)\.trivit-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Temporaries in ``folder`` (of the final file or folder ``name``, if given) left by saves whose
    process is gone (see :data:`_TEMP`)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [Path(folder) / n for n in names if (m := _TEMP.match(n)) and name in (None, m["name"])
            and not _alive(int(m["pid"]))]


def temp_prefix(name: str) -> str:
    """The ``prefix`` (with ``suffix=".tmp"``) of a ``tempfile.mkstemp`` / ``mkdtemp`` temporary for ``name``."""
    return f".{name}.trivit-{os.getpid()}-"


def _open_temp(folder: Path, name: str) -> tuple[str, BinaryIO]:
    """A new temporary file for ``name`` in ``folder``: (its path, an open binary handle)."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), suffix=".tmp", dir=folder)
    os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a checkpoint gets a normal file's permissions
    return tmp, os.fdopen(fd, "wb")


_HINTS = {errno.EFBIG: "the file size limit (ulimit -f) was reached", errno.ENOSPC: "the disk is full",
          errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "no write permission",
          errno.EPERM: "no write permission", errno.EROFS: "a read-only file system"}


def os_error_cause(e: OSError) -> str:
    """Why an ``OSError`` happened, in words: ``"File too large (the file size limit (ulimit -f) was reached)"``;
    for an error :func:`staged_files` restated, the original one's."""
    if isinstance(e.__cause__, OSError) and _restated(e):
        e = e.__cause__
    hint = _HINTS.get(e.errno)
    return (e.strerror or str(e)) + (f" ({hint})" if hint else "")


_RESTATED = "cannot save "


def _restated(e: OSError) -> bool:
    return (e.strerror or "").startswith(_RESTATED)


def _save_error(e: OSError, folder: Path, name: str | None) -> OSError:
    """``e`` restated: which file of which folder could not be written, why, and that nothing changed."""
    target = folder / name if name else folder
    err = OSError(e.errno, f"{_RESTATED}{target}: {os_error_cause(e)}; the files already in {folder} are unchanged "
                           "and no temporary file was left")
    err.__cause__ = e
    return err


class _Stage:
    """What :func:`staged_files` yields: ``stage(name)`` opens a staged file for writing; ``stage.path(name)``
    gives a staged file's path instead, for writers that open files by name (h5py)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.staged: list[tuple[str, str]] = []  # (temp path, final name)
        self.handles: list[BinaryIO] = []
        self.current: str | None = None  # the file being written, for error messages

    def _new(self, name: str) -> tuple[str, BinaryIO]:
        if os.sep in name or (os.altsep and os.altsep in name):
            raise ValueError(f"staged file name must be a plain file name, got {name!r}")
        self.current = name
        tmp, fh = _open_temp(self.folder, name)
        self.staged.append((tmp, name))
        return tmp, fh

    def __call__(self, name: str) -> BinaryIO:
        _, fh = self._new(name)
        self.handles.append(fh)
        return fh

    def path(self, name: str) -> Path:
        tmp, fh = self._new(name)
        fh.close()
        return Path(tmp)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike[str]) -> Iterator[_Stage]:
    """Stage several files in ``folder`` and put them all in place only if every write succeeds.

    Usage::

        with staged_files(d) as open_staged:
            with open_staged("config.json") as f: f.write(...)
            with open_staged("model.safetensors") as f: f.write(...)
        # here both files are in place; on an exception neither was touched

    Files are renamed into place one after another once all are complete and fsynced, so a crash
    can at worst leave some new and some old *complete* files, never a truncated one (and only in
    the microseconds between those renames). Nothing is written outside ``folder``. An ``OSError``
    (no permission, a full disk, the file size limit) is re-raised with the same errno and a message
    naming the file and the cause, after every temporary file is removed; temporaries that a killed
    save left behind are removed by the next save into ``folder``.
    """
    folder = Path(folder)
    stage = _Stage(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in stale_temporaries(folder):
            with contextlib.suppress(OSError):
                stale.unlink()
        yield stage
        stage.current = None
        for fh in stage.handles:
            if not fh.closed:
                fh.close()
        for tmp, _ in stage.staged:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for tmp, name in stage.staged:
            stage.current = name
            os.replace(tmp, folder / name)
        _fsync_dir(folder)
    except BaseException as e:
        for fh in stage.handles:
            with contextlib.suppress(Exception):
                fh.close()
        for tmp, _ in stage.staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not _restated(e):
            raise _save_error(e, folder, stage.current) from e
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
