"""The hybrid ViT (BiT backbone + ViT encoder) in PyTorch, at HF 4.x ``ViTHybrid`` parity.

Shapes: an image (B, C, H, W) becomes a BiT feature map (B, C', h', w'); a ``patch_size`` conv projects
it to (B, N, D) tokens, N = (h' // p)·(w' // p), and from there on everything is the ViT of
:mod:`.modeling_vit` (embeddings, encoder, norm, pooler, classifier), reused through its class hooks.
"""

from __future__ import annotations

import torch

from vit_core.checks import check_pixel_values
from vit_core.config_hybrid import ViTHybridConfig

from .modeling_bit import BitBackbone
from .modeling_utils import static_shape
from .modeling_vit import ViTEmbeddings, ViTForImageClassification, ViTModel, ViTPatchEmbeddings, ViTPreTrainedModel

__all__ = ["ViTHybridModel", "ViTHybridForImageClassification", "ViTHybridPreTrainedModel"]


class ViTHybridPatchEmbeddings(ViTPatchEmbeddings):
    """(B, C, H, W) → BiT feature map (B, C', h', w') → p×p stride-p conv → (B, N, D), row-major."""

    def __init__(self, config: ViTHybridConfig):
        super().__init__(config)  # the projection reads config.feature_channels (C')
        self.backbone = BitBackbone(config.bit)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        check_pixel_values(static_shape(pixel_values), self.config, interpolate_pos_encoding)
        features = self.backbone(pixel_values)[-1]
        return self.projection(features).flatten(2).transpose(1, 2)


class ViTHybridEmbeddings(ViTEmbeddings):
    """The ViT embeddings over the hybrid's patch embedding; position embeddings follow the feature grid."""

    patch_embeddings_class = ViTHybridPatchEmbeddings


class ViTHybridPreTrainedModel(ViTPreTrainedModel):
    config_class = ViTHybridConfig


class ViTHybridModel(ViTHybridPreTrainedModel, ViTModel):
    """The bare hybrid encoder: ``last_hidden_state`` (B, 1 + N, D), ``pooler_output`` (B, D)."""

    embeddings_class = ViTHybridEmbeddings


class ViTHybridForImageClassification(ViTHybridPreTrainedModel, ViTForImageClassification):
    """Linear classifier on the class token: ``logits`` (B, num_labels), ``loss`` from ``labels``."""

    base_model_class = ViTHybridModel
