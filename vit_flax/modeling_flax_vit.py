"""ViT in JAX/Flax Linen, at HF transformers 4.x parity; mirrors :mod:`vit_torch.modeling_vit` class by class.

Shapes: B batch, C channels, H×W image, p patch size, N = (H//p)·(W//p) patches, S = N + 1 tokens
(class token first), D hidden size, h heads, d = D/h head size. Modules take NHWC pixels; the
wrappers take NCHW (as HF) and transpose once. Submodule names equal the PyTorch attribute
names, so the param tree is the canonical checkpoint table under :func:`param_path`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_core.checks import (
    IGNORE_INDEX, check_bool_masked_pos, check_label_values, check_labels, check_mim_mask_allowed, check_pixel_values,
    dtype_name, head_mask_layers,
)
from vit_core.config import ViTConfig
from vit_core.interpolation import resize_matrix
from vit_core.outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput

from .modeling_flax_utils import ACT2FN, FlaxPreTrainedModel, Params

__all__ = ["FlaxViTModel", "FlaxViTForImageClassification", "FlaxViTForMaskedImageModeling", "FlaxViTPreTrainedModel"]

Array = jax.Array
Dtype = Any

# Outputs are pytrees, so jitted / differentiated functions may return them.
for _cls in (BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput):
    jax.tree_util.register_pytree_node(
        _cls, lambda o: ([getattr(o, f.name) for f in dataclasses.fields(o)], None), lambda _, ch, c=_cls: c(*ch)
    )


def _user_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The NCHW shape the user passed, from the NHWC one a module sees (non-4-D shapes pass through
    the wrappers untransposed), so error messages name what the user wrote. A symbolic batch
    (``jax.export``) reads -1, as an unknown one does in vit_tf."""
    if len(shape) != 4:
        return tuple(shape)
    return (shape[0] if isinstance(shape[0], int) else -1, shape[3], shape[1], shape[2])


class _ViTModule(nn.Module):
    """Fields every block shares, and its dense / conv / norm constructors in the module's dtypes."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def _dtypes(self) -> dict[str, Dtype]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _dense(self, features: int, use_bias: bool = True) -> FlaxViTDense:
        return FlaxViTDense(features, use_bias, **self._dtypes)

    def _layer_norm(self) -> FlaxViTLayerNorm:
        return FlaxViTLayerNorm(epsilon=self.config.layer_norm_eps, **self._dtypes)


class FlaxViTDense(nn.Module):
    """(..., in) → (..., out): x·kernel + bias, params as ``nn.Dense``'s (``kernel`` (in, out), ``bias`` (out,)).

    Why not ``nn.Dense``: its backward, by autodiff, gave XLA:CPU a 3-D contraction over (B, S) for
    the kernel gradient, which copied and transposed activations first (ViT-B/16 train step 6%
    slower, measured), and a bias gradient that transposed the attention heads' cotangents a second
    time; :func:`_affine` takes both from one (B·S, out) view.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias \
            else jnp.zeros((self.features,), self.param_dtype)
        return _affine(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


@jax.custom_vjp
def _affine(x: Array, kernel: Array, bias: Array) -> Array:
    """x·kernel + bias over x's last axis; the backward takes the kernel gradient as one 2-D
    (in, B·S)·(B·S, out) product and the bias gradient from the same (B·S, out) cotangent."""
    return jnp.dot(x, kernel) + bias


def _affine_fwd(x: Array, kernel: Array, bias: Array) -> tuple[Array, tuple[Array, Array]]:
    return _affine(x, kernel, bias), (x, kernel)


def _affine_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array, Array]:
    x, kernel = res
    g2 = g.reshape(-1, g.shape[-1])
    dkernel = jnp.dot(x.reshape(-1, x.shape[-1]).T, g2)
    return jnp.dot(g, kernel.T), dkernel, jnp.sum(g2, axis=0)


_affine.defvjp(_affine_fwd, _affine_bwd)


