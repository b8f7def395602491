"""BiT (ResNetV2 with weight-standardised convolutions and GroupNorm) in PyTorch, at HF 4.x parity.

The backbone of the hybrid ViT. Shapes: B batch, C channels, H×W spatial; every module maps
(B, C_in, H, W) → (B, C_out, H', W'). Attribute names equal HF's ``BitModel``, so parameter names are
the canonical checkpoint names under ``...backbone.bit.``. Channels, strides and dilations of every
unit, and each convolution's padding, come from :class:`vit_core.config_hybrid.BitConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_core.config_hybrid import BitConfig, BitLayerSpec, conv_padding, same_padding

from .modeling_utils import activation

__all__ = ["BitBackbone", "BitModel", "WeightStandardizedConv2d", "BitGroupNormActivation"]


def _activation(name: str) -> nn.Module:
    """The config's activation; ReLU in place: it follows a GroupNorm or a residual sum, neither of whose
    backward reads the overwritten output, and it saves one feature-map-sized write per use."""
    return nn.ReLU(inplace=True) if name == "relu" else activation(name)


def _pad(x: torch.Tensor, pads_h: tuple[int, int], pads_w: tuple[int, int]) -> torch.Tensor:
    if not any(pads_h + pads_w):
        return x
    return F.pad(x, [pads_w[0], pads_w[1], pads_h[0], pads_h[1]], value=0.0)


class WeightStandardizedConv2d(nn.Conv2d):
    """Bias-free conv whose kernel is standardised per output channel over (C_in, kh, kw) at each call.

    ``bit.weight_standardization``: "var_eps" (w-μ)/√(σ²+ε) (HF, timm), "std_eps" (w-μ)/(σ+ε)
    (google-research/vision_transformer), σ² the biased variance, in float32; ε
    ``bit.weight_standardization_eps``. The input is zero-padded by the config's rule first.
    """

    def __init__(self, bit: BitConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, bias=False)
        self.global_padding = bit.global_padding
        self.formula = bit.weight_standardization
        self.eps = bit.weight_standardization_eps
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def standardized_weight(self) -> torch.Tensor:
        """The standardised kernel. Without autograd (inference) it is computed once and cached until the
        weight changes (in place, dtype or device); HF recomputes it on every call. Under ``torch.compile``
        the compiled graph computes it (no Python-side cache to guard on)."""
        if self.training or (torch.is_grad_enabled() and self.weight.requires_grad) or torch.compiler.is_compiling():
            return self._standardize()
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._standardize())
        return self._cached[1]

    def _standardize(self) -> torch.Tensor:
        w = self.weight if self.weight.dtype == torch.float64 else self.weight.float()  # never below fp32
        w = w.reshape(1, self.out_channels, -1)
        if self.formula == "var_eps":  # the same kernel as HF's (batch statistics over each output channel)
            w = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=self.eps)
        else:
            w = (w - w.mean(-1, keepdim=True)) / (w.std(-1, unbiased=False, keepdim=True) + self.eps)
        return w.reshape_as(self.weight).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k, _), (s, _), (d, _) = self.kernel_size, self.stride, self.dilation
        (top, bottom), (left, right) = (conv_padding(self.global_padding, n, k, s, d) for n in x.shape[-2:])
        if top == bottom and left == right:  # symmetric: the convolution pads by itself, without a copy
            return F.conv2d(x, self.standardized_weight(), None, self.stride, (top, left), self.dilation)
        x = _pad(x, (top, bottom), (left, right))
        return F.conv2d(x, self.standardized_weight(), None, self.stride, 0, self.dilation)


class BitGroupNormActivation(nn.GroupNorm):
    """GroupNorm (``bit.num_groups`` groups, eps ``bit.group_norm_eps``), then ``bit.hidden_act`` unless
    ``apply_activation=False``."""

    def __init__(self, bit: BitConfig, num_channels: int, apply_activation: bool = True):
        super().__init__(bit.num_groups, num_channels, eps=bit.group_norm_eps)
        self.activation = _activation(bit.hidden_act) if apply_activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(super().forward(x))


class BitMaxPool2d(nn.Module):
    """3×3 stride-2 max-pool; with ``dynamic_padding`` the input is first padded TF-SAME-style with
    zeros (HF's value, not -inf)."""

    def __init__(self, dynamic_padding: bool):
        super().__init__()
        self.dynamic_padding = dynamic_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_padding:
            x = _pad(x, *(same_padding(n, 3, 2, 1) for n in x.shape[-2:]))
        return F.max_pool2d(x, 3, 2)


class BitEmbeddings(nn.Module):
    """The stem: 7×7 stride-2 conv, a 1-pixel zero pad unless padding is SAME, GroupNorm + act
    (bottleneck only), 3×3 stride-2 max-pool: (B, C, H, W) → (B, embedding_size, H/4, W/4)."""

    def __init__(self, bit: BitConfig):
        super().__init__()
        self.convolution = WeightStandardizedConv2d(bit, bit.num_channels, bit.embedding_size, 7, stride=2)
        self.pad = nn.Identity() if bit.global_padding == "SAME" else nn.ConstantPad2d(1, 0.0)
        self.norm = BitGroupNormActivation(bit, bit.embedding_size) if bit.layer_type == "bottleneck" else nn.Identity()
        self.pooler = BitMaxPool2d(bit.embedding_dynamic_padding)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.norm(self.pad(self.convolution(pixel_values))))


