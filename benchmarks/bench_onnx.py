"""onnxruntime (CPU) throughput of vit_torch.export_onnx graphs vs PyTorch eager, ViT-S/16 and ViT-B/16 at 224².

Runs, per model and batch size, in interleaved rounds (one call of each runner per round, the order rotating), and
reports medians: PyTorch with ``attn_implementation="eager"`` and with "sdpa" (the default), and onnxruntime on the
graph of each exporter (dynamo, torchscript). Random weights (no download); fp32; both runtimes use their default
thread pools. Usage: ``python benchmarks/bench_onnx.py [--rounds 7] [--batches 1 8] [--models S B]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vit_torch
from vit_torch.export import export_onnx, run_onnx

MODELS = {  # ViT-S/16 and ViT-B/16 at 224² (timm / HF sizes)
    "S": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "B": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(size: str, batches: list[int], rounds: int, folder: Path) -> None:
    config = vit_torch.ViTConfig(**MODELS[size], image_size=224, patch_size=16, num_labels=1000)
    torch.manual_seed(0)
    model = vit_torch.ViTForImageClassification(config).eval()
    files = {}
    for exporter in ("dynamo", "torchscript"):
        t = time.perf_counter()
        files[exporter] = export_onnx(model, folder / f"vit-{size}-{exporter}.onnx", exporter=exporter)
        print(f"ViT-{size}/16 export {exporter}: {time.perf_counter() - t:.1f} s, "
              f"{files[exporter].stat().st_size / 2**20:.0f} MiB")
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        xt = torch.from_numpy(x)

        def torch_run(impl: str):
            def run():
                config.attn_implementation = impl  # read at each forward
                with torch.inference_mode():
                    return model(xt).logits
            return run

        runners = {"torch eager": torch_run("eager"), "torch sdpa": torch_run("sdpa"),
                   **{f"ort {e}": (lambda f=f: run_onnx(f, x)["logits"]) for e, f in files.items()}}
        ref = runners["torch sdpa"]().numpy()
        for name, run in runners.items():  # warm-up, and a sanity check of the numbers
            diff = float(np.abs(np.asarray(run()) - ref).max())
            assert diff < 1e-3, f"{name}: logits differ from torch sdpa by {diff}"
        times: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(_timed(runners[name]))
        base = statistics.median(times["torch sdpa"])
        print(f"ViT-{size}/16 batch {batch} (median of {rounds}; img/s; ratio to torch sdpa):")
        for name in names:
            med = statistics.median(times[name])
            print(f"  {name:16s} {batch / med:8.1f} img/s  {base / med:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=["S", "B"], choices=list(MODELS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as d:
        for size in args.models:
            bench(size, args.batches, args.rounds, Path(d))


if __name__ == "__main__":
    main()
