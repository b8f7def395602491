"""Keras 3 (TensorFlow backend) side of the checkpoint contract: init, ``from_pretrained``, ``save_pretrained``.

The canonical checkpoint (HF PyTorch names and layouts, see :mod:`vit_core.weights`) is the
only on-disk format. A canonical name such as ``vit.encoder.layer.0.attention.output.dense.weight``
is a path of PyTorch attribute names; every Keras sublayer carries that attribute name as its
``name=``, so :func:`resolve_variable` walks the path child by child and then maps the row's
*kind* to the Keras variable (:data:`KIND_TO_VARIABLE`, the one place kinds are mapped).
Layouts are transposed only by :func:`~vit_core.weights.to_kernel_layout` / ``from_kernel_layout``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import random
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

import keras
import numpy as np
from keras import ops

from vit_core.checkpoint import write_checkpoint
from vit_core.checks import check_config_type, head_mask_layers
from vit_core.config import ViTConfig
from vit_core.config_hybrid import BitConfig, ViTHybridConfig
from vit_core.imports import import_trivit
from vit_core.outputs import ModelOutput
from vit_core.pretrained import saved_config_dict
from vit_core.weights import Kind, ParamSpec, from_kernel_layout, initial_value, param_specs, to_kernel_layout

# Checkpoints are opened by the conversion layer (every format; see conversion/loading.py); a user's
# conversion.py that shadows it is named in the ImportError rather than failing obscurely.
_loading = import_trivit("conversion.loading")
match_checkpoint, resolve_pretrained_args = _loading.match_checkpoint, _loading.resolve_pretrained_args

__all__ = [
    "TFPreTrainedModel", "ViTConfigSerializable", "activation", "resolve_variable", "register", "KIND_TO_VARIABLE",
]

#: Package name under which every trivit Keras class is registered (``"trivit>TFViTModel"`` in ``.keras`` files).
KERAS_PACKAGE = "trivit"


def register(cls: type) -> type:
    """Register a class for ``.keras`` saving / ``keras.models.load_model`` under package ``trivit``."""
    return keras.saving.register_keras_serializable(package=KERAS_PACKAGE)(cls)


def config_to_dict(config: ViTConfig | BitConfig) -> dict[str, Any]:
    """JSON-able config, runtime fields included (``to_dict`` omits ``attn_implementation``, as HF does)."""
    if isinstance(config, BitConfig):
        return config.to_dict()
    return {**config.to_dict(), "attn_implementation": config.attn_implementation}


#: ``model_type`` → config class, for :meth:`ViTConfigSerializable.from_config`.
CONFIG_CLASSES: dict[str, type] = {c.model_type: c for c in (ViTConfig, ViTHybridConfig, BitConfig)}


@contextlib.contextmanager
def _global_policy(policy: Any) -> Iterator[None]:
    """Build under ``policy`` (a name, a serialized dict or None): trivit sublayers take the global policy."""
    if policy is None:
        yield
        return
    if isinstance(policy, dict):
        policy = keras.dtype_policies.deserialize(policy)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class ViTConfigSerializable:
    """``get_config`` / ``from_config`` for Keras classes whose first argument is a config
    (:class:`ViTConfig`, :class:`ViTHybridConfig` or the backbone's :class:`BitConfig`, told apart by ``model_type``).

    The config travels as its JSON dict under ``"config"``; other constructor options are named by
    :meth:`_init_options`. ``from_config`` builds under the saved dtype policy, so the sublayers (which
    take the global policy) come back in the same precision.
    """

    config: ViTConfig | BitConfig

    def _init_options(self) -> dict[str, Any]:
        return {}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "config": config_to_dict(self.config), **self._init_options()}  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Any:  # noqa: ARG003
        config = dict(config)
        vit_config = config.pop("config")
        if not isinstance(vit_config, (ViTConfig, BitConfig)):
            vit_config = CONFIG_CLASSES[vit_config.get("model_type", ViTConfig.model_type)].from_dict(vit_config)
        policy = config.pop("dtype", None)
        if isinstance(policy, dict):
            policy = keras.dtype_policies.deserialize(policy)
        with _global_policy(policy):
            return cls(vit_config, dtype=policy, **config)

M = TypeVar("M", bound="TFPreTrainedModel")
Tensor = Any  # a tf.Tensor / keras variable


def _gelu_tanh(x: Tensor) -> Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), written out as in PyTorch."""
    return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * ops.power(x, 3.0))))


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    # exact, as torch writes it: x·(1 + erf(x/√2))/2. ops.gelu(approximate=False) goes through erfc in TF,
    # much slower under XLA on CPU (measured), for no accuracy a ViT can see.
    "gelu": lambda x: 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476)),
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "quick_gelu": lambda x: x * ops.sigmoid(1.702 * x),
    "relu": ops.relu,
    "selu": ops.selu,
    "silu": ops.silu,
    "tanh": ops.tanh,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function for a config name (names validated by :class:`ViTConfig`)."""
    return _ACTIVATIONS[name]


#: Parameter kind → attribute of the Keras layer holding it (``None``: the path's last part is the variable).
KIND_TO_VARIABLE: dict[Kind, str | None] = {
    Kind.LINEAR_WEIGHT: "kernel",  # Dense
    Kind.CONV_WEIGHT: "kernel",  # Conv2D
    Kind.BIAS: "bias",
    Kind.NORM_WEIGHT: "gamma",  # LayerNormalization
    Kind.NORM_BIAS: "beta",
    Kind.EMBEDDING: None,  # add_weight on the owning layer (cls_token, mask_token, position_embeddings)
}


def _child(obj: Any, part: str) -> Any:
    """One step of a canonical path: a list index, a sublayer by Keras name, else an attribute."""
    if part.isdigit():
        return obj[int(part)]
    if isinstance(obj, keras.layers.Layer):
        for layer in obj._flatten_layers(include_self=False, recursive=False):
            if layer.name == part:
                return layer
    return getattr(obj, part)  # lists of layers (encoder.layer, decoder) and free variables


def resolve_variable(model: keras.layers.Layer, spec: ParamSpec) -> keras.Variable:
    """The Keras variable holding the canonical row ``spec`` of ``model``."""
    parts = spec.name.split(".")
    leaf = KIND_TO_VARIABLE[spec.kind]
    if leaf is not None:
        parts = parts[:-1]  # drop "weight"/"bias": the layer's own attribute name replaces it
    obj: Any = model
    for part in parts:
        obj = _child(obj, part)
    return obj if leaf is None else getattr(obj, leaf)


def rematerialized(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn`` whose activations are recomputed in the backward pass instead of stored (``tf.recompute_grad``
    through ``keras.remat``); the numbers are the same."""
    return keras.remat(fn)