class BitDropPath(nn.Module):
    """Stochastic depth: in training, zero whole samples with probability ``p`` and scale the rest by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device))
        return x / keep * mask


class BitDownsampleConv(nn.Module):
    """The first unit's projection shortcut: 1×1 conv with the unit's stride, then GroupNorm without
    activation (``preact=False``) or nothing (pre-activation units)."""

    def __init__(self, bit: BitConfig, layer: BitLayerSpec, preact: bool):
        super().__init__()
        self.conv = WeightStandardizedConv2d(bit, layer.in_channels, layer.out_channels, 1, stride=layer.stride)
        self.norm = nn.Identity() if preact else BitGroupNormActivation(bit, layer.out_channels, apply_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BitBottleneckLayer(nn.Module):
    """Post-activation bottleneck: act(norm3(conv3(norm1∘conv1 → norm2∘conv2(x))) + shortcut(x))."""

    def __init__(self, bit: BitConfig, layer: BitLayerSpec):
        super().__init__()
        mid = layer.mid_channels
        self.downsample = BitDownsampleConv(bit, layer, preact=False) if layer.is_first_layer else None
        self.conv1 = WeightStandardizedConv2d(bit, layer.in_channels, mid, 1)
        self.norm1 = BitGroupNormActivation(bit, mid)
        self.conv2 = WeightStandardizedConv2d(bit, mid, mid, 3, stride=layer.stride, dilation=layer.dilation)
        self.norm2 = BitGroupNormActivation(bit, mid)
        self.conv3 = WeightStandardizedConv2d(bit, mid, layer.out_channels, 1)
        self.norm3 = BitGroupNormActivation(bit, layer.out_channels, apply_activation=False)
        self.drop_path = BitDropPath(layer.drop_path_rate)
        self.activation = _activation(bit.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        y = self.drop_path(self.norm3(self.conv3(y)))
        return self.activation(y + shortcut)


class BitPreActivationBottleneckLayer(nn.Module):
    """Pre-activation bottleneck: p = norm1(x); conv3(norm3(conv2(norm2(conv1(p))))) + shortcut, the
    shortcut projecting p. As in HF, the 3×3 conv is not dilated."""

    def __init__(self, bit: BitConfig, layer: BitLayerSpec):
        super().__init__()
        mid = layer.mid_channels
        self.downsample = BitDownsampleConv(bit, layer, preact=True) if layer.is_first_layer else None
        self.norm1 = BitGroupNormActivation(bit, layer.in_channels)
        self.conv1 = WeightStandardizedConv2d(bit, layer.in_channels, mid, 1)
        self.norm2 = BitGroupNormActivation(bit, mid)
        self.conv2 = WeightStandardizedConv2d(bit, mid, mid, 3, stride=layer.stride)
        self.norm3 = BitGroupNormActivation(bit, mid)
        self.conv3 = WeightStandardizedConv2d(bit, mid, layer.out_channels, 1)
        self.drop_path = BitDropPath(layer.drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(preact)
        y = self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(preact)))))
        return self.drop_path(y) + shortcut


class BitStage(nn.Module):
    """The units of one stage, in ``layers`` (the first may stride and project)."""

    def __init__(self, bit: BitConfig, layers: list[BitLayerSpec]):
        super().__init__()
        unit = BitBottleneckLayer if bit.layer_type == "bottleneck" else BitPreActivationBottleneckLayer
        self.layers = nn.Sequential(*(unit(bit, layer) for layer in layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BitEncoder(nn.Module):
    """The stages; ``forward`` returns the stem output and each stage's output, up to stage ``last``."""

    def __init__(self, bit: BitConfig):
        super().__init__()
        self.stages = nn.ModuleList(BitStage(bit, layers) for layers in bit.stage_layers())
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, last: int | None = None) -> tuple[torch.Tensor, ...]:
        hidden_states = (x,)
        for stage in self.stages[:last]:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            hidden_states += (x,)
        return hidden_states


class BitModel(nn.Module):
    """``embedder`` then ``encoder``; ``norm`` (pre-activation only) is HF's final norm, which the
    backbone's feature maps never pass through (kept for the checkpoint's names)."""

    def __init__(self, bit: BitConfig):
        super().__init__()
        self.embedder = BitEmbeddings(bit)
        self.encoder = BitEncoder(bit)
        self.norm = BitGroupNormActivation(bit, bit.hidden_sizes[-1]) if bit.layer_type == "preactivation" \
            else nn.Identity()

    def forward(self, pixel_values: torch.Tensor, last_stage: int | None = None) -> tuple[torch.Tensor, ...]:
        """(stem output, stage 1 output, …) up to ``last_stage`` (all stages if None)."""
        return self.encoder(self.embedder(pixel_values), last=last_stage)


class BitBackbone(nn.Module):
    """HF's ``BitBackbone``: the feature maps named by ``out_features``, a tuple of (B, C_i, H_i, W_i).

    Stages after the last requested one are not run (their weights still load and save).
    """

    def __init__(self, bit: BitConfig):
        super().__init__()
        self.config = bit
        self.out_indices = [i % len(bit.stage_names) for i in bit.out_indices]
        self.bit = BitModel(bit)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden_states = self.bit(pixel_values, last_stage=self.out_indices[-1])
        return tuple(hidden_states[i] for i in self.out_indices)
