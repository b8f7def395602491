"""``from_pretrained`` wall time and peak RSS: trivit vs HF transformers 4.x, per framework (issue #13).

Writes a random canonical checkpoint (``config.json`` + ``model.safetensors``, HF PyTorch names and layouts;
default ViT-B/16 with 1000 labels, ~346 MB fp32) into a temporary folder, then loads it in fresh Python
subprocesses, interleaved (trivit pt, HF pt, trivit tf, HF tf, ...; ``--repeats`` rounds) so that load from
other processes hits both sides alike, and reports medians.

Each child imports its framework and library, runs ``gc.collect()`` (so a pending full collection of the
import's objects is not charged to the load), reads its RSS, resets the kernel's high-water mark
(``/proc/self/clear_refs``), times one ``from_pretrained`` call, then reads

* ``peak``: ``ru_maxrss`` minus the RSS after imports (the issue's definition; ``ru_maxrss`` includes any import
  peak, so this can only overstate);
* ``hwm``: the high-water mark since the reset, minus the RSS after imports (the load alone);
* ``touched``: the same after reading every weight once (a forward pass touches them all): a loader that maps
  the file lazily shows its real footprint here.

Peers: HF PyTorch loads the same folder. HF TF 4.57 cannot (``load_pytorch_state_dict_in_tf2_model`` iterates
a ``safe_open`` handle, a TypeError with the installed safetensors; the bench checks and says so), so HF TF
loads its native ``tf_model.h5`` of the same weights (written once by ``trivit convert --to tf-h5``).
HF Flax loads the same folder (it converts the PyTorch safetensors itself); ``--flax-native`` adds HF Flax
from its native ``flax_model.msgpack``.

Targets (issue #13): trivit time <= 0.5 x HF's, and trivit peak <= 1.3 x the weights' bytes, per framework.

Usage::

    python benchmarks/bench_load.py                      # ViT-B/16, pt + tf + flax, 3 rounds
    python benchmarks/bench_load.py --frameworks pt --repeats 5
    python benchmarks/bench_load.py --variant S/16 --labels 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit_core.checkpoint import write_checkpoint  # noqa: E402
from vit_core.config import ViTConfig  # noqa: E402
from vit_core.pretrained import saved_config_dict  # noqa: E402
from vit_core.weights import param_specs  # noqa: E402

TIME_TARGET, RSS_TARGET = 0.5, 1.3
CLASS = "ViTForImageClassification"

#: case → (framework, library, folder kind, import statement, class expression, "touch every weight" expression)
CASES: dict[str, tuple[str, str, str, str, str, str]] = {
    "pt": ("pt", "trivit", "canonical", "import torch, vit_torch as lib", f"lib.{CLASS}",
           "sum(float(p.double().sum()) for p in m.parameters())"),
    "pt-hf": ("pt", "HF", "canonical", "import torch, transformers as lib", f"lib.{CLASS}",
              "sum(float(p.double().sum()) for p in m.parameters())"),
    "tf": ("tf", "trivit", "canonical", "import vit_tf as lib", f"lib.TF{CLASS}",
           "sum(float(v.numpy().sum()) for v in m.weights)"),
    "tf-hf": ("tf", "HF", "tf-h5", "import transformers as lib", f"lib.TF{CLASS}",
              "sum(float(v.numpy().sum()) for v in m.weights)"),
    "flax": ("flax", "trivit", "canonical", "import jax, vit_flax as lib", f"lib.Flax{CLASS}",
             "sum(float(x.sum()) for x in jax.tree_util.tree_leaves(m.params))"),
    "flax-hf": ("flax", "HF", "canonical", "import jax, transformers as lib", f"lib.Flax{CLASS}",
                "sum(float(x.sum()) for x in jax.tree_util.tree_leaves(m.params))"),
    "flax-hf-native": ("flax", "HF", "flax-msgpack", "import jax, transformers as lib", f"lib.Flax{CLASS}",
                       "sum(float(x.sum()) for x in jax.tree_util.tree_leaves(m.params))"),
}

_CHILD = textwrap.dedent("""
    import gc, json, os, resource, sys, time, warnings
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    folder, imports, cls_expr, touch = sys.argv[1:5]
    t0 = time.perf_counter()
    exec(imports)
    import_s = time.perf_counter() - t0
    cls = eval(cls_expr)
    gc.collect()
    base = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    t0 = time.perf_counter()
    m = cls.from_pretrained(folder)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    hwm = status("VmHWM") - base if hwm_reset else None
    eval(touch)
    touched = status("VmHWM") - base if hwm_reset else None
    print("@@" + json.dumps({"seconds": seconds, "import_s": import_s, "peak": peak, "hwm": hwm, "touched": touched}))
