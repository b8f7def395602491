"""trivit's JAX/Flax models: drop-in for ``transformers`` 4.x Flax ViT classes, loading canonical checkpoints."""

from vit_core.config import ViTConfig

from .modeling_flax_utils import param_path
from .modeling_flax_vit import (
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
    FlaxViTPreTrainedModel,
)

__all__ = [
    "ViTConfig",
    "FlaxViTModel",
    "FlaxViTForImageClassification",
    "FlaxViTForMaskedImageModeling",
    "FlaxViTPreTrainedModel",
    "param_path",
]
