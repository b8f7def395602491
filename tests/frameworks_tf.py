"""The TF (Keras 3) adapter of the shared suite (interface in ``frameworks.py``).

Importing this module does not import TensorFlow; ``load`` does.
"""

from __future__ import annotations

import os

import numpy as np

from adapter import Adapter


class TFAdapter(Adapter):
    name = "tf"

    def load(self, class_name: str, path, **flags):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import vit_tf

        return getattr(vit_tf, f"TF{class_name}").from_pretrained(path, **flags)

    def _call(self, model, inputs: dict, **kwargs):
        return model(**{k: np.ascontiguousarray(v) for k, v in inputs.items()}, **kwargs, training=False)
