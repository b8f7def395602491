"""The canonical weight-naming contract: one table per model class.

A checkpoint on disk uses HF PyTorch parameter names and PyTorch layouts, e.g.
``vit.encoder.layer.0.attention.attention.query.weight`` of shape (out, in). Each model class
has a table of :class:`ParamSpec` rows (name, shape, layout kind, initialiser) built from the
config. Every framework loads and saves through that table: PyTorch uses the names as they
are; TensorFlow and Flax map each row's *kind* to their own layout (e.g. a linear weight is
stored transposed as a kernel) with :func:`to_kernel_layout` / :func:`from_kernel_layout`.

:func:`plan_load` compares a table with a checkpoint's keys and shapes and decides, in one
place for all frameworks, what loads, what is freshly initialised, and what is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .config import ViTConfig
from .config_hybrid import BitConfig, ViTHybridConfig
from .safetensors_io import CheckpointError

__all__ = [
    "Kind",
    "Init",
    "ParamSpec",
    "BASE_MODEL_PREFIX",
    "MODEL_CLASSES",
    "param_specs",
    "bit_specs",
    "LoadPlan",
    "plan_load",
    "initial_value",
    "to_kernel_layout",
    "from_kernel_layout",
]

BASE_MODEL_PREFIX = "vit"


class Kind(str, Enum):
    """How a canonical (PyTorch-layout) tensor is laid out; decides each framework's transform."""

    LINEAR_WEIGHT = "linear_weight"  # (out, in)
    CONV_WEIGHT = "conv_weight"  # (out, in, kh, kw)
    BIAS = "bias"  # (out,)
    NORM_WEIGHT = "norm_weight"  # LayerNorm gamma (D,)
    NORM_BIAS = "norm_bias"  # LayerNorm beta (D,)
    EMBEDDING = "embedding"  # free parameter (cls / mask token, position embeddings)


class Init(str, Enum):
    """HF's initialisation scheme, by parameter."""

    TRUNC_NORMAL = "trunc_normal"  # truncated normal, mean 0, std initializer_range, cut at ±2
    ZEROS = "zeros"
    ONES = "ones"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    kind: Kind
    init: Init


def _linear(name: str, n_out: int, n_in: int, bias: bool = True) -> list[ParamSpec]:
    rows = [ParamSpec(f"{name}.weight", (n_out, n_in), Kind.LINEAR_WEIGHT, Init.TRUNC_NORMAL)]
    if bias:
        rows.append(ParamSpec(f"{name}.bias", (n_out,), Kind.BIAS, Init.ZEROS))
    return rows


def _norm(name: str, dim: int) -> list[ParamSpec]:
    return [
        ParamSpec(f"{name}.weight", (dim,), Kind.NORM_WEIGHT, Init.ONES),
        ParamSpec(f"{name}.bias", (dim,), Kind.NORM_BIAS, Init.ZEROS),
    ]


def _conv(name: str, n_out: int, n_in: int, k: int, bias: bool = True) -> list[ParamSpec]:
    rows = [ParamSpec(f"{name}.weight", (n_out, n_in, k, k), Kind.CONV_WEIGHT, Init.TRUNC_NORMAL)]
    if bias:
        rows.append(ParamSpec(f"{name}.bias", (n_out,), Kind.BIAS, Init.ZEROS))
    return rows


def bit_specs(bit: BitConfig, prefix: str = "") -> list[ParamSpec]:
    """Rows of HF's ``BitModel`` (``embedder``, ``encoder.stages``, the pre-activation final ``norm``):
    weight-standardised convolutions without bias, GroupNorm weight and bias."""
    rows = _conv("embedder.convolution", bit.embedding_size, bit.num_channels, 7, bias=False)
    if bit.layer_type == "bottleneck":
        rows += _norm("embedder.norm", bit.embedding_size)
    for s, layers in enumerate(bit.stage_layers()):
        for i, u in enumerate(layers):
            unit = f"encoder.stages.{s}.layers.{i}"
            if u.is_first_layer:
                rows += _conv(f"{unit}.downsample.conv", u.out_channels, u.in_channels, 1, bias=False)
                if bit.layer_type == "bottleneck":
                    rows += _norm(f"{unit}.downsample.norm", u.out_channels)
            if bit.layer_type == "bottleneck":
                rows += _conv(f"{unit}.conv1", u.mid_channels, u.in_channels, 1, bias=False)
                rows += _norm(f"{unit}.norm1", u.mid_channels)
                rows += _conv(f"{unit}.conv2", u.mid_channels, u.mid_channels, 3, bias=False)
                rows += _norm(f"{unit}.norm2", u.mid_channels)
                rows += _conv(f"{unit}.conv3", u.out_channels, u.mid_channels, 1, bias=False)
                rows += _norm(f"{unit}.norm3", u.out_channels)
            else:  # pre-activation: each norm precedes its conv
                rows += _norm(f"{unit}.norm1", u.in_channels)
                rows += _conv(f"{unit}.conv1", u.mid_channels, u.in_channels, 1, bias=False)
                rows += _norm(f"{unit}.norm2", u.mid_channels)
                rows += _conv(f"{unit}.conv2", u.mid_channels, u.mid_channels, 3, bias=False)
                rows += _norm(f"{unit}.norm3", u.mid_channels)
                rows += _conv(f"{unit}.conv3", u.out_channels, u.mid_channels, 1, bias=False)
    if bit.layer_type == "preactivation":
        rows += _norm("norm", bit.hidden_sizes[-1])
    return [ParamSpec(prefix + r.name, r.shape, r.kind, r.init) for r in rows]


