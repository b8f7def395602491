"""trivit vs Hugging Face transformers 4.x image processors: throughput on 64 real photos, in one process.

The batch is scikit-learn's two sample photos (china.jpg, flower.jpg, 427x640 RGB) as PIL images, repeated to
64. Cases: ``ViTImageProcessor`` (224x224 bilinear) and ``ViTHybridImageProcessor`` (shortest edge 224 bicubic,
center crop 224), ``return_tensors`` "np" and "pt". trivit runs with its default thread pool, with
``num_threads=1``, and with the inexact ``reducing_gap=1.0``. Sides are interleaved round by round so drift on
a shared machine hits all of them; each is warmed up first. Prints the median images/s (wall clock), [min, max],
the ratio to HF, images per CPU-second of the process (all its threads; steadier than wall clock when other
work shares the CPUs), its ratio, and the max |difference| to HF's pixel_values.

    python benchmarks/bench_processors.py --rounds 9     # the numbers in docs/image_processing.md
    python benchmarks/bench_processors.py --quick        # smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 8 images")
    args = parser.parse_args()
    rounds, batch = (2, 8) if args.quick else (args.rounds, args.batch)

    import numpy as np
    import PIL
    import transformers
    from PIL import Image
    from sklearn.datasets import load_sample_image

    import vit_core
    from vit_core.image_processing import _default_threads  # the processors' own pool size

    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    images = [photos[i % 2] for i in range(batch)]
    kinds = {"vit": (transformers.ViTImageProcessor(), vit_core.ViTImageProcessorFast()),
             "hybrid": (transformers.ViTHybridImageProcessor(), vit_core.ViTHybridImageProcessor())}
    cases = {}
    for kind, (hf, ours) in kinds.items():
        for tensors in ("np", "pt"):
            cases[(kind, tensors, "HF")] = lambda hf=hf, t=tensors: hf(images, return_tensors=t)["pixel_values"]
            for label, extra in (("trivit", {}), ("trivit 1 thread", {"num_threads": 1}),
                                 ("trivit reducing_gap=1", {"reducing_gap": 1.0})):
                cases[(kind, tensors, label)] = (
                    lambda ours=ours, t=tensors, e=extra: ours(images, return_tensors=t, **e).pixel_values)
    # The floor: Pillow's resize alone, which both sides must run for HF's pixels (no trivit row can beat it).
    cases[("vit", "-", "Pillow resize alone")] = lambda: [im.resize((224, 224), Image.BILINEAR) for im in images]
    cases[("hybrid", "-", "Pillow resize alone")] = lambda: [im.resize((335, 224), Image.BICUBIC) for im in images]
    # ... and spread over one thread per CPU, as trivit's pool does: the ceiling for any exact processor here.
    pool = ThreadPoolExecutor(_default_threads())
    cases[("vit", "-", "Pillow resize, threads")] = lambda: list(
        pool.map(lambda im: im.resize((224, 224), Image.BILINEAR), images))
    cases[("hybrid", "-", "Pillow resize, threads")] = lambda: list(
        pool.map(lambda im: im.resize((335, 224), Image.BICUBIC), images))
    times: dict[tuple[str, str, str], list[float]] = {key: [] for key in cases}
    cpu: dict[tuple[str, str, str], list[float]] = {key: [] for key in cases}
    diffs = {}
    for key, run in cases.items():  # warm-up, and the difference to HF
        out = run()
        if key[1] != "-":
            diffs[key] = float(np.max(np.abs(np.asarray(out) - np.asarray(cases[(key[0], key[1], "HF")]()))))
    for _ in range(rounds):
        for key, run in cases.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            times[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    print(f"{batch} photos (427x640 RGB, PIL), {rounds} rounds, {os.cpu_count()} CPUs; transformers "
          f"{transformers.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}")
    print(f"{'case':<34} {'images/s':>9} {'[min, max]':>13} {'x HF':>5} {'img/CPU-s':>9} {'x HF':>5} "
          f"{'max |diff|':>10}")
    for key, values in times.items():
        rate, per_cpu = batch / statistics.median(values), batch / statistics.median(cpu[key])
        hf = (key[0], "np" if key[1] == "-" else key[1], "HF")
        hf_rate, hf_per_cpu = batch / statistics.median(times[hf]), batch / statistics.median(cpu[hf])
        print(f"{' / '.join(key):<34} {rate:9.0f} [{batch / max(values):4.0f}, {batch / min(values):4.0f}] "
              f"{rate / hf_rate:5.2f} {per_cpu:9.0f} {per_cpu / hf_per_cpu:5.2f} {diffs.get(key, float('nan')):10.3g}")


if __name__ == "__main__":
    main()
