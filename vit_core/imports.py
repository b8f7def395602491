"""Import one of trivit's top-level packages and say so clearly when a user's file shadows it.

trivit's packages have plain names (``conversion``), so a ``conversion.py`` in the working
directory or anywhere earlier on ``sys.path`` is found first and the import fails with a puzzling
``No module named 'conversion.loading'; 'conversion' is not a package``. :func:`import_trivit`
checks the marker each trivit package sets (``__trivit_package__ = "<its name>"``) and otherwise
raises an :class:`ImportError` naming the shadowing file. The shadowing module is not executed
when it is a plain file. This module names no package itself: the caller does (the layers above
vit_core; vit_core imports none of them).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

__all__ = ["MARKER", "ShadowedPackageError", "import_trivit"]

#: Attribute every trivit top-level package sets to its own name.
MARKER = "__trivit_package__"


class ShadowedPackageError(ImportError):
    """A module of the same name as one of trivit's packages is found before it on ``sys.path``."""


def _shadowed(top: str, where: object) -> ShadowedPackageError:
    return ShadowedPackageError(
        f"{where} shadows trivit's {top!r} package: it is found first on sys.path (import {top} loads it "
        f"instead of trivit's). Rename that file (or folder) to something other than {top!r}, or take its "
        "folder off sys.path / the working directory."
    )


def import_trivit(name: str) -> ModuleType:
    """``importlib.import_module(name)`` for a module of one of trivit's packages (e.g.
    ``"conversion.loading"``), after checking that its top-level package is trivit's."""
    top = name.partition(".")[0]
    module = sys.modules.get(top)
    if module is None:
        spec = importlib.util.find_spec(top)
        if spec is not None and spec.submodule_search_locations is None:  # a plain file: not run
            raise _shadowed(top, spec.origin or spec.name)
        module = importlib.import_module(top)
    if getattr(module, MARKER, None) != top:
        raise _shadowed(top, getattr(module, "__file__", None) or getattr(module, "__path__", None) or repr(module))
    return importlib.import_module(name)
