"""vit_core is framework-agnostic: importing all of it loads no torch, tensorflow or jax."""

import subprocess
import sys


def test_vit_core_imports_no_framework():
    code = (
        "import sys, pkgutil, importlib, vit_core\n"
        "for m in pkgutil.iter_modules(vit_core.__path__):\n"
        "    importlib.import_module('vit_core.' + m.name)\n"
        "bad = sorted(n for n in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if n in sys.modules)\n"
        "print(','.join(bad))\n"
        "print(len([m for m in pkgutil.iter_modules(vit_core.__path__)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "", f"importing vit_core loaded {out[0]}"
    assert int(out[1]) >= 8, "the check imported fewer vit_core modules than exist"
