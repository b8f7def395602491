"""JAX ``.npz`` ViT checkpoints → canonical: google-research/vision_transformer and big_vision.

Both store flax parameter trees flattened with ``/``. Layouts are flax's: Dense kernels are
(in, out), the patch-embedding Conv kernel is (p, p, C, D), attention projections are
DenseGeneral kernels (D, heads, head_dim) for query/key/value and (heads, head_dim, D) for
``out``. Both use flax's ``nn.gelu`` (the *tanh approximation* by default, mapped to trivit's
``gelu_new``, the same formula; ``exact_gelu=True`` picks exact ``gelu`` for checkpoints trained
with it) and flax LayerNorm's eps 1e-6.

*Original* (vision_transformer): ``cls``, ``embedding/*``, ``Transformer/posembed_input/
pos_embedding`` (1, N+1, D) covering the class token, blocks ``Transformer/encoderblock_{i}/``
with ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3`` in the
published files (pre-Linen flax) or ``LayerNorm_0``, ``MultiHeadDotProductAttention_0``,
``LayerNorm_1``, ``MlpBlock_0`` when the same code saves under current flax (see :data:`SPELLINGS`;
both are read, the one found is reported in ``Converted.description``), ``Transformer/encoder_norm``,
``head``, optional ``pre_logits`` (Dense + tanh → HF's pooler).

*big_vision*: the same under an optional ``params/`` prefix, with the Linen block names (or one stacked
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
so HF's zero pad is the same function). A stem-only ResNet (``R_Ti_16``) is refused. Pre-Linen files
store GroupNorm ``scale``/``bias`` as (1, 1, 1, C), Linen ones as (C,): both are read.
"""

from __future__ import annotations

import lzma
import math
import os
import re
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vit_core.config_hybrid import BitConfig
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import Kind

from .common import (MAX_EXPANSION, Converted, LazyState, UnsupportedFeatureError, backbone_rows, bit_config_from_units,
                     class_name, float_array, hybrid_image_size, make_config)

__all__ = ["read_npz", "npz_flavour", "SPELLINGS", "NPZ_ERRORS"]

#: Where each flavour keeps its position embedding, and whether it covers the class token.
_FLAVOURS = {
    "npz": dict(pos="Transformer/posembed_input/pos_embedding", pos_has_cls=True),
    "big_vision": dict(pos="pos_embedding", pos_has_cls=False),
}
#: The encoder block's auto-named submodules, by spelling: ``{spelling: (description, {role: name})}``.
#: The published vision_transformer files were written by the pre-Linen ``flax.nn`` API, which numbers
#: a module's submodules across all of them; Linen (everything since, big_vision and vision_transformer
#: run under current flax) numbers them per module type. Every other name is explicit in both code
#: bases (``embedding``, ``cls``, ``Transformer/{posembed_input,encoderblock_N,encoder_norm}``,
#: ``pre_logits``, ``head``, the ResNet's ``conv_root``/``gn_root``/``block{s}/unit{u}/...`` and the
#: MLP's ``Dense_0``/``Dense_1``, which both count the same way), so only these four differ.
SPELLINGS: dict[str, tuple[str, dict[str, str]]] = {
    "pre-linen": ("pre-Linen names, counted across a block's submodules (the published files)",
                  dict(ln1="LayerNorm_0", attn="MultiHeadDotProductAttention_1", ln2="LayerNorm_2", mlp="MlpBlock_3")),
    "linen": ("Linen names, counted per module type (current flax; big_vision)",
              dict(ln1="LayerNorm_0", attn="MultiHeadDotProductAttention_0", ln2="LayerNorm_1", mlp="MlpBlock_0")),
}
#: What reading a zip member can raise on a corrupt archive (RuntimeError: an encrypted member;
#: NotImplementedError: an unknown compression method; TokenError / SyntaxError / TypeError: numpy parsing a
#: garbled ``.npy`` header, found by the fuzz run); every one becomes a CheckpointError.
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error,
              lzma.LZMAError, struct.error, tokenize.TokenError, SyntaxError, TypeError)


def _known_spellings() -> str:
    return "; ".join(f"{k}: {', '.join(v[1].values())} ({v[0]})" for k, v in SPELLINGS.items())


