"""Shared pieces of the converters: the reader result, a lazy state mapping, naming helpers.

Every reader returns a :class:`Converted`: a :class:`~vit_core.config.ViTConfig` (a
:class:`~vit_core.config_hybrid.ViTHybridConfig` for BiT hybrids), the canonical model class name
(``ViTModel`` / ``ViTForImageClassification`` / ``ViTForMaskedImageModeling`` / ``ViTHybridModel`` /
``ViTHybridForImageClassification``) with its table flags, and a :class:`LazyState` mapping canonical
HF-PyTorch names to numpy arrays in PyTorch layout. Tensors are produced one at a time on access, so
a converter streaming from a memory-mapped file never holds the whole model.

The hybrid readers (timm, vision_transformer ``.npz``) share the backbone derivation here:
:func:`bit_config_from_units` (depths and widths from the residual units' kernel shapes) and
:func:`hybrid_image_size` (the image size whose token grid the position embeddings cover).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vit_core.config import ViTConfig
from vit_core.config_hybrid import BOTTLE_RATIO, BitConfig, ViTHybridConfig, make_div
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import BASE_MODEL_PREFIX, Kind, ParamSpec, bit_specs, param_specs

__all__ = [
    "UnsupportedFeatureError",
    "LazyState",
    "Converted",
    "STANDARD_HEADS",
    "BIT_NUM_GROUPS",
    "heads_for_width",
    "class_name",
    "model_class_of",
    "bit_config_from_units",
    "hybrid_image_size",
    "make_config",
    "backbone_rows",
    "kinds_of",
    "float_array",
    "MAX_EXPANSION",
    "check_array",
    "require_hf_legacy_class",
]

#: Attention heads of the standard widths (ViT/DeiT Ti, S, B, L, H).
STANDARD_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
#: GroupNorm groups of every BiT backbone we read (timm's ``GroupNormAct``, flax ``nn.GroupNorm``'s default);
#: files do not record it.
BIT_NUM_GROUPS = 32


class UnsupportedFeatureError(CheckpointError):
    """The source uses an architecture feature HF's ViT cannot express; the message names it."""


def heads_for_width(width: int, num_heads: int | None, source: object) -> int:
    """``num_heads`` if given, else the standard head count of ``width``."""
    if num_heads is not None:
        if num_heads <= 0 or width % num_heads:
            raise CheckpointError(f"{source}: --num-heads {num_heads} does not divide the width {width}")
        return num_heads
    if width not in STANDARD_HEADS:
        raise CheckpointError(
            f"{source}: width {width} is not a standard ViT width {sorted(STANDARD_HEADS)}; "
            "the file does not record the number of attention heads, pass --num-heads N"
        )
    return STANDARD_HEADS[width]


class LazyState(Mapping[str, np.ndarray]):
    """``{canonical name: array}`` whose values are computed on access from zero-arg loaders.

    ``shape(key)`` answers without reading data; :meth:`loaders` hands the callables to
    :func:`vit_core.checkpoint.write_checkpoint`, which then streams tensor by tensor.
    """

    def __init__(self, source: object, entries: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]):
        self.source = source
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> np.ndarray:
        shape, load = self._entries[key]
        arr = load()
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{self.source}: key {key!r} has shape {list(arr.shape)}, expected {list(shape)}")
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][0]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[0] for k, v in self._entries.items()}

    def loaders(self) -> dict[str, Callable[[], np.ndarray]]:
        return {k: (lambda k=k: self[k]) for k in self._entries}


def class_name(config: ViTConfig | None, task: str) -> str:
    """The canonical class of ``task`` (``"Model"``, ``"ForImageClassification"``, ...) for ``config``:
    ``ViT<task>`` or, for a :class:`ViTHybridConfig`, ``ViTHybrid<task>``."""
    return ("ViTHybrid" if isinstance(config, ViTHybridConfig) else "ViT") + task


def model_class_of(keys: set[str] | Mapping[str, object], config: ViTConfig | None = None) -> tuple[str, dict[str, bool]]:
    """The canonical model class (and bare-model flags) that a set of canonical names belongs to;
    the ``ViTHybrid*`` classes when ``config`` is a :class:`ViTHybridConfig`."""
    names = set(keys)
    if any(k.startswith("classifier.") for k in names):
        return class_name(config, "ForImageClassification"), {}
    if any(k.startswith("decoder.") for k in names):
        if isinstance(config, ViTHybridConfig):
            raise CheckpointError("a ViT Hybrid checkpoint with a masked-image-modeling decoder (decoder.*): "
                                  "HF has no ViTHybridForMaskedImageModeling")
        return "ViTForMaskedImageModeling", {}
    bare = {k.removeprefix(f"{BASE_MODEL_PREFIX}.") for k in names}
    return class_name(config, "Model"), {
        "add_pooling_layer": "pooler.dense.weight" in bare,
        "use_mask_token": "embeddings.mask_token" in bare,
    }


