"""trivit (Keras 3) vs Hugging Face transformers 4.x (tf-keras) ViT on TensorFlow, measured in one run.

Two cases, each with XLA (``jit_compile=True``) on both sides and the same random-weight config:

* ``infer``: ``TFViTModel`` forward, ``tf.function(jit_compile=True)``, ``last_hidden_state``;
* ``train``: ``TFViTForImageClassification`` one Keras ``train_on_batch`` step (``compile(jit_compile=True)``,
  SGD, the model's internal cross-entropy loss).

Each case is warmed up (compilation included), then timed ``--repeats`` times, ``--steps`` iterations
per repeat; the table shows the median ms/iter and HF / trivit (>1: trivit is faster).

HF's TF models need tf-keras (``TF_USE_LEGACY_KERAS=1`` is set before transformers is imported); trivit
uses Keras 3. Both live in one process by default; ``--subprocess`` runs each side in its own process.

    python benchmarks/bench_tf.py --variant B/16 --batch 8 --repeats 20 --steps 5
    python benchmarks/bench_tf.py --variant Ti/16 --batch 2 --repeats 2 --steps 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # HF's TF models are tf-keras models; must precede `import transformers`

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SIDES = ("trivit", "hf")
CASES = ("infer", "train")


def _config(args: argparse.Namespace):
    from vit_core.config import ViTConfig

    return ViTConfig.from_variant(args.variant, num_labels=args.num_labels, image_size=args.image_size)


def _hf_config(config):
    import transformers

    return transformers.ViTConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps, image_size=config.image_size,
        patch_size=config.patch_size, num_channels=config.num_channels, qkv_bias=config.qkv_bias,
        encoder_stride=config.encoder_stride, num_labels=config.num_labels,
    )


def _time(fn: Callable[[], Any], warmup: int, repeats: int, steps: int) -> float:
    """Median over ``repeats`` of (seconds for ``steps`` calls) / steps, in ms; ``fn`` must block."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - t0) / steps)
    return 1e3 * statistics.median(times)


def _build(side: str, case: str, config):
    """(model, call(x, y) -> blocking) for one side and case."""
    import tensorflow as tf

    if side == "trivit":
        import keras

        import vit_tf

        if case == "infer":
            model = vit_tf.TFViTModel(config, add_pooling_layer=False)
            fwd = tf.function(lambda x: model(x, training=False).last_hidden_state, jit_compile=True)
            return lambda x, y: fwd(x).numpy()
        model = vit_tf.TFViTForImageClassification(config)
        model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=True)
        return lambda x, y: model.train_on_batch({"pixel_values": x, "labels": y})

    import tf_keras
    import transformers

    hf_config = _hf_config(config)
    if case == "infer":
        model = transformers.TFViTModel(hf_config, add_pooling_layer=False)
        fwd = tf.function(lambda x: model(pixel_values=x, training=False).last_hidden_state, jit_compile=True)
        return lambda x, y: fwd(x).numpy()
    model = transformers.TFViTForImageClassification(hf_config)
    model.compile(optimizer=tf_keras.optimizers.SGD(1e-3), jit_compile=True)  # no loss: HF's internal loss
    return lambda x, y: model.train_on_batch({"pixel_values": x, "labels": y})


def measure(side: str, args: argparse.Namespace) -> dict[str, float]:
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    config = _config(args)
    h, w = config.image_hw
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch, config.num_channels, h, w)).astype(np.float32))
    y = tf.constant(rng.integers(0, config.num_labels, args.batch).astype(np.int32))
    results = {}
    for case in args.cases:
        tf.random.set_seed(0)
        step = _build(side, case, config)
        results[case] = _time(lambda: step(x, y), args.warmup, args.repeats, args.steps)
    return results


def _in_subprocess(side: str, argv: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--only", side], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="B/16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-labels", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats; the median is reported")
    p.add_argument("--steps", type=int, default=3, help="iterations per timed repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (XLA compilation included)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TF's default)")
    p.add_argument("--subprocess", action="store_true", help="run each side in its own process")
    p.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side, JSON out
    args = p.parse_args(argv)

    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    if args.subprocess:
        results = {side: _in_subprocess(side, argv) for side in SIDES}
    else:
        results = {side: measure(side, args) for side in SIDES}

    import keras
    import tensorflow as tf

    mode = "one subprocess per side" if args.subprocess else "one process"
    print(f"\nViT-{args.variant}, batch {args.batch}, {args.image_size}px, fp32, XLA; TF {tf.__version__}, "
          f"Keras {keras.__version__} (trivit) / tf-keras (HF); {mode}; median of {args.repeats} x {args.steps} "
          f"iterations after {args.warmup} warm-up")
    print(f"{'case':<8}{'trivit ms/iter':>16}{'HF ms/iter':>14}{'HF / trivit':>14}")
    for case in args.cases:
        ours, theirs = results["trivit"][case], results["hf"][case]
        print(f"{case:<8}{ours:>16.2f}{theirs:>14.2f}{theirs / ours:>14.3f}")


if __name__ == "__main__":
    main()
