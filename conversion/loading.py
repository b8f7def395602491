"""Opening any checkpoint for the frameworks' ``from_pretrained``: the conversion layer's entry.

vit_core decides everything format-independent (keywords, config, matching, warnings) and reads
the canonical files (safetensors, ``pytorch_model.bin``); this module adds the foreign readers:
single timm / google-research ``.npz`` / big_vision files (config derived from the tensors) and
HF folders holding only ``tf_model.h5`` or ``flax_model.msgpack``. Each framework calls
:func:`resolve_pretrained_args` and :func:`match_checkpoint` from here, nothing else. Heavy
dependencies (torch, h5py, flax) load only when a file that needs them is opened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vit_core import checkpoint as _checkpoint
from vit_core import pretrained as _pretrained
from vit_core.checkpoint import CheckpointState
from vit_core.config import ViTConfig
from vit_core.weights import LoadPlan, ParamSpec

__all__ = ["FOREIGN_READERS", "read_checkpoint", "read_foreign_file", "resolve_pretrained_args", "match_checkpoint"]


def _read_tf_h5(path: Path) -> Mapping[str, Any]:
    from .hf_tf import read_tf_h5_state

    return read_tf_h5_state(path)


def _read_flax_msgpack(path: Path) -> Mapping[str, Any]:
    from .hf_flax import read_flax_msgpack_state

    return read_flax_msgpack_state(path)


#: HF weight files vit_core cannot decode, by suffix (see :func:`vit_core.checkpoint.read_checkpoint`).
FOREIGN_READERS: dict[str, Any] = {".h5": _read_tf_h5, ".msgpack": _read_flax_msgpack}


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointState:
    """Any HF checkpoint folder (or one weight file in it), TF and Flax ones included, as lazy canonical tensors."""
    return _checkpoint.read_checkpoint(path, readers=FOREIGN_READERS)


def read_foreign_file(path: Path, options: dict[str, Any]) -> tuple[ViTConfig, Mapping[str, Any]]:
    """A single timm / ``.npz`` / big_vision file: (config derived from it, lazy canonical state)."""
    from .detect import read_source

    _, converted = read_source(path, **options)
    return converted.config, converted.state


def resolve_pretrained_args(
    model_cls: type,
    path: str | os.PathLike[str],
    config: ViTConfig | None,
    kwargs: dict[str, Any],
    config_class: type[ViTConfig] = ViTConfig,
) -> tuple[Path, ViTConfig, dict[str, Any], Mapping[str, Any] | None]:
    """:func:`vit_core.pretrained.resolve_pretrained_args` with the foreign single-file reader."""
    return _pretrained.resolve_pretrained_args(model_cls, path, config, kwargs, config_class, read_file=read_foreign_file)


def match_checkpoint(specs: list[ParamSpec], path: Path, **options: Any) -> tuple[CheckpointState, LoadPlan]:
    """:func:`vit_core.pretrained.match_checkpoint` reading every HF format (see :func:`read_checkpoint`)."""
    options.setdefault("stacklevel", 5)  # one frame more than the core's default: this one
    return _pretrained.match_checkpoint(specs, path, read=read_checkpoint, **options)
