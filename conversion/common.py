"""Shared pieces of the converters: the reader result, a lazy state mapping, naming helpers.

Every reader returns a :class:`Converted`: a :class:`~vit_core.config.ViTConfig`, the canonical
model class name (``ViTModel`` / ``ViTForImageClassification`` / ``ViTForMaskedImageModeling``)
with its table flags, and a :class:`LazyState` mapping canonical HF-PyTorch names to numpy arrays
in PyTorch layout. Tensors are produced one at a time on access, so a converter streaming from a
memory-mapped file never holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from vit_core.config import ViTConfig
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import BASE_MODEL_PREFIX, Kind, param_specs

__all__ = [
    "UnsupportedFeatureError",
    "LazyState",
    "Converted",
    "STANDARD_HEADS",
    "heads_for_width",
    "model_class_of",
    "kinds_of",
    "float_array",
    "require_hf_legacy_class",
]

#: Attention heads of the standard widths (ViT/DeiT Ti, S, B, L, H).
STANDARD_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


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


def model_class_of(keys: set[str] | Mapping[str, object]) -> tuple[str, dict[str, bool]]:
    """The canonical model class (and ``ViTModel`` flags) that a set of canonical names belongs to."""
    names = set(keys)
    if any(k.startswith("classifier.") for k in names):
        return "ViTForImageClassification", {}
    if any(k.startswith("decoder.") for k in names):
        return "ViTForMaskedImageModeling", {}
    bare = {k.removeprefix(f"{BASE_MODEL_PREFIX}.") for k in names}
    return "ViTModel", {
        "add_pooling_layer": "pooler.dense.weight" in bare,
        "use_mask_token": "embeddings.mask_token" in bare,
    }


def kinds_of(model_class: str, config: ViTConfig, flags: Mapping[str, bool]) -> dict[str, Kind]:
    """Canonical name → layout kind, from the weight table of ``model_class``."""
    return {s.name: s.kind for s in param_specs(model_class, config, **flags)}


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
    description: str = ""  # one line for the CLI: "12 layers, width 768, ..."

    def __iter__(self):  # ``config, model_class, state = read_xxx(...)``
        return iter((self.config, self.model_class, self.state))

    def summary(self) -> str:
        c = self.config
        head = f"{c.num_labels} classes" if self.model_class == "ViTForImageClassification" else "no head"
        return (
            f"{c.num_hidden_layers} layers, width {c.hidden_size}, {c.num_attention_heads} heads, "
            f"MLP {c.intermediate_size}, patch {c.patch_size}, image {c.image_size}, {head}, "
            f"act {c.hidden_act}, eps {c.layer_norm_eps:g} -> {self.model_class}"
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
