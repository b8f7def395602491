"""BiT (ResNetV2) backbone in Keras 3 (TensorFlow backend), class by class the mirror of :mod:`vit_torch.modeling_bit`.

Every layer here reads and returns channels-last maps (B, H, W, C); only :class:`TFBitBackbone` takes
NCHW ``pixel_values`` by default, as PyTorch does (``channels_last=True`` skips both transposes, which
is how the hybrid ViT calls it). Layer names are the PyTorch attribute names, so the canonical rows
(``embedder.convolution.weight``, ``encoder.stages.0.layers.1.norm2.bias``...) resolve onto the Keras
variables by :func:`~vit_tf.modeling_tf_utils.resolve_variable`: a convolution holds ``kernel``
(kh, kw, in, out), a group norm ``gamma`` / ``beta``. Spatial sizes must be static (only the batch
may be unknown): each convolution's padding is computed from its input size by
:func:`~vit_core.config_hybrid.conv_padding`.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from vit_core.config_hybrid import BitConfig, conv_padding, same_padding
from .modeling_tf_utils import Tensor, ViTConfigSerializable, activation, register, rematerialized

__all__ = [
    "TFWeightStandardizedConv2d", "TFBitGroupNormActivation", "TFBitMaxPool2d", "TFBitEmbeddings", "TFBitDropPath",
    "TFBitBottleneckLayer", "TFBitPreActivationBottleneckLayer", "TFBitDownsampleConv", "TFBitStage",
    "TFBitEncoder", "TFBitModel", "TFBitBackbone",
]

Shape = tuple[int | None, ...]
Pads = tuple[tuple[int, int], tuple[int, int]]


def _mean(x: Tensor, axes: tuple[int, ...]) -> Tensor:
    """Mean over ``axes`` (kept), one axis at a time: a flat float32 reduction over a group's H·W·C/G values
    (73 728 in the 384-px stem) drifts by ~2e-5 relative in the variance (measured), the nested one by ~2e-7."""
    for axis in sorted(axes, reverse=True):
        x = ops.mean(x, axis=axis, keepdims=True)
    return x


def _zero_pad(x: Tensor, pads: Pads) -> Tensor:
    """Zero-pad (B, H, W, C) by ((top, bottom), (left, right)); a no-op when every amount is 0."""
    if not any(sum(p) for p in pads):
        return x
    return ops.pad(x, ((0, 0), *pads, (0, 0)))


@register
class TFWeightStandardizedConv2d(ViTConfigSerializable, keras.layers.Layer):
    """Bias-free convolution of a weight-standardised kernel: (B, H, W, Cin) → (B, H', W', filters).

    Before each call the input is zero-padded by ``conv_padding(config.global_padding, ...)`` per axis
    and the kernel is standardised in float32 per output channel over (kh, kw, in) with the biased
    variance: ``var_eps``: (w - μ)/√(σ² + ε), ``std_eps``: (w - μ)/(σ + ε) (``config.weight_standardization``).
    """

    def __init__(
        self, config: BitConfig, filters: int, kernel_size: int, strides: int = 1, dilation_rate: int = 1, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.config = config
        self.filters, self.kernel_size, self.strides, self.dilation_rate = filters, kernel_size, strides, dilation_rate

    def _init_options(self) -> dict[str, Any]:
        return {"filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides,
                "dilation_rate": self.dilation_rate}

    def build(self, input_shape: Shape) -> None:
        k = self.kernel_size
        self.kernel = self.add_weight(
            shape=(k, k, int(input_shape[-1]), self.filters), initializer="he_normal", name="kernel", autocast=False
        )

    def standardized_kernel(self) -> Tensor:
        """The kernel the convolution uses, (kh, kw, in, out) float32."""
        w = ops.cast(self.kernel, "float32")
        centered = w - _mean(w, (0, 1, 2))
        var = _mean(ops.square(centered), (0, 1, 2))
        eps = self.config.weight_standardization_eps
        if self.config.weight_standardization == "std_eps":
            return centered / (ops.sqrt(var) + eps)
        return centered / ops.sqrt(var + eps)

    def call(self, x: Tensor) -> Tensor:
        args = (self.kernel_size, self.strides, self.dilation_rate)
        x = _zero_pad(x, tuple(conv_padding(self.config.global_padding, int(s), *args) for s in x.shape[1:3]))
        kernel = ops.cast(self.standardized_kernel(), x.dtype)
        return ops.conv(x, kernel, strides=self.strides, padding="valid", dilation_rate=self.dilation_rate)


@register
class TFBitGroupNormActivation(ViTConfigSerializable, keras.layers.Layer):
    """GroupNorm(``num_groups``, ``group_norm_eps``) with affine γ, β, then ``hidden_act`` unless
    ``apply_activation=False``: (B, H, W, C) → (B, H, W, C).

    Two passes in float32 whatever the compute dtype: μ over each group's (H, W, C/G), then
    E[(x - μ)²]; y = (x - μ)·rsqrt(var + ε)·γ + β.
    """

    def __init__(self, config: BitConfig, apply_activation: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.apply_activation = apply_activation
        self.activation = activation(config.hidden_act) if apply_activation else None

    def _init_options(self) -> dict[str, Any]:
        return {"apply_activation": self.apply_activation}

    def build(self, input_shape: Shape) -> None:
        c = int(input_shape[-1])
        if c % self.config.num_groups:
            raise ValueError(f"{self.name}: {c} channels do not split into num_groups={self.config.num_groups} groups")
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma", autocast=False)
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta", autocast=False)

    def call(self, x: Tensor) -> Tensor:
        _, h, w, c = x.shape
        g = self.config.num_groups
        y = ops.reshape(ops.cast(x, "float32"), (-1, h, w, g, c // g))
        centered = y - _mean(y, (1, 2, 4))
        inv = ops.rsqrt(_mean(ops.square(centered), (1, 2, 4)) + self.config.group_norm_eps)
        y = ops.reshape(centered * inv, (-1, h, w, c)) * self.gamma + self.beta
        if self.activation is not None:
            y = self.activation(y)
        return ops.cast(y, self.compute_dtype)


@register
class TFBitMaxPool2d(keras.layers.Layer):
    """k×k max-pool, stride s, no padding; with ``use_dynamic_padding`` first zero-padded TF-SAME style
    (the extra pixel after). Zeros, as HF, not -inf: (B, H, W, C) → (B, H', W', C)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, use_dynamic_padding: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.kernel_size, self.stride, self.use_dynamic_padding = kernel_size, stride, use_dynamic_padding

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "kernel_size": self.kernel_size, "stride": self.stride,
                "use_dynamic_padding": self.use_dynamic_padding}

    def call(self, x: Tensor) -> Tensor:
        if self.use_dynamic_padding:
            x = _zero_pad(x, tuple(same_padding(int(s), self.kernel_size, self.stride, 1) for s in x.shape[1:3]))
        return ops.max_pool(x, self.kernel_size, self.stride, padding="valid")


