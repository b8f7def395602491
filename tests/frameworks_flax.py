"""The JAX/Flax adapter of the shared suite (see ``frameworks.py``); jax is imported lazily."""

from __future__ import annotations

import numpy as np


class FlaxAdapter:
    name = "flax"

    def load(self, class_name: str, path, **flags):
        import jax

        # fp32 matmuls at full precision (XLA may otherwise use reduced-precision passes on GPU/TPU).
        jax.config.update("jax_default_matmul_precision", "highest")
        import vit_flax

        return getattr(vit_flax, f"Flax{class_name}").from_pretrained(path, **flags)

    def run(self, model, inputs: dict, **kwargs) -> dict:
        out = model(**inputs, **kwargs)
        return {key: _np(value) for key, value in out.items()}

    def run_tuple(self, model, inputs: dict, **kwargs) -> tuple:
        out = model(**inputs, return_dict=False, **kwargs)
        assert isinstance(out, tuple), f"return_dict=False gave {type(out).__name__}"
        return _np(out)


def _np(value):
    return tuple(_np(v) for v in value) if isinstance(value, tuple) else np.asarray(value)
