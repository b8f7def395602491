"""trivit's Keras 3 (TensorFlow backend) models: the ``TF*`` ViT and ViT Hybrid classes, loading canonical checkpoints."""

from vit_core.config import ViTConfig
from vit_core.config_hybrid import BitConfig, ViTHybridConfig

from .export import export_saved_model, export_tflite, run_tflite
from .modeling_tf_bit import TFBitBackbone, TFBitModel
from .modeling_tf_vit import TFViTForImageClassification, TFViTForMaskedImageModeling, TFViTModel, TFViTPreTrainedModel
from .modeling_tf_vit_hybrid import TFViTHybridForImageClassification, TFViTHybridModel, TFViTHybridPreTrainedModel

__all__ = [
    "ViTConfig", "TFViTModel", "TFViTForImageClassification", "TFViTForMaskedImageModeling", "TFViTPreTrainedModel",
    "BitConfig", "ViTHybridConfig", "TFBitModel", "TFBitBackbone",
    "TFViTHybridModel", "TFViTHybridForImageClassification", "TFViTHybridPreTrainedModel",
    "export_saved_model", "export_tflite", "run_tflite",
]
