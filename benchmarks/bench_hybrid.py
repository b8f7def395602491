"""trivit vs Hugging Face transformers 4.x: ViT Hybrid (R50 + ViT-B, google/vit-hybrid-base-bit-384's config)
inference in PyTorch, measured in one process.

``ViTHybridForImageClassification`` forward (logits, 1000 labels, random weights shared by both sides through
one checkpoint folder), each side with its default attention (SDPA), under ``torch.inference_mode``; fp32 and
bf16 (``dtype=torch.bfloat16`` on both sides), batch 1 and 8. Sides are interleaved repeat by repeat so drift
on a shared machine hits both; each case is warmed up, then timed ``--repeats`` times (``--steps`` calls each).
The table shows the median ms/call, the [min, max] range, and HF / trivit (> 1: trivit is faster).

    python benchmarks/bench_hybrid.py --repeats 7               # the numbers in the docs
    python benchmarks/bench_hybrid.py --image-size 64 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402


def _models(folder: Path, dtype: torch.dtype):
    import transformers

    import vit_torch
    from frameworks import _patch_hf_hybrid_init  # HF 4.57 cannot build a ViTHybrid without it (see there)

    _patch_hf_hybrid_init()
    ours = vit_torch.ViTHybridForImageClassification.from_pretrained(folder, dtype=dtype).eval()
    hf = transformers.ViTHybridForImageClassification.from_pretrained(folder, dtype=dtype).eval()
    return {"trivit": ours, "hf": hf}


def _time(model, x: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model(pixel_values=x)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 warm-up: a smoke test")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup = 1, 1

    from vit_core.config_hybrid import ViTHybridConfig
    import vit_torch

    config = ViTHybridConfig(image_size=args.image_size, num_labels=1000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        vit_torch.ViTHybridForImageClassification(config).save_pretrained(tmp)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            models = _models(Path(tmp), dtype)
            for batch in args.batches:
                x = torch.randn(batch, 3, args.image_size, args.image_size, dtype=dtype)
                times: dict[str, list[float]] = {side: [] for side in models}
                with torch.inference_mode():
                    diff = float((models["trivit"](x).logits.float() - models["hf"](x).logits.float()).abs().max())
                    for side, model in models.items():
                        for _ in range(args.warmup):
                            model(pixel_values=x)
                    for _ in range(args.repeats):
                        for side, model in models.items():
                            times[side].append(_time(model, x, args.steps))
                med = {side: statistics.median(t) for side, t in times.items()}
                rows.append(dict(dtype=dtype_name, batch=batch, image_size=args.image_size,
                                 trivit_ms=med["trivit"], hf_ms=med["hf"], ratio=med["hf"] / med["trivit"],
                                 trivit_range=[min(times["trivit"]), max(times["trivit"])],
                                 hf_range=[min(times["hf"]), max(times["hf"])], max_logit_diff=diff))
                r = rows[-1]
                print(f"{dtype_name:9s} batch {batch:2d}: trivit {r['trivit_ms']:8.1f} ms "
                      f"[{r['trivit_range'][0]:.0f}, {r['trivit_range'][1]:.0f}]  HF {r['hf_ms']:8.1f} ms "
                      f"[{r['hf_range'][0]:.0f}, {r['hf_range'][1]:.0f}]  HF/trivit {r['ratio']:.2f}  "
                      f"max|Δlogit| {diff:.2g}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.image_size}, "
          f"median of {args.repeats} × {args.steps} calls")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
