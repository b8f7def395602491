"""ViT in Keras 3 (TensorFlow backend), class by class the mirror of :mod:`vit_torch.modeling_vit`.

Shapes: B batch, C channels, H×W image, p patch size, N = (H//p)·(W//p) patches,
S = N + 1 tokens (class token first), D hidden size, h heads, d = D/h head size.
Inputs are NCHW like PyTorch (transposed to NHWC once, in the patch embedding). Every
sublayer's Keras ``name`` is the PyTorch attribute name, so the canonical checkpoint names
resolve onto Keras variables by rule (see :mod:`.modeling_tf_utils`). Where Keras reserves an
attribute (``output``), only the Python attribute differs; the layer name stays.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
import numpy as np
from keras import ops

from vit_core import checks
from vit_core.checks import IGNORE_INDEX, dtype_name, label_range_message
from vit_core.config import ViTConfig
from vit_core.interpolation import resize_matrix
from vit_core.outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput

from .modeling_tf_utils import (
    TFPreTrainedModel, Tensor, ViTConfigSerializable, activation, keras_plain, plain_error, register, rematerialized,
)

__all__ = ["TFViTModel", "TFViTForImageClassification", "TFViTForMaskedImageModeling", "TFViTPreTrainedModel"]

Shape = tuple[int | None, ...]


check_pixel_values = keras_plain(checks.check_pixel_values)
check_bool_masked_pos = keras_plain(checks.check_bool_masked_pos)
check_mim_mask_allowed = keras_plain(checks.check_mim_mask_allowed)
check_labels = keras_plain(checks.check_labels)
check_label_values = keras_plain(checks.check_label_values)


def _static_shape(x: Tensor) -> tuple[int, ...]:
    """The static shape for the shared checks in :mod:`vit_core.checks`. An unknown dimension (the batch of
    a traced signature) reads -1; every other dimension must be known when the graph is traced."""
    shape = tuple(-1 if s is None else int(s) for s in (x.shape if hasattr(x, "shape") else np.shape(x)))
    if -1 in shape[1:]:
        raise plain_error(ValueError(
            f"only the batch dimension may be unknown when tracing, got shape {tuple(x.shape)}; "
            "image size is fixed at trace time"
        ))
    return shape


def _dense(units: int, name: str, use_bias: bool = True) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=use_bias, name=name)


@register
class TFViTLayerNorm(keras.layers.LayerNormalization):
    """Keras LayerNormalization computing ``(x - mean)·rsqrt(var + eps)·γ + β`` as PyTorch does; Keras's own
    ``x·inv + (β - mean·inv)`` cancels badly when |mean| ≫ std (1e-5 errors at ViT-B/16 scale)."""

    def call(self, inputs: Tensor) -> Tensor:
        y = _normalize(ops.cast(inputs, "float32"), self.epsilon)
        out = y * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        return ops.cast(out, self.compute_dtype)


def _normalize(x: Tensor, eps: float) -> Tensor:
    """(x - μ)·rsqrt(E[(x - μ)²] + ε) over the last axis, with a hand-written gradient
    inv·(g - mean(g) - y·mean(g·y)): one fused pass instead of autodiff's chain through two means."""

    @tf.custom_gradient
    def normalize(x: Tensor) -> tuple[Tensor, Any]:
        centered = x - tf.reduce_mean(x, axis=-1, keepdims=True)
        inv = tf.math.rsqrt(tf.reduce_mean(centered * centered, axis=-1, keepdims=True) + eps)
        y = centered * inv

        def grad(g: Tensor) -> Tensor:
            return inv * (g - tf.reduce_mean(g, axis=-1, keepdims=True) - y * tf.reduce_mean(g * y, axis=-1, keepdims=True))

        return y, grad

    return normalize(x)


def _layer_norm(config: ViTConfig, name: str) -> TFViTLayerNorm:
    return TFViTLayerNorm(epsilon=config.layer_norm_eps, name=name)