class FlaxViTLayerNorm(nn.Module):
    """LayerNorm over the last axis with PyTorch's two-pass numerics: (x - μ)·rsqrt(E[(x - μ)²] + ε)·γ + β.

    Params ``scale`` / ``bias`` as ``nn.LayerNorm``'s. Why not ``nn.LayerNorm``: its fast variance
    (E[x²] - μ²) loses ~1e-6 in fp32, and its exact mode (``use_fast_variance=False``) made a ViT-S
    train step ~50% slower on CPU than this, measured.
    """

    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        y = _normalize(x.astype(jnp.float32), self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x: Array, eps: float) -> Array:
    """(x - μ)·rsqrt(var + ε) over the last axis, variance in two passes (PyTorch's numbers)."""
    return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x: Array, eps: float) -> tuple[Array, tuple[Array, Array]]:
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    y = centred * inv
    return y, (y, inv)


def _normalize_bwd(eps: float, res: tuple[Array, Array], g: Array) -> tuple[Array]:
    # d/dx of y = (x - μ)·inv: inv·(g - mean(g) - y·mean(g·y)), one fused pass instead of autodiff's chain.
    y, inv = res
    return (inv * (g - jnp.mean(g, axis=-1, keepdims=True) - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class FlaxViTPatchProjection(nn.Module):
    """A p×p, stride-p, VALID convolution, (B, H, W, C) → (B, N, D), computed as one matmul over the
    flattened patches (rows of N = (H//p)·(W//p), patches in row-major order). Params as ``nn.Conv``'s:
    ``kernel`` (p, p, C, D), ``bias`` (D,).

    Why not ``nn.Conv``: XLA:CPU ran the convolution's kernel gradient after transposing the whole
    image to (C, H, W, B); profiled in a ViT-B/16 train step, ~55 ms as a convolution, ~17 ms so.
    """

    features: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        b, h, w, c = pixel_values.shape
        p, gh, gw = self.patch_size, h // self.patch_size, w // self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        patches = pixel_values[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh * gw, p * p * c).astype(self.dtype)
        return _affine(patches, kernel.reshape(-1, self.features).astype(self.dtype), bias.astype(self.dtype))


class FlaxViTPatchEmbeddings(_ViTModule):
    """(B, H, W, C) → (B, N, D) by a stride-p convolution, patches in row-major order."""

    def setup(self) -> None:
        self.projection = FlaxViTPatchProjection(self.config.hidden_size, self.config.patch_size, **self._dtypes)

    def __call__(self, pixel_values: Array, interpolate_pos_encoding: bool = False,
                 deterministic: bool = True) -> Array:
        """``deterministic`` is unused here (the hybrid's backbone reads it, for drop path)."""
        check_pixel_values(_user_shape(pixel_values.shape), self.config, interpolate_pos_encoding)
        return self.projection(pixel_values)


class FlaxViTEmbeddings(_ViTModule):
    """Patch embeddings, optional mask tokens, class token, position embeddings: → (B, S, D)."""

    use_mask_token: bool = False
    #: (B, H, W, C) → (B, N, D); the hybrid puts its backbone + projection here
    patch_embeddings_class: ClassVar[type[nn.Module]] = FlaxViTPatchEmbeddings

    def setup(self) -> None:
        d, pd = self.config.hidden_size, self.param_dtype
        self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, d), pd)
        self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, d), pd) if self.use_mask_token \
            else None
        self.patch_embeddings = self.patch_embeddings_class(self.config, **self._dtypes)
        self.position_embeddings = self.param("position_embeddings", nn.initializers.zeros,
                                              (1, self.config.num_patches + 1, d), pd)
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> Array:
        """Position embeddings (1, S, D) for an H×W input: the grid resized with torch's kernel (two matmuls)."""
        cfg = self.config
        grid, new_grid = cfg.feature_grid(*cfg.image_hw), cfg.feature_grid(height, width)
        pos = self.position_embeddings.astype(self.dtype)
        if new_grid == grid:
            return pos
        my = jnp.asarray(resize_matrix(grid[0], new_grid[0], cfg.interpolate_pos_mode), self.dtype)
        mx = jnp.asarray(resize_matrix(grid[1], new_grid[1], cfg.interpolate_pos_mode), self.dtype)
        patch_pos = pos[0, 1:].reshape(*grid, -1)  # (gh, gw, D)
        patch_pos = jnp.einsum("Hh,hwd->Hwd", my, patch_pos, precision="highest")
        patch_pos = jnp.einsum("Ww,Hwd->HWd", mx, patch_pos, precision="highest")
        return jnp.concatenate([pos[:, :1], patch_pos.reshape(1, -1, pos.shape[-1])], axis=1)

    def __call__(self, pixel_values: Array, bool_masked_pos: Array | None = None,
                 interpolate_pos_encoding: bool = False, deterministic: bool = True) -> Array:
        embeddings = self.patch_embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                           deterministic=deterministic)
        b, h, w, _ = pixel_values.shape  # validated by the patch embedding
        if bool_masked_pos is not None:
            check_bool_masked_pos(bool_masked_pos.shape, b, embeddings.shape[1], self.use_mask_token,
                                  dtype_name(bool_masked_pos))
            mask = bool_masked_pos[..., None].astype(embeddings.dtype)
            embeddings = embeddings * (1.0 - mask) + self.mask_token.astype(embeddings.dtype) * mask
        cls = jnp.broadcast_to(self.cls_token.astype(embeddings.dtype), (b, 1, embeddings.shape[-1]))
        embeddings = jnp.concatenate([cls, embeddings], axis=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(h, w)
        else:
            embeddings = embeddings + self.position_embeddings.astype(embeddings.dtype)
        return self.dropout(embeddings, deterministic=deterministic)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention_core(q: Array, k: Array, v: Array, scale: float) -> Array:
    """softmax(q·kᵀ·scale)·v on heads-major (B, h, Sq, d), (B, h, S, d) → (B, h, Sq, d), softmax in fp32.

    The CPU path of :class:`FlaxViTSelfAttention`. Its backward is written out: the softmax gradient
    uses rowsum(g·out) (a reduction over d) instead of autodiff's rowsum(g·v·p) over the S×S scores,
    and nothing leaves the heads-major layout. ViT-B/16 train step on CPU: see docs/flax.md.
    """
    return _attention_core_fwd(q, k, v, scale)[0]


def _attention_core_fwd(q: Array, k: Array, v: Array, scale: float) -> tuple[Array, tuple[Array, ...]]:
    # The scale multiplies q (B·h·Sq·d numbers), not the scores (B·h·Sq·S): XLA:CPU materialised the
    # scalar as a full (B, h, Sq, S) operand of the score fusions; ViT-B/16 step 2-7% faster, measured.
    q_scaled = q * jnp.asarray(scale, q.dtype)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_scaled, k)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return out, (q_scaled, k, v, probs, out)


