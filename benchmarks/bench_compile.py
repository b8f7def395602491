"""``torch.compile`` (inductor) vs eager for vit_torch's classifier: ViT-S/16 and ViT-B/16 at 224², fp32, CPU.

Both sides are the same module (random weights, eval, ``inference_mode``); the compiled one is timed after its
first call (reported apart: that is the compile). Interleaved rounds through ``trivit.bench.interleaved``, medians
and ranges. Usage: ``python benchmarks/bench_compile.py [--models S B] [--batches 1 8] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import vit_torch
from trivit.bench import make_plan, interleaved

MODELS = {
    "S": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "B": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["S"], choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    plan = make_plan("full", rounds=args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; img/s median [min-max]")
    for size in args.models:
        torch.manual_seed(0)
        config = vit_torch.ViTConfig(**MODELS[size], image_size=224, patch_size=16, num_labels=1000)
        model = vit_torch.ViTForImageClassification(config).eval()
        compiled = torch.compile(model)
        for batch in args.batches:
            x = torch.randn(batch, 3, 224, 224)

            def side(m):
                def call():
                    with torch.inference_mode():
                        return m(x).logits.numpy()
                return call

            values, extra = interleaved({"eager": side(model), "compiled": side(compiled)}, batch, plan)
            med = {k: statistics.median(v) for k, v in values.items()}
            diff = float(abs(extra["outputs"]["eager"] - extra["outputs"]["compiled"]).max())
            print(f"ViT-{size}/16 batch {batch}: eager {med['eager']:.3g} [{min(values['eager']):.3g}-"
                  f"{max(values['eager']):.3g}], compiled {med['compiled']:.3g} [{min(values['compiled']):.3g}-"
                  f"{max(values['compiled']):.3g}], ratio {med['compiled'] / med['eager']:.3f}, first compiled call "
                  f"{extra['first_s']['compiled']:.1f} s, max |logit diff| {diff:.2g}")


if __name__ == "__main__":
    main()