def plain_error(err: Exception) -> Exception:
    """Mark ``err`` so that Keras passes it on as it is: Keras re-raises an error from a layer's ``call`` with the
    call's arguments appended (a multi-line message) unless it is marked as already annotated."""
    err._keras_call_info_injected = True  # type: ignore[attr-defined]
    return err


def keras_plain(check: Callable[..., Any]) -> Callable[..., Any]:
    """``check`` (from :mod:`vit_core.checks`) whose ValueError / TypeError reaches the user in the words every
    framework uses (see :func:`plain_error`)."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except (ValueError, TypeError) as err:
            raise plain_error(err) from None

    checked.__name__, checked.__doc__ = check.__name__, check.__doc__
    return checked


def _scale_for_replicas(loss: Tensor) -> Tensor:
    """The model's own loss divided by the replica count under a ``tf.distribute`` strategy, as Keras divides
    compiled losses (the replicas' gradients are summed, so the step is the global batch's mean); Keras'
    loss tracker multiplies it back for the reported value."""
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss * ops.cast(1.0 / replicas, loss.dtype)


#: True while :func:`_deferred_variables` builds a model: :meth:`TFPreTrainedModel.post_init` then builds and
#: checks but assigns nothing.
_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("trivit_tf_skip_init", default=False)


@contextlib.contextmanager
def _deferred_variables() -> Iterator[list[keras.Variable]]:
    """Build models whose variables exist but hold no value and ran no initialiser: Keras' own deferred
    creation (variables made inside a ``keras.StatelessScope``). Yields a list that holds, on exit, every
    variable created inside; they are taken off Keras' list of pending initialisations, so the caller gives
    each its value (:func:`_initialise_deferred`, or ``var._deferred_initialize()`` for its own initialiser)
    or drops them. Keras-internal API (``keras.src``), checked by the test suite against the pinned Keras."""
    from keras.src.backend.common import global_state

    def pending() -> list[keras.Variable]:
        return list(global_state.get_global_attribute("uninitialized_variables", None) or [])

    before = pending()
    known = {id(v) for v in before}
    created: list[keras.Variable] = []
    token = _SKIP_INIT.set(True)
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield created
    finally:
        _SKIP_INIT.reset(token)
        created.extend(v for v in pending() if id(v) not in known)
        global_state.set_global_attribute("uninitialized_variables", before)


def _initialise_deferred(var: keras.Variable, value: np.ndarray) -> None:
    """Give a deferred variable (see :func:`_deferred_variables`) its first value: one copy, no initialiser."""
    import tensorflow as tf

    with tf.init_scope():  # as Keras' own deferred initialisation: eager, outside any tf.function
        var._initialize(var._convert_to_tensor(value, dtype=var.dtype))
    var._initializer = None


def _kernel(spec: ParamSpec, array: np.ndarray) -> np.ndarray:
    """A canonical (PyTorch-layout) checkpoint array in Keras' layout, float32, C-contiguous."""
    return np.ascontiguousarray(to_kernel_layout(spec.kind, array), dtype=np.float32)