def bit_config_from_units(
    source: object,
    *,
    num_channels: int,
    embedding_size: int,
    units: Mapping[tuple[int, int], tuple[int, int]],
    num_groups: int | None = None,
    **numerics: Any,
) -> BitConfig:
    """The BiT bottleneck backbone (timm's ``ResNetV2(preact=False)``, vision_transformer's R50) that a
    file's residual units describe.

    ``units``: ``(stage, unit)`` (0-based) → ``(mid, out)`` channels, read from each unit's
    ``conv3`` kernel. Depths are the unit counts, ``hidden_sizes`` the stages' output widths; the
    stem width is ``embedding_size``. Both code bases use TF-style SAME padding everywhere (stem
    convolution and max-pool included) and take the last stage's map: ``global_padding="SAME"``,
    ``embedding_dynamic_padding=True``, ``out_features=[last stage]``. ``num_groups`` (default
    :data:`BIT_NUM_GROUPS`) must divide every normalised width. ``numerics``: the standardisation
    and GroupNorm knobs of the source (``weight_standardization``, ``..._eps``, ``group_norm_eps``).
    """
    if not units:
        raise UnsupportedFeatureError(
            f"{source}: a stem-only ResNet backbone (no residual units), which HF's BiT cannot express "
            "(BitConfig needs at least one stage)"
        )
    stages = sorted({s for s, _ in units})
    if stages != list(range(len(stages))):
        raise CheckpointError(f"{source}: backbone stages {[s + 1 for s in stages]} are not numbered consecutively")
    depths, widths = [], []
    for s in stages:
        idx = sorted(i for t, i in units if t == s)
        if idx != list(range(len(idx))):
            raise CheckpointError(f"{source}: stage {s + 1} has units {[i + 1 for i in idx]}, not numbered consecutively")
        shapes = {units[s, i] for i in idx}
        if len(shapes) != 1:
            raise CheckpointError(f"{source}: the units of stage {s + 1} disagree on their (mid, out) widths: "
                                  f"{sorted(shapes)}")
        ((mid, out),) = shapes
        if make_div(out) != out or mid != make_div(out * BOTTLE_RATIO):
            raise UnsupportedFeatureError(
                f"{source}: stage {s + 1} has a bottleneck of {mid} channels for {out} outputs; HF's BiT needs "
                f"{make_div(out * BOTTLE_RATIO)} (bottle ratio {BOTTLE_RATIO}, widths a multiple of 8)"
            )
        depths.append(len(idx))
        widths.append(out)
    groups = BIT_NUM_GROUPS if num_groups is None else num_groups
    mids = [units[s, 0][0] for s in stages]
    odd = [w for w in (embedding_size, *mids, *widths) if w % groups]
    if odd:
        raise CheckpointError(
            f"{source}: GroupNorm width {odd[0]} is not divisible by {groups} groups; the file does not record "
            "the group count: pass num_groups (--num-groups) with the value the model was built with"
        )
    return BitConfig(
        num_channels=num_channels, embedding_size=embedding_size, hidden_sizes=widths, depths=depths,
        layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True, num_groups=groups,
        out_features=[f"stage{len(depths)}"], **numerics,
    )