def _patch_embedding_specs(config: ViTConfig) -> list[ParamSpec]:
    """The patch embedding: a p×p conv over the pixels (ViT), or the BiT backbone then a p×p conv over
    its feature map (hybrid; HF nests the backbone as ``patch_embeddings.backbone.bit``)."""
    rows = bit_specs(config.bit, prefix="embeddings.patch_embeddings.backbone.bit.") \
        if isinstance(config, ViTHybridConfig) else []
    return rows + _conv("embeddings.patch_embeddings.projection", config.hidden_size, config.feature_channels,
                        config.patch_size)


def vit_backbone_specs(
    config: ViTConfig, *, add_pooling_layer: bool = True, use_mask_token: bool = False, prefix: str = ""
) -> list[ParamSpec]:
    """Rows of ``ViTModel`` (and ``ViTHybridModel``): embeddings, ``num_hidden_layers`` encoder layers,
    final norm, pooler."""
    d = config.hidden_size
    rows = [ParamSpec("embeddings.cls_token", (1, 1, d), Kind.EMBEDDING, Init.TRUNC_NORMAL)]
    if use_mask_token:
        rows.append(ParamSpec("embeddings.mask_token", (1, 1, d), Kind.EMBEDDING, Init.ZEROS))
    rows.append(
        ParamSpec("embeddings.position_embeddings", (1, config.num_patches + 1, d), Kind.EMBEDDING, Init.TRUNC_NORMAL)
    )
    rows += _patch_embedding_specs(config)
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            rows += _linear(f"{layer}.attention.attention.{proj}", d, d, bias=config.qkv_bias)
        rows += _linear(f"{layer}.attention.output.dense", d, d)
        rows += _linear(f"{layer}.intermediate.dense", config.intermediate_size, d)
        rows += _linear(f"{layer}.output.dense", d, config.intermediate_size)
        rows += _norm(f"{layer}.layernorm_before", d)
        rows += _norm(f"{layer}.layernorm_after", d)
    rows += _norm("layernorm", d)
    if add_pooling_layer:
        assert config.pooler_output_size is not None
        rows += _linear("pooler.dense", config.pooler_output_size, d)
    return [ParamSpec(prefix + r.name, r.shape, r.kind, r.init) for r in rows]


def _classification_specs(config: ViTConfig) -> list[ParamSpec]:
    rows = vit_backbone_specs(config, add_pooling_layer=False, prefix=f"{BASE_MODEL_PREFIX}.")
    if config.num_labels:
        rows += _linear("classifier", int(config.num_labels), config.hidden_size)
    return rows


def _mim_specs(config: ViTConfig) -> list[ParamSpec]:
    rows = vit_backbone_specs(config, add_pooling_layer=False, use_mask_token=True, prefix=f"{BASE_MODEL_PREFIX}.")
    return rows + _conv("decoder.0", config.encoder_stride**2 * config.num_channels, config.hidden_size, 1)


#: model class name → table builder. ``ViTModel`` takes its constructor flags as keywords.
MODEL_CLASSES: dict[str, Callable[..., list[ParamSpec]]] = {
    "ViTModel": vit_backbone_specs,
    "ViTForImageClassification": _classification_specs,
    "ViTForMaskedImageModeling": _mim_specs,
    "ViTHybridModel": vit_backbone_specs,
    "ViTHybridForImageClassification": _classification_specs,
}


def param_specs(model_class: str, config: ViTConfig, **flags: bool) -> list[ParamSpec]:
    """The table of ``model_class`` (a name from :data:`MODEL_CLASSES`, framework prefix stripped)."""
    name = model_class.removeprefix("TF").removeprefix("Flax")
    if name not in MODEL_CLASSES:
        raise KeyError(f"no weight table for model class {model_class!r}; known: {list(MODEL_CLASSES)}")
    return MODEL_CLASSES[name](config, **flags)