class TFPreTrainedModel(ViTConfigSerializable, keras.Model):
    """Base of every trivit Keras model; mirrors :class:`vit_torch.modeling_utils.TorchPreTrainedModel`."""

    config_class = ViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"

    def __init__(self, config: ViTConfig, **kwargs: Any):
        super().__init__(**kwargs)
        check_config_type(type(self).__name__, config, self.config_class)
        self.config = config
        self._table_flags: dict[str, bool] = {}

    def _init_options(self) -> dict[str, Any]:
        return dict(self._table_flags)  # the constructor flags (add_pooling_layer, use_mask_token)

    # ------------------------------------------------------------------ weights table
    def param_specs(self) -> list[ParamSpec]:
        """This model's rows of the canonical checkpoint table."""
        return param_specs(type(self).__name__, self.config, **dict(self._table_flags))

    def variables_by_name(self) -> dict[str, tuple[ParamSpec, keras.Variable]]:
        """Canonical name → (row, Keras variable), in table order."""
        return {s.name: (s, resolve_variable(self, s)) for s in self.param_specs()}

    def post_init(self) -> None:
        """Build every weight (no forward pass), check them against the table, initialise them as HF does."""
        h, w = self.config.image_hw
        self.build((None, self.config.num_channels, h, w))
        table = self.variables_by_name()
        ours = {id(v) for _, v in table.values()}
        model = {id(v): v.path for v in self.trainable_weights}
        if ours != set(model):
            raise RuntimeError(
                f"{type(self).__name__} variables disagree with the checkpoint table: only in model "
                f"{sorted(p for i, p in model.items() if i not in ours)}, table rows without a distinct variable: "
                f"{len(table) - len(ours & set(model))}"
            )
        if _SKIP_INIT.get():  # from_pretrained's deferred build: it gives every variable its loaded value itself
            return
        for spec, var in table.values():
            var.assign(to_kernel_layout(spec.kind, initial_value(spec, self.config.initializer_range)))

    # ------------------------------------------------------------------ gradient checkpointing
    def _checkpointed_layers(self) -> list[Any]:
        return [layer for layer in self._flatten_layers(include_self=False) if hasattr(layer, "gradient_checkpointing")]

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each encoder layer (and each BiT stage) in the backward pass of ``training=True``
        calls instead of storing its activations; calls asking for attentions run unchanged."""
        for layer in self._checkpointed_layers():
            layer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for layer in self._checkpointed_layers():
            layer.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self._checkpointed_layers())

    # ------------------------------------------------------------------ forward helpers
    def _head_mask(self, head_mask: Tensor | None) -> Tensor | None:
        """(heads,) or (layers, heads), 1 keeps a head → (layers, 1, heads, 1, 1) in the compute dtype."""
        if head_mask is None:
            return None
        c = self.config
        head_mask = ops.convert_to_tensor(head_mask)
        if not keras_plain(head_mask_layers)(head_mask.shape, c):
            head_mask = ops.broadcast_to(head_mask[None], (c.num_hidden_layers, c.num_attention_heads))
        return ops.cast(head_mask[:, None, :, None, None], self.compute_dtype)

    @staticmethod
    def _unpack_inputs(pixel_values: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Accept ``model({"pixel_values": x, "labels": y, ...})`` (what ``fit`` passes) as well as keywords."""
        if isinstance(pixel_values, dict):
            extra = dict(pixel_values)
            pixel_values = extra.pop("pixel_values", None)
            for key, value in extra.items():
                if key not in kwargs:
                    raise TypeError(f"unexpected input {key!r}; expected one of {['pixel_values', *kwargs]}")
                if kwargs[key] is None:
                    kwargs[key] = value
        return pixel_values, kwargs

    # ------------------------------------------------------------------ keras training hooks
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):  # noqa: ANN001, ANN201
        """``compile()`` without a loss trains on the model's own loss (labels in ``x`` or given as ``y``);
        with a compiled loss, that loss sees the first prediction field (``logits`` / ``reconstruction``)."""
        if isinstance(y_pred, ModelOutput):
            if self._compile_loss is None:
                loss = y_pred.loss
                if loss is None and y is not None and hasattr(self, "_classification_loss"):
                    loss = self._classification_loss(y_pred.logits, y)
                if loss is None:
                    raise ValueError("No loss to compute: pass labels (in x or as y) or a `loss` to compile()")
                return _scale_for_replicas(loss + ops.sum(self.losses) if self.losses else loss)
            y_pred = self._prediction(y_pred)
        return super().compute_loss(x, y, y_pred, sample_weight, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):  # noqa: ANN001, ANN201
        if isinstance(y_pred, ModelOutput):
            y_pred = self._prediction(y_pred)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    @staticmethod
    def _prediction(out: ModelOutput) -> Tensor:
        return next(v for k, v in out.items() if k != "loss")

    # ------------------------------------------------------------------ export
    def serving_signature(self, batch_size: int | None = None) -> list[Any]:
        """``[TensorSpec((batch_size, C, H, W), float32, name="pixel_values")]``: NCHW at the config's image
        size (the size is fixed when the graph is traced; ``None`` batch stays dynamic)."""
        import tensorflow as tf

        h, w = self.config.image_hw
        return [tf.TensorSpec((batch_size, self.config.num_channels, h, w), tf.float32, name="pixel_values")]

    def serve(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """The exported inference function: NCHW float32 in, ``{field: tensor}`` out (``logits``,
        ``last_hidden_state`` + ``pooler_output``, or ``reconstruction``); no hidden states / attentions."""
        out = self(pixel_values, output_attentions=False, output_hidden_states=False, return_dict=True, training=False)
        return {k: ops.cast(v, "float32") for k, v in out.items()}

    def export(  # type: ignore[override]
        self,
        filepath: str | os.PathLike[str],
        format: str = "tf_saved_model",  # noqa: A002
        verbose: bool | None = None,
        input_signature: Any = None,
        batch_size: int | None = None,
        processor: Any = None,
        quantize: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Export for inference without trivit installed (see :mod:`vit_tf.export`).

        ``format="tf_saved_model"``: :func:`~vit_tf.export.export_saved_model` (signatures ``serving_default``:
        NCHW float32 ``pixel_values``, and ``serve_images``: uint8 NHWC images preprocessed in the graph with
        ``processor``). ``format="litert"``: :func:`~vit_tf.export.export_tflite` (``quantize`` None or
        ``"dynamic_range"``). ``batch_size`` None keeps the batch dynamic in both. Other formats go to
        ``keras.Model.export``.
        """
        if format not in ("tf_saved_model", "litert"):
            ours = {"batch_size": batch_size, "processor": processor, "quantize": quantize}
            if given := sorted(k for k, v in ours.items() if v is not None):
                raise TypeError(f"{given} apply to format='tf_saved_model' / 'litert' only, got format={format!r}")
            return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)
        from .export import export_saved_model, export_tflite

        unused = {**kwargs, **({"input_signature": input_signature} if input_signature is not None else {})}
        if unused:
            raise TypeError(f"export(format={format!r}) takes no {sorted(unused)}: the signatures are fixed by the "
                            "config (batch_size sets the batch); add other endpoints with keras.export.ExportArchive")
        if format == "litert":
            if processor is not None:
                raise TypeError("processor applies to format='tf_saved_model' only (TFLite takes pixel_values)")
            return export_tflite(self, filepath, quantize=quantize, batch_size=batch_size)
        if quantize is not None:
            raise TypeError(f"quantize applies to format='litert' only, got quantize={quantize!r}")
        return export_saved_model(self, filepath, processor=processor, batch_size=batch_size)

    # ------------------------------------------------------------------ save / load
    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """Canonical ``{name: array}`` (PyTorch layouts) in table order: what :meth:`save_pretrained` writes."""
        return {
            name: np.ascontiguousarray(from_kernel_layout(spec.kind, np.asarray(var.numpy())))
            for name, (spec, var) in self.variables_by_name().items()
        }

    def save_pretrained(self, save_directory: str | os.PathLike[str], max_shard_size: int | str | None = None) -> None:
        """Write ``config.json`` + canonical ``model.safetensors`` (readable by vit_torch and HF PyTorch), atomically."""
        config_dict = saved_config_dict(self.config, type(self).__name__, "float32")
        write_checkpoint(save_directory, self.state_dict_numpy(), config_dict, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        config: ViTConfig | None = None,
        attn_implementation: str | None = None,
        ignore_mismatched_sizes: bool = False,
        output_loading_info: bool = False,
        **kwargs: Any,
    ) -> M | tuple[M, dict[str, list]]:
        """Build the model from a local folder holding ``config.json`` and canonical weights.

        Constructor flags (``add_pooling_layer=False``) go to the constructor; config fields
        (``num_labels=10``) override the config. Weights are float32.
        """
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        path, config, init_kwargs, state = resolve_pretrained_args(
            cls, pretrained_model_name_or_path, config, kwargs, config_class=cls.config_class
        )
        seeds = random.getstate()  # Keras draws layer seeds from Python's random when building
        with _deferred_variables() as created:
            model = cls(config, *model_args, **init_kwargs)
        state, plan = match_checkpoint(
            model.param_specs(), path, owner=f"{cls.__name__}.from_pretrained({str(path)!r})",
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            state=state,
        )
        table = model.variables_by_name()
        if set(table) == set(plan.sources):
            for name, key in plan.sources.items():  # each variable created from its loaded value, one at a time
                spec, var = table[name]
                _initialise_deferred(var, _kernel(spec, state.read(key)))
            ours = {id(v) for _, v in table.values()}
            for var in created:  # Keras' own state (e.g. seed generators): its own initialisers
                if id(var) not in ours:
                    var._deferred_initialize()
        else:
            # Some weights are freshly initialised (a missing or re-sized head): build and initialise the model
            # exactly as its constructor does, so a seeded run draws the very same values (and layer seeds), then load.
            random.setstate(seeds)
            model = cls(config, *model_args, **init_kwargs)
            table = model.variables_by_name()
            for name, key in plan.sources.items():
                spec, var = table[name]
                var.assign(_kernel(spec, state.read(key)))
        return (model, plan.loading_info()) if output_loading_info else model
