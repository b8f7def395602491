"""trivit's PyTorch models: drop-in for ``transformers`` 4.x ViT and ViT Hybrid classes."""

from vit_core.config import ViTConfig
from vit_core.config_hybrid import BitConfig, ViTHybridConfig

from .export import export_onnx, run_onnx
from .modeling_vit import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel, ViTPreTrainedModel
from .modeling_vit_hybrid import ViTHybridForImageClassification, ViTHybridModel, ViTHybridPreTrainedModel

__all__ = [
    "BitConfig",
    "ViTConfig",
    "ViTHybridConfig",
    "ViTModel",
    "ViTForImageClassification",
    "ViTForMaskedImageModeling",
    "ViTPreTrainedModel",
    "ViTHybridModel",
    "ViTHybridForImageClassification",
    "ViTHybridPreTrainedModel",
    "export_onnx",
    "run_onnx",
]
