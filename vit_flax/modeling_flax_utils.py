"""Flax side of the checkpoint contract: activations, the param-path rule, init, load and save.

Params are a plain nested dict (the ``"params"`` collection's content, as in HF Flax); each
canonical checkpoint name maps to one path in it by :func:`param_path`, and every layout change
goes through :func:`vit_core.weights.to_kernel_layout` / ``from_kernel_layout``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from vit_core.checkpoint import write_checkpoint
from vit_core.checks import check_config_type
from vit_core.config import ViTConfig
from vit_core.imports import import_trivit
from vit_core.pretrained import saved_config_dict
from vit_core.safetensors_io import ALIGNMENT, aligned_empty
from vit_core.weights import Init, Kind, ParamSpec, from_kernel_layout, param_specs, to_kernel_layout

# Checkpoints are opened by the conversion layer (every format; see conversion/loading.py); a user's
# conversion.py that shadows it is named in the ImportError rather than failing obscurely.
_loading = import_trivit("conversion.loading")
match_checkpoint, resolve_pretrained_args = _loading.match_checkpoint, _loading.resolve_pretrained_args

__all__ = ["ACT2FN", "param_path", "FlaxPreTrainedModel", "to_dtype", "stack_layers", "unstack_layers"]

Params = dict[str, Any]
M = TypeVar("M", bound="FlaxPreTrainedModel")


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch writes it, x·(1 + erf(x/√2))/2.

    The backward keeps only x and recomputes erf: autodiff kept the erf term of every layer alive
    until the backward, one more (B, S, intermediate_size) buffer per layer (ViT-B/16 batch 8: the
    train step's XLA temp memory 1075 → 872 MB, and as many fewer fresh pages to fault in per step).
    """
    return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
    """Φ(x) = (1 + erf(x/√2))/2."""
    return 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    # The barrier ties the recomputation to g, so XLA neither merges it with the forward's erf (CSE)
    # nor schedules it before the backward reaches this layer.
    x, g = jax.lax.optimization_barrier((x, g))
    return (g * (_normal_cdf(x) + x * jnp.exp(-0.5 * x * x) * 0.3989422804014327),)  # 0.398… = 1/√(2π)


_gelu.defvjp(lambda x: (_gelu(x), x), _gelu_bwd)


ACT2FN: dict[str, Callable[[jax.Array], jax.Array]] = {
    # exact, as torch writes it: x·(1 + erf(x/√2))/2. jax.nn.gelu(approximate=False) goes through erfc,
    # 2.3x slower on CPU (measured, ViT-B/16 MLP activations), for no accuracy a ViT can see.
    "gelu": _gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "selu": jax.nn.selu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}

_LEAF = {Kind.LINEAR_WEIGHT: "kernel", Kind.CONV_WEIGHT: "kernel", Kind.NORM_WEIGHT: "scale", Kind.BIAS: "bias",
         Kind.NORM_BIAS: "bias"}


def param_path(spec: ParamSpec) -> tuple[str, ...]:
    """THE name rule: canonical ``vit.encoder.layer.0.attention.attention.query.weight`` (linear)
    → ``("vit", "encoder", "layer_0", "attention", "attention", "query", "kernel")``.

    A numeric part joins its list's name (``layer.0`` → ``layer_0``, ``decoder.0`` → ``decoder_0``,
    Linen's names for list submodules); the last part is Flax's leaf name for the row's kind.
    """
    parts = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", spec.name).split(".")
    return (*parts[:-1], _LEAF.get(spec.kind, parts[-1]))


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _flat_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for k, v in tree.items():
        out |= _flat_paths(v, (*prefix, k)) if isinstance(v, Mapping) else {(*prefix, k)}
    return out


_LAYER = re.compile(r"layer_(\d+)")


def stack_layers(params: Params) -> Params:
    """Canonical tree → ``scan_layers`` tree: each encoder's ``layer_0`` … ``layer_{L-1}`` become one
    ``layer`` subtree whose leaves carry a leading (L,) axis, in layer order."""
    if not isinstance(params, Mapping):
        return params
    numbered = sorted((int(m.group(1)), k) for k in params if (m := _LAYER.fullmatch(k)))
    out = {k: stack_layers(v) for k, v in params.items() if not _LAYER.fullmatch(k)}
    if numbered:
        if [i for i, _ in numbered] != list(range(len(numbered))):
            raise ValueError(f"layers are not numbered 0..L-1: {[k for _, k in numbered]}")
        out["layer"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(params[k] for _, k in numbered))
    return out