#: vision_transformer's ResNet numerics: ``StdConv`` (w-μ)/(σ+1e-5), flax ``nn.GroupNorm`` eps 1e-6.
VIT_RESNET_NUMERICS = {"weight_standardization": "std_eps", "weight_standardization_eps": 1e-5, "group_norm_eps": 1e-6}
_RESNET_KEY = re.compile(r"^(conv_root|gn_root|block\d+)/")
_UNIT_CONV3 = re.compile(r"^block(\d+)/unit(\d+)/conv3/kernel$")
_CANONICAL_BIT = re.compile(r"(?:embedder|encoder\.stages\.(\d+)\.layers\.(\d+))\.(.+)\.(weight|bias)")


class _Npz:
    """Lazy member access to an ``.npz`` (a zip of ``.npy`` files; no pickles), errors naming the file and key.

    Each member's ``.npy`` header is checked before its data is read: a numeric dtype (or the 2-byte
    voids numpy writes for bfloat16, widened exactly to float32), and exactly as many data bytes as
    the member holds, so a corrupt header can never make the reader allocate more than the file has.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
        except NPZ_ERRORS as e:
            raise CheckpointError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
        names = {i.filename.removesuffix(".npy"): i for i in infos}
        self.prefix = "params/" if any(n.startswith("params/") for n in names) else ""
        self._members = {n.removeprefix(self.prefix): i for n, i in names.items() if n.startswith(self.prefix)}
        self.keys = set(self._members)
        self._headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def _header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        if key in self._headers:
            return self._headers[key]
        info = self._members.get(key)
        if info is None:
            raise CheckpointError(f"{self.path}: key {key!r} is missing")
        try:
            with self._zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f".npy format version {version}")
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                offset = f.tell()
        except NPZ_ERRORS as e:
            raise CheckpointError(f"{self.path}: key {key!r} is corrupt ({type(e).__name__}: {e})") from None
        if dtype.kind not in "fiu" and not (dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None):
            raise CheckpointError(f"{self.path}: key {key!r} has dtype {dtype}, not a number array")
        nbytes = math.prod(shape) * dtype.itemsize
        stored = info.compress_type == zipfile.ZIP_STORED
        if (nbytes != info.file_size - offset or (stored and info.file_size != info.compress_size)
                or info.file_size > MAX_EXPANSION * info.compress_size + 4096):
            raise CheckpointError(
                f"{self.path}: key {key!r} is corrupt: its header says shape {list(shape)} {dtype} ({nbytes} bytes), "
                f"but the member holds {info.file_size - offset} data bytes ({info.compress_size} stored)"
            )
        self._headers[key] = (tuple(shape), dtype)
        return self._headers[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape from the ``.npy`` header, without reading the data."""
        return self._header(key)[0]

    def __getitem__(self, key: str) -> np.ndarray:
        _, dtype = self._header(key)
        try:
            with self._zip.open(self._members[key]) as f:
                arr = np.lib.format.read_array(f, allow_pickle=False)
        except NPZ_ERRORS as e:
            raise CheckpointError(f"{self.path}: key {key!r} cannot be read ({type(e).__name__}: {e})") from None
        if dtype.kind == "V":  # numpy stores bfloat16 as 2-byte voids: widen the bits exactly
            return (arr.view("<u2").astype(np.uint32) << 16).view(np.float32)
        return float_array(arr)


def npz_flavour(keys: set[str]) -> str:
    """``"npz"`` (original vision_transformer, either spelling) or ``"big_vision"``, from the key names."""
    bare = {k.removeprefix("params/") for k in keys}
    if any("MultiHeadDotProductAttention_1" in k for k in bare) or "Transformer/posembed_input/pos_embedding" in bare:
        return "npz"
    return "big_vision"


