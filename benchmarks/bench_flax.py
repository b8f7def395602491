"""trivit Flax vs HF transformers 4.x Flax ViT: jitted inference and a jitted AdamW train step, one process.

    python benchmarks/bench_flax.py --variant B/16 --batch 8 --repeats 20

Both sides run the same weights (trivit's random init, copied into HF's tree; the max |difference|
of the outputs is printed as a check that the same function is timed), at JAX's default matmul
precision, fp32. Each case is compiled and run ``--warmup`` times untimed, then timed ``--repeats``
times, each call ended by ``block_until_ready``; the table gives the median ms/iter and
ratio = HF / trivit (> 1: trivit faster). The train step is cross-entropy + ``optax.adamw`` through
:func:`vit_flax.training.make_train_step` for trivit and the same loss / optimizer written out for HF
(HF's Flax ViT takes no labels); params and optimizer state are fed back each step.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vit_flax
from vit_core.config import ViTConfig
from vit_flax.training import make_train_step

#: (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size) by ViT size
SIZES = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096),
         "H": (1280, 32, 16, 5120)}


def variant_config(variant: str, image_size: int, num_labels: int) -> ViTConfig:
    m = re.fullmatch(r"(Ti|S|B|L|H)/(\d+)", variant)
    if m is None:
        raise SystemExit(f"--variant must look like B/16 (sizes {', '.join(SIZES)}), got {variant!r}")
    d, layers, heads, mlp = SIZES[m.group(1)]
    return ViTConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                     patch_size=int(m.group(2)), image_size=image_size, num_labels=num_labels)


def to_hf_tree(params: Any) -> Any:
    """trivit's param tree → HF Flax ViT's: the only difference is ``layer_3`` ↔ ``layer/3``."""
    if not isinstance(params, dict):
        return params
    out: dict[str, Any] = {}
    for k, v in params.items():
        if m := re.fullmatch(r"layer_(\d+)", k):
            out.setdefault("layer", {})[m.group(1)] = to_hf_tree(v)
        else:
            out[k] = to_hf_tree(v)
    return out


def same_structure(a: Any, b: Any) -> bool:
    shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)  # noqa: E731
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and shapes(a) == shapes(b)


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms; the first ``warmup`` calls (compilation included) are not timed."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def chained(step: Callable[..., Any], params: Any, opt_state: Any, batch: Any) -> Callable[[], Any]:
    """A no-argument call of a train step that feeds its params and optimizer state back in."""
    state = [params, opt_state]

    def run() -> Any:
        state[0], state[1], loss = step(state[0], state[1], batch)
        return loss

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="B/16", help="Ti|S|B|L|H / patch size, e.g. B/16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (the first compiles)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-labels", type=int, default=1000)
    ap.add_argument("--skip-train", action="store_true", help="time inference only")
    args = ap.parse_args(argv)

    import transformers  # only here: the rest of trivit never imports it

    cfg = variant_config(args.variant, args.image_size, args.num_labels)
    hf_cfg = transformers.ViTConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, 3, args.image_size, args.image_size)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, args.num_labels, args.batch), jnp.int32)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"transformers {transformers.__version__}; ViT-{args.variant} {args.image_size}px fp32, batch "
          f"{args.batch}, warm-up {args.warmup}, median of {args.repeats}")

    rows = []
    for name, ours_cls, hf_cls, out_of in [
        ("FlaxViTModel", vit_flax.FlaxViTModel, transformers.FlaxViTModel,
         lambda o: (o.last_hidden_state, o.pooler_output)),
        ("FlaxViTForImageClassification", vit_flax.FlaxViTForImageClassification,
         transformers.FlaxViTForImageClassification, lambda o: o.logits),
    ]:
        ours = ours_cls(cfg, seed=0)
        hf = hf_cls(hf_cfg, input_shape=(1, args.image_size, args.image_size, 3), seed=0)
        hf_params = to_hf_tree(ours.params)
        if same_structure(hf_params, hf.params):
            hf.params = hf_params
        else:  # should not happen; then the two sides time differently initialised (same-shaped) weights
            print(f"  note: {name} trees differ; HF keeps its own init")

        ours_fwd = jax.jit(lambda p, x, m=ours, f=out_of: f(m(x, params=p)))
        hf_fwd = jax.jit(lambda p, x, m=hf, f=out_of: f(m(x, params=p)))
        diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(ours_fwd(ours.params, x)),
                                                               jax.tree_util.tree_leaves(hf_fwd(hf.params, x))))
        t_ours = time_ms(lambda: ours_fwd(ours.params, x), args.warmup, args.repeats)
        t_hf = time_ms(lambda: hf_fwd(hf.params, x), args.warmup, args.repeats)
        rows.append((f"{name} inference", t_ours, t_hf, diff))

        if args.skip_train or name != "FlaxViTForImageClassification":
            continue
        tx = optax.adamw(1e-4)
        ours_step = make_train_step(ours, tx)

        @jax.jit
        def hf_step(params: Any, opt_state: Any, batch: dict[str, jax.Array], m: Any = hf) -> tuple:
            def loss_fn(p: Any) -> jax.Array:
                logits = m(batch["pixel_values"], params=p).logits
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        batch = {"pixel_values": x, "labels": labels}
        loss_diff = abs(float(ours_step(ours.params, tx.init(ours.params), batch)[2])
                        - float(hf_step(hf.params, tx.init(hf.params), batch)[2]))
        t_ours = time_ms(chained(ours_step, ours.params, tx.init(ours.params), batch), args.warmup, args.repeats)
        t_hf = time_ms(chained(hf_step, hf.params, tx.init(hf.params), batch), args.warmup, args.repeats)
        rows.append((f"{name} train step (AdamW)", t_ours, t_hf, loss_diff))

    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  {'trivit ms':>10}  {'HF ms':>10}  {'HF/trivit':>9}  {'max |diff|':>10}")
    for case, t_ours, t_hf, diff in rows:
        print(f"{case:<{w}}  {t_ours:10.2f}  {t_hf:10.2f}  {t_hf / t_ours:9.2f}  {diff:10.2e}")


if __name__ == "__main__":
    main()
