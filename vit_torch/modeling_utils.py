"""PyTorch side of the checkpoint contract: init, ``from_pretrained``, ``save_pretrained``.

Every model loads and saves through its table in :mod:`vit_core.weights`; PyTorch's own
parameter names *are* the canonical names, so no renaming happens here, only checks.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from vit_core.checkpoint import CheckpointState, write_checkpoint
from vit_core.checks import check_config_type, head_mask_layers
from vit_core.config import ViTConfig
from vit_core.imports import import_trivit
from vit_core.safetensors_io import RawTensor
from vit_core.pretrained import saved_config_dict
from vit_core.weights import Init, ParamSpec, param_specs

# Checkpoints are opened by the conversion layer (every format; see conversion/loading.py); a user's
# conversion.py that shadows it is named in the ImportError rather than failing obscurely.
_loading = import_trivit("conversion.loading")
match_checkpoint, resolve_pretrained_args = _loading.match_checkpoint, _loading.resolve_pretrained_args

__all__ = ["TorchPreTrainedModel", "activation", "resolve_dtype", "static_shape"]

M = TypeVar("M", bound="TorchPreTrainedModel")


class _NewGELU(nn.Module):
    """HF's ``gelu_new``: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _QuickGELU(nn.Module):
    """x·σ(1.702·x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Any] = {
    "gelu": lambda: nn.GELU(),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_new": _NewGELU,
    "quick_gelu": _QuickGELU,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation(name: str) -> nn.Module:
    """The activation module for a config name (names validated by :class:`ViTConfig`)."""
    return _ACTIVATIONS[name]()


def static_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``x.shape`` as ints, for :mod:`vit_core.checks`. Under ``torch.export`` a dynamic size is a ``SymInt``, and
    ``int()`` of it would fix the exported graph to the example's size: the checks read its example value instead."""
    return tuple(s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in x.shape)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: Any, checkpoint_dtype: str | None = None) -> torch.dtype:
    """``torch.float16``, ``"bfloat16"`` or ``"auto"`` (the checkpoint's own float dtype) → torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return _DTYPES.get(checkpoint_dtype or "float32", torch.float32)
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported; use a torch dtype, one of {list(_DTYPES)}, or 'auto'")


#: True while :func:`_structure_only` builds a model: :meth:`TorchPreTrainedModel.post_init` then does nothing.
_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("trivit_torch_skip_init", default=False)

#: safetensors dtype → torch dtype, for tensors wrapped in place.
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


#: torch.nn.init functions the torch modules' own constructors call; no-ops while a structure is built.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _structure_only() -> Iterator[None]:
    """Build models on the meta device (no memory) with no initialiser running: neither trivit's
    :meth:`~TorchPreTrainedModel.post_init` nor the ``reset_parameters`` of torch's own modules (their
    ``torch.nn.init`` calls are no-ops meanwhile, as in HF's ``no_init_weights``). For from_pretrained,
    which replaces every parameter and checks the tree against the table itself."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    token = _SKIP_INIT.set(True)
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, _keep)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
        _SKIP_INIT.reset(token)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _loaded_tensor(state: CheckpointState, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Checkpoint tensor ``key`` as a ``dtype`` tensor. Stored in that dtype in a safetensors file, it is wrapped
    in place over a private copy-on-write map of the file (pages load on first use, writes stay in this
    process; as HF's loader); otherwise read once and converted, through float32 as the model's own
    parameters would have been."""
    mapped = state.mapped(key)
    if mapped is not None and _TORCH_DTYPES.get(mapped.dtype) == dtype:
        flat = torch.frombuffer(mapped.buffer, dtype=dtype, count=mapped.count, offset=mapped.offset)
        return flat.view(mapped.shape)
    return torch.from_numpy(state.read(key)).to(torch.float32).to(dtype)


def _to_numpy(t: torch.Tensor) -> np.ndarray | RawTensor:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return RawTensor(t.view(torch.int16).numpy().view(np.uint16), "BF16")
    return t.numpy()


class TorchPreTrainedModel(nn.Module):
    """Base of every trivit PyTorch model; mirrors HF's ``PreTrainedModel`` where it matters."""

    config_class = ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True

    def __init__(self, config: ViTConfig):
        super().__init__()
        check_config_type(type(self).__name__, config, self.config_class)
        self.config = config
        self._table_flags: dict[str, bool] = {}

    # ------------------------------------------------------------------ weights table
    def param_specs(self) -> list[ParamSpec]:
        """This model's rows of the canonical checkpoint table."""
        return param_specs(type(self).__name__, self.config, **self._table_flags)

    def post_init(self) -> None:
        """Check the module tree against the table, then initialise every weight as HF does."""
        if _SKIP_INIT.get():  # from_pretrained's meta-device build: it loads and checks every weight itself
            return
        specs = self.param_specs()
        names = dict(self.named_parameters())
        if set(names) != {s.name for s in specs}:
            raise RuntimeError(
                f"{type(self).__name__} parameters disagree with the checkpoint table: "
                f"only in model {sorted(set(names) - {s.name for s in specs})}, "
                f"only in table {sorted({s.name for s in specs} - set(names))}"
            )
        with torch.no_grad():
            for spec in specs:
                self._init_param(names[spec.name], spec)

    def _init_param(self, param: torch.Tensor, spec: ParamSpec) -> None:
        if spec.init is Init.TRUNC_NORMAL:
            std = self.config.initializer_range
            param.copy_(nn.init.trunc_normal_(torch.empty(param.shape), mean=0.0, std=std).to(param.dtype))
        elif spec.init is Init.ZEROS:
            param.zero_()
        else:
            param.fill_(1.0)

    # ------------------------------------------------------------------ forward helpers
    def _head_mask(self, head_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(heads,) or (layers, heads), 1 keeps a head → (layers, 1, heads, 1, 1) in the model dtype."""
        if head_mask is None:
            return None
        head_mask = torch.as_tensor(head_mask)
        if not head_mask_layers(head_mask.shape, self.config):
            head_mask = head_mask.expand(self.config.num_hidden_layers, -1)
        return head_mask[:, None, :, None, None].to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # ------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each encoder layer in the backward pass instead of storing its activations."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    # ------------------------------------------------------------------ save / load
    def state_dict_numpy(self) -> dict[str, np.ndarray | RawTensor]:
        """Canonical ``{name: array}`` in table order (what :meth:`save_pretrained` writes)."""
        params = dict(self.named_parameters())
        return {spec.name: _to_numpy(params[spec.name]) for spec in self.param_specs()}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        is_main_process: bool = True,
    ) -> None:
        """Write ``config.json`` + ``model.safetensors`` (sharded above ``max_shard_size``), atomically."""
        if not safe_serialization:
            raise ValueError("trivit writes safetensors only (no pickles); drop safe_serialization=False")
        if not is_main_process:
            return
        config_dict = saved_config_dict(self.config, type(self).__name__, str(self.dtype).removeprefix("torch."))
        write_checkpoint(save_directory, self.state_dict_numpy(), config_dict, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        config: ViTConfig | None = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        attn_implementation: str | None = None,
        ignore_mismatched_sizes: bool = False,
        output_loading_info: bool = False,
        **kwargs: Any,
    ) -> M | tuple[M, dict[str, list]]:
        """Build the model from a local folder holding ``config.json`` and weights.

        Keyword arguments that are constructor flags (``add_pooling_layer=False``) go to the
        constructor; those that are config fields (``num_labels=10``) override the config.
        """
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        path, config, init_kwargs, state = resolve_pretrained_args(
            cls, pretrained_model_name_or_path, config, kwargs, config_class=cls.config_class
        )
        ckpt_dtype = config.extra.get("dtype") or config.extra.get("torch_dtype")
        target = resolve_dtype(torch_dtype if dtype is None else dtype, ckpt_dtype)
        with _structure_only():
            model = cls(config, *model_args, **init_kwargs)
        state, plan = match_checkpoint(
            model.param_specs(),
            path,
            owner=f"{cls.__name__}.from_pretrained({str(path)!r})",
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            state=state,
        )
        params = dict(model.named_parameters())
        if set(params) == set(plan.sources) and not any(b.is_meta for b in model.buffers()):
            for name, key in plan.sources.items():  # swap each meta parameter for the loaded tensor
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                module._parameters[leaf] = nn.Parameter(_loaded_tensor(state, key, target), params[name].requires_grad)
        else:
            # Some weights are freshly initialised (a missing or re-sized head): build and initialise the model on
            # the CPU exactly as its constructor does, so a seeded run draws the very same values, then load.
            model = cls(config, *model_args, **init_kwargs)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, key in plan.sources.items():
                    params[name].copy_(torch.from_numpy(state.read(key)))
            model = model.to(target)
        model.eval()
        return (model, plan.loading_info()) if output_loading_info else model


