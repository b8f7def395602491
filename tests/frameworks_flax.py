"""The JAX/Flax adapter of the shared suite (see ``frameworks.py``); jax is imported lazily."""

from __future__ import annotations

from adapter import Adapter


class FlaxAdapter(Adapter):
    name = "flax"

    def load(self, class_name: str, path, **flags):
        import jax

        # fp32 matmuls at full precision (XLA may otherwise use reduced-precision passes on GPU/TPU).
        jax.config.update("jax_default_matmul_precision", "highest")
        import vit_flax

        return getattr(vit_flax, f"Flax{class_name}").from_pretrained(path, **flags)

    def _call(self, model, inputs: dict, **kwargs):
        return model(**inputs, **kwargs)