@register
class TFViTPatchEmbeddings(ViTConfigSerializable, keras.layers.Layer):
    """(B, C, H, W) → (B, N, D) by a stride-p convolution, patches in row-major order."""

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.image_size = config.image_hw
        self.patch_size = (config.patch_size, config.patch_size)
        self.num_channels = config.num_channels
        self.num_patches = config.num_patches
        self.projection = keras.layers.Conv2D(
            config.hidden_size, config.patch_size, strides=config.patch_size, padding="valid", name="projection"
        )

    def build(self, input_shape: Shape) -> None:
        b, c, h, w = input_shape
        self.projection.build((b, h, w, c))

    def call(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        gh, gw = check_pixel_values(_static_shape(pixel_values), self.config, interpolate_pos_encoding)
        x = self.projection(ops.transpose(pixel_values, (0, 2, 3, 1)))  # (B, H/p, W/p, D)
        return ops.reshape(x, (-1, gh * gw, x.shape[3]))


@register
class TFViTEmbeddings(ViTConfigSerializable, keras.layers.Layer):
    """Patch embeddings, optional mask tokens, class token, position embeddings: → (B, S, D)."""

    #: The layer turning pixels into (B, N, D) tokens (the hybrid's: a BiT backbone, then the projection).
    patch_embeddings_class: type[keras.layers.Layer] = TFViTPatchEmbeddings

    def __init__(self, config: ViTConfig, use_mask_token: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.use_mask_token = use_mask_token
        self.patch_embeddings = self.patch_embeddings_class(config, name="patch_embeddings")
        self.dropout = keras.layers.Dropout(config.hidden_dropout_prob, name="dropout")
        self.patch_size = config.patch_size
        self.config = config

    def _init_options(self) -> dict[str, Any]:
        return {"use_mask_token": self.use_mask_token}

    def build(self, input_shape: Shape) -> None:
        d = self.config.hidden_size
        self.cls_token = self.add_weight(shape=(1, 1, d), initializer="zeros", name="cls_token")
        self.mask_token = (
            self.add_weight(shape=(1, 1, d), initializer="zeros", name="mask_token") if self.use_mask_token else None
        )
        self.patch_embeddings.build(input_shape)
        self.position_embeddings = self.add_weight(
            shape=(1, self.config.num_patches + 1, d), initializer="zeros", name="position_embeddings"
        )

    def interpolate_pos_encoding(self, embeddings: Tensor, height: int, width: int) -> Tensor:
        """Position embeddings (1, S, D) for an H×W input: the token grid (``config.feature_grid``: (H//p, W//p)
        for the ViT) resized with PyTorch's bicubic/bilinear kernel, as two matmuls (:func:`resize_matrix`)."""
        grid = self.config.feature_grid(*self.config.image_hw)
        new_grid = self.config.feature_grid(height, width)
        if new_grid == grid:
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        d = embeddings.shape[-1]
        mode = self.config.interpolate_pos_mode
        dtype = patch_pos.dtype  # the compute dtype (bfloat16 under a mixed policy)
        wy = ops.cast(resize_matrix(grid[0], new_grid[0], mode).astype(np.float32), dtype)  # (h', h)
        wx = ops.cast(resize_matrix(grid[1], new_grid[1], mode).astype(np.float32), dtype)  # (w', w)
        patch_pos = ops.reshape(patch_pos, (*grid, d))
        patch_pos = ops.einsum("yh,hwd->ywd", wy, patch_pos)
        patch_pos = ops.einsum("xw,ywd->yxd", wx, patch_pos)
        return ops.concatenate((cls_pos, ops.reshape(patch_pos, (1, -1, d))), axis=1)

    def call(
        self,
        pixel_values: Tensor,
        bool_masked_pos: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        training: bool = False,
    ) -> Tensor:
        embeddings = self.patch_embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        _, _, h, w = pixel_values.shape  # validated by the patch embedding
        b, n = ops.shape(embeddings)[0], embeddings.shape[1]
        if bool_masked_pos is not None:
            mask_shape = _static_shape(bool_masked_pos)
            batch = embeddings.shape[0]
            if batch is None or mask_shape[:1] == (-1,):  # traced with an unknown batch: compare the rest
                batch = mask_shape[0] if mask_shape else -1
            check_bool_masked_pos(mask_shape, batch, n, self.mask_token is not None, dtype_name(bool_masked_pos))
            mask = ops.cast(bool_masked_pos[..., None], embeddings.dtype)
            embeddings = embeddings * (1.0 - mask) + self.mask_token * mask
        cls = ops.broadcast_to(self.cls_token, (b, 1, embeddings.shape[-1]))
        embeddings = ops.concatenate((cls, embeddings), axis=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, h, w)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings, training=training)


def attention_core(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q·kᵀ·scale)·v: q (B, h, Sq, d), k and v (B, h, S, d) → (B, h, Sq, d), softmax in fp32.

    The gradient is written out: the softmax part uses rowsum(g·out), a reduction over d, instead of
    autodiff's rowsum over the S×S probabilities. Same math as :func:`vit_flax.modeling_flax_vit.attention_core`.
    """

    @tf.custom_gradient
    def core(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Any]:
        scores = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32) * scale
        probs = tf.cast(tf.nn.softmax(scores, axis=-1), q.dtype)
        out = tf.matmul(probs, v)

        def grad(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            dv = tf.matmul(probs, g, transpose_a=True)
            dprobs = tf.cast(tf.matmul(g, v, transpose_b=True), tf.float32)
            row = tf.reduce_sum(tf.cast(g * out, tf.float32), axis=-1, keepdims=True)  # = rowsum(dprobs·probs)
            dscores = tf.cast(tf.cast(probs, tf.float32) * (dprobs - row) * scale, q.dtype)
            return tf.matmul(dscores, k), tf.matmul(dscores, q, transpose_a=True), dv

        return out, grad

    return core(q, k, v)


@register
class TFViTSelfAttention(ViTConfigSerializable, keras.layers.Layer):
    """Multi-head self-attention core: (B, S, D) → context (B, Sq, D), probs (B, h, Sq, S) or None.

    Sq = S, or 1 with ``class_token_only`` (only the class token's query). Without probs, head_mask
    or active dropout: :func:`attention_core`; else the explicit softmax path (autodiff)."""

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.all_head_size = config.hidden_size
        self.scaling = self.attention_head_size**-0.5
        self.query = _dense(config.hidden_size, "query", use_bias=config.qkv_bias)
        self.key = _dense(config.hidden_size, "key", use_bias=config.qkv_bias)
        self.value = _dense(config.hidden_size, "value", use_bias=config.qkv_bias)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.dropout = keras.layers.Dropout(self.dropout_prob, name="dropout")  # F.dropout in PyTorch

    def build(self, input_shape: Shape) -> None:
        for dense in (self.query, self.key, self.value):
            dense.build(input_shape)

    def call(
        self,
        hidden_states: Tensor,
        head_mask: Tensor | None = None,
        output_attentions: bool = False,
        training: bool = False,
        class_token_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        def heads(x: Tensor) -> Tensor:  # (B, S, D) → (B, h, S, d)
            x = ops.reshape(x, (-1, x.shape[1], self.num_attention_heads, self.attention_head_size))
            return ops.transpose(x, (0, 2, 1, 3))

        # k stays (B, h, S, d) and q·kᵀ is one transposed-operand matmul: ~3% faster under XLA on CPU
        # (ViT-B/16 inference, measured) than transposing k to (B, h, d, S) first.
        queries = hidden_states[:, :1] if class_token_only else hidden_states
        q, k, v = heads(self.query(queries)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        probs = None
        dropout = training and self.dropout_prob > 0
        if self.config.attn_implementation == "sdpa" and head_mask is None and not output_attentions and not dropout:
            context = attention_core(q, k, v, self.scaling)
        else:
            scores = ops.matmul(q, ops.swapaxes(k, -1, -2)) * self.scaling
            probs = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), q.dtype)
            probs = self.dropout(probs, training=training)
            if head_mask is not None:
                probs = probs * head_mask
            context = ops.matmul(probs, v)
        context = ops.transpose(context, (0, 2, 1, 3))
        return ops.reshape(context, (-1, q.shape[2], self.all_head_size)), probs


@register
class TFViTSelfOutput(ViTConfigSerializable, keras.layers.Layer):
    """Attention output projection; the residual is added in :class:`TFViTLayer`."""

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.hidden_size, "dense")
        self.dropout = keras.layers.Dropout(config.hidden_dropout_prob, name="dropout")

    def build(self, input_shape: Shape) -> None:
        self.dense.build(input_shape)

    def call(self, hidden_states: Tensor, training: bool = False) -> Tensor:
        return self.dropout(self.dense(hidden_states), training=training)


@register
class TFViTAttention(ViTConfigSerializable, keras.layers.Layer):
    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.attention = TFViTSelfAttention(config, name="attention")
        self.self_output = TFViTSelfOutput(config, name="output")  # torch: self.output (a Keras property)

    def build(self, input_shape: Shape) -> None:
        self.attention.build(input_shape)
        self.self_output.build(input_shape)

    def call(
        self,
        hidden_states: Tensor,
        head_mask: Tensor | None = None,
        output_attentions: bool = False,
        training: bool = False,
        class_token_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        context, probs = self.attention(
            hidden_states,
            head_mask=head_mask,
            output_attentions=output_attentions,
            training=training,
            class_token_only=class_token_only,
        )
        return self.self_output(context, training=training), probs


@register
class TFViTIntermediate(ViTConfigSerializable, keras.layers.Layer):
    """(B, S, D) → (B, S, intermediate_size), then the activation."""

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.intermediate_size, "dense")
        self.intermediate_act_fn = activation(config.hidden_act)

    def build(self, input_shape: Shape) -> None:
        self.dense.build(input_shape)

    def call(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


@register
class TFViTOutput(ViTConfigSerializable, keras.layers.Layer):
    """(B, S, intermediate_size) → (B, S, D), plus the residual ``input_tensor``."""

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(config.hidden_size, "dense")
        self.dropout = keras.layers.Dropout(config.hidden_dropout_prob, name="dropout")

    def build(self, input_shape: Shape) -> None:
        self.dense.build(input_shape)

    def call(self, hidden_states: Tensor, input_tensor: Tensor, training: bool = False) -> Tensor:
        return self.dropout(self.dense(hidden_states), training=training) + input_tensor


@register
class TFViTLayer(ViTConfigSerializable, keras.layers.Layer):
    """Pre-norm transformer block: x + attn(LN(x)), then h + mlp(LN(h)); (B, S, D) → (B, S, D).

    ``class_token_only``: only the class token's row is computed, (B, S, D) → (B, 1, D), the same
    numbers as row 0 of the full block (every step after the keys and values is row-wise).
    """

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.attention = TFViTAttention(config, name="attention")
        self.intermediate = TFViTIntermediate(config, name="intermediate")
        self.mlp_output = TFViTOutput(config, name="output")  # torch: self.output (a Keras property)
        self.layernorm_before = _layer_norm(config, "layernorm_before")
        self.layernorm_after = _layer_norm(config, "layernorm_after")

    def build(self, input_shape: Shape) -> None:
        b, s, _ = input_shape
        self.attention.build(input_shape)
        self.intermediate.build(input_shape)
        self.mlp_output.build((b, s, self.config.intermediate_size))
        self.layernorm_before.build(input_shape)
        self.layernorm_after.build(input_shape)

    def call(
        self,
        hidden_states: Tensor,
        head_mask: Tensor | None = None,
        output_attentions: bool = False,
        training: bool = False,
        class_token_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        attention_output, probs = self.attention(
            self.layernorm_before(hidden_states),
            head_mask=head_mask,
            output_attentions=output_attentions,
            training=training,
            class_token_only=class_token_only,
        )
        hidden_states = attention_output + (hidden_states[:, :1] if class_token_only else hidden_states)
        layer_output = self.mlp_output(
            self.intermediate(self.layernorm_after(hidden_states)), hidden_states, training=training
        )
        return layer_output, probs


@register
class TFViTEncoder(ViTConfigSerializable, keras.layers.Layer):
    """``num_hidden_layers`` × :class:`TFViTLayer`: (B, S, D) → :class:`BaseModelOutput`.

    ``class_token_only``: the last block computes only the class token (``last_hidden_state``
    (B, 1, D)); for callers that read nothing else, and that ask for no hidden states or attentions.
    """

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.layer = [TFViTLayer(config, name=f"layer.{i}") for i in range(config.num_hidden_layers)]
        #: recompute each layer in the backward pass (``TFPreTrainedModel.gradient_checkpointing_enable``)
        self.gradient_checkpointing = False

    def build(self, input_shape: Shape) -> None:
        for layer in self.layer:
            layer.build(input_shape)

    def call(
        self,
        hidden_states: Tensor,
        head_mask: Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        training: bool = False,
        class_token_only: bool = False,
    ) -> BaseModelOutput:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn: tuple[Tensor, ...] | None = () if output_attentions else None
        for i, layer in enumerate(self.layer):
            layer_mask = None if head_mask is None else head_mask[i]
            last = class_token_only and i == len(self.layer) - 1
            if self.gradient_checkpointing and training and not output_attentions:
                hidden_states = rematerialized(
                    lambda x, layer=layer, m=layer_mask, last=last: layer(
                        x, head_mask=m, training=True, class_token_only=last
                    )[0]
                )(hidden_states)
                probs = None
            else:
                hidden_states, probs = layer(
                    hidden_states,
                    head_mask=layer_mask,
                    output_attentions=output_attentions,
                    training=training,
                    class_token_only=last,
                )
            if all_hidden is not None:
                all_hidden += (hidden_states,)
            if all_attn is not None:
                all_attn += (probs,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn)


@register
class TFViTPooler(ViTConfigSerializable, keras.layers.Layer):
    """Class token → dense → activation: (B, S, D) → (B, pooler_output_size)."""

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.dense = _dense(int(config.pooler_output_size or config.hidden_size), "dense")
        self.activation = activation(config.pooler_act)

    def build(self, input_shape: Shape) -> None:
        self.dense.build((input_shape[0], input_shape[-1]))

    def call(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


@register
class TFViTPixelShuffle(keras.layers.Layer):
    """PyTorch's ``nn.PixelShuffle(r)`` from channels-last input: (B, h, w, C·r²) → (B, C, h·r, w·r)."""

    def __init__(self, upscale_factor: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.upscale_factor = upscale_factor

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "upscale_factor": self.upscale_factor}

    def call(self, x: Tensor) -> Tensor:
        r = self.upscale_factor
        _, h, w, crr = x.shape
        c = crr // (r * r)
        x = ops.reshape(x, (-1, h, w, c, r, r))  # channel index = c·r² + i·r + j
        x = ops.transpose(x, (0, 3, 1, 4, 2, 5))  # (B, C, h, r, w, r)
        return ops.reshape(x, (-1, c, h * r, w * r))


class TFViTPreTrainedModel(TFPreTrainedModel):
    """Shared machinery (init, from_pretrained, save_pretrained, fit hooks) lives in :class:`TFPreTrainedModel`."""


@register
class TFViTModel(TFViTPreTrainedModel):
    """The bare encoder. ``last_hidden_state`` (B, S, D) after the final norm; ``pooler_output``."""

    embeddings_class: type[TFViTEmbeddings] = TFViTEmbeddings

    def __init__(
        self, config: ViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False, **kwargs: Any
    ):
        super().__init__(config, **kwargs)
        self.embeddings = self.embeddings_class(config, use_mask_token=use_mask_token, name="embeddings")
        self.encoder = TFViTEncoder(config, name="encoder")
        self.layernorm = _layer_norm(config, "layernorm")
        self.pooler = TFViTPooler(config, name="pooler") if add_pooling_layer else None
        self._table_flags = {"add_pooling_layer": add_pooling_layer, "use_mask_token": use_mask_token}
        self.post_init()

    def build(self, input_shape: Shape) -> None:
        b = input_shape[0]
        seq_shape = (b, self.config.num_patches + 1, self.config.hidden_size)
        self.embeddings.build(input_shape)
        self.encoder.build(seq_shape)
        self.layernorm.build(seq_shape)
        if self.pooler is not None:
            self.pooler.build(seq_shape)

    def get_input_embeddings(self) -> TFViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def call(
        self,
        pixel_values: Tensor | dict | None = None,
        bool_masked_pos: Tensor | None = None,
        head_mask: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        training: bool = False,
        class_token_only: bool = False,
    ) -> BaseModelOutputWithPooling | tuple:
        pixel_values, extra = self._unpack_inputs(
            pixel_values, {"bool_masked_pos": bool_masked_pos, "head_mask": head_mask}
        )
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_attentions, output_hidden_states, return_dict = self.config.output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        head_mask = self._head_mask(extra["head_mask"])
        pixel_values = ops.cast(pixel_values, self.compute_dtype)
        embedding_output = self.embeddings(
            pixel_values,
            bool_masked_pos=extra["bool_masked_pos"],
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
            training=training,
        )
        encoded = self.encoder(
            embedding_output,
            head_mask=head_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            training=training,
            class_token_only=class_token_only,
        )
        sequence_output = self.layernorm(encoded.last_hidden_state)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return out if return_dict else out.to_tuple()


def _checked_class_indices(labels: Tensor, num_labels: int) -> Tensor:
    """``labels`` (B,) int64, checked against ``[0, num_labels)`` / ``IGNORE_INDEX``: eagerly with
    :func:`~vit_core.checks.check_label_values`; in a graph (``tf.function``, ``model.fit``) by an assertion
    whose message starts with the same words (XLA drops assertions: there the loss is NaN instead)."""
    if tf.executing_eagerly() and hasattr(labels, "numpy"):
        check_label_values(labels.numpy(), num_labels)
        return labels
    ok = tf.reduce_all((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < num_labels)))
    with tf.control_dependencies([tf.debugging.Assert(ok, [label_range_message(num_labels), labels], summarize=32)]):
        return tf.identity(labels)


@register
class TFViTForImageClassification(TFViTPreTrainedModel):
    """Linear classifier on the class token after the final norm: ``logits`` (B, num_labels).

    Unless hidden states or attentions are asked for, the last block computes the class token alone.
    """

    base_model_class: type[TFViTModel] = TFViTModel

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.num_labels = int(config.num_labels or 0)
        self.vit = self.base_model_class(config, add_pooling_layer=False, name="vit")
        self.classifier = (
            _dense(self.num_labels, "classifier") if self.num_labels else keras.layers.Identity(name="classifier")
        )
        self.post_init()

    def build(self, input_shape: Shape) -> None:
        self.classifier.build((input_shape[0], self.config.hidden_size))

    def call(
        self,
        pixel_values: Tensor | dict | None = None,
        head_mask: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        training: bool = False,
    ) -> ImageClassifierOutput | tuple:
        pixel_values, extra = self._unpack_inputs(pixel_values, {"head_mask": head_mask, "labels": labels})
        output_attentions, output_hidden_states, return_dict = self.config.output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        labels, kind = extra["labels"], None
        if labels is not None:  # checked before the forward pass, not after it
            labels = ops.convert_to_tensor(labels)
            batch = getattr(pixel_values, "shape", (None,))[0]
            kind, labels = self._labels_problem(labels, -1 if batch is None else int(batch))
        outputs = self.vit(
            pixel_values,
            head_mask=extra["head_mask"],
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            training=training,
            class_token_only=not (output_attentions or output_hidden_states),
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = None if labels is None else self._classification_loss(logits, labels, kind)
        out = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return out if return_dict else out.to_tuple()

    def _labels_problem(self, labels: Tensor, batch: int) -> tuple[str, Tensor]:
        """Validate ``labels`` (:func:`~vit_core.checks.check_labels`) → (problem type, labels; single-label
        ones carry the range check, see :func:`_checked_class_indices`)."""
        shape = tuple(-1 if s is None else int(s) for s in labels.shape)
        kind = check_labels(shape, dtype_name(labels), self.config, batch)
        if kind == "single_label_classification":
            labels = _checked_class_indices(ops.reshape(ops.cast(labels, "int64"), (-1,)), self.num_labels)
        return kind, labels

    def _classification_loss(self, logits: Tensor, labels: Tensor, kind: str | None = None) -> Tensor:
        """Mean loss by ``problem_type``: MSE, cross-entropy (ignore_index -100) or BCE-with-logits.
        Computed in float32 whatever the compute dtype (as Keras does under mixed precision). ``kind``: the
        problem type :meth:`_labels_problem` found for these ``labels`` (None: validate them here)."""
        labels = ops.convert_to_tensor(labels)
        logits = ops.cast(logits, "float32")
        if kind is None:
            kind, labels = self._labels_problem(labels, -1 if logits.shape[0] is None else int(logits.shape[0]))
        if kind == "regression":
            if self.num_labels == 1:
                logits, labels = ops.squeeze(logits), ops.squeeze(labels)
            return ops.mean(ops.square(logits - ops.cast(labels, logits.dtype)))
        if kind == "single_label_classification":
            logits = ops.reshape(logits, (-1, self.num_labels))
            labels = ops.reshape(ops.cast(labels, "int64"), (-1,))
            keep = labels != IGNORE_INDEX
            valid = (labels >= 0) & (labels < self.num_labels)  # False only where no check could run (XLA)
            per_example = ops.sparse_categorical_crossentropy(
                ops.cast(ops.where(valid, labels, 0), "int32"), logits, from_logits=True
            )
            per_example = ops.where(keep & ~valid, float("nan"), per_example)  # out of range: NaN, never a number
            keep = ops.cast(keep, logits.dtype)
            return ops.sum(per_example * keep) / ops.sum(keep)  # NaN when every label is ignored, as in PyTorch
        return ops.mean(ops.binary_crossentropy(ops.cast(labels, logits.dtype), logits, from_logits=True))


@register
class TFViTForMaskedImageModeling(TFViTPreTrainedModel):
    """SimMIM: encoder with mask tokens, 1×1 conv to stride²·C channels, pixel shuffle → (B, C, H, W)."""

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.vit = TFViTModel(config, add_pooling_layer=False, use_mask_token=True, name="vit")
        self.decoder = [  # torch: nn.Sequential(Conv2d, PixelShuffle); the conv reads channels-last here
            keras.layers.Conv2D(config.encoder_stride**2 * config.num_channels, kernel_size=1, name="decoder.0"),
            TFViTPixelShuffle(config.encoder_stride, name="decoder.1"),
        ]
        self.post_init()

    def build(self, input_shape: Shape) -> None:
        self.decoder[0].build((input_shape[0], None, None, self.config.hidden_size))

    def call(
        self,
        pixel_values: Tensor | dict | None = None,
        bool_masked_pos: Tensor | None = None,
        head_mask: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        training: bool = False,
    ) -> MaskedImageModelingOutput | tuple:
        pixel_values, extra = self._unpack_inputs(
            pixel_values, {"bool_masked_pos": bool_masked_pos, "head_mask": head_mask}
        )
        bool_masked_pos = extra["bool_masked_pos"]
        cfg = self.config
        if bool_masked_pos is not None:
            check_mim_mask_allowed(cfg)
        return_dict = cfg.return_dict if return_dict is None else return_dict
        outputs = self.vit(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            head_mask=extra["head_mask"],
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            training=training,
        )
        gh, gw = pixel_values.shape[2] // cfg.patch_size, pixel_values.shape[3] // cfg.patch_size
        tokens = outputs.last_hidden_state[:, 1:]  # (B, N, D), N = gh·gw
        grid = ops.reshape(tokens, (-1, gh, gw, tokens.shape[-1]))  # channels-last (torch: (B, D, gh, gw))
        reconstruction = grid
        for layer in self.decoder:
            reconstruction = layer(reconstruction)  # → (B, C, H, W)
        loss = None
        if bool_masked_pos is not None:
            mask = ops.reshape(bool_masked_pos, (-1, gh, gw))
            mask = ops.repeat(ops.repeat(mask, cfg.patch_size, axis=1), cfg.patch_size, axis=2)[:, None]
            mask = ops.cast(mask, "float32")  # the loss in float32 whatever the compute dtype
            per_pixel = ops.abs(ops.cast(pixel_values, "float32") - ops.cast(reconstruction, "float32"))
            loss = ops.sum(per_pixel * mask) / (ops.sum(mask) + 1e-5) / cfg.num_channels
        out = MaskedImageModelingOutput(
            loss=loss, reconstruction=reconstruction, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return out if return_dict else out.to_tuple()
