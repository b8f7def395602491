"""JAX ``.npz`` ViT checkpoints → canonical: google-research/vision_transformer and big_vision.

Both store flax parameter trees flattened with ``/``. Layouts are flax's: Dense kernels are
(in, out), the patch-embedding Conv kernel is (p, p, C, D), attention projections are
DenseGeneral kernels (D, heads, head_dim) for query/key/value and (heads, head_dim, D) for
``out``. Both use flax's ``nn.gelu`` (the *tanh approximation* by default, mapped to trivit's
``gelu_new``, the same formula; ``exact_gelu=True`` picks exact ``gelu`` for checkpoints trained
with it) and flax LayerNorm's eps 1e-6.

*Original* (vision_transformer): ``cls``, ``embedding/*``, ``Transformer/posembed_input/
pos_embedding`` (1, N+1, D) covering the class token, blocks ``Transformer/encoderblock_{i}/``
with ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``,
``Transformer/encoder_norm``, ``head``, optional ``pre_logits`` (Dense + tanh → HF's pooler).

*big_vision*: the same under an optional ``params/`` prefix, but blocks use
``MultiHeadDotProductAttention_0``, ``LayerNorm_0/1``, ``MlpBlock_0`` (or one stacked
``encoderblock`` when trained with ``scan=True``), and ``pos_embedding`` (1, N, D) covers the
patches only: big_vision adds it to the patch tokens *before* prepending ``cls``, so the class
token gets no position embedding. Prepending a zero row therefore gives exactly the same
function in HF's layout (which adds position embeddings after the class token is prepended).
``gap`` / ``map`` pooling (no ``cls``, or a ``MAPHead_0``) has no HF equivalent and is refused.

*R50+ViT hybrids* (vision_transformer ``R50+ViT-B_16.npz``, ``R26_S_32``, ``R50_L_32``...): a ResNet
root ``conv_root`` (7×7/2) + ``gn_root``, then ``block{s}/unit{u}`` bottleneck units (``conv1..3`` +
``gn1..3``, and ``conv_proj`` + ``gn_proj`` on each stage's first unit), then ``embedding`` as a
``patch_size`` convolution over the last stage's map. Its ``StdConv`` standardises kernels as
(w-μ)/(σ+1e-5) and flax ``nn.GroupNorm`` uses 32 groups, eps 1e-6, so the derived BitConfig carries
``weight_standardization="std_eps"``, ``weight_standardization_eps=1e-5``, ``group_norm_eps=1e-6``;
all its convolutions and the root max-pool are TF-SAME (the pool pads with -inf, but after a ReLU,
so HF's zero pad is the same function). A stem-only ResNet (``R_Ti_16``) is refused.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vit_core.config_hybrid import BitConfig
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import Kind

from .common import (Converted, LazyState, UnsupportedFeatureError, backbone_rows, bit_config_from_units, class_name,
                     float_array, hybrid_image_size, make_config)

__all__ = ["read_npz", "npz_flavour"]

_FLAVOURS = {
    "npz": dict(attn="MultiHeadDotProductAttention_1", ln1="LayerNorm_0", ln2="LayerNorm_2", mlp="MlpBlock_3",
                pos="Transformer/posembed_input/pos_embedding", pos_has_cls=True),
    "big_vision": dict(attn="MultiHeadDotProductAttention_0", ln1="LayerNorm_0", ln2="LayerNorm_1", mlp="MlpBlock_0",
                       pos="pos_embedding", pos_has_cls=False),
}


#: vision_transformer's ResNet numerics: ``StdConv`` (w-μ)/(σ+1e-5), flax ``nn.GroupNorm`` eps 1e-6.
VIT_RESNET_NUMERICS = {"weight_standardization": "std_eps", "weight_standardization_eps": 1e-5, "group_norm_eps": 1e-6}
_RESNET_KEY = re.compile(r"^(conv_root|gn_root|block\d+)/")
_UNIT_CONV3 = re.compile(r"^block(\d+)/unit(\d+)/conv3/kernel$")
_CANONICAL_BIT = re.compile(r"(?:embedder|encoder\.stages\.(\d+)\.layers\.(\d+))\.(.+)\.(weight|bias)")


class _Npz:
    """Lazy member access to an ``.npz`` (no pickles), errors naming the file and key."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._zip = np.load(path, allow_pickle=False)
            names = list(self._zip.files)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable .npz archive ({e})") from None
        self.prefix = "params/" if any(n.startswith("params/") for n in names) else ""
        self.keys = {n.removeprefix(self.prefix) for n in names if n.startswith(self.prefix)}

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def shape(self, key: str) -> tuple[int, ...]:
        # The .npy header gives the shape without reading the data.
        try:
            with zipfile.ZipFile(self.path) as z, z.open(self.prefix + key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
        except KeyError:
            raise CheckpointError(f"{self.path}: key {key!r} is missing") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{self.path}: key {key!r} is corrupt ({e})") from None
        return tuple(shape)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise CheckpointError(f"{self.path}: key {key!r} is missing")
        try:
            return float_array(np.asarray(self._zip[self.prefix + key]))
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{self.path}: key {key!r} cannot be read ({e})") from None


def npz_flavour(keys: set[str]) -> str:
    """``"npz"`` (original vision_transformer) or ``"big_vision"``, from the key names."""
    bare = {k.removeprefix("params/") for k in keys}
    if any("MultiHeadDotProductAttention_1" in k for k in bare) or "Transformer/posembed_input/pos_embedding" in bare:
        return "npz"
    return "big_vision"


def read_npz(
    path: str | os.PathLike[str],
    *,
    flavour: str | None = None,
    exact_gelu: bool = False,
    num_heads: int | None = None,
    num_labels: int | None = None,
    num_groups: int | None = None,
) -> Converted:
    """Read an original-ViT (plain or R+ViT hybrid) or big_vision ``.npz`` (``flavour`` auto-detected
    when ``None``).

    ``num_labels=0`` drops the head (and keeps ``pre_logits`` as the pooler); another value
    must equal the head's class count. ``num_heads``, if given, must match the kernels.
    ``num_groups``: the hybrid ResNet's GroupNorm groups (default 32, flax's).
    """
    path = Path(path)
    z = _Npz(path)
    flavour = flavour or npz_flavour(z.keys)
    if flavour not in _FLAVOURS:
        raise ValueError(f"npz flavour must be one of {list(_FLAVOURS)}, got {flavour!r}")
    f = _FLAVOURS[flavour]
    name = "big_vision" if flavour == "big_vision" else "vision_transformer"
    if flavour == "big_vision" and "conv_root/kernel" in z:
        raise UnsupportedFeatureError(f"{path}: a ResNet hybrid root (conv_root) in a big_vision file; only "
                                      "vision_transformer's R+ViT hybrids are known (pass --from npz)")
    if any(k.startswith("MAPHead_0/") for k in z.keys):
        raise UnsupportedFeatureError(f"{path}: {name} checkpoint uses map pooling (MAPHead_0); HF's ViT has only class-token pooling")
    if "cls" not in z:
        raise UnsupportedFeatureError(
            f"{path}: {name} checkpoint has no class token 'cls' (gap/average pooling); HF's ViT has only class-token pooling"
        )
    if f["pos"] not in z:
        raise UnsupportedFeatureError(f"{path}: {name} checkpoint has no learned position embedding {f['pos']!r} (fixed sincos2d?)")

    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in z
    if scanned:
        depth = z.shape("Transformer/encoderblock/LayerNorm_0/scale")[0]
    else:
        depth = sum(1 for k in z.keys if k.startswith("Transformer/encoderblock_") and k.endswith(f"/{f['ln1']}/scale"))
    if depth == 0:
        raise CheckpointError(f"{path}: no encoder blocks found (expected Transformer/encoderblock_0/{f['ln1']}/scale)")

    def block(i: int, rest: str) -> tuple[tuple[int, ...], Callable[[], np.ndarray]]:
        if scanned:
            key = f"Transformer/encoderblock/{rest}"
            return z.shape(key)[1:], lambda: z[key][i]
        key = f"Transformer/encoderblock_{i}/{rest}"
        return z.shape(key), lambda: z[key]

    p, _, embedded, width = z.shape("embedding/kernel")
    channels = embedded
    bit = None
    if "conv_root/kernel" in z:
        bit = _backbone_config(z, path, num_groups)
        channels = bit.num_channels  # the embedding convolution reads the feature map, not the pixels
    elif num_groups is not None:
        raise CheckpointError(f"{path}: num_groups applies to hybrid (ResNet + ViT) checkpoints only; this is a plain ViT")
    _, heads, head_dim = block(0, f"{f['attn']}/query/kernel")[0]
    if num_heads is not None and num_heads != heads:
        raise CheckpointError(f"{path}: the attention kernels have {heads} heads, not --num-heads {num_heads}")
    mlp = block(0, f"{f['mlp']}/Dense_0/kernel")[0][1]
    tokens = z.shape(f["pos"])[1] + (0 if f["pos_has_cls"] else 1)
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"{path}: {f['pos']} has {tokens - 1} patch positions, not a square grid")
    image_size = grid * p if bit is None else hybrid_image_size(bit, p, tokens - 1, path)
    head_classes = z.shape("head/kernel")[1] if "head/kernel" in z else 0
    if num_labels is not None and num_labels not in (0, head_classes):
        raise CheckpointError(f"{path}: the head has {head_classes} classes; --num-labels {num_labels} would need a new head")
    classes = head_classes if num_labels is None else num_labels
    pre_logits = "pre_logits/kernel" in z
    if pre_logits and classes:
        raise UnsupportedFeatureError(
            f"{path}: {name} checkpoint has a pre_logits layer (Dense + tanh) before the head, which HF's "
            "ViTForImageClassification does not have; pass --num-labels 0 to convert the backbone with "
            "pre_logits as the pooler"
        )
    config = make_config(
        bit, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
        hidden_act="gelu" if exact_gelu else "gelu_new", layer_norm_eps=1e-6, image_size=image_size, patch_size=p,
        num_channels=channels, num_labels=classes,
        pooler_output_size=z.shape("pre_logits/kernel")[1] if pre_logits else None,
        qkv_bias=_has_block(z, scanned, f"{f['attn']}/query/bias"),
    )
    if classes:
        model_class, flags, prefix = class_name(config, "ForImageClassification"), {}, "vit."
    else:
        model_class, flags, prefix = class_name(config, "Model"), {"add_pooling_layer": pre_logits}, ""
    d = width
    entries: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}

    def top(dst: str, key: str, shape: tuple[int, ...], fn: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> None:
        z.shape(key)  # fail early, naming the key, if it is missing
        entries[dst] = (shape, lambda: np.ascontiguousarray(fn(z[key])))

    def blk(dst: str, i: int, rest: str, shape: tuple[int, ...], fn: Callable[[np.ndarray], np.ndarray]) -> None:
        _, load = block(i, rest)
        entries[dst] = (shape, lambda: np.ascontiguousarray(fn(load())))

    top(f"{prefix}embeddings.cls_token", "cls", (1, 1, d))
    if f["pos_has_cls"]:
        top(f"{prefix}embeddings.position_embeddings", f["pos"], (1, tokens, d))
    else:
        top(f"{prefix}embeddings.position_embeddings", f["pos"], (1, tokens, d),
            lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], axis=1))
    top(f"{prefix}embeddings.patch_embeddings.projection.weight", "embedding/kernel", (d, embedded, p, p),
        lambda a: a.transpose(3, 2, 0, 1))
    top(f"{prefix}embeddings.patch_embeddings.projection.bias", "embedding/bias", (d,))
    if bit is not None:
        for spec, key in backbone_rows(bit, prefix, _backbone_key, (k for k in z.keys if _RESNET_KEY.match(k)), path):
            if spec.kind is Kind.CONV_WEIGHT:  # flax (kh, kw, in, out) -> (out, in, kh, kw)
                kh, kw, cin, cout = z.shape(key)
                top(spec.name, key, (cout, cin, kh, kw), lambda a: a.transpose(3, 2, 0, 1))
            else:
                top(spec.name, key, z.shape(key))
    for i in range(depth):
        layer = f"{prefix}encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            blk(f"{layer}.attention.attention.{proj}.weight", i, f"{f['attn']}/{proj}/kernel", (d, d),
                lambda a: a.reshape(d, d).T)
            if config.qkv_bias:
                blk(f"{layer}.attention.attention.{proj}.bias", i, f"{f['attn']}/{proj}/bias", (d,), lambda a: a.reshape(d))
        blk(f"{layer}.attention.output.dense.weight", i, f"{f['attn']}/out/kernel", (d, d), lambda a: a.reshape(d, d).T)
        blk(f"{layer}.attention.output.dense.bias", i, f"{f['attn']}/out/bias", (d,), lambda a: a)
        for dense, hf, shape in (("Dense_0", "intermediate.dense", (mlp, d)), ("Dense_1", "output.dense", (d, mlp))):
            blk(f"{layer}.{hf}.weight", i, f"{f['mlp']}/{dense}/kernel", shape, lambda a: a.T)
            blk(f"{layer}.{hf}.bias", i, f"{f['mlp']}/{dense}/bias", shape[:1], lambda a: a)
        for ln, hf in ((f["ln1"], "layernorm_before"), (f["ln2"], "layernorm_after")):
            blk(f"{layer}.{hf}.weight", i, f"{ln}/scale", (d,), lambda a: a)
            blk(f"{layer}.{hf}.bias", i, f"{ln}/bias", (d,), lambda a: a)
    top(f"{prefix}layernorm.weight", "Transformer/encoder_norm/scale", (d,))
    top(f"{prefix}layernorm.bias", "Transformer/encoder_norm/bias", (d,))
    if pre_logits:
        r = config.pooler_output_size
        top("pooler.dense.weight", "pre_logits/kernel", (r, d), lambda a: a.T)
        top("pooler.dense.bias", "pre_logits/bias", (r,))
    if classes:
        top("classifier.weight", "head/kernel", (classes, d), lambda a: a.T)
        top("classifier.bias", "head/bias", (classes,))
    out = Converted(config, model_class, LazyState(path, entries), flags, description=name)
    out.check()
    return out


