"""The BiT (ResNetV2) backbone of the hybrid ViT in JAX/Flax Linen, at HF transformers 4.x parity;
mirrors :mod:`vit_torch.modeling_bit` class by class.

Shapes: B batch, H×W a feature map's size, C its channels. Every module takes and returns NHWC.
Submodule names are HF's PyTorch attribute names (lists become ``stages_0``, ``layers_1``), so the
param tree is the canonical table of :func:`vit_core.weights.bit_specs` under
:func:`vit_flax.modeling_flax_utils.param_path`. Every padding comes from
:func:`vit_core.config_hybrid.conv_padding` / ``same_padding`` (the geometry
:meth:`BitConfig.feature_shapes` computes), so shapes agree with the config by construction.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_core.config_hybrid import BitConfig, BitLayerSpec, conv_padding, same_padding

from .modeling_flax_utils import ACT2FN
from .modeling_flax_vit import Array, Dtype, _ViTModule

__all__ = [
    "FlaxWeightStandardizedConv2d",
    "FlaxBitGroupNormActivation",
    "FlaxBitMaxPool2d",
    "FlaxBitEmbeddings",
    "FlaxBitDropPath",
    "FlaxBitDownsampleConv",
    "FlaxBitBottleneckLayer",
    "FlaxBitPreActivationBottleneckLayer",
    "FlaxBitStage",
    "FlaxBitEncoder",
    "FlaxBitModel",
    "FlaxBitBackbone",
    "standardize_kernel",
]


def _mean(x: Array, axes: tuple[int, ...]) -> Array:
    """Mean over ``axes`` (kept as size 1), one axis at a time: fp32 rounding then grows with the
    longest axis, not with their product. One flat XLA:CPU reduce made GroupNorm's variance 4x less
    accurate than torch's (measured vs fp64), and the BiT's outputs differed from torch's by > 1e-5."""
    for axis in sorted(axes, reverse=True):
        x = jnp.mean(x, axis=axis, keepdims=True)
    return x


def standardize_kernel(kernel: Array, eps: float, method: str) -> Array:
    """A (kh, kw, in, out) kernel standardised per output channel over (kh, kw, in), in float32, with
    the biased variance: "var_eps" (w - μ)/√(σ² + ε) (HF, timm), "std_eps" (w - μ)/(σ + ε)."""
    w = kernel.astype(jnp.float32)
    centred = w - _mean(w, (0, 1, 2))
    var = _mean(centred * centred, (0, 1, 2))
    if method == "var_eps":
        return centred * jax.lax.rsqrt(var + eps)
    if method == "std_eps":
        return centred / (jnp.sqrt(var) + eps)
    raise ValueError(f"weight_standardization {method!r} must be 'var_eps' or 'std_eps'")


