"""Model outputs with HF 4.x semantics, shared by every framework.

An output is a dataclass whose fields may be ``None``. Like HF's ``ModelOutput`` it behaves as
an ordered mapping over the fields that are set: ``out.logits``, ``out["logits"]``, ``out[0]``
(the first field that is not ``None``) and ``out.to_tuple()`` all work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "ModelOutput",
    "BaseModelOutput",
    "BaseModelOutputWithPooling",
    "ImageClassifierOutput",
    "MaskedImageModelingOutput",
]


@dataclass
class ModelOutput:
    """Base class: ordered mapping over the fields that are not ``None``."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    """``last_hidden_state`` (B, 1 + num_patches, D); ``pooler_output`` (B, pooler_output_size)."""

    last_hidden_state: Any = None
    pooler_output: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    """``loss`` scalar; ``logits`` (B, num_labels)."""

    loss: Any = None
    logits: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None


@dataclass
class MaskedImageModelingOutput(ModelOutput):
    """``loss`` scalar (masked L1); ``reconstruction`` (B, C, H, W)."""

    loss: Any = None
    reconstruction: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None
