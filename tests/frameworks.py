"""Framework adapters for the shared suite: load a checkpoint folder, run numpy inputs, return numpy outputs.

Every adapter has the same three methods, so one test body serves every framework:

* ``load(class_name, path, **flags)``: ``<prefix><class_name>.from_pretrained(path, **flags)``
* ``run(model, inputs, **call_kwargs)``: ``inputs`` is a dict of numpy arrays (NCHW
  ``pixel_values``, optional ``bool_masked_pos``, ``head_mask``, ``labels``); returns the output
  as ``{field: ndarray | tuple[ndarray, ...]}`` in the model's field order.
* ``name``: "pt", "hf" (the transformers 4.x PyTorch oracle), later "tf" and "flax".
"""

from __future__ import annotations

import numpy as np

from conftest import DEVICE


def _to_numpy_tree(out) -> dict:
    result = {}
    for key in out.keys():
        value = out[key]
        if isinstance(value, tuple):
            result[key] = tuple(v.detach().cpu().numpy() for v in value)
        else:
            result[key] = value.detach().cpu().numpy()
    return result


class TorchAdapter:
    name = "pt"

    def _module(self):
        import vit_torch

        return vit_torch

    def load(self, class_name: str, path, **flags):
        model = getattr(self._module(), class_name).from_pretrained(path, **flags)
        return model.to(DEVICE).eval()

    def run(self, model, inputs: dict, **kwargs) -> dict:
        import torch

        def tensor(x):
            return torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE)

        with torch.no_grad():
            out = model(**{k: tensor(v) for k, v in inputs.items()}, **kwargs)
        return _to_numpy_tree(out)


class HFTorchAdapter(TorchAdapter):
    """transformers 4.x, eager attention (its sdpa path ignores head_mask and cannot return attentions)."""

    name = "hf"

    def _module(self):
        import transformers

        return transformers

    def load(self, class_name: str, path, **flags):
        flags.setdefault("attn_implementation", "eager")
        return super().load(class_name, path, **flags)


ADAPTERS = {"pt": TorchAdapter, "hf": HFTorchAdapter}
