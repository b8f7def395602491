"""trivit's framework-agnostic core: config, image processors, checkpoint contract.

Imports only numpy, Pillow and the standard library (tested): no torch, tensorflow or jax.
"""

from .checkpoint import read_checkpoint, write_checkpoint
from .config import ConfigError, ViTConfig
from .config_hybrid import BitConfig, ViTHybridConfig
from .image_processing import BatchFeature, ViTFeatureExtractor, ViTImageProcessor, ViTImageProcessorFast
from .image_processing_vit_hybrid import ViTHybridImageProcessor
from .safetensors_io import CheckpointError

__all__ = [
    "BatchFeature",
    "BitConfig",
    "CheckpointError",
    "ConfigError",
    "ViTConfig",
    "ViTFeatureExtractor",
    "ViTHybridConfig",
    "ViTHybridImageProcessor",
    "ViTImageProcessor",
    "ViTImageProcessorFast",
    "read_checkpoint",
    "write_checkpoint",
]
__version__ = "0.1.0"
