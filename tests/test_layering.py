"""The packages form a plain DAG: vit_core <- conversion <- vit_torch / vit_tf / vit_flax <- trivit.

Each package is imported with all its submodules in a fresh interpreter; the test then looks at
which of trivit's other packages (and which frameworks) that pulled in. A lazy import inside a
function is not caught here; the source scan below catches those for vit_core and conversion.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vit_core", "conversion", "vit_torch", "vit_tf", "vit_flax", "trivit")
FRAMEWORKS = ("vit_torch", "vit_tf", "vit_flax")
THIRD_PARTY_FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "keras")
#: What each package may import, of trivit's own packages.
ALLOWED = {
    "vit_core": set(),
    "conversion": {"vit_core"},
    **{fw: {"vit_core", "conversion"} for fw in FRAMEWORKS},
    "trivit": set(PACKAGES) - {"trivit"},
}

_CHILD = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    name = sys.argv[1]
    pkg = importlib.import_module(name)
    subs = sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, name + "."))
    for sub in subs:
        importlib.import_module(sub)
    loaded = sorted({m.partition(".")[0] for m in sys.modules})
    print(json.dumps({"subs": subs, "loaded": loaded}))
""")


def _imports_of(package: str) -> tuple[list[str], set[str]]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, package], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, f"importing {package} and its submodules failed:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["subs"], set(out["loaded"])


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_lower_layers(package):
    subs, loaded = _imports_of(package)
    assert subs, f"found no submodules of {package}: the check would prove nothing"
    others = loaded & (set(PACKAGES) - {package})
    bad = others - ALLOWED[package]
    assert not bad, f"importing {package} (and {len(subs)} submodules) imported {sorted(bad)}; it may import only {sorted(ALLOWED[package])}"
    if package in ("vit_core", "conversion"):
        heavy = loaded & set(THIRD_PARTY_FRAMEWORKS)
        assert not heavy, f"importing {package} loaded {sorted(heavy)}; frameworks must load only on use"


def _imported_names(package: str) -> dict[str, set[str]]:
    """Top-level names each module of ``package`` imports anywhere in its source (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.partition(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", ["vit_core", "conversion"])
def test_no_lazy_import_of_higher_layers(package):
    """Not even inside a function: vit_core names none of trivit's other packages, conversion only vit_core."""
    for module, names in _imported_names(package).items():
        bad = names & (set(PACKAGES) - {package}) - ALLOWED[package]
        assert not bad, f"{module} imports {sorted(bad)}"
        if package == "vit_core":  # torch too: pytorch_model.bin is read by vit_core.torch_pickle with numpy
            assert not names & set(THIRD_PARTY_FRAMEWORKS), f"{module} imports {sorted(names)}"


def _shadow_run(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "conversion.py").write_text("raise SystemExit('the user script ran')\n")
    prelude = f"import sys; sys.path.insert(0, {str(shadow)!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _assert_names_shadow(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert proc.returncode != 0
    assert "the user script ran" not in proc.stderr + proc.stdout
    assert "ShadowedPackageError" in proc.stderr, proc.stderr[-2000:]
    assert str(tmp_path / "shadow" / "conversion.py") in proc.stderr
    assert "shadows trivit's 'conversion' package" in proc.stderr and "Rename that file" in proc.stderr


def test_shadowing_conversion_py_is_named_on_import(tmp_path):
    _assert_names_shadow(_shadow_run(tmp_path, "import vit_torch\n"), tmp_path)


def test_shadowing_conversion_py_is_named_by_the_cli(tmp_path):
    code = "from trivit.cli import main\nmain(['convert', 'src', 'dst'])\n"
    _assert_names_shadow(_shadow_run(tmp_path, code), tmp_path)


def test_import_trivit_accepts_the_real_package():
    from vit_core.imports import import_trivit

    loading = import_trivit("conversion.loading")
    assert loading.__name__ == "conversion.loading"