def hybrid_image_size(bit: BitConfig, patch_size: int, patch_tokens: int, source: object) -> int:
    """The square image size whose token grid has ``patch_tokens`` cells: grid side × the backbone's
    stride × ``patch_size`` (the feature map is cut into ``patch_size`` patches)."""
    grid = math.isqrt(patch_tokens)
    if grid * grid != patch_tokens:
        raise CheckpointError(f"{source}: the position embeddings cover {patch_tokens} patches, not a square grid")
    stride = 4 * math.prod(layers[0].stride for layers in bit.stage_layers())  # stem: conv /2, pool /2
    size = grid * stride * patch_size
    _, h, w = bit.feature_shape(size, size)
    if (h // patch_size, w // patch_size) != (grid, grid):  # a reader bug, not a file problem
        raise CheckpointError(f"{source}: image size {size} gives a {h}x{w} feature map, not a {grid}x{grid} token grid")
    return size


def make_config(bit: BitConfig | None, **fields: Any) -> ViTConfig:
    """A plain reader's ``ViTConfig`` (``encoder_stride`` = the patch size) or, given the backbone a
    hybrid's tensors describe, a ``ViTHybridConfig`` over it."""
    if bit is None:
        return ViTConfig(**fields, encoder_stride=fields["patch_size"])
    return ViTHybridConfig(**fields, backbone_config=bit)


def backbone_rows(
    bit: BitConfig, prefix: str, source_key: Callable[[str], str], backbone_keys: Iterable[str], source: object
) -> list[tuple[ParamSpec, str]]:
    """Every canonical backbone row (``{prefix}embeddings.patch_embeddings.backbone.bit.*``, from the weight
    table) with the source key it reads: ``source_key(name below backbone.bit.)``. Source backbone keys
    that no row reads (``backbone_keys`` minus those) are refused: HF's BiT has no place for them."""
    below = f"{prefix}embeddings.patch_embeddings.backbone.bit."
    rows = [(spec, source_key(spec.name.removeprefix(below))) for spec in bit_specs(bit, prefix=below)]
    unused = sorted(set(backbone_keys) - {key for _, key in rows})
    if unused:
        raise UnsupportedFeatureError(
            f"{source}: backbone keys HF's BiT has no place for (not a bottleneck ResNetV2 as the hybrids "
            f"build it): {unused[:8]}"
        )
    return rows


def kinds_of(model_class: str, config: ViTConfig, flags: Mapping[str, bool]) -> dict[str, Kind]:
    """Canonical name → layout kind, from the weight table of ``model_class``."""
    return {s.name: s.kind for s in param_specs(model_class, config, **flags)}


#: A container holds at most this many bytes of array data per byte of file (deflate's ceiling is ~1032:1).
MAX_EXPANSION = 1100


def check_array(source: object, key: str, shape: tuple[int, ...], dtype: np.dtype, file_size: int,
                expansion: int | None = None) -> None:
    """Refuse, before reading it, an array whose header names a non-numeric dtype or more data than a
    ``file_size``-byte container can hold (``expansion`` bytes per file byte, default
    :data:`MAX_EXPANSION`): a corrupt header must not make a reader allocate more than the file could
    ever expand to."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "fiu" and dtype.name != "bfloat16":
        raise CheckpointError(f"{source}: {key!r} has dtype {dtype}, not a number array")
    if any(n < 0 for n in shape) or math.prod(shape) * dtype.itemsize > (expansion or MAX_EXPANSION) * file_size + 4096:
        raise CheckpointError(f"{source}: {key!r} claims shape {list(shape)} {dtype}, more data than the "
                              f"{file_size}-byte file can hold; the file is corrupt")


def float_array(arr: np.ndarray) -> np.ndarray:
    """A float array as is; bfloat16 (ml_dtypes) widened exactly to float32."""
    return arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr


@dataclass
class Converted:
    """What every reader returns: config, canonical model class (+ flags) and the lazy state."""

    config: ViTConfig
    model_class: str
    state: LazyState
    flags: dict[str, bool] = field(default_factory=dict)
    description: str = ""  # what was read, e.g. the npz flavour and block spelling; summary() appends it

    def __iter__(self):  # ``config, model_class, state = read_xxx(...)``
        return iter((self.config, self.model_class, self.state))

    def summary(self) -> str:
        c = self.config
        head = f"{c.num_labels} classes" if self.model_class.endswith("ForImageClassification") else "no head"
        backbone = ""
        if isinstance(c, ViTHybridConfig):
            b = c.bit
            backbone = (
                f"BiT {b.layer_type} backbone (stem {b.embedding_size}, depths {b.depths}, widths "
                f"{b.stage_channels()[1:]}, {b.num_groups} groups, {b.weight_standardization} "
                f"{b.weight_standardization_eps:g}, GroupNorm eps {b.group_norm_eps:g}) + "
            )
        return (
            f"{backbone}{c.num_hidden_layers} layers, width {c.hidden_size}, {c.num_attention_heads} heads, "
            f"MLP {c.intermediate_size}, patch {c.patch_size}, image {c.image_size}, {head}, "
            f"act {c.hidden_act}, eps {c.layer_norm_eps:g} -> {self.model_class}"
            + (f" [{self.description}]" if self.description else "")
        )

    def check(self) -> None:
        """Every tensor has the shape the weight table wants (a reader bug or an odd file shows here)."""
        want = {s.name: s.shape for s in param_specs(self.model_class, self.config, **self.flags)}
        got = self.state.shapes()
        if set(want) != set(got):
            raise CheckpointError(
                f"{self.state.source}: converted names disagree with the {self.model_class} table: "
                f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
            )
        bad = [f"{k}: {list(got[k])} vs {list(want[k])}" for k in want if tuple(got[k]) != tuple(want[k])]
        if bad:
            raise CheckpointError(f"{self.state.source}: converted shapes disagree with the table: {bad}")


def require_hf_legacy_class(model_class: str, flags: Mapping[str, bool], framework: str, known: Mapping) -> None:
    """HF's TF and Flax have only ``ViTModel`` (no mask token) and ``ViTForImageClassification``."""
    if model_class not in known or flags.get("use_mask_token"):
        what = model_class + (" with a mask token" if flags.get("use_mask_token") else "")
        raise CheckpointError(f"HF {framework} has no {what}; write it with --to hf instead")
