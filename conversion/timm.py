"""timm ``VisionTransformer`` state dicts (``vit_*`` / ``deit_*``, class-token family) → canonical.

timm's ViT is HF's ViT with other names: pre-norm blocks (``norm1`` → attention, ``norm2`` → MLP),
a fused ``attn.qkv`` projection of shape (3·D, D) whose rows are [query; key; value], exact GELU,
LayerNorm eps 1e-6, a final ``norm`` and a linear ``head`` on the class token. The file does not
record the number of heads: it comes from ``num_heads`` or the standard width → heads table.

Variants HF's ViT cannot express are refused with the feature named: register tokens, fc_norm /
average pooling, layer scale, no class token, distillation token, qk-norm, attention pooling,
pre-norm (``norm_pre``) and a pre-logits layer. A pos_embed without the class-token row
(timm's ``no_embed_class=True``) is accepted: a zero row is inserted for the class token, which
is exact because timm then adds no position embedding to the class token.

*Hybrids* (``vit_base_r50_s16_384``, ``vit_small_r26_s32_*``, ``vit_large_r50_s32_*``...): the patch
embedding is timm's ``HybridEmbed``, a ResNetV2 backbone under ``patch_embed.backbone.`` (``stem.conv``
+ ``stem.norm``, then ``stages.S.blocks.U`` bottleneck units named as HF's: ``downsample.conv/norm``,
``conv1..3``, ``norm1..3``) and a ``patch_size`` convolution ``patch_embed.proj`` over its last map.
timm builds it (``_resnetv2``) with ``preact=False``, ``StdConv2dSame(eps=1e-8)`` (TF-SAME padding,
(w-μ)/√(σ²+1e-8)), ``GroupNormAct(32, eps=1e-5)`` and a SAME max-pool, which are HF's BiT numbers
exactly; the config is derived from the kernel shapes (:func:`~conversion.common.bit_config_from_units`).
Refused by name: torchvision-style ResNet backbones (``resnet26d``/``resnet50d`` hybrids), stem-only
backbones (``vit_*_r_s16_p8``), deep stems and pre-activation backbones.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit_core.checkpoint import load_torch_file
from vit_core.config_hybrid import BitConfig
from vit_core.safetensors_io import CheckpointError, SafetensorsFile

from .common import (Converted, LazyState, UnsupportedFeatureError, backbone_rows, bit_config_from_units, class_name,
                     heads_for_width, hybrid_image_size, make_config)

__all__ = ["read_timm", "load_flat_state", "looks_like_timm"]

#: key pattern → feature name, for variants HF's ViT cannot express.
_REFUSED: list[tuple[str, str]] = [
    (r"^reg_token$", "register tokens (reg_token)"),
    (r"^dist_token$|^head_dist\.", "distillation token (dist_token, DeiT distilled)"),
    (r"^fc_norm\.", "fc_norm / global average pooling (fc_norm)"),
    (r"\.ls[12]\.gamma$|\.gamma_[12]$", "layer scale (ls1.gamma / gamma_1)"),
    (r"\.attn\.[qk]_norm\.", "qk norm (attn.q_norm / attn.k_norm)"),
    (r"^attn_pool\.", "attention pooling head (attn_pool)"),
    (r"^norm_pre\.", "pre-norm before the blocks (norm_pre)"),
    (r"^pre_logits\.", "pre-logits representation layer (pre_logits)"),
    (r"\.attn\.[qv]_bias$", "separate q/v biases (BEiT-style q_bias / v_bias)"),
    (r"\.mlp\.norm\.", "norm inside the MLP (mlp.norm)"),
    (r"^patch_embed\.norm\.", "norm after the patch embedding (patch_embed.norm)"),
    (r"^patch_embed\.backbone\.(conv1|bn1|layer\d)\.",
     "a non-BiT CNN backbone (a ResNet such as resnet26d / resnet50d: patch_embed.backbone.conv1 / layer1)"),
    (r"^patch_embed\.backbone\.conv\.", "a stem-only ResNetV2 backbone (patch_embed.backbone.conv, vit_*_r_s16_p8)"),
    (r"^patch_embed\.backbone\.stem\.conv\d", "a deep ResNetV2 stem (patch_embed.backbone.stem.conv1/2/3)"),
    (r"^patch_embed\.backbone\.norm\.", "a pre-activation ResNetV2 backbone (final norm patch_embed.backbone.norm)"),
]

_BACKBONE = "patch_embed.backbone."
_BACKBONE_PARAM = re.compile(
    r"^patch_embed\.backbone\.(stem\.(conv\.weight|norm\.(weight|bias))|stages\.\d+\.blocks\.\d+\."
    r"(downsample\.conv\.weight|downsample\.norm\.(weight|bias)|conv[123]\.weight|norm[123]\.(weight|bias)))$"
)
_UNIT_CONV3 = re.compile(r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.conv3\.weight$")
#: timm's hybrid numerics (``StdConv2dSame(eps=1e-8)``, ``GroupNormAct(eps=1e-5)``): HF's BiT defaults.
TIMM_BIT_NUMERICS = {"weight_standardization": "var_eps", "weight_standardization_eps": 1e-8, "group_norm_eps": 1e-5}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_PARAMS = {
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
}
_TOP_PARAMS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
               "norm.weight", "norm.bias", "head.weight", "head.bias"}
#: timm block sub-module → HF layer sub-module (weights and biases keep their suffix).
_RENAME = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def load_flat_state(path: Path) -> Mapping[str, Any]:
    """``{name: array}`` from ``.safetensors`` or a ``torch.save`` file (both memory-mapped; the torch pickle
    is read by :mod:`vit_core.torch_pickle`, which runs no pickled code and needs no torch).

    Torch files wrapped as ``{"model": state}`` / ``{"state_dict": state}`` are unwrapped and a
    DDP ``module.`` prefix is dropped. Values are numpy arrays, read lazily.
    """
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    state = load_torch_file(path, wrappers=("model", "state_dict", "model_ema"))
    return {key.removeprefix("module."): t for key, t in state.items()}


def looks_like_timm(keys: set[str]) -> bool:
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


def _refuse(keys: set[str], path: object) -> None:
    for pattern, feature in _REFUSED:
        hits = sorted(k for k in keys if re.search(pattern, k))
        if hits:
            raise UnsupportedFeatureError(
                f"{path}: timm checkpoint uses {feature} (e.g. key {hits[0]!r}), which HF's ViT / ViT Hybrid "
                "architecture does not have; it cannot be converted exactly"
            )
    if "cls_token" not in keys:
        raise UnsupportedFeatureError(
            f"{path}: timm checkpoint has no class token (cls_token missing: class_token=False / global "
            "pooling); HF's ViT classifies from a class token"
        )
    if any(k.startswith(_BACKBONE) for k in keys) and f"{_BACKBONE}stem.norm.weight" not in keys:
        raise UnsupportedFeatureError(
            f"{path}: timm hybrid backbone has no stem norm ({_BACKBONE}stem.norm missing): a pre-activation "
            "ResNetV2 backbone, which timm's hybrids never use and this reader does not map"
        )
    unknown = sorted(k for k in keys if k not in _TOP_PARAMS and not _BACKBONE_PARAM.match(k)
                     and not ((m := _BLOCK.match(k)) and m.group(2) in _BLOCK_PARAMS))
    if unknown:
        raise UnsupportedFeatureError(f"{path}: unrecognised timm keys (not a plain or BiT-hybrid ViT): {unknown[:8]}")


def _backbone_key(name: str) -> str:
    """A canonical BiT name (below ``...backbone.bit.``) → timm's ResNetV2 name (below ``patch_embed.backbone.``)."""
    name = name.replace("embedder.convolution.", "stem.conv.").replace("embedder.norm.", "stem.norm.")
    return _BACKBONE + re.sub(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2.", name)


def _backbone_config(keys: set[str], shape: Callable[..., tuple[int, ...]], path: object,
                     num_groups: int | None) -> BitConfig:
    """The BiT backbone of a timm hybrid, from its stem and ``conv3`` (out, mid, 1, 1) kernel shapes."""
    stem, channels, _, _ = shape(f"{_BACKBONE}stem.conv.weight", 4)
    units = {(int(m.group(1)), int(m.group(2))): shape(k, 4)[1::-1] for k in keys if (m := _UNIT_CONV3.match(k))}
    return bit_config_from_units(path, num_channels=channels, embedding_size=stem, units=units,
                                 num_groups=num_groups, **TIMM_BIT_NUMERICS)


def read_timm(
    path: str | os.PathLike[str],
    *,
    num_heads: int | None = None,
    num_labels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_groups: int | None = None,
) -> Converted:
    """Read a timm ViT or BiT-hybrid ViT state dict (``.pth`` / ``.bin`` / ``.safetensors``).

    ``num_labels``: ``None`` keeps the head as found; ``0`` drops it (→ ``ViTModel`` /
    ``ViTHybridModel``); any other value must equal the head's class count. ``image_size`` is needed
    only for non-square grids. ``num_groups``: the hybrid backbone's GroupNorm groups (default 32).
    """
    path = Path(path)
    raw = load_flat_state(path)
    keys = set(raw)
    _refuse(keys, path)

    def shape(k: str, ndim: int | None = None) -> tuple[int, ...]:
        if k not in raw:
            raise CheckpointError(f"{path}: timm key {k!r} is missing")
        got = raw.shape(k) if isinstance(raw, SafetensorsFile) else tuple(raw[k].shape)
        if ndim is not None and len(got) != ndim:
            raise CheckpointError(f"{path}: timm key {k!r} has shape {list(got)}, expected {ndim} dimensions")
        return got

    width, channels, patch, _ = shape("patch_embed.proj.weight", 4)
    bit = None
    if any(k.startswith(_BACKBONE) for k in keys):
        bit = _backbone_config(keys, shape, path, num_groups)
        channels = bit.num_channels  # the projection reads the feature map, not the pixels
    elif num_groups is not None:
        raise CheckpointError(f"{path}: num_groups applies to hybrid (CNN backbone) checkpoints only; this is a plain ViT")
    depth = 1 + max((int(m.group(1)) for k in keys if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{path}: no transformer blocks (blocks.N.*) in the timm checkpoint")
    mlp = shape("blocks.0.mlp.fc1.weight", 2)[0]
    heads = heads_for_width(width, num_heads, path)
    qkv_bias = "blocks.0.attn.qkv.bias" in keys

    tokens = shape("pos_embed", 3)[1]
    class_row = True
    if image_size is None:
        grid = math.isqrt(tokens - 1)
        if grid * grid != tokens - 1:
            grid = math.isqrt(tokens)
            class_row = False
            if grid * grid != tokens:
                raise CheckpointError(
                    f"{path}: pos_embed has {tokens} rows, not a square grid (+1 class token); pass image_size"
                )
        image_size = grid * patch if bit is None else hybrid_image_size(bit, patch, grid * grid, path)
    else:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if bit is not None:
            _, h, w = bit.feature_shape(h, w)
        n = (h // patch) * (w // patch)
        if tokens not in (n, n + 1):
            raise CheckpointError(f"{path}: pos_embed has {tokens} rows; image_size {image_size} needs {n + 1}")
        class_row = tokens == n + 1

    head_classes = shape("head.weight", 2)[0] if "head.weight" in keys else 0
    if num_labels is not None and num_labels not in (0, head_classes):
        raise CheckpointError(
            f"{path}: the timm head has {head_classes} classes; --num-labels {num_labels} would need a new, "
            "untrained head (pass 0 to drop the head, or omit it)"
        )
    classes = head_classes if num_labels is None else num_labels
    config = make_config(
        bit, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=image_size, patch_size=patch,
        num_channels=channels, qkv_bias=qkv_bias, num_labels=classes,
    )
    model_class = class_name(config, "ForImageClassification" if classes else "Model")
    flags = {} if classes else {"add_pooling_layer": False}
    prefix = "vit." if classes else ""

    entries: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}

    def take(dst: str, src: str, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a,
             out_shape: tuple[int, ...] | None = None) -> None:
        entries[dst] = (out_shape or shape(src), lambda: fn(np.asarray(raw[src])))

    take(f"{prefix}embeddings.cls_token", "cls_token")
    if class_row:
        take(f"{prefix}embeddings.position_embeddings", "pos_embed")
    else:
        take(f"{prefix}embeddings.position_embeddings", "pos_embed",
             lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], axis=1), (1, tokens + 1, width))
    take(f"{prefix}embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight")
    if "patch_embed.proj.bias" in keys:
        take(f"{prefix}embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias")
    else:  # bias=False: a zero bias is the same function
        entries[f"{prefix}embeddings.patch_embeddings.projection.bias"] = ((width,), lambda: np.zeros(width, np.float32))
    if bit is not None:
        for spec, key in backbone_rows(bit, prefix, _backbone_key, (k for k in keys if k.startswith(_BACKBONE)), path):
            take(spec.name, key)
    for i in range(depth):
        src, dst = f"blocks.{i}", f"{prefix}encoder.layer.{i}"
        for j, proj in enumerate(("query", "key", "value")):
            sl = slice(j * width, (j + 1) * width)
            take(f"{dst}.attention.attention.{proj}.weight", f"{src}.attn.qkv.weight", lambda a, s=sl: a[s], (width, width))
            if qkv_bias:
                take(f"{dst}.attention.attention.{proj}.bias", f"{src}.attn.qkv.bias", lambda a, s=sl: a[s], (width,))
        for old, new in _RENAME.items():
            for suffix in ("weight", "bias"):
                take(f"{dst}.{new}.{suffix}", f"{src}.{old}.{suffix}")
    take(f"{prefix}layernorm.weight", "norm.weight")
    take(f"{prefix}layernorm.bias", "norm.bias")
    if classes:
        take("classifier.weight", "head.weight")
        take("classifier.bias", "head.bias")
    out = Converted(config, model_class, LazyState(path, entries), flags)
    out.check()
    return out
