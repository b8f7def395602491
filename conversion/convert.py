"""Write a :class:`Converted` in a target format, atomically, and verify it numerically.

Atomicity of the destination: everything is written into a fresh sibling folder
``.DST.convert-XXXX`` which is renamed to ``DST`` only when complete; on any error it is
removed, so a failed conversion leaves no ``DST`` at all. ``DST`` must not exist (or be empty).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

import numpy as np

from vit_core.checkpoint import write_checkpoint
from vit_core.pretrained import saved_config_dict

from .common import Converted

__all__ = ["TARGET_FORMATS", "write_converted", "convert_to", "verify"]

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
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.convert-", dir=dst.parent))
    try:
        written = write_converted(conv, staging, fmt, _Progress(conv, TARGET_FORMATS[fmt], progress, force_progress))
        if dst.is_dir():
            dst.rmdir()  # empty, checked above
        os.rename(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [dst / p.name for p in written]


# ------------------------------------------------------------------------------- verification
_FRAMEWORKS = {"pt": ("vit_torch", ""), "tf": ("vit_tf", "TF"), "flax": ("vit_flax", "Flax")}


def _main_output(model_class: str) -> str:
    """The field ``--verify`` compares: logits, the reconstruction, or the bare model's last hidden state."""
    if model_class.endswith("ForImageClassification"):
        return "logits"
    return "reconstruction" if model_class.endswith("ForMaskedImageModeling") else "last_hidden_state"


def _torch_reference(conv: Converted, pixels: np.ndarray) -> np.ndarray:
    import torch

    import vit_torch

    model = getattr(vit_torch, conv.model_class)(conv.config, **conv.flags).eval()
    state = {k: torch.from_numpy(np.array(conv.state[k], dtype=np.float32)) for k in conv.state}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return getattr(model(torch.from_numpy(pixels)), _main_output(conv.model_class)).numpy()


def _run_framework(name: str, conv: Converted, folder: Path, pixels: np.ndarray) -> np.ndarray:
    module, prefix = _FRAMEWORKS[name]
    cls = getattr(importlib.import_module(module), prefix + conv.model_class)
    model = cls.from_pretrained(folder, **conv.flags)
    field = _main_output(conv.model_class)
    if name == "pt":
        import torch

        with torch.no_grad():
            return getattr(model.eval()(torch.from_numpy(pixels)), field).numpy()
    return np.asarray(getattr(model(pixels), field))


def verify(conv: Converted, folder: str | os.PathLike[str], frameworks: Iterable[str] = ("pt", "tf", "flax"),
           *, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, float]:
    """Run the source weights (in vit_torch, from memory) and the written folder (in each framework
    that imports) on the same random pixels; returns ``{framework: max abs difference}``."""
    c = conv.config
    h, w = c.image_hw
    pixels = np.random.default_rng(seed).standard_normal((2, c.num_channels, h, w)).astype(np.float32)
    ref = _torch_reference(conv, pixels)
    out: dict[str, float] = {}
    for name in frameworks:
        if name not in _FRAMEWORKS:
            raise ValueError(f"unknown framework {name!r}; choose from {list(_FRAMEWORKS)}")
        module, prefix = _FRAMEWORKS[name]
        try:
            imported = importlib.import_module(module)
        except Exception as e:  # an extra not installed, or a framework that fails to import
            log(f"verify: skipping {name} ({type(e).__name__}: {e})")
            continue
        if not hasattr(imported, prefix + conv.model_class):
            log(f"verify: skipping {name} ({module} has no {prefix + conv.model_class})")
            continue
        with contextlib.redirect_stdout(sys.stderr):
            got = _run_framework(name, conv, Path(folder), pixels)
        out[name] = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
        log(f"verify: {name}: max |{_main_output(conv.model_class)} - source| = {out[name]:.3g}")
    return out
