"""The hybrid ViT (BiT backbone + ViT, HF 4.x ``ViTHybridModel``) in JAX/Flax Linen; mirrors
:mod:`vit_torch.modeling_vit_hybrid`.

Only the patch embedding is new: the BiT backbone (:mod:`vit_flax.modeling_flax_bit`) maps NHWC
pixels (B, H, W, C) to a (B, h', w', C') feature map, and a ``patch_size`` convolution projects it to
(B, N, D) tokens, N = (h' // p)·(w' // p) in row-major order. Everything after (mask / class tokens,
position embeddings and their interpolation, encoder, final norm, pooler, classifier, losses) is the
ViT's own code, reached through the ``patch_embeddings_class`` / ``embeddings_class`` /
``base_model_class`` hooks of :mod:`vit_flax.modeling_flax_vit`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from vit_core.checks import check_pixel_values
from vit_core.config_hybrid import ViTHybridConfig

from .modeling_flax_bit import FlaxBitBackbone
from .modeling_flax_vit import (
    Array,
    FlaxViTEmbeddings,
    FlaxViTForImageClassification,
    FlaxViTForImageClassificationModule,
    FlaxViTModel,
    FlaxViTModule,
    FlaxViTPatchProjection,
    FlaxViTPreTrainedModel,
    _user_shape,
    _ViTModule,
)

__all__ = [
    "FlaxViTHybridPatchEmbeddings",
    "FlaxViTHybridEmbeddings",
    "FlaxViTHybridModule",
    "FlaxViTHybridForImageClassificationModule",
    "FlaxViTHybridPreTrainedModel",
    "FlaxViTHybridModel",
    "FlaxViTHybridForImageClassification",
]


class FlaxViTHybridPatchEmbeddings(_ViTModule):
    """(B, H, W, C) → (B, N, D): ``backbone`` (BiT) → last ``out_features`` map (B, h', w', C') →
    ``projection`` (p×p, stride p, with bias)."""

    config: ViTHybridConfig  # type: ignore[assignment]
    #: rematerialise each BiT stage in the backward pass
    gradient_checkpointing: bool = False

    def setup(self) -> None:
        self.backbone = FlaxBitBackbone(self.config.bit, gradient_checkpointing=self.gradient_checkpointing,
                                        **self._dtypes)
        self.projection = FlaxViTPatchProjection(self.config.hidden_size, self.config.patch_size, **self._dtypes)

    def __call__(self, pixel_values: Array, interpolate_pos_encoding: bool = False,
                 deterministic: bool = True) -> Array:
        """``deterministic``: False turns the backbone's drop path on (``dropout`` rng)."""
        check_pixel_values(_user_shape(pixel_values.shape), self.config, interpolate_pos_encoding)
        return self.projection(self.backbone(pixel_values, deterministic)[-1])


class FlaxViTHybridEmbeddings(FlaxViTEmbeddings):
    """The ViT embeddings over the hybrid's patches: → (B, N + 1, D)."""

    gradient_checkpointing: bool = False

    @property
    def patch_embeddings_class(self) -> Any:  # type: ignore[override]
        return partial(FlaxViTHybridPatchEmbeddings, gradient_checkpointing=self.gradient_checkpointing)


class FlaxViTHybridModule(FlaxViTModule):
    """The bare hybrid encoder on NHWC pixels (see :class:`FlaxViTModule`). ``gradient_checkpointing``
    rematerialises the BiT stages as well as the encoder layers (as vit_torch's does)."""

    # Properties, not plain classes: the ViT builds its hooks from (config, dtypes) alone; these bind the
    # gradient_checkpointing flag on the way down to the BiT stages.
    @property
    def embeddings_class(self) -> Any:  # type: ignore[override]
        return partial(FlaxViTHybridEmbeddings, gradient_checkpointing=self.gradient_checkpointing)


class FlaxViTHybridForImageClassificationModule(FlaxViTForImageClassificationModule):
    """Linear classifier on the class token of the hybrid encoder: ``logits`` (B, num_labels)."""

    base_model_class = FlaxViTHybridModule


# ---------------------------------------------------------------------------------------- wrappers
class FlaxViTHybridPreTrainedModel(FlaxViTPreTrainedModel):
    """The ViT wrapper (NCHW in, pure in ``params``, canonical checkpoints) for a :class:`ViTHybridConfig`."""

    config_class = ViTHybridConfig


class FlaxViTHybridModel(FlaxViTHybridPreTrainedModel, FlaxViTModel):
    """The bare hybrid encoder; constructor and call as :class:`FlaxViTModel` (``add_pooling_layer``,
    ``use_mask_token``; keywords ``bool_masked_pos`` (B, N), ``head_mask``, ``class_token_only``)."""

    module_class = FlaxViTHybridModule


class FlaxViTHybridForImageClassification(FlaxViTHybridPreTrainedModel, FlaxViTForImageClassification):
    """Classifier on the class token: ``logits`` (B, num_labels); ``loss`` when ``labels`` are given."""

    module_class = FlaxViTHybridForImageClassificationModule