def _attention_core_bwd(scale: float, res: tuple[Array, ...], g: Array) -> tuple[Array, Array, Array]:
    q_scaled, k, v, probs, out = res
    dv = jnp.einsum("bhqk,bhqd->bhkd", probs, g)
    dprobs = jnp.einsum("bhqd,bhkd->bhqk", g, v)
    row = jnp.sum((g * out).astype(jnp.float32), axis=-1, keepdims=True)  # = rowsum(dprobs · probs)
    dscores = (probs.astype(jnp.float32) * (dprobs.astype(jnp.float32) - row)).astype(q_scaled.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", dscores, k) * jnp.asarray(scale, q_scaled.dtype)
    return dq, jnp.einsum("bhqk,bhqd->bhkd", dscores, q_scaled), dv


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def _dot_product_attention(q: Array, k: Array, v: Array, scale: float) -> Array:
    """:func:`jax.nn.dot_product_attention` (cuDNN flash attention where the GPU has it) on heads-major arrays."""
    bshd = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    return bshd(jax.nn.dot_product_attention(bshd(q), bshd(k), bshd(v), scale=scale))


class FlaxViTSelfAttention(_ViTModule):
    """Multi-head self-attention core: (B, S, D) → context (B, Sq, D), probs (B, h, Sq, S) or None.

    Sq = S, or 1 with ``class_token_only`` (only the class token's query: what a classifier reads of
    the last layer). Without probs, head_mask or dropout: :func:`attention_core` on CPU (faster there,
    measured), :func:`jax.nn.dot_product_attention` elsewhere; the platform is picked when XLA lowers.
    """

    def setup(self) -> None:
        cfg = self.config
        self.num_attention_heads, self.attention_head_size = cfg.num_attention_heads, cfg.head_dim
        self.scaling = self.attention_head_size**-0.5
        self.query, self.key, self.value = (self._dense(cfg.hidden_size, use_bias=cfg.qkv_bias) for _ in range(3))
        self.dropout_prob = cfg.attention_probs_dropout_prob

    def __call__(self, hidden_states: Array, head_mask: Array | None = None, deterministic: bool = True,
                 output_attentions: bool = False, class_token_only: bool = False) -> tuple[Array, Array | None]:
        b = hidden_states.shape[0]
        heads = lambda x: x.reshape(b, x.shape[1], self.num_attention_heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        queries = hidden_states[:, :1] if class_token_only else hidden_states
        q, k, v = heads(self.query(queries)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        dropout = 0.0 if deterministic else self.dropout_prob
        probs = None
        if self.config.attn_implementation == "sdpa" and head_mask is None and not output_attentions and not dropout:
            context = jax.lax.platform_dependent(q, k, v, cpu=partial(attention_core, scale=self.scaling),
                                                 default=partial(_dot_product_attention, scale=self.scaling))
        else:  # explicit path: needed for the probabilities, head_mask and attention dropout
            scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * self.scaling
            probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
            if dropout:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - dropout, probs.shape)
                probs = jnp.where(keep, probs / (1.0 - dropout), 0.0).astype(q.dtype)
            if head_mask is not None:
                probs = probs * head_mask.astype(probs.dtype)
            context = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return context.transpose(0, 2, 1, 3).reshape(b, q.shape[2], -1), probs


class FlaxViTSelfOutput(_ViTModule):
    """Attention output projection; the residual is added in :class:`FlaxViTLayer`."""

    def setup(self) -> None:
        self.dense = self._dense(self.config.hidden_size)
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)

    def __call__(self, hidden_states: Array, deterministic: bool = True) -> Array:
        return self.dropout(self.dense(hidden_states), deterministic=deterministic)


class FlaxViTAttention(_ViTModule):
    def setup(self) -> None:
        self.attention = FlaxViTSelfAttention(self.config, **self._dtypes)
        self.output = FlaxViTSelfOutput(self.config, **self._dtypes)

    def __call__(self, hidden_states: Array, head_mask: Array | None = None, deterministic: bool = True,
                 output_attentions: bool = False, class_token_only: bool = False) -> tuple[Array, Array | None]:
        context, probs = self.attention(hidden_states, head_mask, deterministic, output_attentions, class_token_only)
        return self.output(context, deterministic), probs


class FlaxViTIntermediate(_ViTModule):
    """(B, S, D) → (B, S, intermediate_size), then the activation."""

    def setup(self) -> None:
        self.dense = self._dense(self.config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[self.config.hidden_act]

    def __call__(self, hidden_states: Array) -> Array:
        return self.intermediate_act_fn(self.dense(hidden_states))


class FlaxViTOutput(FlaxViTSelfOutput):
    """(B, S, intermediate_size) → (B, S, D), plus the residual ``input_tensor``."""

    def __call__(self, hidden_states: Array, input_tensor: Array, deterministic: bool = True) -> Array:  # type: ignore[override]
        return super().__call__(hidden_states, deterministic) + input_tensor


class FlaxViTLayer(_ViTModule):
    """Pre-norm transformer block: x + attn(LN(x)), then h + mlp(LN(h)); (B, S, D) → (B, S, D).

    ``class_token_only``: only the class token's row is computed, (B, S, D) → (B, 1, D), the same
    numbers as row 0 of the full block (every step after the keys and values is row-wise).
    """

    def setup(self) -> None:
        self.attention = FlaxViTAttention(self.config, **self._dtypes)
        self.intermediate = FlaxViTIntermediate(self.config, **self._dtypes)
        self.output = FlaxViTOutput(self.config, **self._dtypes)
        self.layernorm_before = self._layer_norm()
        self.layernorm_after = self._layer_norm()

    def __call__(self, hidden_states: Array, head_mask: Array | None = None, deterministic: bool = True,
                 output_attentions: bool = False, class_token_only: bool = False) -> tuple[Array, Array | None]:
        attention_output, probs = self.attention(self.layernorm_before(hidden_states), head_mask, deterministic,
                                                 output_attentions, class_token_only)
        hidden_states = attention_output + (hidden_states[:, :1] if class_token_only else hidden_states)
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states, deterministic)
        return layer_output, probs


class _ScanStep(FlaxViTLayer):
    """One :class:`FlaxViTLayer` as an ``nn.scan`` body: carry = hidden states, scanned input = that layer's
    head mask; emits (hidden states or None, probs or None) per layer. Call flags are fields (scan needs arrays)."""

    deterministic: bool = True
    output_attentions: bool = False
    output_hidden_states: bool = False

    def __call__(self, hidden_states: Array, head_mask: Array | None) -> tuple[Array, tuple]:  # type: ignore[override]
        out, probs = super().__call__(hidden_states, head_mask, self.deterministic, self.output_attentions)
        return out, (out if self.output_hidden_states else None, probs)


class FlaxViTEncoder(_ViTModule):
    """``num_hidden_layers`` blocks named ``layer_0``...; optionally rematerialised in the backward pass.

    With ``scan_layers`` the blocks are one ``nn.scan`` named ``layer`` whose params carry a leading
    (num_hidden_layers,) axis: one compiled block instead of L (faster compiles at depth); the
    wrappers stack / unstack ``layer_i`` so checkpoints are unchanged.

    ``class_token_only``: the last block computes only the class token (``last_hidden_state``
    (B, 1, D)); for callers that read nothing else, and that ask for no hidden states or attentions.
    Scanned layers share one body, so there every token is computed and the class token's row returned.
    """

    gradient_checkpointing: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, hidden_states: Array, head_mask: Array | None = None, deterministic: bool = True,
                 output_attentions: bool = False, output_hidden_states: bool = False,
                 class_token_only: bool = False) -> BaseModelOutput:
        cfg = self.config
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn: tuple[Array, ...] | None = () if output_attentions else None
        if self.scan_layers:
            step = nn.remat(_ScanStep, prevent_cse=False) if self.gradient_checkpointing else _ScanStep
            scanned = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=0, length=cfg.num_hidden_layers)
            hidden_states, (hs, probs) = scanned(cfg, **self._dtypes, deterministic=deterministic,
                                                 output_attentions=output_attentions,
                                                 output_hidden_states=output_hidden_states,
                                                 name="layer")(hidden_states, head_mask)
            if all_hidden is not None:
                all_hidden += tuple(hs)
            if all_attn is not None:
                all_attn += tuple(probs)
            if class_token_only:
                hidden_states = hidden_states[:, :1]
            return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn)
        # static_argnums count self as 0: deterministic (3), output_attentions (4), class_token_only (5) are bools.
        layer_cls = nn.remat(FlaxViTLayer, static_argnums=(3, 4, 5)) if self.gradient_checkpointing else FlaxViTLayer
        for i in range(cfg.num_hidden_layers):
            layer = layer_cls(cfg, **self._dtypes, name=f"layer_{i}")
            layer_mask = None if head_mask is None else head_mask[i]
            last = class_token_only and i == cfg.num_hidden_layers - 1
            hidden_states, probs = layer(hidden_states, layer_mask, deterministic, output_attentions, last)
            if all_hidden is not None:
                all_hidden += (hidden_states,)
            if all_attn is not None:
                all_attn += (probs,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn)


