"""HF transformers 4.x TensorFlow weights (``tf_model.h5``) ↔ canonical, with h5py only (no TF).

Layout written by ``TFViT*.save_pretrained`` (Keras 2 ``save_weights`` HDF5)::

    /  attrs: layer_names = [b"vit", b"classifier"], backend, keras_version
    /vit  attrs: weight_names = [b"tf_vi_t_for_image_classification/vit/embeddings/cls_token:0", ...]
    /vit/tf_vi_t_for_image_classification/vit/embeddings/cls_token:0     (dataset)

HF's loader drops the first component of each weight name (the Keras model name) and matches
the rest with its own variables. Names map to canonical ones as ``/`` → ``.``,
``layer_._{i}`` → ``layer.{i}``, ``kernel`` → ``weight`` (transposed, see
:func:`vit_core.weights.from_kernel_layout`), ``gamma``/``beta`` → LayerNorm ``weight``/``bias``.
A file holding more than the ``vit`` layer (a ``classifier``) gets the ``vit.`` prefix.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit_core.atomic import staged_files
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.pretrained import saved_config_dict
from vit_core.safetensors_io import CheckpointError
from vit_core.weights import BASE_MODEL_PREFIX, Kind, from_kernel_layout, to_kernel_layout

from .common import LazyState, check_array, float_array, kinds_of, require_hf_legacy_class

__all__ = ["TF_WEIGHTS_NAME", "read_tf_h5_state", "write_tf_h5"]

TF_WEIGHTS_NAME = "tf_model.h5"
#: HF's Keras model names (the first weight-name component; HF ignores it when loading).
_TF_MODEL_NAMES = {"ViTModel": "tf_vi_t_model", "ViTForImageClassification": "tf_vi_t_for_image_classification"}
_ATTR_LIMIT = 60_000  # HDF5 object headers hold at most 64 KiB of attributes: longer lists are chunked


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise CheckpointError("reading or writing tf_model.h5 needs h5py (it comes with tensorflow)") from None
    return h5py


#: What h5py raises on a corrupt or odd file (HDF5's own errors come as OSError / KeyError / RuntimeError).
_H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError)


def _read_attr_list(group: Any, name: str) -> list[str]:
    """A string-list attribute, joined back from Keras' chunks ``name0``, ``name1``, ... if split."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks, i = [], 0
        while f"{name}{i}" in group.attrs:
            chunks.append(group.attrs[f"{name}{i}"])
            i += 1
    values: list[str] = []
    for chunk in chunks:
        arr = np.asarray(chunk)
        if arr.ndim != 1 or arr.dtype.kind not in "SUO":
            raise ValueError(f"attribute {name!r} is {arr.dtype} of shape {list(arr.shape)}, not a list of names")
        for v in arr:
            if not isinstance(v, (bytes, str)):
                raise ValueError(f"attribute {name!r} holds a {type(v).__name__}, not a name")
            values.append(v.decode("utf-8") if isinstance(v, bytes) else v)
    return values


def _write_attr_list(group: Any, name: str, values: list[str]) -> None:
    encoded = [v.encode("utf-8") for v in values]
    chunks, cur, size = [], [], 0
    for v in encoded:
        if cur and size + len(v) > _ATTR_LIMIT:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(v)
        size += len(v)
    chunks.append(cur)
    if len(chunks) == 1:
        group.attrs[name] = np.array(chunks[0], dtype="S") if chunks[0] else np.array([], dtype="S1")
    else:
        for i, chunk in enumerate(chunks):
            group.attrs[f"{name}{i}"] = np.array(chunk, dtype="S")


def _to_canonical(tf_path: str, ndim: int) -> tuple[str, Kind]:
    """``vit/encoder/layer_._0/attention/attention/query/kernel:0`` → canonical name and kind."""
    parts = tf_path.removesuffix(":0").replace("layer_._", "layer/").split("/")
    last = parts[-1]
    if last == "kernel":
        kind = Kind.CONV_WEIGHT if ndim == 4 else Kind.LINEAR_WEIGHT
        parts[-1] = "weight"
    elif last == "gamma":
        kind, parts[-1] = Kind.NORM_WEIGHT, "weight"
    elif last == "beta":
        kind, parts[-1] = Kind.NORM_BIAS, "bias"
    elif last == "bias":
        kind = Kind.BIAS
    else:
        kind = Kind.EMBEDDING
    return ".".join(parts), kind


def _to_tf_path(name: str, kind: Kind) -> str:
    """Inverse of :func:`_to_canonical`, without the model-name component and ``:0``."""
    parts = name.split(".")
    if parts[-1] == "weight":
        parts[-1] = {Kind.NORM_WEIGHT: "gamma"}.get(kind, "kernel")
    elif parts[-1] == "bias" and kind is Kind.NORM_BIAS:
        parts[-1] = "beta"
    return "/".join(parts).replace("encoder/layer/", "encoder/layer_._")