@register
class TFBitEmbeddings(ViTConfigSerializable, keras.layers.Layer):
    """The stem: 7×7 stride-2 conv, a zero pad of 1 unless ``global_padding == "SAME"``, GroupNorm +
    activation (bottleneck only), 3×3 stride-2 max-pool: (B, H, W, C) → (B, H/4, W/4, embedding_size)."""

    def __init__(self, config: BitConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.convolution = TFWeightStandardizedConv2d(config, config.embedding_size, 7, strides=2, name="convolution")
        self.pooler = TFBitMaxPool2d(3, 2, use_dynamic_padding=config.embedding_dynamic_padding, name="pooler")
        self.pad = 0 if config.global_padding == "SAME" else 1
        self.norm = TFBitGroupNormActivation(config, name="norm") if config.layer_type != "preactivation" else None

    def build(self, input_shape: Shape) -> None:
        self.convolution.build(input_shape)
        if self.norm is not None:
            self.norm.build((input_shape[0], None, None, self.config.embedding_size))

    def call(self, pixel_values: Tensor) -> Tensor:
        p = self.pad
        embedding = _zero_pad(self.convolution(pixel_values), ((p, p), (p, p)))
        if self.norm is not None:
            embedding = self.norm(embedding)
        return self.pooler(embedding)


@register
class TFBitDropPath(keras.layers.Dropout):
    """Stochastic depth on (B, H, W, C): in training each sample's whole map is zeroed with probability
    ``rate`` and the others scaled by 1/(1 - rate) (Keras dropout with noise shape (B, 1, 1, 1)); identity
    at inference."""

    def __init__(self, rate: float, **kwargs: Any):
        kwargs.pop("noise_shape", None)  # fixed; present in a saved get_config
        super().__init__(rate, noise_shape=(None, 1, 1, 1), **kwargs)


@register
class TFBitDownsampleConv(ViTConfigSerializable, keras.layers.Layer):
    """The projection shortcut of a stage's first unit: 1×1 stride-s conv, then (bottleneck units only)
    GroupNorm without activation: (B, H, W, Cin) → (B, H/s, W/s, filters)."""

    def __init__(self, config: BitConfig, filters: int, strides: int = 1, preact: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.filters, self.strides, self.preact = filters, strides, preact
        self.conv = TFWeightStandardizedConv2d(config, filters, 1, strides=strides, name="conv")
        self.norm = None if preact else TFBitGroupNormActivation(config, apply_activation=False, name="norm")

    def _init_options(self) -> dict[str, Any]:
        return {"filters": self.filters, "strides": self.strides, "preact": self.preact}

    def build(self, input_shape: Shape) -> None:
        self.conv.build(input_shape)
        if self.norm is not None:
            self.norm.build((input_shape[0], None, None, self.filters))

    def call(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return x if self.norm is None else self.norm(x)


class _TFBitUnit(ViTConfigSerializable, keras.layers.Layer):
    """What both residual units share: unit ``layer_index`` of stage ``stage_index`` of
    ``config.stage_layers()``, its projection shortcut (first unit only) and its drop path."""

    preact: bool

    def __init__(self, config: BitConfig, stage_index: int, layer_index: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.stage_index, self.layer_index = stage_index, layer_index
        self.spec = spec = config.stage_layers()[stage_index][layer_index]
        self.downsample = (
            TFBitDownsampleConv(config, spec.out_channels, spec.stride, preact=self.preact, name="downsample")
            if spec.is_first_layer else None
        )
        self.drop_path = TFBitDropPath(spec.drop_path_rate, name="drop_path") if spec.drop_path_rate > 0 else None

    def _init_options(self) -> dict[str, Any]:
        return {"stage_index": self.stage_index, "layer_index": self.layer_index}

    def _build_convs(self, input_shape: Shape, pairs: list[tuple[keras.layers.Layer, int]]) -> None:
        """Build each (layer, input channels) of ``pairs``; the shortcut from ``input_shape``."""
        b = input_shape[0]
        if self.downsample is not None:
            self.downsample.build(input_shape)
        for layer, channels in pairs:
            layer.build((b, None, None, channels))

    def _drop_path(self, x: Tensor, training: bool) -> Tensor:
        return x if self.drop_path is None else self.drop_path(x, training=training)


@register
class TFBitBottleneckLayer(_TFBitUnit):
    """Non-pre-activation bottleneck (ResNet v1.5): act(norm3(conv3(norm2(conv2(norm1(conv1(x)))))) + shortcut),
    the stride and dilation on the 3×3 conv2: (B, H, W, Cin) → (B, H/s, W/s, Cout)."""

    preact = False

    def __init__(self, config: BitConfig, stage_index: int, layer_index: int, **kwargs: Any):
        super().__init__(config, stage_index, layer_index, **kwargs)
        s = self.spec
        self.conv1 = TFWeightStandardizedConv2d(config, s.mid_channels, 1, name="conv1")
        self.norm1 = TFBitGroupNormActivation(config, name="norm1")
        self.conv2 = TFWeightStandardizedConv2d(
            config, s.mid_channels, 3, strides=s.stride, dilation_rate=s.dilation, name="conv2"
        )
        self.norm2 = TFBitGroupNormActivation(config, name="norm2")
        self.conv3 = TFWeightStandardizedConv2d(config, s.out_channels, 1, name="conv3")
        self.norm3 = TFBitGroupNormActivation(config, apply_activation=False, name="norm3")
        self.activation = activation(config.hidden_act)

    def build(self, input_shape: Shape) -> None:
        mid = self.spec.mid_channels
        self._build_convs(input_shape, [
            (self.conv1, int(input_shape[-1])), (self.norm1, mid), (self.conv2, mid), (self.norm2, mid),
            (self.conv3, mid), (self.norm3, self.spec.out_channels),
        ])

    def call(self, hidden_states: Tensor, training: bool = False) -> Tensor:
        shortcut = hidden_states if self.downsample is None else self.downsample(hidden_states)
        x = self.norm1(self.conv1(hidden_states))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.activation(self._drop_path(x, training) + shortcut)


@register
class TFBitPreActivationBottleneckLayer(_TFBitUnit):
    """Pre-activation bottleneck (ResNet v2): p = norm1(x); conv3(norm3(conv2(norm2(conv1(p))))) + shortcut,
    the shortcut x or (first unit) downsample(p); stride on the 3×3 conv2, which (as HF) is never dilated."""

    preact = True

    def __init__(self, config: BitConfig, stage_index: int, layer_index: int, **kwargs: Any):
        super().__init__(config, stage_index, layer_index, **kwargs)
        s = self.spec
        self.norm1 = TFBitGroupNormActivation(config, name="norm1")
        self.conv1 = TFWeightStandardizedConv2d(config, s.mid_channels, 1, name="conv1")
        self.norm2 = TFBitGroupNormActivation(config, name="norm2")
        self.conv2 = TFWeightStandardizedConv2d(config, s.mid_channels, 3, strides=s.stride, name="conv2")
        self.norm3 = TFBitGroupNormActivation(config, name="norm3")
        self.conv3 = TFWeightStandardizedConv2d(config, s.out_channels, 1, name="conv3")

    def build(self, input_shape: Shape) -> None:
        c, mid = int(input_shape[-1]), self.spec.mid_channels
        self._build_convs(input_shape, [
            (self.norm1, c), (self.conv1, c), (self.norm2, mid), (self.conv2, mid),
            (self.norm3, mid), (self.conv3, mid),
        ])

    def call(self, hidden_states: Tensor, training: bool = False) -> Tensor:
        preact = self.norm1(hidden_states)
        shortcut = hidden_states if self.downsample is None else self.downsample(preact)
        x = self.conv1(preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return self._drop_path(x, training) + shortcut


@register
class TFBitStage(ViTConfigSerializable, keras.layers.Layer):
    """Stage ``stage_index``: its residual units in sequence (``layers.{i}``)."""

    def __init__(self, config: BitConfig, stage_index: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.stage_index = stage_index
        unit = TFBitBottleneckLayer if config.layer_type == "bottleneck" else TFBitPreActivationBottleneckLayer
        specs = config.stage_layers()[stage_index]
        self.layers = [unit(config, stage_index, i, name=f"layers.{i}") for i in range(len(specs))]

    def _init_options(self) -> dict[str, Any]:
        return {"stage_index": self.stage_index}

    def build(self, input_shape: Shape) -> None:
        for layer in self.layers:
            layer.build(input_shape)
            input_shape = (input_shape[0], None, None, layer.spec.out_channels)

    def call(self, hidden_states: Tensor, training: bool = False) -> Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, training=training)
        return hidden_states


@register
class TFBitEncoder(ViTConfigSerializable, keras.layers.Layer):
    """The stages (``stages.{s}``): (B, h, w, embedding_size) → (input, stage 1 output, ...) up to stage ``last``."""

    def __init__(self, config: BitConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.stages = [TFBitStage(config, s, name=f"stages.{s}") for s in range(config.num_stages)]
        #: recompute each stage in the backward pass (``TFPreTrainedModel.gradient_checkpointing_enable``)
        self.gradient_checkpointing = False

    def build(self, input_shape: Shape) -> None:
        for stage, channels in zip(self.stages, self.config.stage_channels()):
            stage.build((input_shape[0], None, None, channels))

    def call(self, hidden_states: Tensor, last: int | None = None, training: bool = False) -> tuple[Tensor, ...]:
        all_hidden = (hidden_states,)
        for stage in self.stages[:last]:
            if self.gradient_checkpointing and training:
                hidden_states = rematerialized(lambda x, stage=stage: stage(x, training=True))(hidden_states)
            else:
                hidden_states = stage(hidden_states, training=training)
            all_hidden += (hidden_states,)
        return all_hidden


@register
class TFBitModel(ViTConfigSerializable, keras.layers.Layer):
    """Stem then stages, channels-last: (B, H, W, C) → (stem output, stage 1 output, ...). ``norm``
    (pre-activation only) is HF's final GroupNorm + activation, which the backbone's maps never pass
    through: built for the checkpoint's names, not applied."""

    def __init__(self, config: BitConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.embedder = TFBitEmbeddings(config, name="embedder")
        self.encoder = TFBitEncoder(config, name="encoder")
        self.norm = TFBitGroupNormActivation(config, name="norm") if config.layer_type == "preactivation" else None

    def build(self, input_shape: Shape) -> None:
        b = input_shape[0]
        self.embedder.build((b, None, None, self.config.num_channels))
        self.encoder.build((b, None, None, self.config.embedding_size))
        if self.norm is not None:
            self.norm.build((b, None, None, self.config.hidden_sizes[-1]))

    def call(self, pixel_values: Tensor, last_stage: int | None = None, training: bool = False) -> tuple[Tensor, ...]:
        """The maps up to stage ``last_stage`` (all stages if None)."""
        return self.encoder(self.embedder(pixel_values), last=last_stage, training=training)


@register
class TFBitBackbone(ViTConfigSerializable, keras.layers.Layer):
    """HF's ``BitBackbone``: the maps of ``config.out_features`` (stem and/or stages), in stage order.

    ``call(pixel_values)``: (B, C, H, W) → tuple of (B, Cᵢ, hᵢ, wᵢ); with ``channels_last=True`` input and
    outputs are (B, H, W, C) / (B, hᵢ, wᵢ, Cᵢ). Stages after the last requested one are not run (their
    weights still load and save); the pre-activation final norm is not applied.
    """

    def __init__(self, config: BitConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.bit = TFBitModel(config, name="bit")
        names = config.stage_names
        self.out_positions = [names.index(f) for f in config.out_features]
        self.channels = [config.stage_channels()[i] for i in self.out_positions]

    def build(self, input_shape: Shape) -> None:
        self.bit.build(input_shape)  # only the batch is read: channels come from the config

    def call(self, pixel_values: Tensor, channels_last: bool = False, training: bool = False) -> tuple[Tensor, ...]:
        c = pixel_values.shape[-1 if channels_last else 1]
        if c != self.config.num_channels:
            layout = "(B, H, W, C)" if channels_last else "(B, C, H, W)"
            raise ValueError(
                f"pixel_values {layout} has {c} channels (shape {tuple(pixel_values.shape)}), but "
                f"backbone_config.num_channels is {self.config.num_channels}"
            )
        if not channels_last:
            pixel_values = ops.transpose(pixel_values, (0, 2, 3, 1))
        hidden = self.bit(pixel_values, last_stage=self.out_positions[-1], training=training)
        maps = tuple(hidden[i] for i in self.out_positions)
        return maps if channels_last else tuple(ops.transpose(m, (0, 3, 1, 2)) for m in maps)