class FlaxViTPooler(_ViTModule):
    """Class token → dense → activation: (B, S, D) → (B, pooler_output_size)."""

    def setup(self) -> None:
        self.dense = self._dense(self.config.pooler_output_size)
        self.activation = ACT2FN[self.config.pooler_act]

    def __call__(self, hidden_states: Array) -> Array:
        return self.activation(self.dense(hidden_states[:, 0]))


class FlaxViTModule(_ViTModule):
    """The bare encoder on NHWC pixels. ``last_hidden_state`` (B, S, D) after the final norm; ``pooler_output``.

    ``class_token_only`` (heads that read only the class token): ``last_hidden_state`` is (B, 1, D).
    """

    add_pooling_layer: bool = True
    use_mask_token: bool = False
    gradient_checkpointing: bool = False
    scan_layers: bool = False
    embeddings_class: ClassVar[type[FlaxViTEmbeddings]] = FlaxViTEmbeddings

    def setup(self) -> None:
        self.embeddings = self.embeddings_class(self.config, use_mask_token=self.use_mask_token, **self._dtypes)
        self.encoder = FlaxViTEncoder(self.config, gradient_checkpointing=self.gradient_checkpointing,
                                      scan_layers=self.scan_layers, **self._dtypes)
        self.layernorm = self._layer_norm()
        self.pooler = FlaxViTPooler(self.config, **self._dtypes) if self.add_pooling_layer else None

    def _head_mask(self, head_mask: Array | None) -> Array | None:
        """(heads,) or (layers, heads), 1 keeps a head → (layers, 1, heads, 1, 1)."""
        if head_mask is None:
            return None
        head_mask = jnp.asarray(head_mask)
        if not head_mask_layers(head_mask.shape, self.config):
            head_mask = jnp.broadcast_to(head_mask, (self.config.num_hidden_layers, *head_mask.shape))
        return head_mask[:, None, :, None, None].astype(self.dtype)

    def __call__(self, pixel_values: Array, bool_masked_pos: Array | None = None, head_mask: Array | None = None,
                 deterministic: bool = True, output_attentions: bool = False, output_hidden_states: bool = False,
                 interpolate_pos_encoding: bool = False, class_token_only: bool = False) -> BaseModelOutputWithPooling:
        head_mask = self._head_mask(head_mask)  # checked before the forward pass
        embedding_output = self.embeddings(pixel_values.astype(self.dtype), bool_masked_pos, interpolate_pos_encoding,
                                           deterministic)
        encoded = self.encoder(embedding_output, head_mask, deterministic, output_attentions,
                               output_hidden_states, class_token_only)
        sequence_output = self.layernorm(encoded.last_hidden_state)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output,
                                          hidden_states=encoded.hidden_states, attentions=encoded.attentions)


