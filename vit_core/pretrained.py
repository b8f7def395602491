"""The framework-independent half of ``from_pretrained`` / ``save_pretrained``.

Each framework's model class keeps only what is truly its own (creating variables, copying
arrays in, reading them out); argument handling, checkpoint matching, warnings and the saved
``config.json`` are decided here, once. Reading the checkpoint itself is the caller's: the
functions below take the readers as arguments (the core imports no converter), and the frameworks
call them through ``conversion.loading``, which passes readers for every supported format.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointState, read_checkpoint
from .config import CONFIG_NAME, ViTConfig
from .weights import LoadPlan, ParamSpec, plan_load

__all__ = ["resolve_pretrained_args", "match_checkpoint", "saved_config_dict"]

#: HF hub-only keywords of ``from_pretrained`` that mean nothing for a local folder.
IGNORED_HUB_KWARGS = frozenset({"local_files_only", "cache_dir", "revision", "use_safetensors", "low_cpu_mem_usage"})


def _is_foreign_file(path: Path) -> bool:
    """A single timm / .npz weight file (no HF ``config.json`` beside it to describe it)."""
    return path.is_file() and not (path.parent / CONFIG_NAME).is_file()


#: Opens a single foreign weight file: ``read_file(path, options)`` → (derived config, lazy canonical
#: state); ``options`` are the reader's keywords (``num_heads``, ``exact_gelu``).
FileReader = Callable[[Path, dict[str, Any]], tuple[ViTConfig, Mapping[str, Any]]]
#: Reader options ``from_pretrained`` passes on to a :data:`FileReader`.
FILE_READER_OPTIONS = ("num_heads", "exact_gelu")


def resolve_pretrained_args(
    model_cls: type,
    path: str | os.PathLike[str],
    config: ViTConfig | None,
    kwargs: dict[str, Any],
    config_class: type[ViTConfig] = ViTConfig,
    *,
    read_file: FileReader | None = None,
) -> tuple[Path, ViTConfig, dict[str, Any], Mapping[str, Any] | None]:
    """Split ``from_pretrained`` keywords, build the config, and open a foreign checkpoint.

    ``path`` is an HF folder (or a weight file inside one), or a single timm / google-research
    ``.npz`` / big_vision file: that one is opened by ``read_file`` (``num_heads=`` /
    ``exact_gelu=`` keywords go to it), which derives its config from the tensors; its lazily
    converted state is returned as the fourth item (``None`` for HF checkpoints, which
    :func:`match_checkpoint` opens).

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
        if read_file is None:
            raise TypeError(f"{path} is a single (timm / .npz) weight file: pass read_file= to open it "
                            "(the frameworks' from_pretrained pass conversion.loading's)")
        options = {k: kwargs.pop(k) for k in FILE_READER_OPTIONS if k in kwargs}
        derived, state = read_file(path, options)
        if config is None:
            config = derived
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
    read: Callable[[Path], CheckpointState] = read_checkpoint,
    stacklevel: int = 4,
) -> tuple[CheckpointState, LoadPlan]:
    """Match the checkpoint at ``path`` (``state`` if already opened) with a model's table (see
    :func:`plan_load`); returns the lazy state (a :class:`CheckpointState`: ``read`` / ``mapped`` give each
    tensor without intermediate copies) and the plan.

    ``read`` opens ``path`` when ``state`` is None (the default reads canonical safetensors /
    ``pytorch_model.bin`` only). ``stacklevel`` is the default warning's: that of the caller of
    ``from_pretrained`` when this is called from it directly.

    Optional parts that are missing, extra or re-initialised are reported with a warning that
    names ``owner`` (e.g. ``"TFViTModel.from_pretrained('dir')"``).
    """
    if state is None:
        state = read(path)
        path = state.source
    elif not isinstance(state, CheckpointState):  # a foreign file's converted state: same read() / mapped() API
        state = CheckpointState(path, [state])
    plan = plan_load(specs, state.shapes(), source=str(path), ignore_mismatched_sizes=ignore_mismatched_sizes)
    if (msg := plan.warning()) is not None:
        (warn or (lambda m: warnings.warn(m, stacklevel=stacklevel)))(f"{owner}: {msg}")
    return state, plan


def saved_config_dict(config: ViTConfig, model_class: str, dtype: str) -> dict[str, Any]:
    """``config.json`` content for a canonical checkpoint: architectures name the PyTorch class
    (the file has PyTorch names and layouts whichever framework wrote it)."""
    out = config.to_dict()
    out["architectures"] = [model_class.removeprefix("TF").removeprefix("Flax")]
    out["dtype"] = dtype
    return out
