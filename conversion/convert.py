"""Write a :class:`Converted` in a target format, atomically.

(Verifying a conversion numerically runs models, so it lives above the frameworks: ``trivit.convert.verify``.)

Atomicity of the destination: everything is written into a fresh sibling folder
``.DST.trivit-PID-XXXX.tmp`` which is renamed to ``DST`` only when complete; on any error it is
removed, so a failed conversion leaves no ``DST`` at all. ``DST`` must not exist (or be empty). A
staging folder that a killed conversion left (its process gone) is removed by the next conversion
to the same ``DST``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np

from vit_core.atomic import os_error_cause, stale_temporaries, temp_prefix
from vit_core.checkpoint import write_checkpoint
from vit_core.pretrained import saved_config_dict

from .common import Converted

__all__ = ["TARGET_FORMATS", "write_converted", "convert_to"]

#: ``--to`` value → number of times the writer materialises each tensor (for the progress count).
TARGET_FORMATS: dict[str, int] = {"hf": 2, "tf-h5": 1, "flax-msgpack": 1}  # hf: header pass + data pass
_PROGRESS_MIN_BYTES = 100 * 2**20


class _Progress:
    """``\\rconverting: 120/392 tensors, 812/1213 MB`` on stderr, for models above 100 MB."""

    def __init__(self, conv: Converted, passes: int, stream: TextIO | None, force: bool = False):
        shapes = conv.state.shapes()
        self.sizes = {k: 4 * int(np.prod(s)) for k, s in shapes.items()}
        self.total = sum(self.sizes.values())
        self.enabled = stream is not None and (force or self.total >= _PROGRESS_MIN_BYTES)
        self.stream, self.passes = stream, passes
        self.calls: dict[str, int] = {}
        self.done = self.done_bytes = 0

    def wrap(self, key: str, load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        def counted() -> np.ndarray:
            arr = load()
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.enabled and self.calls[key] == self.passes:
                self.done += 1
                self.done_bytes += self.sizes[key]
                end = "\n" if self.done == len(self.sizes) else ""
                print(f"\rconverting: {self.done}/{len(self.sizes)} tensors, "
                      f"{self.done_bytes / 2**20:.0f}/{self.total / 2**20:.0f} MB", end=end, file=self.stream, flush=True)
            return arr

        return counted


def write_converted(conv: Converted, folder: Path, fmt: str, progress: _Progress | None = None) -> list[Path]:
    """Write ``conv`` into ``folder`` (which may already exist) in format ``fmt``."""
    loaders = conv.state.loaders()
    if progress is not None:
        loaders = {k: progress.wrap(k, f) for k, f in loaders.items()}
    if fmt == "hf":
        return write_checkpoint(folder, loaders, saved_config_dict(conv.config, conv.model_class, "float32"))
    if fmt == "tf-h5":
        from .hf_tf import write_tf_h5

        return write_tf_h5(folder, loaders, conv.config, conv.model_class, conv.flags)
    if fmt == "flax-msgpack":
        from .hf_flax import write_flax_msgpack

        return write_flax_msgpack(folder, loaders, conv.config, conv.model_class, conv.flags)
    raise ValueError(f"target format must be one of {list(TARGET_FORMATS)}, got {fmt!r}")


def convert_to(conv: Converted, dst: str | os.PathLike[str], fmt: str = "hf", *, progress: TextIO | None = None,
               force_progress: bool = False) -> list[Path]:
    """Write ``conv`` as a new folder ``dst``, all or nothing (see the module docstring)."""
    if fmt not in TARGET_FORMATS:
        raise ValueError(f"target format must be one of {list(TARGET_FORMATS)}, got {fmt!r}")
    dst = Path(dst)
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; choose a new destination (conversions never overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(dst.parent, dst.name):  # a killed conversion's staging folder
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(dst.name), suffix=".tmp", dir=dst.parent))
    try:
        written = write_converted(conv, staging, fmt, _Progress(conv, TARGET_FORMATS[fmt], progress, force_progress))
        if dst.is_dir():
            dst.rmdir()  # empty, checked above
        os.rename(staging, dst)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot convert into {dst}: {os_error_cause(e)}; {dst} was not created and "
                                   "nothing was left beside it") from e
        raise
    return [dst / p.name for p in written]
