"""Configs of the hybrid ViT: ``BitConfig`` (the BiT / ResNetV2 backbone) and ``ViTHybridConfig``.

Field names and defaults are HF transformers 4.x's, so HF's hybrid ``config.json`` files load and
ours load in HF. Beyond HF, three numerics knobs make the backbone reproduce checkpoints from other
code bases (see docs/conversion.md): ``weight_standardization``, ``weight_standardization_eps`` and
``group_norm_eps``. Their defaults are HF's (and timm's) numbers.

The backbone's geometry (output grid, channels) is computed here, once, for every framework:
:meth:`BitConfig.feature_shape` walks the stem and the stages with each convolution's padding rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .config import (
    SUPPORTED_ACTIVATIONS, ConfigError, ViTConfig, _short, check_field_types, check_parameter_bound,
    check_positive_float,
)

__all__ = ["BitConfig", "ViTHybridConfig", "BitLayerSpec", "make_div", "conv_output_size"]

LAYER_TYPES: tuple[str, ...] = ("preactivation", "bottleneck")
#: ``weight_standardization`` formulas: "var_eps" (w-μ)/√(σ²+ε) (HF, timm); "std_eps" (w-μ)/(σ+ε)
#: (google-research/vision_transformer's StdConv).
WEIGHT_STANDARDIZATIONS: tuple[str, ...] = ("var_eps", "std_eps")
#: BiT's bottleneck width is this fraction of a unit's output channels.
BOTTLE_RATIO = 0.25


def make_div(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (at least ``divisor``, never below 90%)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def static_padding(kernel: int, stride: int, dilation: int) -> int:
    """Symmetric padding of a convolution with no padding mode (HF's ``get_padding_value(None)``)."""
    return (stride - 1 + dilation * (kernel - 1)) // 2


def is_dynamic_same(kernel: int, stride: int, dilation: int) -> bool:
    """TF-style SAME padding that depends on the input size (cannot be a fixed symmetric pad)."""
    return not (stride == 1 and dilation * (kernel - 1) % 2 == 0)


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF-style SAME padding (before, after) along one axis of ``size``: the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv_padding(padding: str | None, size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding a BiT convolution applies along an axis of ``size`` under ``padding``
    (``None``, ``"SAME"`` or ``"VALID"``), exactly as HF's ``WeightStandardizedConv2d``."""
    if padding == "VALID":
        return 0, 0
    if padding == "SAME" and is_dynamic_same(kernel, stride, dilation):
        return same_padding(size, kernel, stride, dilation)
    p = static_padding(kernel, stride, dilation)
    return p, p


def conv_output_size(padding: str | None, size: int, kernel: int, stride: int = 1, dilation: int = 1) -> int:
    before, after = conv_padding(padding, size, kernel, stride, dilation)
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class BitLayerSpec:
    """One residual unit of a stage: channels, stride, dilation of its 3×3 conv, drop-path rate."""

    in_channels: int
    out_channels: int
    mid_channels: int
    stride: int
    dilation: int  # of the 3×3 convolution (HF: the stage's first_dilation for the first unit)
    drop_path_rate: float
    is_first_layer: bool


@dataclass
class BitConfig:
    """The BiT (ResNetV2) backbone. HF 4.x's fields and defaults; ``stage_names`` is derived."""

    model_type: ClassVar[str] = "bit"

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    layer_type: str = "preactivation"
    hidden_act: str = "relu"
    global_padding: str | None = None
    num_groups: int = 32
    drop_path_rate: float = 0.0
    embedding_dynamic_padding: bool = False
    output_stride: int = 32
    width_factor: int = 1
    out_features: list[str] | None = None
    out_indices: list[int] | None = None
    # trivit parity knobs (not in HF, which hard-codes HF's values below).
    weight_standardization: str = "var_eps"
    weight_standardization_eps: float = 1e-8
    group_norm_eps: float = 1e-5
    #: Keys we do not model (HF's common config keys, ``transformers_version``...), kept for the round trip.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self, prefix="backbone_config.")
        self.hidden_sizes = list(self.hidden_sizes)
        self.depths = list(self.depths)
        if isinstance(self.global_padding, str):
            if self.global_padding.upper() not in ("SAME", "VALID"):
                raise ConfigError(
                    f"backbone_config.global_padding {self.global_padding!r} is not supported; use None, 'SAME' or 'VALID'"
                )
            self.global_padding = self.global_padding.upper()
        elif self.global_padding is not None:
            raise ConfigError(f"backbone_config.global_padding must be None or a string, got {self.global_padding!r}")
        self.out_features, self.out_indices = self._aligned_outputs(self.out_features, self.out_indices)
        self.validate()

    # ------------------------------------------------------------------ stages
    @property
    def stage_names(self) -> list[str]:
        return ["stem", *(f"stage{i}" for i in range(1, len(self.depths) + 1))]

    @property
    def num_stages(self) -> int:
        """Stages actually built: HF zips ``depths`` with ``hidden_sizes`` (the shorter wins)."""
        return min(len(self.depths), len(self.hidden_sizes))

    def _aligned_outputs(self, feats: Any, idxs: Any) -> tuple[list[str], list[int]]:
        """HF's ``get_aligned_output_features_output_indices``: fill one from the other, default the last stage."""
        names = self.stage_names
        for field_name, value in (("out_features", feats), ("out_indices", idxs)):
            if value is not None and not value:
                raise ConfigError(f"backbone_config.{field_name} must name at least one stage of {names}, got {value!r}")
        if feats is not None:
            if not isinstance(feats, (list, tuple)) or any(f not in names for f in feats):
                raise ConfigError(f"backbone_config.out_features must be a list of stage names {names}, got {feats!r}")
            feats = list(feats)
            if feats != [n for n in names if n in feats]:
                raise ConfigError(f"backbone_config.out_features must be distinct and in the order of {names}, got {feats}")
        if idxs is not None:
            if not isinstance(idxs, (list, tuple)) or any(
                not isinstance(i, int) or isinstance(i, bool) or not -len(names) <= i < len(names) for i in idxs
            ):
                raise ConfigError(f"backbone_config.out_indices must be a list of indices into {names}, got {idxs!r}")
            positive = [i % len(names) for i in idxs]
            if positive != sorted(set(positive)):
                raise ConfigError(f"backbone_config.out_indices must be distinct and in stage order, got {list(idxs)}")
            from_idx = [names[i] for i in positive]
            if feats is not None and feats != from_idx:
                raise ConfigError(
                    f"backbone_config.out_features {feats} and out_indices {list(idxs)} name different stages"
                )
            return from_idx, list(idxs)
        if feats is None:
            return [names[-1]], [len(names) - 1]
        return feats, [names.index(f) for f in feats]

    def stage_channels(self) -> list[int]:
        """Output channels of the stem and of each built stage (HF's ``make_div(hidden · width_factor)``)."""
        return [self.embedding_size, *(make_div(h * self.width_factor) for h in self.hidden_sizes[: self.num_stages])]

    def stage_plan(self) -> list[tuple[int, BitLayerSpec, BitLayerSpec]]:
        """Per built stage: (depth, its first unit, the unit every later one repeats), with HF's stride and
        dilation schedule; ``drop_path_rate`` 0 (see :meth:`stage_layers`). O(stages), whatever the depths."""
        plan = []
        prev, current_stride, dilation = self.embedding_size, 4, 1
        for s, (depth, out) in enumerate(zip(self.depths, self.stage_channels()[1:])):
            stride = 1 if s == 0 else 2
            if current_stride >= self.output_stride:
                dilation *= stride
                stride = 1
            first_dilation = 1 if dilation in (1, 2) else 2
            mid = make_div(out * BOTTLE_RATIO)
            first = BitLayerSpec(prev, out, mid, stride, first_dilation, 0.0, True)
            plan.append((depth, first, BitLayerSpec(out, out, mid, 1, dilation, 0.0, False)))
            prev = out
            current_stride *= stride
        return plan

    def stage_layers(self) -> list[list[BitLayerSpec]]:
        """Every residual unit, stage by stage, with HF's stride / dilation / drop-path schedule."""
        total = sum(self.depths[: self.num_stages])
        rates = [self.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]  # np.linspace
        stages: list[list[BitLayerSpec]] = []
        k = 0
        for depth, first, later in self.stage_plan():
            stages.append([dataclasses.replace(first if i == 0 else later, drop_path_rate=rates[k + i])
                           for i in range(depth)])
            k += depth
        return stages

    def num_parameters_estimate(self) -> int:
        """Parameters of ``BitModel`` (as :func:`vit_core.weights.bit_specs` lists them), from the sizes alone."""
        bottleneck = self.layer_type == "bottleneck"
        count = self.embedding_size * self.num_channels * 49 + (2 * self.embedding_size if bottleneck else 0)
        for depth, first, later in self.stage_plan():
            for unit, n in ((first, 1), (later, depth - 1)):
                i, m, o = unit.in_channels, unit.mid_channels, unit.out_channels
                convs = i * m + 9 * m * m + m * o + (i * o if unit.is_first_layer else 0)
                norms = 2 * (m + m + o + (o if unit.is_first_layer else 0)) if bottleneck else 2 * (i + m + m)
                count += n * (convs + norms)
        return count + (0 if bottleneck else 2 * self.hidden_sizes[-1])

    # ------------------------------------------------------------------ geometry
    def stem_output_size(self, size: int) -> int:
        """Spatial size after the stem (7×7 stride-2 conv, optional pad, 3×3 stride-2 max-pool)."""
        size = conv_output_size(self.global_padding, size, 7, 2)
        if self.global_padding != "SAME":
            size += 2  # HF's ConstantPad2d(1) before the pool
        if self.embedding_dynamic_padding:
            return math.ceil(size / 2)
        return (size - 3) // 2 + 1

    def layer_output_size(self, layer: BitLayerSpec, size: int) -> int:
        """Spatial size after one unit (its 3×3 conv; HF's pre-activation unit ignores ``dilation``)."""
        dilation = layer.dilation if self.layer_type == "bottleneck" else 1
        return conv_output_size(self.global_padding, size, 3, layer.stride, dilation)

    def feature_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of the stem and of every stage for an H×W input."""
        h, w = self.stem_output_size(height), self.stem_output_size(width)
        out = [(self.embedding_size, h, w)]
        for depth, first, later in self.stage_plan():
            h, w = self.layer_output_size(first, h), self.layer_output_size(first, w)
            for _ in range(depth - 1):  # a later unit keeps the size (stride 1): stop at the fixed point
                nh, nw = self.layer_output_size(later, h), self.layer_output_size(later, w)
                if (nh, nw) == (h, w):
                    break
                h, w = nh, nw
            out.append((first.out_channels, h, w))
        return out

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, height, width) of the last ``out_features`` map: what the hybrid ViT embeds."""
        return self.feature_shapes(height, width)[self.out_indices[-1] % len(self.stage_names)]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field (``backbone_config.<field>``)."""
        for name in ("num_channels", "embedding_size", "num_groups", "output_stride", "width_factor"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"backbone_config.{name} must be a positive int, got {v!r}")
        for name in ("hidden_sizes", "depths"):
            v = getattr(self, name)
            if not v or any(not isinstance(x, int) or isinstance(x, bool) or x <= 0 for x in v):
                raise ConfigError(f"backbone_config.{name} must be a non-empty list of positive ints, got {v!r}")
        if len(self.depths) > len(self.hidden_sizes):
            raise ConfigError(
                f"backbone_config.depths has {len(self.depths)} stages but hidden_sizes only {len(self.hidden_sizes)}"
            )
        check_parameter_bound("backbone_config", self.num_parameters_estimate())
        if self.layer_type not in LAYER_TYPES:
            raise ConfigError(f"backbone_config.layer_type {self.layer_type!r} must be one of {list(LAYER_TYPES)}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"backbone_config.hidden_act {self.hidden_act!r} is not supported; choose one of {list(SUPPORTED_ACTIVATIONS)}"
            )
        if self.global_padding == "VALID":
            raise ConfigError(
                "backbone_config.global_padding='VALID' cannot run: every 3×3 convolution shrinks its input by 2 "
                "pixels, so no residual add fits (HF's BitModel fails at its first block too); use None or 'SAME'"
            )
        if not isinstance(self.drop_path_rate, (int, float)) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"backbone_config.drop_path_rate must be a float in [0, 1), got {self.drop_path_rate!r}")
        if self.weight_standardization not in WEIGHT_STANDARDIZATIONS:
            raise ConfigError(
                f"backbone_config.weight_standardization {self.weight_standardization!r} must be one of "
                f"{list(WEIGHT_STANDARDIZATIONS)}"
            )
        for name in ("weight_standardization_eps", "group_norm_eps"):
            check_positive_float(f"backbone_config.{name}", getattr(self, name))
        last = self.stage_channels()[-1]
        if self.layer_type == "preactivation" and self.hidden_sizes[-1] != last:
            raise ConfigError(
                f"backbone_config.hidden_sizes[-1] ({self.hidden_sizes[-1]}) must equal the last stage's width ({last}) "
                "for layer_type='preactivation': the final norm has hidden_sizes[-1] channels and runs on that stage's "
                "output (HF's BitModel fails otherwise)"
            )
        g = self.num_groups
        for name, width in self._group_norm_widths():
            if width % g:
                raise ConfigError(
                    f"backbone_config.num_groups ({g}) must divide every group-normalised width; {name} has {width}"
                )

    def _group_norm_widths(self) -> list[tuple[str, int]]:
        out = []
        if self.layer_type == "bottleneck":
            out.append(("embedding_size", self.embedding_size))
        else:
            out.append(("hidden_sizes[-1] (the final norm)", self.hidden_sizes[-1]))
        for s, (_, layer, _) in enumerate(self.stage_plan()):
            out += [(f"stage{s + 1} (input)", layer.in_channels), (f"stage{s + 1} (bottleneck)", layer.mid_channels),
                    (f"stage{s + 1} (output)", layer.out_channels)]
        return out

    # ------------------------------------------------------------------ serialisation
    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], **overrides: Any) -> BitConfig:
        if not isinstance(config_dict, Mapping):
            raise ConfigError(f"backbone_config must be an object (a dict), got {_short(config_dict)}")
        merged = {**config_dict, **overrides}
        model_type = merged.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(
                f"backbone_config.model_type is {_short(model_type)}; trivit's hybrid supports only the BiT backbone "
                "(model_type ['bit'])"
            )
        merged.pop("stage_names", None)  # derived from depths
        extra = merged.pop("extra", None) or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"backbone_config.extra must be an object, got {_short(extra)}")
        extra = dict(extra)
        known = cls._field_names()
        kwargs = {}
        for k, v in merged.items():
            (kwargs if k in known else extra)[k] = v
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for name in sorted(self._field_names()):
            v = getattr(self, name)
            out[name] = list(v) if isinstance(v, (list, tuple)) else v
        out["stage_names"] = self.stage_names
        out["model_type"] = self.model_type
        return out


#: HF's ``ViTHybridConfig`` default backbone (the R50 stages of google/vit-hybrid-base-bit-384).
DEFAULT_HYBRID_BACKBONE: dict[str, Any] = {
    "global_padding": "same",
    "layer_type": "bottleneck",
    "depths": [3, 4, 9],
    "out_features": ["stage3"],
    "embedding_dynamic_padding": True,
}


@dataclass
class ViTHybridConfig(ViTConfig):
    """A ViT whose patches are the cells of a BiT feature map (HF 4.x ``ViTHybridConfig``).

    Tokens: the backbone turns an H×W image into a (C', h', w') map (:meth:`BitConfig.feature_shape`);
    a ``patch_size`` convolution (1 by default) projects it to ``hidden_size``, giving
    ``(h' // patch_size) · (w' // patch_size)`` patches plus the class token.

    ``backbone_featmap_shape`` ([1, C', h', w'] at ``image_size``, as HF stores it) is derived from the
    backbone when omitted; a stored value that disagrees with the backbone is an error (HF would
    build position embeddings of the wrong length from it).
    """

    model_type: ClassVar[str] = "vit-hybrid"

    patch_size: int = 1
    backbone_config: BitConfig | dict[str, Any] | None = None
    backbone_featmap_shape: list[int] | None = None
    # Read for HF file compatibility; anything that would download or need timm is refused.
    backbone: str | None = None
    use_pretrained_backbone: bool = False
    use_timm_backbone: bool = False
    backbone_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.backbone is not None:
            raise ConfigError(
                f"backbone={self.backbone!r} names a backbone to load by name (a hub or timm download); trivit "
                "never downloads: describe it with backbone_config instead"
            )
        if self.use_pretrained_backbone:
            raise ConfigError("use_pretrained_backbone=True needs a download; trivit loads backbone weights from the checkpoint")
        if self.use_timm_backbone:
            raise ConfigError("use_timm_backbone=True needs timm at run time; trivit builds BiT itself (use backbone_config)")
        if self.backbone_kwargs:
            raise ConfigError(f"backbone_kwargs {self.backbone_kwargs!r} only configure a by-name backbone; use backbone_config")
        if self.backbone_config is None:
            self.backbone_config = BitConfig.from_dict(DEFAULT_HYBRID_BACKBONE)
        elif isinstance(self.backbone_config, Mapping):
            self.backbone_config = BitConfig.from_dict(self.backbone_config)
        elif not isinstance(self.backbone_config, BitConfig):
            raise ConfigError(f"backbone_config must be a BitConfig or a dict, got {type(self.backbone_config).__name__}")
        super().__post_init__()

    @property
    def bit(self) -> BitConfig:
        assert isinstance(self.backbone_config, BitConfig)
        return self.backbone_config

    def feature_map_hw(self, height: int, width: int) -> tuple[int, int]:
        """The backbone's output map (h', w') for an H×W image; tokens are its ``patch_size`` cells."""
        return self.bit.feature_shape(height, width)[1:]

    def feature_map_name(self) -> str:
        return "a backbone feature map"

    def _backbone_parameters(self) -> int:
        return self.bit.num_parameters_estimate()

    def _head_parameter_counts(self) -> list[int]:
        return super()._head_parameter_counts()[:2]  # no masked-image-modeling head for the hybrid

    @property
    def feature_channels(self) -> int:
        """Channels of the backbone map the projection reads (``backbone_featmap_shape[1]``)."""
        return self.bit.feature_shape(*self.image_hw)[0]

    def validate(self) -> None:
        super().validate()
        if self.num_channels != self.bit.num_channels:
            raise ConfigError(
                f"num_channels ({self.num_channels}) differs from backbone_config.num_channels ({self.bit.num_channels})"
            )
        c, h, w = self.bit.feature_shape(*self.image_hw)
        derived = [1, c, h, w]
        if self.backbone_featmap_shape is None:
            self.backbone_featmap_shape = derived
        elif list(self.backbone_featmap_shape) != derived:
            raise ConfigError(
                f"backbone_featmap_shape {list(self.backbone_featmap_shape)} disagrees with the backbone, which maps "
                f"an image of {self.image_size!r} to {derived}; drop the field (it is derived) or fix image_size"
            )
        else:
            self.backbone_featmap_shape = derived

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["backbone_config"] = self.bit.to_dict()
        return out
