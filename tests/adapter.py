"""Base of the suite's framework adapters (see ``frameworks.py``): the output handling they share.

A subclass provides ``name``, ``load(class_name, path, **flags)``, ``_call(model, inputs, **kwargs)``
(one forward pass on numpy inputs) and, if its tensors are not numpy-convertible as they are,
``_leaf(tensor) -> np.ndarray``.
"""

from __future__ import annotations

import numpy as np


class Adapter:
    name: str

    def load(self, class_name: str, path, **flags):
        raise NotImplementedError

    def _call(self, model, inputs: dict, **kwargs):
        raise NotImplementedError

    def _leaf(self, value) -> np.ndarray:
        return np.asarray(value)

    def _np(self, value):
        return tuple(self._np(v) for v in value) if isinstance(value, tuple) else self._leaf(value)

    def run(self, model, inputs: dict, **kwargs) -> dict:
        out = self._call(model, inputs, **kwargs)
        return {key: self._np(out[key]) for key in out.keys()}

    def run_tuple(self, model, inputs: dict, **kwargs) -> tuple:
        out = self._call(model, inputs, return_dict=False, **kwargs)
        assert isinstance(out, tuple), f"return_dict=False gave {type(out).__name__}"
        return self._np(out)
