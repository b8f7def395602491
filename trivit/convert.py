"""``trivit convert SRC DST``: the command-line front end of :mod:`conversion`, and ``--verify``
(which runs the source and the converted checkpoint in each framework, so it lives above them)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from vit_core.imports import import_trivit
from vit_core.safetensors_io import CheckpointError

_conversion = import_trivit("conversion")  # a user's conversion.py that shadows it is named, not mistaken for it
Converted = _conversion.Converted
TARGET_FORMATS, SOURCE_FORMATS = _conversion.TARGET_FORMATS, _conversion.SOURCE_FORMATS
convert_to, read_source = _conversion.convert_to, _conversion.read_source

__all__ = ["add_parser", "run", "verify"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``convert`` on the ``trivit`` sub-command table."""
    p = sub.add_parser("convert", help="convert timm / JAX npz / big_vision / HF TF or Flax weights",
                       description="Convert a ViT checkpoint. SRC: an HF folder or a timm/.npz file; DST: a new folder.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--from", dest="src_format", choices=SOURCE_FORMATS, help="source format (default: detected)")
    p.add_argument("--to", dest="dst_format", choices=list(TARGET_FORMATS), default="hf",
                   help="hf: config.json + model.safetensors (default); tf-h5: tf_model.h5; flax-msgpack: flax_model.msgpack")
    p.add_argument("--num-heads", type=int, help="attention heads (timm files do not record them; default from the width)")
    p.add_argument("--num-labels", type=int, help="0 drops the classification head; otherwise must match it")
    p.add_argument("--num-groups", type=int,
                   help="hybrids (timm, npz): the CNN backbone's GroupNorm groups (not recorded in the file; default 32)")
    p.add_argument("--exact-gelu", action="store_true", help="npz/big_vision: exact erf GELU instead of flax's tanh default")
    p.add_argument("--verify", action="store_true", help="run source and converted models on random pixels, print max |diff|")
    p.add_argument("--verify-in", default="pt,tf,flax", help="frameworks for --verify (default pt,tf,flax: those that import)")
    p.add_argument("--progress", action="store_true", help="show progress even for small models")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        fmt, conv = read_source(args.src, args.src_format, num_heads=args.num_heads, num_labels=args.num_labels,
                                exact_gelu=args.exact_gelu, num_groups=args.num_groups)
        how = "read" if args.src_format else "detected and read"
        print(f"{how} {args.src} as {fmt} checkpoint: {conv.summary()}")
        files = convert_to(conv, args.dst, args.dst_format, progress=sys.stderr, force_progress=args.progress)
        print(f"wrote {args.dst} ({args.dst_format}): {', '.join(sorted(f.name for f in files))}")
        if args.verify:
            diffs = verify(conv, args.dst, [f.strip() for f in args.verify_in.split(",") if f.strip()])
            worst = max(diffs.values(), default=float("nan"))
            print(f"verify: max abs difference {worst:.3g} over {sorted(diffs)}")
            if not worst <= 1e-4:
                print("verify FAILED: the converted model disagrees with the source", file=sys.stderr)
                return 1
    except (CheckpointError, OSError, ValueError) as e:  # OSError: FileNotFoundError, FileExistsError, a full disk, ...
        print(f"trivit convert: error: {e}", file=sys.stderr)
        return 2
    return 0


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