# The two functions below are jitted so that an eager call (the wrappers do not jit) compiles one program
# per conv / norm signature instead of one per primitive: the first eager forward of the tiny test config
# took 12.5 s, now ~7 s; inside an outer jit they are inlined (no effect on the compiled model).
@partial(jax.jit, static_argnames=("stride", "dilation", "padding", "eps", "method", "dtype"))
def weight_standardized_conv(x: Array, kernel: Array, *, stride: int, dilation: int, padding: str | None, eps: float,
                             method: str, dtype: Dtype) -> Array:
    """(B, H, W, C_in), kernel (k, k, C_in, C_out) → (B, H', W', C_out) in ``dtype``: x zero-padded per axis by
    ``conv_padding(padding, ...)``, convolved (no bias) with :func:`standardize_kernel` of the kernel."""
    pads = [conv_padding(padding, size, kernel.shape[0], stride, dilation) for size in x.shape[1:3]]
    weight = standardize_kernel(kernel, eps, method).astype(dtype)
    return jax.lax.conv_general_dilated(x.astype(dtype), weight, (stride, stride), pads,
                                        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@partial(jax.jit, static_argnames=("num_groups", "eps", "activation", "dtype"))
def group_norm(x: Array, scale: Array, bias: Array, *, num_groups: int, eps: float, activation: str | None,
               dtype: Dtype) -> Array:
    """(B, H, W, C) → (B, H, W, C) in ``dtype``: each group's (H, W, C/G) normalised with two-pass float32
    statistics, then ``scale`` / ``bias`` (C,) in float32, then ``activation`` (an :data:`ACT2FN` name, or None)."""
    b, h, w, c = x.shape
    x = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
    centred = x - _mean(x, (1, 2, 4))
    y = (centred * jax.lax.rsqrt(_mean(centred * centred, (1, 2, 4)) + eps)).reshape(b, h, w, c)
    y = (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
    return y if activation is None else ACT2FN[activation](y)


class FlaxWeightStandardizedConv2d(nn.Module):
    """(B, H, W, C_in) → (B, H', W', features): a bias-free convolution with a weight-standardised
    kernel (param ``kernel`` (k, k, C_in, features)), zero-padded per axis by ``conv_padding(padding, ...)``
    (``padding`` is ``BitConfig.global_padding``: None static, "SAME" TF-style, extra pixel after)."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: str | None = None
    eps: float = 1e-8
    standardization: str = "var_eps"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Array) -> Array:
        k, s, d = self.kernel_size, self.stride, self.dilation
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, hidden_states.shape[-1], self.features),
                            self.param_dtype)
        return weight_standardized_conv(hidden_states, kernel, stride=s, dilation=d, padding=self.padding,
                                        eps=self.eps, method=self.standardization, dtype=self.dtype)


class FlaxBitGroupNormActivation(nn.Module):
    """GroupNorm over each group's (H, W, C/G) with torch's two-pass numbers, affine (params ``scale``,
    ``bias`` (C,)), then ``activation`` (an :data:`ACT2FN` name; None: no activation). (B, H, W, C) → same.

    Statistics and the affine run in float32; the result is cast to ``dtype``.
    """

    num_groups: int
    eps: float = 1e-5
    activation: str | None = "relu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: Array) -> Array:
        b, h, w, c = hidden_states.shape
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return group_norm(hidden_states, scale, bias, num_groups=self.num_groups, eps=self.eps,
                          activation=self.activation, dtype=self.dtype)


class FlaxBitMaxPool2d(nn.Module):
    """k×k, stride-s max pool, (B, H, W, C) → (B, H', W', C). With ``use_dynamic_padding`` the input is
    first padded TF-SAME style (``same_padding``) with ZEROS, as HF does (not -inf: this matters where
    the pooled values can be negative); otherwise no padding."""

    kernel_size: int = 3
    stride: int = 2
    use_dynamic_padding: bool = True

    def __call__(self, hidden_states: Array) -> Array:
        k, s = self.kernel_size, self.stride
        if self.use_dynamic_padding:
            pads = [same_padding(size, k, s, 1) for size in hidden_states.shape[1:3]]
            hidden_states = jnp.pad(hidden_states, ((0, 0), *pads, (0, 0)))
        return nn.max_pool(hidden_states, (k, k), strides=(s, s), padding="VALID")


class _BitModule(_ViTModule):
    """A BiT block: the backbone config, the module's dtypes, and its conv / norm constructors."""

    config: BitConfig  # type: ignore[assignment]

    def _conv(self, features: int, kernel_size: int, stride: int = 1,
              dilation: int = 1) -> FlaxWeightStandardizedConv2d:
        cfg = self.config
        return FlaxWeightStandardizedConv2d(features, kernel_size, stride, dilation, cfg.global_padding,
                                            cfg.weight_standardization_eps, cfg.weight_standardization, **self._dtypes)

    def _norm(self, apply_activation: bool = True) -> FlaxBitGroupNormActivation:
        cfg = self.config
        return FlaxBitGroupNormActivation(cfg.num_groups, cfg.group_norm_eps,
                                          cfg.hidden_act if apply_activation else None, **self._dtypes)


class FlaxBitEmbeddings(_BitModule):
    """The stem, (B, H, W, C) → (B, H', W', embedding_size): 7×7 stride-2 conv; a zero pad of 1 unless
    ``global_padding`` is "SAME"; GroupNorm + activation (bottleneck only); 3×3 stride-2 max pool."""

    def setup(self) -> None:
        cfg = self.config
        self.convolution = self._conv(cfg.embedding_size, 7, stride=2)
        self.norm = self._norm() if cfg.layer_type == "bottleneck" else None
        self.pooler = FlaxBitMaxPool2d(3, 2, use_dynamic_padding=cfg.embedding_dynamic_padding)

    def __call__(self, pixel_values: Array) -> Array:
        embedding = self.convolution(pixel_values)
        if self.config.global_padding != "SAME":
            embedding = jnp.pad(embedding, ((0, 0), (1, 1), (1, 1), (0, 0)))
        if self.norm is not None:
            embedding = self.norm(embedding)
        return self.pooler(embedding)


class FlaxBitDropPath(nn.Module):
    """Stochastic depth: in training, each sample's branch is kept with probability 1 - ``rate`` and
    scaled by 1/(1 - rate), else zeroed (mask from the ``dropout`` rng). (B, ...) → same."""

    rate: float = 0.0

    def __call__(self, hidden_states: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return hidden_states
        keep = 1.0 - self.rate
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, hidden_states / jnp.asarray(keep, hidden_states.dtype), 0).astype(hidden_states.dtype)


class FlaxBitDownsampleConv(_BitModule):
    """The first unit's shortcut, (B, H, W, C_in) → (B, H/s, W/s, out_channels): 1×1 stride-s conv, then
    (bottleneck, ``preact=False``) GroupNorm without activation."""

    out_channels: int = 0
    stride: int = 1
    preact: bool = True

    def setup(self) -> None:
        self.conv = self._conv(self.out_channels, 1, stride=self.stride)
        self.norm = None if self.preact else self._norm(apply_activation=False)

    def __call__(self, hidden_states: Array) -> Array:
        hidden_states = self.conv(hidden_states)
        return hidden_states if self.norm is None else self.norm(hidden_states)


class _BitUnit(_BitModule):
    """A residual unit of a stage, described by ``spec``: (B, H, W, in) → (B, H/stride, W/stride, out)."""

    spec: BitLayerSpec | None = None

    def _unit_parts(self, preact: bool) -> None:
        """The parts both layer types share: the first unit's ``downsample`` and the ``drop_path``."""
        u = self.spec
        self.downsample = (FlaxBitDownsampleConv(self.config, out_channels=u.out_channels, stride=u.stride,
                                                 preact=preact, **self._dtypes) if u.is_first_layer else None)
        self.drop_path = FlaxBitDropPath(u.drop_path_rate)


class FlaxBitBottleneckLayer(_BitUnit):
    """Bottleneck (v1.5): act(norm3(conv3(norm2(conv2(norm1(conv1(x)))))) + shortcut), the stride and
    ``spec.dilation`` on the 3×3 ``conv2``; norm3 and the shortcut's norm have no activation."""

    def setup(self) -> None:
        u = self.spec
        self._unit_parts(preact=False)
        self.conv1, self.norm1 = self._conv(u.mid_channels, 1), self._norm()
        self.conv2, self.norm2 = self._conv(u.mid_channels, 3, u.stride, u.dilation), self._norm()
        self.conv3, self.norm3 = self._conv(u.out_channels, 1), self._norm(apply_activation=False)
        self.activation = ACT2FN[self.config.hidden_act]

    def __call__(self, hidden_states: Array, deterministic: bool = True) -> Array:
        shortcut = hidden_states if self.downsample is None else self.downsample(hidden_states)
        hidden_states = self.norm1(self.conv1(hidden_states))
        hidden_states = self.norm2(self.conv2(hidden_states))
        hidden_states = self.norm3(self.conv3(hidden_states))
        return self.activation(self.drop_path(hidden_states, deterministic) + shortcut)


class FlaxBitPreActivationBottleneckLayer(_BitUnit):
    """Pre-activation (v2): p = norm1(x); conv3(norm3(conv2(norm2(conv1(p))))) + shortcut, the shortcut
    being x or ``downsample(p)``; the stride on the 3×3 ``conv2``, whose dilation is 1 (as HF's)."""

    def setup(self) -> None:
        u = self.spec
        self._unit_parts(preact=True)
        self.norm1, self.conv1 = self._norm(), self._conv(u.mid_channels, 1)
        self.norm2, self.conv2 = self._norm(), self._conv(u.mid_channels, 3, u.stride)
        self.norm3, self.conv3 = self._norm(), self._conv(u.out_channels, 1)

    def __call__(self, hidden_states: Array, deterministic: bool = True) -> Array:
        preact = self.norm1(hidden_states)
        shortcut = hidden_states if self.downsample is None else self.downsample(preact)
        hidden_states = self.conv1(preact)
        hidden_states = self.conv2(self.norm2(hidden_states))
        hidden_states = self.conv3(self.norm3(hidden_states))
        return self.drop_path(hidden_states, deterministic) + shortcut


class FlaxBitStage(_BitModule):
    """One stage: its units ``layers_0`` ... in order (``layer_specs``, from ``BitConfig.stage_layers``)."""

    layer_specs: tuple[BitLayerSpec, ...] = ()

    def setup(self) -> None:
        unit = FlaxBitBottleneckLayer if self.config.layer_type == "bottleneck" else FlaxBitPreActivationBottleneckLayer
        self.layers = [unit(self.config, spec=spec, **self._dtypes) for spec in self.layer_specs]

    def __call__(self, hidden_states: Array, deterministic: bool = True) -> Array:
        for layer in self.layers:
            hidden_states = layer(hidden_states, deterministic)
        return hidden_states


class FlaxBitEncoder(_BitModule):
    """The stages ``stages_0`` ...: (B, H, W, embedding_size) → (its input, each stage's output), up to
    stage ``last``. With ``gradient_checkpointing`` each stage is rematerialised in the backward pass."""

    gradient_checkpointing: bool = False

    def setup(self) -> None:
        # static_argnums count self as 0: deterministic (2) is a bool.
        stage = nn.remat(FlaxBitStage, static_argnums=(2,)) if self.gradient_checkpointing else FlaxBitStage
        self.stages = [stage(self.config, layer_specs=tuple(layers), **self._dtypes)
                       for layers in self.config.stage_layers()]

    def __call__(self, hidden_states: Array, deterministic: bool = True, last: int | None = None) -> tuple[Array, ...]:
        all_hidden = (hidden_states,)
        for stage in self.stages[:last]:
            hidden_states = stage(hidden_states, deterministic)
            all_hidden += (hidden_states,)
        return all_hidden


class FlaxBitModel(_BitModule):
    """``embedder`` then ``encoder``: (B, H, W, C) → (stem output, stage 1 output, ...) up to ``last_stage``
    (all if None). ``norm`` (pre-activation only) is HF's final norm, which no feature map passes
    through: it is run once at init, to create its params (the checkpoint has them), like the stages
    after ``last_stage``."""

    gradient_checkpointing: bool = False

    def setup(self) -> None:
        self.embedder = FlaxBitEmbeddings(self.config, **self._dtypes)
        self.encoder = FlaxBitEncoder(self.config, gradient_checkpointing=self.gradient_checkpointing,
                                      **self._dtypes)
        self.norm = self._norm() if self.config.layer_type == "preactivation" else None

    def __call__(self, pixel_values: Array, deterministic: bool = True,
                 last_stage: int | None = None) -> tuple[Array, ...]:
        if not self.is_initializing():
            return self.encoder(self.embedder(pixel_values), deterministic, last_stage)
        hidden_states = self.encoder(self.embedder(pixel_values), deterministic)
        if self.norm is not None:
            self.norm(hidden_states[-1])
        return hidden_states[: None if last_stage is None else last_stage + 1]


class FlaxBitBackbone(_BitModule):
    """HF's ``BitBackbone``: (B, H, W, C) → the feature maps of ``config.out_features``, a tuple of
    (B, H_i, W_i, C_i) in stage order. Stages after the last requested one are not run."""

    gradient_checkpointing: bool = False

    def setup(self) -> None:
        self.bit = FlaxBitModel(self.config, gradient_checkpointing=self.gradient_checkpointing, **self._dtypes)

    def __call__(self, pixel_values: Array, deterministic: bool = True) -> tuple[Array, ...]:
        out_indices = [i % len(self.config.stage_names) for i in self.config.out_indices]
        hidden_states = self.bit(pixel_values, deterministic, last_stage=out_indices[-1])
        return tuple(hidden_states[i] for i in out_indices)