def initial_value(spec: ParamSpec, std: float, rng: Any = np.random) -> np.ndarray:
    """HF's initial value for one row, canonical layout, float32, drawn from ``rng`` (a numpy
    ``Generator`` or the ``np.random`` module, which ``keras.utils.set_random_seed`` seeds).

    Truncated normal: mean 0, std ``std``, cut at ±2 *absolute* (``torch.nn.init.trunc_normal_``'s
    defaults, which HF PyTorch uses); out-of-range draws are redrawn.
    """
    if spec.init is Init.ZEROS:
        return np.zeros(spec.shape, np.float32)
    if spec.init is Init.ONES:
        return np.ones(spec.shape, np.float32)
    out = rng.standard_normal(spec.shape) * std
    while (bad := np.abs(out) > 2.0).any():
        out[bad] = rng.standard_normal(int(bad.sum())) * std
    return out.astype(np.float32)


# --------------------------------------------------------------------------- layouts
def to_kernel_layout(kind: Kind, array: np.ndarray) -> np.ndarray:
    """Canonical (PyTorch) layout → the channels-last kernel layout of Keras and Flax."""
    if kind is Kind.LINEAR_WEIGHT:
        return array.T  # (out, in) -> (in, out)
    if kind is Kind.CONV_WEIGHT:
        return array.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    return array


def from_kernel_layout(kind: Kind, array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_kernel_layout`."""
    if kind is Kind.LINEAR_WEIGHT:
        return array.T
    if kind is Kind.CONV_WEIGHT:
        return array.transpose(3, 2, 0, 1)
    return array


# ----------------------------------------------------------------------- load planning
def _is_optional(name: str) -> bool:
    """Parameters that may be absent from a checkpoint (freshly initialised) or extra in it
    (dropped), as in HF: task heads, the pooler and the mask token. The backbone proper is strict."""
    bare = name.removeprefix(f"{BASE_MODEL_PREFIX}.")
    if bare == name and name.split(".")[0] not in ("embeddings", "encoder", "layernorm", "pooler"):
        return True  # a task head: classifier.*, decoder.*
    return bare.startswith("pooler.") or bare == "embeddings.mask_token"


@dataclass
class LoadPlan:
    """What :func:`plan_load` decided. ``sources`` maps model name → checkpoint key."""

    sources: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # optional, left as initialised
    unexpected: list[str] = field(default_factory=list)  # optional, dropped
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def loading_info(self) -> dict[str, list]:
        """HF's ``output_loading_info`` dict."""
        return {
            "missing_keys": list(self.missing),
            "unexpected_keys": list(self.unexpected),
            "mismatched_keys": list(self.mismatched),
            "error_msgs": [],
        }

    def warning(self) -> str | None:
        parts = []
        if self.missing:
            parts.append(f"newly initialised (not in the checkpoint): {self.missing}")
        if self.unexpected:
            parts.append(f"in the checkpoint but not used by this model: {self.unexpected}")
        if self.mismatched:
            rows = [f"{n}: checkpoint {list(a)} vs model {list(b)}" for n, a, b in self.mismatched]
            parts.append(f"re-initialised because of a shape mismatch: {rows}")
        return "; ".join(parts) or None


def plan_load(
    specs: list[ParamSpec],
    checkpoint_shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str = "checkpoint",
    ignore_mismatched_sizes: bool = False,
) -> LoadPlan:
    """Match a model table with a checkpoint's ``{key: shape}``.

    Handles HF's base-model prefix both ways (a ``ViTModel`` checkpoint into a task model and
    back). Raises one :class:`CheckpointError` listing every missing, unexpected and
    shape-mismatched key of the strict part; optional parts (see ``_is_optional``) are reported
    on the plan instead.
    """
    prefix = f"{BASE_MODEL_PREFIX}."
    model_prefixed = any(s.name.startswith(prefix) for s in specs)
    ckpt_prefixed = any(k.startswith(prefix) for k in checkpoint_shapes)
    renamed: dict[str, str] = {}  # model-side name → checkpoint key
    for key in checkpoint_shapes:
        if model_prefixed and not ckpt_prefixed:
            renamed[prefix + key] = key
        elif ckpt_prefixed and not model_prefixed:
            renamed[key.removeprefix(prefix) if key.startswith(prefix) else f"<head>.{key}"] = key
        else:
            renamed[key] = key

    plan = LoadPlan()
    missing, unexpected, mismatched = [], [], []
    wanted = {s.name: s for s in specs}
    for name, spec in wanted.items():
        key = renamed.get(name)
        if key is None:
            (plan.missing if _is_optional(name) else missing).append(name)
            continue
        shape = tuple(checkpoint_shapes[key])
        if shape != spec.shape:
            row = (key, shape, spec.shape)
            (plan.mismatched if ignore_mismatched_sizes else mismatched).append(row)
            continue
        plan.sources[name] = key
    for name, key in renamed.items():
        if name not in wanted:
            (plan.unexpected if name.startswith("<head>.") or _is_optional(name) else unexpected).append(key)
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            lines += [f"  shape mismatch: {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
            lines.append("  (pass ignore_mismatched_sizes=True to re-initialise mismatched heads)")
        raise CheckpointError("\n".join(lines))
    return plan
