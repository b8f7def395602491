"""trivit's Keras 3 (TensorFlow backend) models: the ``TF*`` ViT classes, loading canonical checkpoints."""

from vit_core.config import ViTConfig

from .modeling_tf_vit import TFViTForImageClassification, TFViTForMaskedImageModeling, TFViTModel, TFViTPreTrainedModel

__all__ = ["ViTConfig", "TFViTModel", "TFViTForImageClassification", "TFViTForMaskedImageModeling", "TFViTPreTrainedModel"]
