"""StableHLO export of the Flax models through ``jax.export``: one self-contained file per model.

:func:`export_stablehlo` traces ``model(pixel_values)`` (inference: no dropout, no hidden states or
attentions) with the params closed over, so they are baked into the module as constants: the file is
the whole deployable model, and running it needs ``jax`` only (not flax, not trivit). The price is
size: the file holds every weight, ~4 bytes per fp32 param (ViT-B/16's 86.6M params: ~350 MB), and
``jax.export``'s flatbuffer container caps a file at 2 GiB (ViT-L fp32, 1.2 GB, fits; ViT-H does not).
Params as a call argument would keep the file small but make the weights a second artifact to ship
and keep in step; the canonical ``model.safetensors`` already is that.

The exported function takes NCHW ``pixel_values`` (float32; a symbolic batch ``b`` unless
``batch_size`` is given, the other dimensions fixed at the config's) and returns a dict of the
model's output fields by name (``{"logits": (B, num_labels)}``, ``{"last_hidden_state", "pooler_output"}``,
``{"reconstruction": (B, C, H, W)}``); the names travel in the file itself (the exported output tree).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_core.atomic import staged_files

from .modeling_flax_vit import FlaxViTPreTrainedModel

__all__ = ["export_stablehlo", "load_stablehlo", "StableHLOModel"]

#: Fields of a model's output that are not exported (they need the output_* flags, or labels).
_LEFT_OUT = ("hidden_states", "attentions", "loss")
#: Constants with more elements than this are elided in the ``.mlir`` text (the weights; it is for reading).
_MLIR_ELIDE = 64


def _jax_export() -> Any:
    try:
        from jax import export
    except ImportError as err:
        raise ImportError(f"StableHLO export/load needs jax >= 0.4.30 with jax.export "
                          f"(pip install 'trivit[flax]'): {err}") from None
    return export


def export_stablehlo(model: FlaxViTPreTrainedModel, path: str | os.PathLike[str], *,
                     params: Mapping[str, Any] | None = None, batch_size: int | None = None,
                     platforms: Sequence[str] = ("cpu",)) -> Path:
    """Serialise ``model``'s inference function to ``path`` (``jax.export`` bytes) and its StableHLO text
    to ``path + ".mlir"`` (constants over 64 elements elided), both written atomically; returns ``path``.

    ``params``: the weights to bake in (default ``model.params``). ``batch_size``: a fixed batch; ``None``
    exports a symbolic one (any batch >= 1). ``platforms``: the ones the file may run on (``"cpu"``,
    ``"cuda"``, ``"rocm"``, ``"tpu"``); lowering for one needs no such device here.
    """
    export = _jax_export()
    if not isinstance(model, FlaxViTPreTrainedModel):
        raise TypeError(f"model must be a vit_flax model (FlaxViTModel, FlaxViTForImageClassification, ...), "
                        f"got {type(model).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (symbolic batch), got {batch_size!r}")
    if isinstance(platforms, str) or not platforms or not all(isinstance(p, str) for p in platforms):
        raise ValueError(f"platforms must be a non-empty sequence of platform names like ('cpu',), got {platforms!r}")
    params = model.params if params is None else params
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be the model's param dict, got {type(params).__name__}")

    def infer(pixel_values: jax.Array) -> dict[str, jax.Array]:
        out = model(pixel_values, params=params, output_attentions=False, output_hidden_states=False,
                    return_dict=True)
        return {k: v for k, v in out.items() if k not in _LEFT_OUT}

    cfg = model.config
    batch = batch_size if batch_size is not None else "b"
    shape = export.symbolic_shape(f"{batch}, {cfg.num_channels}, {cfg.image_hw[0]}, {cfg.image_hw[1]}")
    exported = export.export(jax.jit(infer), platforms=tuple(platforms))(jax.ShapeDtypeStruct(shape, jnp.float32))
    path = Path(path)
    with staged_files(path.parent) as open_staged:
        with open_staged(path.name) as fh:
            fh.write(exported.serialize())
        with open_staged(path.name + ".mlir") as fh:
            fh.write(_mlir_text(exported).encode("utf-8"))
    return path


def _mlir_text(exported: Any) -> str:
    """The module as StableHLO text, large constants elided and no debug locations (``exported.mlir_module()``
    prints every weight in hex, 2 characters per byte: ~0.7 GB of text for ViT-B/16; elided, 416 kB)."""
    from jax.extend.mlir import ir
    from jax.extend.mlir.dialects import chlo, sdy, stablehlo

    with ir.Context() as ctx:
        for dialect in (stablehlo, chlo, sdy):
            dialect.register_dialect(ctx)
        module = exported.mlir_module(serialized=False)
        return module.operation.get_asm(large_elements_limit=_MLIR_ELIDE, enable_debug_info=False)


class StableHLOModel:
    """A deserialised export: ``model(pixel_values)`` on a NumPy NCHW array → dict of NumPy arrays by name.

    ``input_shape`` is the accepted shape (``None`` for a symbolic batch), ``output_names`` the fields,
    ``platforms`` what it was exported for, ``exported`` the underlying ``jax.export.Exported``.
    """

    def __init__(self, exported: Any, source: str):
        self.exported, self._source = exported, source
        (aval,) = exported.in_avals
        self.input_shape: tuple[int | None, ...] = tuple(d if isinstance(d, int) else None for d in aval.shape)
        self.input_dtype = np.dtype(aval.dtype)
        self.output_names: tuple[str, ...] = tuple(jax.tree_util.tree_unflatten(exported.out_tree,
                                                                                [0] * len(exported.out_avals)))
        self.platforms: tuple[str, ...] = tuple(exported.platforms)
        self._call = jax.jit(exported.call)  # compiled once per input shape

    def __repr__(self) -> str:
        return f"StableHLOModel({self._source!r}, input_shape={self.input_shape}, outputs={list(self.output_names)})"

    def __call__(self, pixel_values: Any) -> dict[str, np.ndarray]:
        """``pixel_values`` (B, C, H, W), any float dtype (cast to the exported one) → {field: array}."""
        x = np.asarray(pixel_values)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"pixel_values must be a float array, got dtype {x.dtype}")
        want = tuple("b" if d is None else d for d in self.input_shape)
        if x.ndim != len(want) or any(d is not None and d != s for d, s in zip(self.input_shape, x.shape)):
            raise ValueError(f"pixel_values must have shape ({', '.join(map(str, want))})"
                             f"{' (b: any batch size)' if None in self.input_shape else ''}, got {x.shape} "
                             f"(exported {self._source})")
        if x.shape[0] < 1:
            raise ValueError(f"pixel_values must hold at least one image, got shape {x.shape}")
        out = self._call(x.astype(self.input_dtype, copy=False))
        return {k: np.asarray(v) for k, v in out.items()}


def load_stablehlo(path: str | os.PathLike[str]) -> Callable[..., dict[str, np.ndarray]]:
    """Read a file written by :func:`export_stablehlo` (or any ``jax.export`` artifact of one NCHW input
    returning a dict) → a :class:`StableHLOModel`."""
    export = _jax_export()
    path = Path(path)
    data = path.read_bytes()
    try:
        exported = export.deserialize(bytearray(data))
    except Exception as err:  # noqa: BLE001 - the flatbuffer reader raises anything on foreign bytes
        raise ValueError(f"{str(path)!r} is not a jax.export (StableHLO) artifact written by export_stablehlo: "
                         f"deserialising it failed ({type(err).__name__}: {err})") from None
    if len(exported.in_avals) != 1 or len(exported.in_avals[0].shape) != 4:
        raise ValueError(f"{str(path)!r} takes inputs {[a.str_short() for a in exported.in_avals]}, "
                         "not one NCHW pixel_values array: not written by export_stablehlo")
    names = jax.tree_util.tree_unflatten(exported.out_tree, [0] * len(exported.out_avals))
    if not isinstance(names, dict):
        raise ValueError(f"{str(path)!r} returns {exported.out_tree}, not a dict of named outputs: "
                         "not written by export_stablehlo")
    return StableHLOModel(exported, str(path))
