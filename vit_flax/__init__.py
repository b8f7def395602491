"""trivit's JAX/Flax models: drop-in for ``transformers`` 4.x Flax ViT classes (and the ViT Hybrid,
which HF has in PyTorch only), loading canonical checkpoints."""

from vit_core.config import ViTConfig
from vit_core.config_hybrid import BitConfig, ViTHybridConfig

from .checkpointing import restore_train_state, save_train_state, saved_steps
from .export import export_stablehlo, load_stablehlo
from .modeling_flax_bit import FlaxBitBackbone, FlaxBitModel
from .modeling_flax_utils import param_path
from .modeling_flax_vit import (
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
    FlaxViTPreTrainedModel,
)
from .modeling_flax_vit_hybrid import (
    FlaxViTHybridForImageClassification,
    FlaxViTHybridModel,
    FlaxViTHybridPreTrainedModel,
)

__all__ = [
    "BitConfig",
    "ViTConfig",
    "ViTHybridConfig",
    "FlaxViTModel",
    "FlaxViTForImageClassification",
    "FlaxViTForMaskedImageModeling",
    "FlaxViTPreTrainedModel",
    "FlaxViTHybridModel",
    "FlaxViTHybridForImageClassification",
    "FlaxViTHybridPreTrainedModel",
    "FlaxBitModel",
    "FlaxBitBackbone",
    "param_path",
    "export_stablehlo",
    "load_stablehlo",
    "save_train_state",
    "restore_train_state",
    "saved_steps",
]