def read_tf_h5_state(path: str | os.PathLike[str]) -> LazyState:
    """Open ``tf_model.h5`` lazily as ``{canonical name: array in PyTorch layout}``.

    Every listed weight must be a numeric dataset whose size fits the file (:func:`~conversion.common.
    check_array`): a corrupt header never makes the reader allocate more than the file can hold.
    """
    h5py = _h5py()
    path = Path(path)
    try:
        file_size = path.stat().st_size
        f = h5py.File(path, "r")
        layers = _read_attr_list(f, "layer_names")
    except _H5_ERRORS as e:
        raise CheckpointError(f"{path}: not a readable Keras HDF5 weight file ({type(e).__name__}: {e})") from None
    if not layers:
        raise CheckpointError(f"{path}: no 'layer_names' attribute; not a Keras HDF5 weight file")
    has_head = any(layer != BASE_MODEL_PREFIX for layer in layers)
    entries: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    for layer in layers:
        try:
            group = f[layer]
            names = _read_attr_list(group, "weight_names")
        except _H5_ERRORS as e:
            raise CheckpointError(f"{path}: layer {layer!r} is listed but unreadable ({type(e).__name__}: {e})") from None
        for weight in names:
            try:
                ds = group[weight]
                if not isinstance(ds, h5py.Dataset):
                    raise TypeError(f"a {type(ds).__name__}, not a dataset")
                shape, dtype, contiguous = tuple(ds.shape), ds.dtype, ds.chunks is None
            except _H5_ERRORS as e:
                raise CheckpointError(f"{path}: weight {weight!r} of layer {layer!r} is unreadable ({type(e).__name__}: {e})") from None
            # HF / Keras store weights contiguously (the data must then be in the file); chunked ones may compress
            check_array(path, weight, shape, dtype, file_size, expansion=1 if contiguous else None)
            name, kind = _to_canonical("/".join(weight.split("/")[1:]), len(shape))
            if not has_head:
                name = name.removeprefix(f"{BASE_MODEL_PREFIX}.")
            if name in entries:
                raise CheckpointError(f"{path}: weight {weight!r} maps to {name!r}, which appears twice")

            def load(ds: Any = ds, kind: Kind = kind, weight: str = weight) -> np.ndarray:
                try:
                    arr = np.asarray(ds[()])
                except _H5_ERRORS as e:
                    raise CheckpointError(f"{path}: weight {weight!r} cannot be read ({type(e).__name__}: {e}); "
                                          "truncated file?") from None
                return np.ascontiguousarray(from_kernel_layout(kind, float_array(arr)))

            # a zero-stride stand-in of the right shape: the layout's transpose without allocating the tensor
            stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape, (0,) * len(shape))
            entries[name] = (tuple(from_kernel_layout(kind, stand_in).shape), load)
    return LazyState(path, entries)


def write_tf_h5(
    folder: str | os.PathLike[str],
    state: Mapping[str, Any],
    config: ViTConfig,
    model_class: str,
    flags: Mapping[str, bool] | None = None,
) -> list[Path]:
    """Write ``config.json`` + ``tf_model.h5`` that HF 4.x ``TFViT*.from_pretrained`` loads, atomically.

    ``state`` values may be arrays or zero-arg callables (read one at a time). Only ``ViTModel``
    (without mask token) and ``ViTForImageClassification`` exist in HF TensorFlow.
    """
    h5py = _h5py()
    flags = dict(flags or {})
    require_hf_legacy_class(model_class, flags, "TensorFlow", _TF_MODEL_NAMES)
    kinds = kinds_of(model_class, config, flags)
    folder = Path(folder)
    config_dict = saved_config_dict(config, model_class, "float32")
    with staged_files(folder) as stage:
        with stage(CONFIG_NAME) as fh:
            fh.write((json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        with open(stage.path(TF_WEIGHTS_NAME), "r+b") as raw:
            sink = _DeferredErrors(raw)
            try:
                _write_h5(h5py, sink, state, kinds, model_class)
            except Exception:
                if sink.error is None:
                    raise
            if sink.error is not None:  # the disk's error, not the one HDF5 made of it
                raise sink.error
    return [folder / CONFIG_NAME, folder / TF_WEIGHTS_NAME]


class _DeferredErrors(io.RawIOBase):
    """The file h5py writes through: HDF5 must never see a failed write (libhdf5 crashes closing a file
    after one, e.g. at a full disk or the file size limit). The first ``OSError`` is kept, later writes are
    dropped (the file is a temporary that is then removed), and the writer raises the kept error."""

    def __init__(self, raw: Any):
        self.raw, self.error = raw, None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return 0 if self.error is not None else self.raw.readinto(b)

    def write(self, b: Any) -> int:
        n = memoryview(b).nbytes
        if self.error is None:
            try:
                self.raw.write(b)
            except OSError as e:
                self.error = e
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as e:
                self.error = e
        return self.raw.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None:
            try:
                self.raw.flush()
            except OSError as e:
                self.error = e


def _write_h5(h5py: Any, path: Any, state: Mapping[str, Any], kinds: Mapping[str, Kind], model_class: str) -> None:
    """The Keras-2 HDF5 weight file (layout in the module docstring) at ``path`` (a file name or object)."""
    model_name = _TF_MODEL_NAMES[model_class]
    layers: dict[str, list[str]] = {}
    with h5py.File(path, "w") as f:
        for name, value in state.items():
            if name not in kinds:
                raise CheckpointError(f"tensor {name!r} is not in the {model_class} table; cannot write {TF_WEIGHTS_NAME}")
            arr = value() if callable(value) else value
            layer = name.split(".")[0] if model_class != "ViTModel" else BASE_MODEL_PREFIX
            tf_name = name if model_class != "ViTModel" else f"{BASE_MODEL_PREFIX}.{name}"
            weight = f"{model_name}/{_to_tf_path(tf_name, kinds[name])}:0"
            group = f.require_group(layer)
            group.create_dataset(weight, data=np.ascontiguousarray(to_kernel_layout(kinds[name], np.asarray(arr))))
            layers.setdefault(layer, []).append(weight)
        for layer, weights in layers.items():
            _write_attr_list(f[layer], "weight_names", weights)
        _write_attr_list(f, "layer_names", list(layers))
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
