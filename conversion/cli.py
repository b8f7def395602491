"""``trivit convert SRC DST``: the command-line front end of :mod:`conversion`."""

from __future__ import annotations

import argparse
import sys

from vit_core.safetensors_io import CheckpointError

from .convert import TARGET_FORMATS, convert_to, verify
from .detect import SOURCE_FORMATS, read_source

__all__ = ["add_parser", "run"]


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
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"trivit convert: error: {e}", file=sys.stderr)
        return 2
    return 0
