"""ViT in PyTorch, at Hugging Face transformers 4.x parity (names, signatures, numbers).

Shapes: B batch, C channels, H×W image, p patch size, N = (H//p)·(W//p) patches,
S = N + 1 tokens (class token first), D hidden size, h heads, d = D/h head size.
Attribute names equal HF's, so ``state_dict()`` keys are the canonical checkpoint names.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_core.checks import (
    IGNORE_INDEX, check_bool_masked_pos, check_label_values, check_labels, check_mim_mask_allowed, check_pixel_values,
    dtype_name,
)
from vit_core.config import ViTConfig
from vit_core.outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput

from .modeling_utils import TorchPreTrainedModel, activation, static_shape

__all__ = ["ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling", "ViTPreTrainedModel"]


class ViTPatchEmbeddings(nn.Module):
    """(B, C, H, W) → (B, N, D) by a stride-p convolution, patches in row-major order."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.image_size = config.image_hw
        self.patch_size = (config.patch_size, config.patch_size)
        self.num_channels = config.num_channels
        self.num_patches = config.num_patches
        self.projection = nn.Conv2d(config.feature_channels, config.hidden_size, config.patch_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        check_pixel_values(static_shape(pixel_values), self.config, interpolate_pos_encoding)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    """Patch embeddings, optional mask tokens, class token, position embeddings: → (B, S, D)."""

    #: (B, C, H, W) → (B, N, D); the hybrid puts its backbone + projection here.
    patch_embeddings_class: type[nn.Module] = ViTPatchEmbeddings

    def __init__(self, config: ViTConfig, use_mask_token: bool = False):
        super().__init__()
        d = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d)) if use_mask_token else None
        self.patch_embeddings = self.patch_embeddings_class(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.patch_size = config.patch_size
        self.config = config

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an H×W input: the patch grid resized to the input's grid
        (``config.feature_grid``: (H//p, W//p) for the ViT, the backbone's output grid for the hybrid)."""
        grid = self.config.feature_grid(*self.config.image_hw)
        new_grid = self.config.feature_grid(height, width)
        # Exported graphs (torch.export, ONNX tracing) serve every size: always resize (the identity at the same size).
        if not (torch.compiler.is_exporting() or torch.jit.is_tracing()) and new_grid == grid:
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        d = embeddings.shape[-1]
        patch_pos = patch_pos.reshape(1, *grid, d).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=new_grid, mode=self.config.interpolate_pos_mode, align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, d)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        embeddings = self.patch_embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        b, _, h, w = pixel_values.shape  # validated by the patch embedding
        if bool_masked_pos is not None:
            b_n = static_shape(embeddings)[:2]
            check_bool_masked_pos(
                static_shape(bool_masked_pos), *b_n, self.mask_token is not None, dtype_name(bool_masked_pos)
            )
            mask = bool_masked_pos.unsqueeze(-1).type_as(embeddings)
            embeddings = embeddings * (1.0 - mask) + self.mask_token.expand(b, embeddings.shape[1], -1) * mask
        embeddings = torch.cat((self.cls_token.expand(b, -1, -1), embeddings), dim=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, h, w)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


class ViTSelfAttention(nn.Module):
    """Multi-head self-attention core: (B, S, D) → context (B, Sq, D), probs (B, h, Sq, S) or None.

    Sq = S, or 1 with ``class_token_only`` (only the class token's query: what a classifier reads of
    the last layer).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.all_head_size = config.hidden_size
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        class_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = hidden_states.shape[0]
        split = lambda x: x.view(b, x.shape[1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # noqa: E731
        queries = hidden_states[:, :1] if class_token_only else hidden_states
        q, k, v = split(self.query(queries)), split(self.key(hidden_states)), split(self.value(hidden_states))
        p = self.dropout_prob if self.training else 0.0
        probs = None
        # bf16 on the CPU takes the explicit path: PyTorch's CPU flash kernel ran ViT-B's (8, 12, 197, 64) in 9-10 ms,
        # these two matmuls and a bf16 softmax in 4.7 ms (ViT-S's (8, 6, 197, 64): 4.1-4.5 vs 1.9-2.5 ms). In fp32
        # SDPA is the faster one and stays. See docs/torch.md.
        cpu_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
        if self.config.attn_implementation == "sdpa" and head_mask is None and not output_attentions and not cpu_bf16:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scaling)
        else:  # explicit path: needed for the probabilities and for head_mask, which sdpa cannot apply
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
            # The CPU bf16 softmax accumulates in fp32 and rounds once, like the cast (1 in 8e4 probabilities one bf16
            # ulp apart), without an fp32 (B, h, S, S) copy: with it, ViT-B's attention took 17-27 ms instead of 4.7.
            probs = F.softmax(scores, dim=-1) if cpu_bf16 else F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            probs = F.dropout(probs, p=p, training=self.training)
            if head_mask is not None:
                probs = probs * head_mask
            context = torch.matmul(probs, v)
        return context.transpose(1, 2).reshape(b, q.shape[2], self.all_head_size), probs


class ViTSelfOutput(nn.Module):
    """Attention output projection; the residual is added in :class:`ViTLayer`."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        class_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.attention(hidden_states, head_mask, output_attentions, class_token_only)
        return self.output(context), probs


class ViTIntermediate(nn.Module):
    """(B, S, D) → (B, S, intermediate_size), then the activation."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class ViTOutput(nn.Module):
    """(B, S, intermediate_size) → (B, S, D), plus the residual ``input_tensor``."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states)) + input_tensor


class ViTLayer(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then h + mlp(LN(h)); (B, S, D) → (B, S, D).

    ``class_token_only``: only the class token's row is computed, (B, S, D) → (B, 1, D), the same
    numbers as row 0 of the full block (every step after the keys and values is row-wise).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTAttention(config)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        class_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, probs = self.attention(
            self.layernorm_before(hidden_states), head_mask, output_attentions, class_token_only
        )
        hidden_states = attention_output + (hidden_states[:, :1] if class_token_only else hidden_states)
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return layer_output, probs


class ViTEncoder(nn.Module):
    """``num_hidden_layers`` × :class:`ViTLayer`: (B, S, D) → :class:`BaseModelOutput`.

    ``class_token_only``: the last block computes only the class token (``last_hidden_state``
    (B, 1, D)); for callers that read nothing else, and that ask for no hidden states or attentions.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([ViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        class_token_only: bool = False,
    ) -> BaseModelOutput:
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn: tuple[torch.Tensor, ...] | None = () if output_attentions else None
        for i, layer in enumerate(self.layer):
            layer_mask = None if head_mask is None else head_mask[i]
            last = class_token_only and i == len(self.layer) - 1
            if self.gradient_checkpointing and self.training:
                hidden_states, probs = checkpoint(
                    layer, hidden_states, layer_mask, output_attentions, last, use_reentrant=False
                )
            else:
                hidden_states, probs = layer(hidden_states, layer_mask, output_attentions, last)
            if all_hidden is not None:
                all_hidden += (hidden_states,)
            if all_attn is not None:
                all_attn += (probs,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn)


class ViTPooler(nn.Module):
    """Class token → dense → activation: (B, S, D) → (B, pooler_output_size)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = activation(config.pooler_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class ViTPreTrainedModel(TorchPreTrainedModel):
    """Shared machinery (init, from_pretrained, save_pretrained) lives in :class:`TorchPreTrainedModel`."""


class ViTModel(ViTPreTrainedModel):
    """The bare encoder. ``last_hidden_state`` (B, S, D) after the final norm; ``pooler_output``."""

    embeddings_class: type[ViTEmbeddings] = ViTEmbeddings

    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config)
        self.embeddings = self.embeddings_class(config, use_mask_token=use_mask_token)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self._table_flags = {"add_pooling_layer": add_pooling_layer, "use_mask_token": use_mask_token}
        self.post_init()

    def get_input_embeddings(self) -> ViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        class_token_only: bool = False,
    ) -> BaseModelOutputWithPooling | tuple:
        """``class_token_only`` (beyond HF, for heads that read only the class token): the last block
        computes the class token alone and ``last_hidden_state`` is (B, 1, D)."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_attentions, output_hidden_states, return_dict = self.config.output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        head_mask = self._head_mask(head_mask)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embedding_output = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=bool(interpolate_pos_encoding)
        )
        encoded = self.encoder(embedding_output, head_mask, output_attentions, output_hidden_states, class_token_only)
        sequence_output = self.layernorm(encoded.last_hidden_state)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        out = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return out if return_dict else out.to_tuple()


class ViTForImageClassification(ViTPreTrainedModel):
    """Linear classifier on the class token after the final norm: ``logits`` (B, num_labels).

    Unless hidden states or attentions are asked for, the last block computes the class token alone.
    """

    base_model_class: type[ViTModel] = ViTModel

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = self.base_model_class(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple:
        output_attentions, output_hidden_states, return_dict = self.config.output_flags(
            output_attentions, output_hidden_states, return_dict
        )
        kind = None
        if labels is not None:  # checked before the forward pass, not after it
            labels = torch.as_tensor(labels)
            kind = self._labels_problem(labels, -1 if pixel_values is None else static_shape(pixel_values)[0])
        outputs = self.vit(
            pixel_values,
            head_mask=head_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            class_token_only=not (output_attentions or output_hidden_states),
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = None if labels is None else self._classification_loss(logits, labels, kind)
        out = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return out if return_dict else out.to_tuple()

    def _labels_problem(self, labels: torch.Tensor, batch: int) -> str:
        """Validate ``labels`` (:func:`~vit_core.checks.check_labels`; class indices on the host) → problem type."""
        kind = check_labels(static_shape(labels), dtype_name(labels), self.config, batch)
        if kind == "single_label_classification" and not torch.compiler.is_compiling():  # compiled: see the loss
            check_label_values(labels.detach().cpu().numpy(), self.num_labels)
        return kind

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """Mean loss by ``problem_type``: MSE, cross-entropy (ignore_index -100) or BCE-with-logits.
        ``kind``: the problem type :meth:`_labels_problem` found (None: validate ``labels`` here)."""
        labels = torch.as_tensor(labels)
        kind = kind or self._labels_problem(labels, logits.shape[0])
        labels = labels.to(logits.device)
        if kind == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if kind == "single_label_classification":
            y = labels.view(-1).long()
            if not torch.compiler.is_compiling():
                return F.cross_entropy(logits.view(-1, self.num_labels), y, ignore_index=IGNORE_INDEX)
            # Inside a torch.compile graph the labels' values are not on the host: an out-of-range label makes the
            # loss NaN (as under jax.jit and XLA), never an out-of-bounds read or a plausible number.
            bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= self.num_labels))
            loss = F.cross_entropy(logits.view(-1, self.num_labels), torch.where(bad, IGNORE_INDEX, y),
                                   ignore_index=IGNORE_INDEX)
            return torch.where(bad.any(), torch.full_like(loss, float("nan")), loss)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class ViTForMaskedImageModeling(ViTPreTrainedModel):
    """SimMIM: encoder with mask tokens, 1×1 conv to stride²·C channels, pixel shuffle → (B, C, H, W)."""

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False, use_mask_token=True)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, config.encoder_stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(config.encoder_stride),
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskedImageModelingOutput | tuple:
        cfg = self.config
        if bool_masked_pos is not None:
            check_mim_mask_allowed(cfg)
        return_dict = cfg.return_dict if return_dict is None else return_dict
        outputs = self.vit(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            head_mask=head_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        assert pixel_values is not None
        gh, gw = pixel_values.shape[2] // cfg.patch_size, pixel_values.shape[3] // cfg.patch_size
        tokens = outputs.last_hidden_state[:, 1:]  # (B, N, D), N = gh·gw
        grid = tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], gh, gw)
        reconstruction = self.decoder(grid)
        loss = None
        if bool_masked_pos is not None:
            mask = bool_masked_pos.reshape(-1, gh, gw)
            mask = mask.repeat_interleave(cfg.patch_size, 1).repeat_interleave(cfg.patch_size, 2).unsqueeze(1)
            mask = mask.to(reconstruction.dtype)
            per_pixel = F.l1_loss(pixel_values.to(reconstruction.dtype), reconstruction, reduction="none")
            loss = (per_pixel * mask).sum() / (mask.sum() + 1e-5) / cfg.num_channels
        out = MaskedImageModelingOutput(
            loss=loss, reconstruction=reconstruction, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return out if return_dict else out.to_tuple()
