"""Framework adapters for the shared suite: load a checkpoint folder, run numpy inputs, return numpy outputs.

Every adapter has the same three methods, so one test body serves every framework:

* ``load(class_name, path, **flags)``: ``<prefix><class_name>.from_pretrained(path, **flags)``
* ``run(model, inputs, **call_kwargs)``: ``inputs`` is a dict of numpy arrays (NCHW
  ``pixel_values``, optional ``bool_masked_pos``, ``head_mask``, ``labels``); returns the output
  as ``{field: ndarray | tuple[ndarray, ...]}`` in the model's field order.
* ``run_tuple(model, inputs, **call_kwargs)``: the same call with ``return_dict=False``, as a
  tuple of numpy arrays / tuples.
* ``name``: "pt", "hf" (the transformers 4.x PyTorch oracle), later "tf" and "flax".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapter import Adapter
from settings import DEVICE


class TorchAdapter(Adapter):
    name = "pt"

    def _module(self):
        import vit_torch

        return vit_torch

    def load(self, class_name: str, path, **flags):
        model = getattr(self._module(), class_name).from_pretrained(path, **flags)
        return model.to(DEVICE).eval()

    def _call(self, model, inputs: dict, **kwargs):
        import torch

        with torch.no_grad():
            return model(**{k: torch.from_numpy(np.ascontiguousarray(v)).to(DEVICE) for k, v in inputs.items()}, **kwargs)

    def _leaf(self, value) -> np.ndarray:
        return value.detach().cpu().numpy()


def _patch_hf_hybrid_init() -> None:
    """transformers 4.57's ViTHybrid cannot be built: its ``_init_weights`` zeroes ``mask_token`` even when it is
    None. Skip that one module's init (every weight is loaded from the checkpoint right after); the rest of the
    oracle is HF's own code, untouched. Idempotent."""
    import transformers.models.deprecated.vit_hybrid.modeling_vit_hybrid as hybrid

    base = hybrid.ViTHybridPreTrainedModel
    if getattr(base, "_trivit_init_patched", False):
        return
    original = base._init_weights

    def _init_weights(self, module):
        if isinstance(module, hybrid.ViTHybridEmbeddings) and module.mask_token is None:
            return
        original(self, module)

    base._init_weights = _init_weights
    base._trivit_init_patched = True


class HFTorchAdapter(TorchAdapter):
    """transformers 4.x, eager attention (its sdpa path ignores head_mask and cannot return attentions)."""

    name = "hf"

    def _module(self):
        import transformers

        _patch_hf_hybrid_init()
        return transformers

    def load(self, class_name: str, path, **flags):
        import json

        import torch
        from transformers.activations import ACT2FN

        flags.setdefault("attn_implementation", "eager")
        act = json.loads((Path(path) / "config.json").read_text())["hidden_act"]
        if act in ACT2FN:
            return super().load(class_name, path, **flags)
        # HF's ACT2FN lacks "selu" (trivit supports it): build HF's model with a placeholder
        # activation and put torch's own module in its place, so the rest is still HF's code.
        model = super().load(class_name, path, hidden_act="relu", **flags)
        for module in model.modules():
            if hasattr(module, "intermediate_act_fn"):
                module.intermediate_act_fn = {"selu": torch.nn.SELU}[act]()
        return model


ADAPTERS = {"pt": TorchAdapter, "hf": HFTorchAdapter}

# The TF and Flax adapters live beside this file, one module each.
for _name, _module, _cls in (("tf", "frameworks_tf", "TFAdapter"), ("flax", "frameworks_flax", "FlaxAdapter")):
    try:
        ADAPTERS[_name] = getattr(__import__(_module), _cls)
    except ModuleNotFoundError as _e:
        if _e.name != _module:
            raise
