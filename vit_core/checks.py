"""Input checks shared by every framework: one wording per error, raised before any framework op.

Each function takes plain shapes (tuples of ints), so torch, TF and Flax models call the same
code and users get the same message whichever framework they picked.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import ViTConfig

__all__ = ["check_config_type", "check_pixel_values", "check_bool_masked_pos", "head_mask_layers", "check_mim_mask_allowed"]


def check_config_type(owner: str, config: object, config_class: type[ViTConfig]) -> None:
    """A model accepts its own config class only: a ``ViTHybridConfig`` (a ``ViTConfig`` subclass) does
    not build a plain ``ViTModel``, whose patch embedding would be a pixel convolution."""
    if not isinstance(config, config_class) or type(config).model_type != config_class.model_type:
        raise TypeError(f"{owner}: config must be a {config_class.__name__}, got {type(config).__name__}")


def check_pixel_values(shape: Sequence[int], config: ViTConfig, interpolate_pos_encoding: bool) -> tuple[int, int]:
    """Validate NCHW ``pixel_values``; return the patch grid (``config.feature_grid``: (H // p, W // p) for
    the ViT, the backbone's output grid over p for the hybrid)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {shape}")
    _, c, h, w = shape
    if c != config.num_channels:
        raise ValueError(
            f"pixel_values has {c} channels (shape {shape}), but config.num_channels is "
            f"{config.num_channels}; inputs are NCHW"
        )
    if not interpolate_pos_encoding and (h, w) != config.image_hw:
        raise ValueError(
            f"Input image size ({h}*{w}) doesn't match model ({config.image_hw[0]}*{config.image_hw[1]}); "
            "pass interpolate_pos_encoding=True to run at another resolution"
        )
    gh, gw = config.feature_grid(h, w)
    if gh < 1 or gw < 1:
        raise ValueError(
            f"pixel_values of size {h}*{w} is too small: its patch grid is {gh}*{gw} (patch_size {config.patch_size})"
        )
    return gh, gw


def check_bool_masked_pos(shape: Sequence[int], batch: int, num_patches: int, use_mask_token: bool) -> None:
    if not use_mask_token:
        raise ValueError("bool_masked_pos needs a model built with use_mask_token=True")
    if tuple(int(s) for s in shape) != (batch, num_patches):
        raise ValueError(
            f"bool_masked_pos must have shape (batch, num_patches) = {(batch, num_patches)}, got {tuple(shape)}"
        )


def head_mask_layers(shape: Sequence[int], config: ViTConfig) -> bool:
    """Validate a head mask's shape; True if it is per layer (layers, heads), False if (heads,)."""
    shape = tuple(int(s) for s in shape)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if shape == (heads,):
        return False
    if shape == (layers, heads):
        return True
    raise ValueError(
        f"head_mask must have shape (num_heads,) = ({heads},) or (num_layers, num_heads) = "
        f"({layers}, {heads}), got {shape}"
    )


def check_mim_mask_allowed(config: ViTConfig) -> None:
    if config.patch_size != config.encoder_stride:
        raise ValueError(
            "When `bool_masked_pos` is provided, `patch_size` must be equal to `encoder_stride` so that the "
            f"reconstruction has the input's size. Got patch_size={config.patch_size}, "
            f"encoder_stride={config.encoder_stride}."
        )