def _block_spelling(z: _Npz, block: str, path: Path) -> str:
    """The spelling (a :data:`SPELLINGS` key) of the submodules under ``block`` (``Transformer/encoderblock_0/``)."""
    found = {k[len(block):].split("/", 1)[0] for k in z.keys if k.startswith(block)}
    for name, (_, roles) in SPELLINGS.items():
        if found == set(roles.values()):
            return name
    best = max(SPELLINGS.values(), key=lambda s: len(found & set(s[1].values())))[1]
    extra, missing = sorted(found - set(best.values())), sorted(set(best.values()) - found)
    raise CheckpointError(
        f"{path}: {block} has submodules {sorted(found)}, which match no known spelling"
        + (f"; first unexpected: {block}{extra[0]}" if extra else "")
        + (f"; first missing: {block}{missing[0]}" if missing else "")
        + f". Known spellings: {_known_spellings()}"
    )


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
    when ``None``), in either block spelling (:data:`SPELLINGS`, detected).

    ``num_labels=0`` drops the head (and keeps ``pre_logits`` as the pooler); another value
    must equal the head's class count. ``num_heads``, if given, must match the kernels.
    ``num_groups``: the hybrid ResNet's GroupNorm groups (default 32, flax's). Every key of the file
    must be read: the first one that is not is named (with the known spellings). The returned
    ``description`` says which flavour and spelling were read (the CLI prints it).
    """
    path = Path(path)
    z = _Npz(path)
    if "embedding/kernel" not in z or not any(k.startswith("Transformer/") for k in z.keys):
        raise CheckpointError(f"{path}: not a vision_transformer / big_vision ViT checkpoint: it has no "
                              f"'embedding/kernel' or no 'Transformer/...' keys (found e.g. {sorted(z.keys)[:4]})")
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

    scanned = any(k.startswith("Transformer/encoderblock/") for k in z.keys)
    first = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    if not any(k.startswith(first) for k in z.keys):
        raise CheckpointError(f"{path}: no encoder blocks found (expected keys under {first}). "
                              f"Known spellings: {_known_spellings()}")
    spelling = _block_spelling(z, first, path)
    s = SPELLINGS[spelling][1]
    used: set[str] = set()  # every source key some tensor reads

    def expect(key: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
        """``key``'s shape, which must be one of ``shapes`` (any, if none given)."""
        got = z.shape(key)
        if shapes and got not in shapes:
            want = " or ".join(str(list(sh)) for sh in shapes)
            raise CheckpointError(f"{path}: key {key!r} has shape {list(got)}, expected {want}")
        used.add(key)
        return got

    def ndim(key: str, n: int) -> tuple[int, ...]:
        got = z.shape(key)
        if len(got) != n:
            raise CheckpointError(f"{path}: key {key!r} has shape {list(got)}, expected {n} dimensions")
        return got

    if scanned:
        depth = ndim(f"{first}{s['ln1']}/scale", 2)[0]
    else:
        depth = sum(1 for k in z.keys if re.fullmatch(r"Transformer/encoderblock_\d+/" + s["ln1"] + "/scale", k))
    if depth == 0 or (not scanned and any(f"Transformer/encoderblock_{i}/{s['ln1']}/scale" not in z for i in range(depth))):
        raise CheckpointError(f"{path}: encoder blocks are not numbered 0..N-1 "
                              f"(expected Transformer/encoderblock_{{i}}/{s['ln1']}/scale for i < {depth})")
    for i in range(1, 1 if scanned else depth):
        other = _block_spelling(z, f"Transformer/encoderblock_{i}/", path)
        if other != spelling:
            odd = sorted(set(SPELLINGS[other][1].values()) - set(s.values()))
            raise CheckpointError(
                f"{path}: Transformer/encoderblock_{i}/ uses the {other} spelling but encoderblock_0/ the {spelling} "
                f"one; first unexpected: Transformer/encoderblock_{i}/{odd[0]}. Known spellings: {_known_spellings()}"
            )

    def bkey(i: int, rest: str) -> str:
        return f"{first}{rest}" if scanned else f"Transformer/encoderblock_{i}/{rest}"

    def bshape(rest: str, n: int) -> tuple[int, ...]:
        return ndim(bkey(0, rest), n + scanned)[scanned:]

    p, p2, embedded, width = ndim("embedding/kernel", 4)
    channels = embedded
    bit = None
    gn_spelling = ""
    if "conv_root/kernel" in z:
        bit = _backbone_config(z, path, num_groups, ndim)
        channels = bit.num_channels  # the embedding convolution reads the feature map, not the pixels
    elif num_groups is not None:
        raise CheckpointError(f"{path}: num_groups applies to hybrid (ResNet + ViT) checkpoints only; this is a plain ViT")
    _, heads, head_dim = bshape(f"{s['attn']}/query/kernel", 3)
    if p != p2 or heads * head_dim != width:
        raise CheckpointError(f"{path}: embedding/kernel {[p, p2, embedded, width]} and the attention kernels "
                              f"({heads} heads x {head_dim}) do not describe one ViT (square patches, heads x head_dim = width)")
    if num_heads is not None and num_heads != heads:
        raise CheckpointError(f"{path}: the attention kernels have {heads} heads, not --num-heads {num_heads}")
    mlp = bshape(f"{s['mlp']}/Dense_0/kernel", 2)[1]
    pos_tokens = ndim(f["pos"], 3)[1]
    tokens = pos_tokens + (0 if f["pos_has_cls"] else 1)
    grid = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or grid * grid != tokens - 1:
        raise CheckpointError(f"{path}: {f['pos']} has {tokens - 1} patch positions, not a square grid")
    image_size = grid * p if bit is None else hybrid_image_size(bit, p, tokens - 1, path)
    head_classes = ndim("head/kernel", 2)[1] if "head/kernel" in z else 0
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
    pooler = ndim("pre_logits/kernel", 2)[1] if pre_logits else None
    if min(p, embedded, width, heads, head_dim, mlp, pooler or 1) <= 0:
        raise CheckpointError(f"{path}: a zero-sized dimension (patch {p}, channels {embedded}, width {width}, "
                              f"{heads} heads x {head_dim}, MLP {mlp}, pre_logits {pooler})")
    try:
        config = make_config(
            bit, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
            hidden_act="gelu" if exact_gelu else "gelu_new", layer_norm_eps=1e-6, image_size=image_size,
            patch_size=p, num_channels=channels, num_labels=classes, pooler_output_size=pooler,
            qkv_bias=bkey(0, f"{s['attn']}/query/bias") in z,
        )
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its tensors describe no valid ViT config ({e})") from None
    if classes:
        model_class, flags, prefix = class_name(config, "ForImageClassification"), {}, "vit."
    else:
        model_class, flags, prefix = class_name(config, "Model"), {"add_pooling_layer": pre_logits}, ""
    d, hd = width, head_dim
    entries: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}

    def top(dst: str, key: str, src: tuple[int, ...], shape: tuple[int, ...],
            fn: Callable[[np.ndarray], np.ndarray] = lambda a: a, *alternatives: tuple[int, ...]) -> None:
        expect(key, src, *alternatives)  # fail early, naming the key, if it is missing or misshapen
        entries[dst] = (shape, lambda: np.ascontiguousarray(fn(z[key]).reshape(shape)))

    def blk(dst: str, rest: str, src: tuple[int, ...], fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> None:
        for i in range(depth):
            key = bkey(i, rest)
            expect(key, (depth, *src) if scanned else src)
            load = (lambda key=key, i=i: z[key][i]) if scanned else (lambda key=key: z[key])
            entries[dst.format(i=i)] = (shape, lambda load=load: np.ascontiguousarray(fn(load())))

    top(f"{prefix}embeddings.cls_token", "cls", (1, 1, d), (1, 1, d))
    if f["pos_has_cls"]:
        top(f"{prefix}embeddings.position_embeddings", f["pos"], (1, tokens, d), (1, tokens, d))
    else:
        top(f"{prefix}embeddings.position_embeddings", f["pos"], (1, tokens - 1, d), (1, tokens, d),
            lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], axis=1))
    top(f"{prefix}embeddings.patch_embeddings.projection.weight", "embedding/kernel", (p, p, embedded, d),
        (d, embedded, p, p), lambda a: a.transpose(3, 2, 0, 1))
    top(f"{prefix}embeddings.patch_embeddings.projection.bias", "embedding/bias", (d,), (d,))
    if bit is not None:
        for spec, key in backbone_rows(bit, prefix, _backbone_key, (k for k in z.keys if _RESNET_KEY.match(k)), path):
            if spec.kind is Kind.CONV_WEIGHT:  # flax (kh, kw, in, out) -> (out, in, kh, kw)
                cout, cin, kh, kw = spec.shape
                top(spec.name, key, (kh, kw, cin, cout), spec.shape, lambda a: a.transpose(3, 2, 0, 1))
            else:  # GroupNorm scale / bias: (C,), or (1, 1, 1, C) as pre-Linen flax stored them
                top(spec.name, key, spec.shape, spec.shape, lambda a: a, (1, 1, 1, *spec.shape))
                if z.shape(key) != spec.shape:
                    gn_spelling = "; GroupNorm scale/bias (1, 1, 1, C) (pre-Linen)"
    layer = prefix + "encoder.layer.{i}"
    for proj in ("query", "key", "value"):
        blk(f"{layer}.attention.attention.{proj}.weight", f"{s['attn']}/{proj}/kernel", (d, heads, hd),
            lambda a: a.reshape(d, d).T, (d, d))
        if config.qkv_bias:
            blk(f"{layer}.attention.attention.{proj}.bias", f"{s['attn']}/{proj}/bias", (heads, hd),
                lambda a: a.reshape(d), (d,))
    blk(f"{layer}.attention.output.dense.weight", f"{s['attn']}/out/kernel", (heads, hd, d),
        lambda a: a.reshape(d, d).T, (d, d))
    blk(f"{layer}.attention.output.dense.bias", f"{s['attn']}/out/bias", (d,), lambda a: a, (d,))
    for dense, hf, src in (("Dense_0", "intermediate.dense", (d, mlp)), ("Dense_1", "output.dense", (mlp, d))):
        blk(f"{layer}.{hf}.weight", f"{s['mlp']}/{dense}/kernel", src, lambda a: a.T, src[::-1])
        blk(f"{layer}.{hf}.bias", f"{s['mlp']}/{dense}/bias", src[1:], lambda a: a, src[1:])
    for ln, hf in ((s["ln1"], "layernorm_before"), (s["ln2"], "layernorm_after")):
        blk(f"{layer}.{hf}.weight", f"{ln}/scale", (d,), lambda a: a, (d,))
        blk(f"{layer}.{hf}.bias", f"{ln}/bias", (d,), lambda a: a, (d,))
    top(f"{prefix}layernorm.weight", "Transformer/encoder_norm/scale", (d,), (d,))
    top(f"{prefix}layernorm.bias", "Transformer/encoder_norm/bias", (d,), (d,))
    if pre_logits:
        r = config.pooler_output_size
        top("pooler.dense.weight", "pre_logits/kernel", (d, r), (r, d), lambda a: a.T)
        top("pooler.dense.bias", "pre_logits/bias", (r,), (r,))
    if classes:
        top("classifier.weight", "head/kernel", (d, classes), (classes, d), lambda a: a.T)
        top("classifier.bias", "head/bias", (classes,), (classes,))
    else:  # num_labels=0 drops the head on purpose
        used |= {k for k in z.keys if k.startswith("head/")}
    unread = sorted(z.keys - used)
    if unread:
        raise CheckpointError(
            f"{path}: {len(unread)} key(s) of the file fit no tensor of the {model_class} it describes; first "
            f"unexpected: {unread[0]!r} (read as {name} with {spelling} block names). Known spellings: {_known_spellings()}"
        )
    description = f"{name}, {SPELLINGS[spelling][0]}{gn_spelling}"
    out = Converted(config, model_class, LazyState(path, entries), flags, description=description)
    out.check()
    return out


def _backbone_config(z: _Npz, path: Path, num_groups: int | None, ndim: Callable[[str, int], tuple[int, ...]]) -> BitConfig:
    """The BiT backbone of an R+ViT hybrid, from ``conv_root`` (7, 7, C, stem) and each unit's
    ``conv3`` (1, 1, mid, out) kernel shape (``ndim(key, n)``: a key's shape, checked to have n axes)."""
    _, _, channels, stem = ndim("conv_root/kernel", 4)
    units = {}
    for k in z.keys:
        if m := _UNIT_CONV3.match(k):
            _, _, mid, out = ndim(k, 4)
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