def _dims(shape: tuple[Any, ...]) -> tuple[int, ...]:
    """Static dims as ints for :mod:`vit_core.checks`; a symbolic one (``jax.export``) reads -1."""
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def labels_problem(config: ViTConfig, labels: Array, batch: int) -> str:
    """Validate ``labels`` (:func:`~vit_core.checks.check_labels`: shapes and dtypes, also under ``jax.jit``) →
    problem type. Class indices out of ``[0, num_labels)``: a ``ValueError`` when they are concrete (the wrapper
    called eagerly, or numpy labels closed over); traced (inside ``jax.jit``) their values are unknown, and
    :func:`classification_loss` is NaN instead."""
    kind = check_labels(_dims(jnp.shape(labels)), dtype_name(labels), config, batch)
    if kind == "single_label_classification":
        try:
            values = np.asarray(labels)
        except jax.errors.TracerArrayConversionError:
            values = None  # traced: see the docstring
        if values is not None:
            check_label_values(values, config.num_labels)
    return kind


def classification_loss(config: ViTConfig, logits: Array, labels: Array, kind: str | None = None) -> Array:
    """Mean loss by ``problem_type``, as torch: MSE, cross-entropy (ignore_index -100) or BCE-with-logits.
    ``kind``: what :func:`labels_problem` returned for ``labels`` (None: validate them here)."""
    kind = kind or labels_problem(config, labels, _dims(logits.shape)[0])
    labels = jnp.asarray(labels)
    if kind == "regression":
        if config.num_labels == 1:
            return jnp.mean((jnp.squeeze(logits) - jnp.squeeze(labels).astype(logits.dtype)) ** 2)
        return jnp.mean((logits - labels.astype(logits.dtype)) ** 2)
    if kind == "single_label_classification":
        logp = jax.nn.log_softmax(logits.reshape(-1, config.num_labels).astype(jnp.float32), axis=-1)
        y = labels.reshape(-1).astype(jnp.int32)
        keep = y != IGNORE_INDEX
        in_range = (y >= 0) & (y < config.num_labels)
        picked = jnp.take_along_axis(logp, jnp.where(in_range, y, 0)[:, None], axis=-1)[:, 0]
        picked = jnp.where(keep & ~in_range, jnp.nan, picked)  # out of range (traced labels): NaN, never a number
        return (-jnp.sum(jnp.where(keep, picked, 0.0)) / jnp.sum(keep)).astype(logits.dtype)
    y = labels.astype(logits.dtype)
    return jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))


