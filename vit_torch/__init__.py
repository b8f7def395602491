"""trivit's PyTorch models: drop-in for ``transformers`` 4.x ViT classes."""

from vit_core.config import ViTConfig

from .modeling_vit import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel, ViTPreTrainedModel

__all__ = ["ViTConfig", "ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling", "ViTPreTrainedModel"]
