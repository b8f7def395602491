"""ViT Hybrid in Keras 3 (TensorFlow backend), the mirror of :mod:`vit_torch.modeling_vit_hybrid`.

A BiT backbone (:mod:`.modeling_tf_bit`) turns the NCHW image into a (B, h', w', C') feature map; a
p×p stride-p convolution projects its cells to tokens (B, N, D), N = (h'//p)·(w'//p) =
``config.num_patches``. From there it is the ViT of :mod:`.modeling_tf_vit`, reused through its
class hooks: class token, position embeddings, encoder, final norm, pooler, classifier and losses.
``interpolate_pos_encoding`` resizes the position grid from ``config.feature_grid`` at
``image_size`` to ``config.feature_grid`` of the actual input (HF 4.x's hybrid reads the pixel size
there, which is wrong for a backbone of stride 16).
"""

from __future__ import annotations

from typing import Any

from keras import ops

from vit_core.config_hybrid import ViTHybridConfig

from .modeling_tf_bit import TFBitBackbone
from .modeling_tf_utils import Tensor, TFPreTrainedModel, register
from .modeling_tf_vit import (
    Shape, TFViTEmbeddings, TFViTForImageClassification, TFViTModel, TFViTPatchEmbeddings, _static_shape,
    check_pixel_values,
)

__all__ = [
    "TFViTHybridPatchEmbeddings", "TFViTHybridEmbeddings", "TFViTHybridPreTrainedModel", "TFViTHybridModel",
    "TFViTHybridForImageClassification",
]


@register
class TFViTHybridPatchEmbeddings(TFViTPatchEmbeddings):
    """(B, C, H, W) → backbone map (B, h', w', C') → ``projection`` (p×p, stride p) → (B, N, D), row-major."""

    def __init__(self, config: ViTHybridConfig, **kwargs: Any):
        super().__init__(config, **kwargs)  # the projection conv, as the ViT's, over C' channels
        self.backbone = TFBitBackbone(config.bit, name="backbone")

    def build(self, input_shape: Shape) -> None:
        self.backbone.build(input_shape)
        self.projection.build((input_shape[0], None, None, self.config.feature_channels))

    def call(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        gh, gw = check_pixel_values(_static_shape(pixel_values), self.config, interpolate_pos_encoding)
        features = self.backbone(ops.transpose(pixel_values, (0, 2, 3, 1)), channels_last=True)[-1]
        x = self.projection(features)  # (B, h'/p, w'/p, D)
        return ops.reshape(x, (-1, gh * gw, x.shape[3]))


@register
class TFViTHybridEmbeddings(TFViTEmbeddings):
    """The ViT embeddings over the hybrid patch embedding: → (B, N + 1, D)."""

    patch_embeddings_class = TFViTHybridPatchEmbeddings


class TFViTHybridPreTrainedModel(TFPreTrainedModel):
    """Hybrid models take a :class:`ViTHybridConfig` only."""

    config_class = ViTHybridConfig


@register
class TFViTHybridModel(TFViTHybridPreTrainedModel, TFViTModel):
    """:class:`TFViTModel` with the hybrid embeddings: ``last_hidden_state`` (B, N + 1, D), ``pooler_output``."""

    embeddings_class = TFViTHybridEmbeddings


@register
class TFViTHybridForImageClassification(TFViTHybridPreTrainedModel, TFViTForImageClassification):
    """:class:`TFViTForImageClassification` over :class:`TFViTHybridModel`: ``logits`` (B, num_labels)."""

    base_model_class = TFViTHybridModel