class _HeadModule(_ViTModule):
    """A head over ``vit`` (a :class:`FlaxViTModule` without pooler): the fields and flags they share."""

    gradient_checkpointing: bool = False
    scan_layers: bool = False
    #: the encoder the head reads (the hybrid's subclasses put theirs here)
    base_model_class: ClassVar[type[FlaxViTModule]] = FlaxViTModule

    def _vit(self, use_mask_token: bool = False) -> FlaxViTModule:
        return self.base_model_class(self.config, add_pooling_layer=False, use_mask_token=use_mask_token,
                                     gradient_checkpointing=self.gradient_checkpointing, scan_layers=self.scan_layers,
                                     **self._dtypes)


class FlaxViTForImageClassificationModule(_HeadModule):
    """Linear classifier on the class token after the final norm: ``logits`` (B, num_labels).

    Unless hidden states or attentions are asked for, the last block computes the class token alone.
    """

    def setup(self) -> None:
        self.vit = self._vit()
        n = self.config.num_labels
        self.classifier = self._dense(n) if n else (lambda x: x)

    def __call__(self, pixel_values: Array, head_mask: Array | None = None, labels: Array | None = None,
                 deterministic: bool = True, output_attentions: bool = False, output_hidden_states: bool = False,
                 interpolate_pos_encoding: bool = False) -> ImageClassifierOutput:
        # labels are checked before the forward pass, not after it
        kind = None if labels is None else labels_problem(self.config, labels, _dims(pixel_values.shape)[0])
        outputs = self.vit(pixel_values, head_mask=head_mask, deterministic=deterministic,
                           output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                           interpolate_pos_encoding=interpolate_pos_encoding,
                           class_token_only=not (output_attentions or output_hidden_states))
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = None if labels is None else classification_loss(self.config, logits, labels, kind)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class FlaxPixelShuffle(nn.Module):
    """torch's PixelShuffle on NHWC in, NCHW out: (B, h, w, s²·C) → (B, C, h·s, w·s)."""

    upscale_factor: int

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        s = self.upscale_factor
        x = x.reshape(b, h, w, c // (s * s), s, s).transpose(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c // (s * s), h * s, w * s)


class FlaxViTForMaskedImageModelingModule(_HeadModule):
    """SimMIM: encoder with mask tokens, 1×1 conv to stride²·C channels, pixel shuffle → (B, C, H, W)."""

    def setup(self) -> None:
        cfg = self.config
        self.vit = self._vit(use_mask_token=True)
        self.decoder = [  # names decoder_0 (the conv), decoder_1 (no params), as torch's Sequential
            nn.Conv(cfg.encoder_stride**2 * cfg.num_channels, (1, 1), **self._dtypes),
            FlaxPixelShuffle(cfg.encoder_stride),
        ]

    def __call__(self, pixel_values: Array, bool_masked_pos: Array | None = None, head_mask: Array | None = None,
                 deterministic: bool = True, output_attentions: bool = False, output_hidden_states: bool = False,
                 interpolate_pos_encoding: bool = False) -> MaskedImageModelingOutput:
        cfg = self.config
        if bool_masked_pos is not None:
            check_mim_mask_allowed(cfg)
        outputs = self.vit(pixel_values, bool_masked_pos=bool_masked_pos, head_mask=head_mask,
                           deterministic=deterministic, output_attentions=output_attentions,
                           output_hidden_states=output_hidden_states, interpolate_pos_encoding=interpolate_pos_encoding)
        b, h, w, c = pixel_values.shape
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        reconstruction = outputs.last_hidden_state[:, 1:].reshape(b, gh, gw, -1)  # (B, gh, gw, D)
        for layer in self.decoder:
            reconstruction = layer(reconstruction)  # → (B, C, H, W)
        loss = None
        if bool_masked_pos is not None:
            mask = jnp.asarray(bool_masked_pos).reshape(-1, gh, gw)
            mask = jnp.repeat(jnp.repeat(mask, cfg.patch_size, 1), cfg.patch_size, 2)[:, None]  # (B, 1, H, W)
            mask = mask.astype(reconstruction.dtype)
            target = pixel_values.transpose(0, 3, 1, 2).astype(reconstruction.dtype)
            per_pixel = jnp.abs(target - reconstruction)
            loss = jnp.sum(per_pixel * mask) / (jnp.sum(mask) + 1e-5) / c
        return MaskedImageModelingOutput(loss=loss, reconstruction=reconstruction,
                                         hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# ---------------------------------------------------------------------------------------- wrappers
class FlaxViTPreTrainedModel(FlaxPreTrainedModel):
    """The one wrapper ``__call__``: NCHW in, flags resolved from the config, pure in ``params``.

    Positional order is HF 4.x's (``pixel_values, params, dropout_rng, train, output_attentions,
    output_hidden_states, return_dict``); the model's other inputs (``input_names``) and
    ``interpolate_pos_encoding`` are keywords. Inputs are validated by the modules (at trace time,
    so also under ``jax.jit``) with :mod:`vit_core.checks`, in the words every framework uses.
    """

    #: keyword inputs besides ``pixel_values`` that this model's module takes
    input_names: tuple[str, ...] = ()

    def __call__(self, pixel_values: Any = None, params: Params | None = None, dropout_rng: jax.Array | None = None,
                 train: bool = False, output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                 return_dict: bool | None = None, *, interpolate_pos_encoding: bool | None = None,
                 **inputs: Any) -> Any:
        unknown = sorted(set(inputs) - set(self.input_names))
        if unknown:
            raise TypeError(f"{type(self).__name__}.__call__ got unexpected keyword arguments {unknown}")
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        pixel_values = jnp.asarray(pixel_values)
        if pixel_values.ndim == 4:  # NCHW → NHWC; other ranks go on as they are, for the module's check to name
            pixel_values = jnp.transpose(pixel_values, (0, 2, 3, 1))
        output_attentions, output_hidden_states, return_dict = self.config.output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     interpolate_pos_encoding=bool(interpolate_pos_encoding))
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        out = self.module.apply({"params": self.params if params is None else params}, pixel_values,
                                deterministic=not train, rngs=rngs, **flags, **inputs)
        return out if return_dict else out.to_tuple()


class FlaxViTModel(FlaxViTPreTrainedModel):
    """The bare encoder; ``add_pooling_layer`` / ``use_mask_token`` as in :class:`vit_torch.ViTModel`.

    Inputs: ``pixel_values`` (B, C, H, W); keywords ``bool_masked_pos`` (B, N), ``head_mask``, and
    ``class_token_only`` (beyond HF: the last block computes the class token alone, ``last_hidden_state``
    (B, 1, D)).
    """

    module_class = FlaxViTModule
    input_names = ("bool_masked_pos", "head_mask", "class_token_only")

    def __init__(self, config: ViTConfig, input_shape: tuple[int, ...] | None = None, seed: int = 0,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, _do_init: bool = True,
                 add_pooling_layer: bool = True, use_mask_token: bool = False, gradient_checkpointing: bool = False,
                 scan_layers: bool = False):
        super().__init__(config, input_shape, seed, dtype, param_dtype, _do_init, gradient_checkpointing,
                         scan_layers, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)


class FlaxViTForImageClassification(FlaxViTPreTrainedModel):
    """Classifier on the class token: ``logits`` (B, num_labels); ``loss`` when ``labels`` are given.

    Inputs: ``pixel_values`` (B, C, H, W); keywords ``head_mask``, ``labels`` (B,) or (B, num_labels).
    """

    module_class = FlaxViTForImageClassificationModule
    input_names = ("head_mask", "labels")


class FlaxViTForMaskedImageModeling(FlaxViTPreTrainedModel):
    """SimMIM: ``reconstruction`` (B, C, H, W); masked L1 ``loss`` when ``bool_masked_pos`` (B, N) is given."""

    module_class = FlaxViTForMaskedImageModelingModule
    input_names = ("bool_masked_pos", "head_mask")
