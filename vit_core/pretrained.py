"""The framework-independent half of ``from_pretrained`` / ``save_pretrained``.

Each framework's model class keeps only what is truly its own (creating variables, copying
arrays in, reading them out); argument handling, checkpoint matching, warnings and the saved
``config.json`` are decided here, once.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .checkpoint import read_checkpoint
from .config import CONFIG_NAME, ViTConfig
from .weights import LoadPlan, ParamSpec, plan_load

__all__ = ["resolve_pretrained_args", "match_checkpoint", "saved_config_dict"]

#: HF hub-only keywords of ``from_pretrained`` that mean nothing for a local folder.
IGNORED_HUB_KWARGS = frozenset({"local_files_only", "cache_dir", "revision", "use_safetensors", "low_cpu_mem_usage"})


def _is_foreign_file(path: Path) -> bool:
    """A single timm / .npz weight file (no HF ``config.json`` beside it to describe it)."""
    return path.is_file() and not (path.parent / CONFIG_NAME).is_file()


def resolve_pretrained_args(
    model_cls: type,
    path: str | os.PathLike[str],
    config: ViTConfig | None,
    kwargs: dict[str, Any],
    config_class: type[ViTConfig] = ViTConfig,
) -> tuple[Path, ViTConfig, dict[str, Any], Mapping[str, Any] | None]:
    """Split ``from_pretrained`` keywords, build the config, and open a foreign checkpoint.

    ``path`` is an HF folder (or a weight file inside one), or a single timm / google-research
    ``.npz`` / big_vision file: its config is then derived from the tensors by :mod:`conversion`
    (``num_heads=`` / ``exact_gelu=`` keywords go to that reader) and its lazily converted state is
    returned as the fourth item (``None`` for HF checkpoints, which :func:`match_checkpoint` opens).

    Keywords naming constructor parameters (``add_pooling_layer``) are returned for the
    constructor; those naming config fields (``num_labels``, ``attn_implementation``) override the
    config; hub-only ones are ignored; anything else is a ``TypeError`` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (trivit never downloads; pass a local folder)")
    kwargs = {k: v for k, v in kwargs.items() if k not in IGNORED_HUB_KWARGS}
    state = None
    if _is_foreign_file(path):
        from conversion import read_source  # lazy: the core imports no converter at import time

        options = {k: kwargs.pop(k) for k in ("num_heads", "exact_gelu") if k in kwargs}
        _, converted = read_source(path, **options)
        state = converted.state
        if config is None:
            config = converted.config
    init_params = {
        name
        for name, p in inspect.signature(model_cls.__init__).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in ("self", "config")
    }
    init_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in init_params}
    unknown = sorted(set(kwargs) - config_class._field_names())
    if unknown:
        raise TypeError(f"{model_cls.__name__}.from_pretrained got unexpected keyword arguments {unknown}")
    if config is None:
        config = config_class.from_pretrained(path, **kwargs)
    elif kwargs:
        config = config.copy(**kwargs)
    return path, config, init_kwargs, state


def match_checkpoint(
    specs: list[ParamSpec],
    path: Path,
    *,
    owner: str,
    state: Mapping[str, Any] | None = None,
    ignore_mismatched_sizes: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[Mapping[str, Any], LoadPlan]:
    """Match the checkpoint at ``path`` (``state`` if already opened) with a model's table (see
    :func:`plan_load`); returns the lazy ``{name: array}`` state and the plan.

    Optional parts that are missing, extra or re-initialised are reported with a warning that
    names ``owner`` (e.g. ``"TFViTModel.from_pretrained('dir')"``).
    """
    if state is None:
        state = read_checkpoint(path)
        path = state.source
    plan = plan_load(specs, state.shapes(), source=str(path), ignore_mismatched_sizes=ignore_mismatched_sizes)
    if (msg := plan.warning()) is not None:
        (warn or (lambda m: warnings.warn(m, stacklevel=4)))(f"{owner}: {msg}")
    return state, plan


def saved_config_dict(config: ViTConfig, model_class: str, dtype: str) -> dict[str, Any]:
    """``config.json`` content for a canonical checkpoint: architectures name the PyTorch class
    (the file has PyTorch names and layouts whichever framework wrote it)."""
    out = config.to_dict()
    out["architectures"] = [model_class.removeprefix("TF").removeprefix("Flax")]
    out["dtype"] = dtype
    return out
