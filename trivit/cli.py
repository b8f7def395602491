"""The ``trivit`` command line: one module per verb (``trivit/<verb>.py``), each with
``add_parser(subparsers)`` (which sets ``func``) and ``run(args) -> exit code``.

Importing a verb module is light: frameworks load when a verb runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "VERBS"]

#: The verbs, in ``--help`` order; each is the module ``trivit.<verb>``.
VERBS: tuple[str, ...] = ("demo", "convert", "predict", "train", "bench", "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trivit", description="One ViT, three frameworks, one checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        importlib.import_module(f"trivit.{verb}").add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