""")


def write_random_checkpoint(folder: Path, variant: str, labels: int) -> int:
    """A canonical checkpoint of random float32 weights, written tensor by tensor; returns the weights' bytes."""
    config = ViTConfig.from_variant(variant, num_labels=labels)
    specs = param_specs(CLASS, config)
    rng = np.random.default_rng(0)
    tensors = {s.name: (lambda s=s: (rng.standard_normal(s.shape, np.float32) * 0.02)) for s in specs}
    write_checkpoint(folder, tensors, saved_config_dict(config, CLASS, "float32"))
    return sum(4 * int(np.prod(s.shape)) for s in specs)


def convert(src: Path, dst: Path, fmt: str) -> None:
    """A native HF TF / Flax folder of the same weights, by ``trivit convert`` (streaming)."""
    subprocess.run([sys.executable, "-m", "trivit.cli", "convert", str(src), str(dst), "--to", fmt], check=True,
                   cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True)


def run_child(case: str, folder: Path) -> dict:
    _, _, _, imports, cls_expr, touch = CASES[case]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), imports, cls_expr, touch], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(lines[-1][2:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--labels", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frameworks", default="pt,tf,flax")
    ap.add_argument("--flax-native", action="store_true", help="also HF Flax from its own flax_model.msgpack")
    ap.add_argument("--folder", type=Path, help="reuse a canonical checkpoint folder instead of writing one")
    ap.add_argument("--json", type=Path, help="write the raw and median numbers here")
    args = ap.parse_args(argv)
    frameworks = args.frameworks.split(",")
    cases = [c for c, (fw, lib, kind, *_) in CASES.items()
             if fw in frameworks and (c != "flax-hf-native" or args.flax_native)]

    with tempfile.TemporaryDirectory(prefix="trivit-bench-load-") as tmp:
        tmp = Path(tmp)
        folders = {"canonical": args.folder or tmp / "canonical"}
        if args.folder is None:
            weight_bytes = write_random_checkpoint(folders["canonical"], args.variant, args.labels)
        else:
            weight_bytes = (args.folder / "model.safetensors").stat().st_size
        print(f"checkpoint: {folders['canonical']} ({weight_bytes / 2**20:.1f} MiB of weights)")
        if "tf-hf" in cases:
            folders["tf-h5"] = tmp / "tf-h5"
            convert(folders["canonical"], folders["tf-h5"], "tf-h5")
            same = run_child("tf-hf", folders["canonical"])
            print("HF TF on the same folder:", "loads" if "error" not in same else f"fails ({same['error'][-160:]})")
        if "flax-hf-native" in cases:
            folders["flax-msgpack"] = tmp / "flax-msgpack"
            convert(folders["canonical"], folders["flax-msgpack"], "flax-msgpack")
        runs: dict[str, list[dict]] = {c: [] for c in cases}
        for r in range(args.repeats):
            for case in cases:
                out = run_child(case, folders[CASES[case][2]])
                runs[case].append(out)
                shown = out.get("error") or f"{out['seconds']:.3f} s, peak {out['peak'] / 2**20:.0f} MiB"
                print(f"  round {r + 1} {case:15s} {shown}", flush=True)

    def med(case: str, field: str) -> float | None:
        vals = [o[field] for o in runs[case] if "error" not in o and o.get(field) is not None]
        return statistics.median(vals) if vals else None

    print(f"\nmedians of {args.repeats} fresh processes; weights {weight_bytes / 2**20:.1f} MiB "
          f"(targets: time <= {TIME_TARGET} x HF, peak <= {RSS_TARGET} x weights)")
    print(f"{'case':15s} {'import s':>9s} {'load s':>8s} {'x HF':>6s} {'peak MiB':>9s} {'x W':>6s} "
          f"{'hwm MiB':>8s} {'touched MiB':>12s}")
    summary = {}
    for case in cases:
        fw, lib = CASES[case][:2]
        peer = f"{fw}-hf" if lib == "trivit" else None
        s, peak = med(case, "seconds"), med(case, "peak")
        if s is None:
            print(f"{case:15s} failed: {runs[case][-1].get('error')}")
            continue
        ratio = s / med(peer, "seconds") if peer in runs and med(peer, "seconds") else None
        hwm, touched = med(case, "hwm"), med(case, "touched")
        summary[case] = {"seconds": s, "import_s": med(case, "import_s"), "time_vs_hf": ratio, "peak": peak,
                         "peak_vs_weights": peak / weight_bytes, "hwm": hwm, "touched": touched}
        print(f"{case:15s} {med(case, 'import_s'):9.2f} {s:8.3f} {'' if ratio is None else f'{ratio:.2f}':>6s} "
              f"{peak / 2**20:9.0f} {peak / weight_bytes:6.2f} {'' if hwm is None else f'{hwm / 2**20:.0f}':>8s} "
              f"{'' if touched is None else f'{touched / 2**20:.0f}':>12s}")
    if args.json:
        args.json.write_text(json.dumps({"weight_bytes": weight_bytes, "runs": runs, "median": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
