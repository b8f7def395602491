"""The framework-independent half of ``from_pretrained`` / ``save_pretrained``.

Each framework's model class keeps only what is truly its own (creating variables, copying
arrays in, reading them out); argument handling, checkpoint matching, warnings and the saved
``config.json`` are decided here, once.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointState, read_checkpoint
from .config import ViTConfig
from .weights import LoadPlan, ParamSpec, plan_load

__all__ = ["resolve_pretrained_args", "match_checkpoint", "saved_config_dict"]

#: HF hub-only keywords of ``from_pretrained`` that mean nothing for a local folder.
IGNORED_HUB_KWARGS = frozenset({"local_files_only", "cache_dir", "revision", "use_safetensors", "low_cpu_mem_usage"})


def resolve_pretrained_args(
    model_cls: type,
    path: str | os.PathLike[str],
    config: ViTConfig | None,
    kwargs: dict[str, Any],
    config_class: type[ViTConfig] = ViTConfig,
) -> tuple[Path, ViTConfig, dict[str, Any]]:
    """Split ``from_pretrained`` keywords and build the config.

    Keywords naming constructor parameters (``add_pooling_layer``) are returned for the
    constructor; those naming config fields (``num_labels``, ``attn_implementation``) override the
    config; hub-only ones are ignored; anything else is a ``TypeError`` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (trivit never downloads; pass a local folder)")
    kwargs = {k: v for k, v in kwargs.items() if k not in IGNORED_HUB_KWARGS}
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
    return path, config, init_kwargs


def match_checkpoint(
    specs: list[ParamSpec],
    path: Path,
    *,
    owner: str,
    ignore_mismatched_sizes: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[CheckpointState, LoadPlan]:
    """Open the checkpoint at ``path`` and match it with a model's table (see :func:`plan_load`).

    Optional parts that are missing, extra or re-initialised are reported with a warning that
    names ``owner`` (e.g. ``"TFViTModel.from_pretrained('dir')"``).
    """
    state = read_checkpoint(path)
    plan = plan_load(specs, state.shapes(), source=str(state.source), ignore_mismatched_sizes=ignore_mismatched_sizes)
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
