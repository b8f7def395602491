"""Checkpoint conversion into and out of trivit's canonical (HF PyTorch) layout.

Readers (each returns :class:`~conversion.common.Converted` = config, model class, lazy state):
:func:`read_timm` (timm ``vit_*``/``deit_*`` state dicts), :func:`read_npz` (google-research
vision_transformer and big_vision ``.npz``), :func:`read_hf` (HF folders, including TF
``tf_model.h5`` and Flax ``flax_model.msgpack``). Writers: the canonical folder
(:func:`vit_core.checkpoint.write_checkpoint`), :func:`write_tf_h5`, :func:`write_flax_msgpack`.
:mod:`conversion.loading` opens any checkpoint for the frameworks' ``from_pretrained``.
Heavy dependencies (torch, h5py, flax) are imported only by the functions that need them.
This layer imports vit_core only (no framework, no CLI): running models to verify a
conversion lives above the frameworks, in ``trivit.convert``.
"""

from __future__ import annotations

#: Marks trivit's package (see :func:`vit_core.imports.import_trivit`): a user's ``conversion.py`` lacks it.
__trivit_package__ = "conversion"

from .common import Converted, LazyState, UnsupportedFeatureError
from .convert import TARGET_FORMATS, convert_to, write_converted
from .detect import SOURCE_FORMATS, detect_format, read_hf, read_source
from .hf_flax import read_flax_msgpack_state, write_flax_msgpack
from .hf_tf import read_tf_h5_state, write_tf_h5
from .loading import read_checkpoint
from .npz import read_npz
from .timm import read_timm

__all__ = [
    "Converted",
    "LazyState",
    "UnsupportedFeatureError",
    "SOURCE_FORMATS",
    "TARGET_FORMATS",
    "detect_format",
    "read_source",
    "read_hf",
    "read_timm",
    "read_npz",
    "read_tf_h5_state",
    "write_tf_h5",
    "read_flax_msgpack_state",
    "write_flax_msgpack",
    "convert_to",
    "write_converted",
    "read_checkpoint",
]