def unstack_layers(params: Params, num_layers: int) -> Params:
    """Inverse of :func:`stack_layers` (works on arrays and on ``jax.ShapeDtypeStruct`` leaves)."""

    def take(x: Any, i: int) -> Any:
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x[i]

    def walk(node: Any, key: str = "") -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, k) for k, v in node.items() if not (key == "encoder" and k == "layer")}
        if key == "encoder" and "layer" in node:
            for i in range(num_layers):
                out[f"layer_{i}"] = jax.tree_util.tree_map(lambda x, i=i: take(x, i), node["layer"])
        return out

    return walk(params)


def init_param(rng: jax.Array, spec: ParamSpec, std: float, dtype: Any) -> jax.Array:
    """HF's init of one row, in Flax layout: trunc-normal(0, std) cut at ±2 (absolute, as torch), zeros, ones."""
    shape = to_kernel_layout(spec.kind, np.empty(spec.shape, np.float32)).shape
    if spec.init is Init.TRUNC_NORMAL:
        return (std * jax.random.truncated_normal(rng, -2.0 / std, 2.0 / std, shape, jnp.float32)).astype(dtype)
    return (jnp.zeros if spec.init is Init.ZEROS else jnp.ones)(shape, dtype)


def to_dtype(params: Params, dtype: Any, mask: Any = None) -> Params:
    """Cast floating leaves of ``params`` (where ``mask`` is True, if given) to ``dtype``."""
    cast = lambda p, m=True: p.astype(dtype) if m and jnp.issubdtype(p.dtype, jnp.floating) else p  # noqa: E731
    return jax.tree_util.tree_map(cast, params) if mask is None else jax.tree_util.tree_map(cast, params, mask)


def _device_array(array: np.ndarray, dtype: Any) -> jax.Array:
    """A loaded array (ours alone: nothing else refers to it) as a jax array of ``dtype``. Of that dtype already,
    it is laid out C-contiguous and aligned (if it is not yet: one copy), which XLA's CPU client adopts without
    copying; else converted by ``jnp.asarray``."""
    if array.dtype != jnp.dtype(dtype):
        return jnp.asarray(array, dtype=dtype)
    if not array.flags.c_contiguous or array.ctypes.data % ALIGNMENT:
        aligned = aligned_empty(array.shape, array.dtype)
        np.copyto(aligned, array)
        array = aligned
    return jax.device_put(array)