def _backbone_config(z: _Npz, path: Path, num_groups: int | None) -> BitConfig:
    """The BiT backbone of an R+ViT hybrid, from ``conv_root`` (7, 7, C, stem) and each unit's
    ``conv3`` (1, 1, mid, out) kernel shape."""
    _, _, channels, stem = z.shape("conv_root/kernel")
    units = {}
    for k in z.keys:
        if m := _UNIT_CONV3.match(k):
            _, _, mid, out = z.shape(k)
            units[int(m.group(1)) - 1, int(m.group(2)) - 1] = (mid, out)
    return bit_config_from_units(path, num_channels=channels, embedding_size=stem, units=units,
                                 num_groups=num_groups, **VIT_RESNET_NUMERICS)


def _backbone_key(name: str) -> str:
    """A canonical BiT name (below ``...backbone.bit.``) → the vision_transformer ResNet key."""
    stage, unit, module, leaf = _CANONICAL_BIT.fullmatch(name).groups()
    if stage is None:
        scope = {"convolution": "conv_root", "norm": "gn_root"}[module]
    else:
        local = {"downsample.conv": "conv_proj", "downsample.norm": "gn_proj"}.get(module, module.replace("norm", "gn"))
        scope = f"block{int(stage) + 1}/unit{int(unit) + 1}/{local}"
    if scope.rsplit("/", 1)[-1].startswith("conv"):
        return f"{scope}/kernel"
    return f"{scope}/{'scale' if leaf == 'weight' else 'bias'}"


def _has_block(z: _Npz, scanned: bool, rest: str) -> bool:
    return (f"Transformer/encoderblock/{rest}" if scanned else f"Transformer/encoderblock_0/{rest}") in z