class FlaxPreTrainedModel:
    """HF-4.x-style wrapper: a Linen ``module``, its ``params`` and ``config``; loads/saves canonical checkpoints.

    Subclasses set ``module_class`` and implement ``_module_kwargs`` and ``__call__``.
    """

    config_class = ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    module_class: Any = None

    def __init__(
        self,
        config: ViTConfig,
        input_shape: tuple[int, ...] | None = None,
        seed: int = 0,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        _do_init: bool = True,
        gradient_checkpointing: bool = False,
        scan_layers: bool = False,
        **flags: bool,
    ):
        check_config_type(type(self).__name__, config, self.config_class)
        self.config, self.dtype, self.param_dtype = config, dtype, param_dtype
        self._table_flags = flags
        #: params stacked per layer under ``encoder/layer`` (``nn.scan``); checkpoints stay per layer
        self.scan_layers = scan_layers
        self.module = self.module_class(config=config, dtype=dtype, param_dtype=param_dtype,
                                        gradient_checkpointing=gradient_checkpointing, scan_layers=scan_layers,
                                        **flags)
        self.input_shape = input_shape or (1, config.num_channels, *config.image_hw)
        self._params: Params | None = None
        if _do_init:
            self._params = self.init_weights(jax.random.PRNGKey(seed), self.input_shape)

    # ------------------------------------------------------------------ params
    @property
    def params(self) -> Params:
        if self._params is None:
            raise ValueError("params are not initialised (_do_init=False); pass params= or call init_weights")
        return self._params

    @params.setter
    def params(self, params: Params) -> None:
        self._params = params

    def param_specs(self) -> list[ParamSpec]:
        """This model's rows of the canonical checkpoint table."""
        return param_specs(type(self).__name__, self.config, **self._table_flags)

    def _check_tree(self, input_shape: tuple[int, ...]) -> None:
        """The module's param tree must be exactly the table's paths with the table's (kernel-layout) shapes."""
        x = jax.ShapeDtypeStruct((input_shape[0], *input_shape[2:], input_shape[1]), jnp.float32)
        tree = self._table_tree(jax.eval_shape(lambda x: self.module.init(jax.random.PRNGKey(0), x), x)["params"])
        want = {param_path(s): to_kernel_layout(s.kind, np.empty(s.shape, np.int8)).shape for s in self.param_specs()}
        have = {p: tuple(_get(tree, p).shape) for p in _flat_paths(tree)}
        if have != want:
            raise RuntimeError(f"{type(self).__name__} param tree disagrees with the checkpoint table: "
                               f"only in module {sorted(set(have.items()) - set(want.items()))}, "
                               f"only in table {sorted(set(want.items()) - set(have.items()))}")

    def _module_tree(self, params: Params) -> Params:
        """Canonical (per-layer) tree → the module's layout."""
        return stack_layers(params) if self.scan_layers else params

    def _table_tree(self, params: Params) -> Params:
        """The module's layout → canonical (per-layer) tree, one path per table row."""
        return unstack_layers(params, self.config.num_hidden_layers) if self.scan_layers else params

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, ...], only: set[str] | None = None) -> Params:
        """Fresh params for every table row (or only the rows named in ``only``), HF's init scheme,
        in the module's layout.

        ``input_shape`` is NCHW; it is used to check the module's tree against the table.
        """
        self._check_tree(input_shape)
        return self._module_tree(self._init_table(rng, only))

    def _init_table(self, rng: jax.Array, only: set[str] | None = None) -> Params:
        """Fresh canonical-tree params for every table row, or only the rows named in ``only``."""
        specs = [s for s in self.param_specs() if only is None or s.name in only]
        if not specs:  # from_pretrained with every weight loaded: nothing to draw, nothing to compile
            return {}

        @jax.jit  # one compilation for the whole tree instead of one per shape
        def build(rng: jax.Array) -> Params:
            params: Params = {}
            for key, spec in zip(jax.random.split(rng, max(len(specs), 1)), specs):
                _set(params, param_path(spec), init_param(key, spec, self.config.initializer_range, self.param_dtype))
            return params

        return build(rng)

    def to_bf16(self, params: Params, mask: Any = None) -> Params:
        return to_dtype(params, jnp.bfloat16, mask)

    def to_fp16(self, params: Params, mask: Any = None) -> Params:
        return to_dtype(params, jnp.float16, mask)

    def to_fp32(self, params: Params, mask: Any = None) -> Params:
        return to_dtype(params, jnp.float32, mask)

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialise each encoder layer in the backward pass (``nn.remat``); same numbers."""
        self.module = self.module.clone(gradient_checkpointing=True)

    def num_parameters(self, params: Params | None = None) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params or self.params))

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike[str], params: Params | None = None,
                        max_shard_size: int | str | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` with canonical names and PyTorch layouts."""
        params = self._table_tree(self.params if params is None else params)
        specs = self.param_specs()
        tensors = {s.name: from_kernel_layout(s.kind, np.asarray(_get(params, param_path(s)))) for s in specs}
        config_dict = saved_config_dict(self.config, type(self).__name__, str(jnp.dtype(_get(params, param_path(specs[0])).dtype)))
        write_checkpoint(save_directory, tensors, config_dict, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        config: ViTConfig | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        ignore_mismatched_sizes: bool = False,
        output_loading_info: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> M | tuple[M, dict[str, list]]:
        """Build the model from a local folder with ``config.json`` and canonical (PyTorch-named) weights.

        Constructor flags (``add_pooling_layer=False``) go to the constructor; config fields
        (``num_labels=10``, ``attn_implementation``) override the config.
        """
        path, config, init_kwargs, state = resolve_pretrained_args(
            cls, pretrained_model_name_or_path, config, kwargs, config_class=cls.config_class
        )
        model = cls(config, *model_args, dtype=dtype, param_dtype=param_dtype, _do_init=False, **init_kwargs)
        specs = model.param_specs()
        state, plan = match_checkpoint(
            specs, path, owner=f"{cls.__name__}.from_pretrained({str(path)!r})",
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            state=state,
        )
        fresh = {s.name for s in specs} - set(plan.sources)
        model._check_tree(model.input_shape)
        params = model._init_table(jax.random.PRNGKey(seed), only=fresh)
        for spec in specs:
            if spec.name in plan.sources:
                array = to_kernel_layout(spec.kind, state.read(plan.sources[spec.name]))
                _set(params, param_path(spec), _device_array(array, param_dtype))
        model.params = model._module_tree(params)
        return (model, plan.loading_info()) if output_loading_info else model
