"""Model configuration: HF-4.x-compatible ``ViTConfig`` that reads and writes ``config.json``.

Every default lives here and only here. Unknown keys found in a ``config.json`` are kept on
``config.extra`` and written back, so a round trip through trivit loses nothing.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .atomic import atomic_write_json

__all__ = [
    "ConfigError", "ViTConfig", "SUPPORTED_ACTIVATIONS", "CONFIG_NAME", "VIT_VARIANTS", "MAX_PARAMETERS",
    "MAX_NUM_LABELS", "SUPPORTED_MODEL_TYPES", "check_field_types",
]

CONFIG_NAME = "config.json"

#: ``hidden_act`` values every framework implements, with the same numerics as HF PyTorch's ACT2FN.
SUPPORTED_ACTIVATIONS: tuple[str, ...] = (
    "gelu",  # exact, erf-based
    "relu",
    "selu",
    "gelu_new",  # tanh approximation
    "gelu_pytorch_tanh",  # tanh approximation (same formula, PyTorch's kernel)
    "quick_gelu",  # x * sigmoid(1.702 x)
    "silu",
)
#: ``pooler_act`` may also be tanh (HF's default).
SUPPORTED_POOLER_ACTIVATIONS: tuple[str, ...] = ("tanh", *SUPPORTED_ACTIVATIONS)
#: Kernels for resizing the position-embedding grid (``interpolate_pos_encoding``).
SUPPORTED_INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear")
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")
#: Fields that describe a run, not a model: never serialised.
_RUNTIME_FIELDS: frozenset[str] = frozenset({"attn_implementation"})
PROBLEM_TYPES: tuple[str, ...] = (
    "regression",
    "single_label_classification",
    "multi_label_classification",
)

#: Named presets: width, depth, heads, MLP width (the ViT paper's table, plus DeiT's Ti and S).
VIT_VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
VIT_PATCH_SIZES: tuple[int, ...] = (8, 14, 16, 32)
#: A config whose largest model would hold more parameters than this is refused before anything is
#: allocated (a typo such as ``hidden_size: 2**31`` would otherwise ask for exabytes). ViT-H/14 has 0.63e9;
#: the bound leaves room for 30x that. Raise it here (``vit_core.config.MAX_PARAMETERS = ...``) if needed.
MAX_PARAMETERS: int = 20_000_000_000
#: ``num_labels`` above this is refused before ``id2label`` is built (one dict entry per label).
MAX_NUM_LABELS: int = 1_000_000
#: ``model_type`` values trivit reads, with their config classes (``config_hybrid`` adds "vit-hybrid").
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("vit", "vit-hybrid")


class ConfigError(ValueError):
    """A configuration field has an invalid value; the message names the field."""


# ------------------------------------------------------------------------------------- field types
def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_key(k: Any) -> bool:
    """An ``id2label`` key: an int, or its JSON spelling (a string of decimal digits)."""
    return _is_int(k) or (isinstance(k, str) and re.fullmatch(r"-?\d{1,18}", k) is not None)


def _matches(value: Any, tp: Any) -> bool:
    """``value`` fits the annotation ``tp`` (the forms the configs use). Floats take ints; ints and
    floats never take booleans; lists take tuples; ``dict[int, ...]`` takes JSON's string keys."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is int:
        return _is_int(value)
    if tp is float:
        return (_is_int(value) or isinstance(value, float)) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    if origin is tuple:  # tuple[int, int]: a pair, from JSON a list of two
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_matches, value, args))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        key_ok = _is_int_key if args[0] is int else (lambda k: _matches(k, args[0]))
        return isinstance(value, Mapping) and all(key_ok(k) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"unsupported field annotation {tp!r}")  # a new field type: teach _matches


def _describe(tp: Any) -> str:
    """``tp`` in words, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    plural = lambda t: _describe(t).removeprefix("an ").removeprefix("a ") + "s"  # noqa: E731
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {plural(args[0])}"
    if origin is list:
        return f"a list of {plural(args[0])}"
    if origin is dict:
        if args[1] is Any:
            return "an object"
        return f"an object mapping {'integer keys' if args[0] is int else plural(args[0])} to {plural(args[1])}"
    names = {int: "an int", float: "a number", str: "a string", bool: "a boolean (true/false)", type(None): "null"}
    return names.get(tp, "any value" if tp is Any else f"a {getattr(tp, '__name__', tp)}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.name != "extra"}


def check_field_types(config: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` for the first field whose value does not fit its annotation, naming the
    field (``prefix`` + name), the expected type and the value (``"hidden_size": "768"`` in a config.json)."""
    for name, tp in _field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, tp):
            raise ConfigError(
                f"{prefix}{name} must be {_describe(tp)}, got {_short(value)} ({type(value).__name__})"
            )
    if not isinstance(getattr(config, "extra", {}), Mapping):
        raise ConfigError(f"{prefix}extra must be an object, got {_short(config.extra)}")


def check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")


def check_parameter_bound(owner: str, count: int) -> None:
    """Refuse a model of more than :data:`MAX_PARAMETERS` parameters, before anything is allocated."""
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"{owner} describes a model of about {count:.3g} parameters ({4 * count / 2**30:.3g} GiB in float32), "
            f"above trivit's bound of {MAX_PARAMETERS:.3g} (vit_core.config.MAX_PARAMETERS); check its sizes"
        )


C = TypeVar("C", bound="ViTConfig")


def _label_maps(num_labels: int) -> tuple[dict[int, str], dict[str, int]]:
    id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    return id2label, {v: k for k, v in id2label.items()}


@dataclass
class ViTConfig:
    """Configuration of a ViT model; field names and defaults are those of HF transformers 4.x.

    Shape bookkeeping: an image of ``image_size`` (int or (H, W)) is cut into
    ``(H // patch_size) * (W // patch_size)`` patches; the sequence adds one class token.
    """

    model_type: ClassVar[str] = "vit"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    encoder_stride: int = 16
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    # trivit parity knob (not in HF; HF PyTorch uses bicubic, align_corners=False, no antialias).
    interpolate_pos_mode: str = "bicubic"
    #: "sdpa" (fused kernel) or "eager" (explicit softmax); both give the same numbers, and either
    #: returns correct attentions / honours head_mask. Not written to config.json (as in HF).
    attn_implementation: str = "sdpa"
    # Fields common to every HF config.
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    num_labels: int | None = None
    problem_type: str | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    architectures: list[str] | None = None
    #: Keys we do not model (``transformers_version``, ``dtype``, ...), kept for the round trip.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)  # type: ignore[assignment]
        if not self.pooler_output_size:
            self.pooler_output_size = self.hidden_size
        self._init_labels()
        self.validate()

    # ----------------------------------------------------------------- labels
    def _init_labels(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ConfigError(
                    f"num_labels={self.num_labels} disagrees with id2label, which has "
                    f"{len(self.id2label)} entries"
                )
            self.num_labels = len(self.id2label)
        else:
            n = 2 if self.num_labels is None else self.num_labels
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"num_labels must be an int >= 0, got {n!r}")
            if n > MAX_NUM_LABELS:
                raise ConfigError(
                    f"num_labels={n} is above trivit's bound of {MAX_NUM_LABELS} (vit_core.config.MAX_NUM_LABELS)"
                )
            self.num_labels = n
            self.id2label, _ = _label_maps(n)
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}

    def set_num_labels(self, num_labels: int) -> None:
        """Change the number of labels, regenerating ``id2label``/``label2id`` (HF semantics)."""
        self.id2label, self.label2id = None, None
        self.num_labels = num_labels
        self._init_labels()

    # ------------------------------------------------------------- validation
    @property
    def image_hw(self) -> tuple[int, int]:
        """``image_size`` as (height, width)."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def feature_map_hw(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the map the patch projection cuts into p×p patches, for an H×W input: the
        image itself (the hybrid: its backbone's output map)."""
        return height, width

    def feature_map_name(self) -> str:
        """What :meth:`feature_map_hw` measures, in error messages."""
        return "the image"

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (rows, columns) of an H×W input: the feature map over p, (H // p, W // p) for the ViT."""
        h, w = self.feature_map_hw(height, width)
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.feature_grid(*self.image_hw)
        return gh * gw

    @property
    def feature_channels(self) -> int:
        """Channels of the map the patch projection reads: the image's (the hybrid's backbone map has its own)."""
        return self.num_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters_estimate(self) -> int:
        """Parameters of the largest model this config builds (exact, from the sizes alone; no allocation):
        the encoder plus the biggest head (pooler with mask token, classifier, or the MIM decoder)."""
        d, i, n = self.hidden_size, self.intermediate_size, self.num_patches
        layer = 3 * d * d + (3 * d if self.qkv_bias else 0) + d * d + d + 2 * d * i + i + d + 4 * d
        patch = self.feature_channels * self.patch_size**2 * d + d
        encoder = d + (n + 1) * d + patch + self._backbone_parameters() + self.num_hidden_layers * layer + 2 * d
        return encoder + max(self._head_parameter_counts())

    def _backbone_parameters(self) -> int:
        return 0

    def _head_parameter_counts(self) -> list[int]:
        """Parameter counts of each head variant over the encoder (see :meth:`num_parameters_estimate`)."""
        d, labels, p = self.hidden_size, int(self.num_labels or 0), int(self.pooler_output_size or self.hidden_size)
        decoder = self.encoder_stride**2 * self.num_channels
        return [d + d * p + p, d * labels + labels, d + d * decoder + decoder]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for name in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "patch_size", "num_channels", "encoder_stride", "pooler_output_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        h, w = self.image_hw if isinstance(self.image_size, (int, tuple)) else (0, 0)
        if min(h, w) <= 0 or (isinstance(self.image_size, tuple) and len(self.image_size) != 2):
            raise ConfigError(f"image_size must be a positive int or (height, width), got {self.image_size!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        check_parameter_bound(type(self).__name__, self.num_parameters_estimate())
        self._check_image_divisible(h, w)
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; choose one of {list(SUPPORTED_ACTIVATIONS)}"
            )
        if self.pooler_act not in SUPPORTED_POOLER_ACTIVATIONS:
            raise ConfigError(
                f"pooler_act {self.pooler_act!r} is not supported; choose one of {list(SUPPORTED_POOLER_ACTIVATIONS)}"
            )
        if self.interpolate_pos_mode not in SUPPORTED_INTERPOLATIONS:
            raise ConfigError(
                f"interpolate_pos_mode {self.interpolate_pos_mode!r} is not supported; choose one of "
                f"{list(SUPPORTED_INTERPOLATIONS)}"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"attn_implementation {self.attn_implementation!r} must be one of {list(ATTN_IMPLEMENTATIONS)}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ConfigError(f"{name} must be a float in [0, 1), got {p!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            check_positive_float(name, getattr(self, name))
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type {self.problem_type!r} must be None or one of {list(PROBLEM_TYPES)}")

    def _check_image_divisible(self, h: int, w: int) -> None:
        """``image_size`` must give a feature map that is a whole number of patches. HF floors instead (the
        conv drops the remainder pixels); trivit refuses, as it refuses such inputs at run time."""
        fh, fw = self.feature_map_hw(h, w)
        p = self.patch_size
        if min(fh, fw) < p:
            raise ConfigError(
                f"image_size {self.image_size!r} gives {self.feature_map_name()} of {fh}×{fw}, smaller than one "
                f"{p}×{p} patch; use a larger image_size"
            )
        if fh % p or fw % p:
            where = "" if (fh, fw) == (h, w) else f" (it gives {self.feature_map_name()} of {fh}×{fw})"
            raise ConfigError(f"image_size {self.image_size!r} must be divisible by patch_size ({p}){where}")

    # ---------------------------------------------------------- construction
    @classmethod
    def from_variant(cls: type[C], name: str, **overrides: Any) -> C:
        """A named preset such as ``"B/16"``, ``"ti/8"``, ``"L/14"`` (width/depth/heads from the ViT paper)."""
        try:
            size, patch = name.replace("-", "/").split("/")
            key = {k.lower(): k for k in VIT_VARIANTS}[size.lower()]
            patch_size = int(patch)
        except (ValueError, KeyError):
            raise ConfigError(
                f"unknown ViT variant {name!r}; expected SIZE/PATCH with SIZE in "
                f"{list(VIT_VARIANTS)} and PATCH in {list(VIT_PATCH_SIZES)}, e.g. 'B/16'"
            ) from None
        if patch_size not in VIT_PATCH_SIZES:
            raise ConfigError(f"unknown patch size in variant {name!r}; choose one of {list(VIT_PATCH_SIZES)}")
        hidden, depth, heads, mlp = VIT_VARIANTS[key]
        kwargs: dict[str, Any] = dict(
            hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
            intermediate_size=mlp, patch_size=patch_size, encoder_stride=patch_size,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls: type[C], config_dict: Mapping[str, Any], **overrides: Any) -> C:
        """Build from an HF-style dict; unknown keys go to ``extra``; ``overrides`` win."""
        if not isinstance(config_dict, Mapping):
            raise ConfigError(f"a config must be a JSON object (a dict), got {type(config_dict).__name__}")
        merged = {**config_dict, **overrides}
        known = cls._field_names()
        model_type = merged.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            supported = "supported" if model_type in SUPPORTED_MODEL_TYPES else "not supported"
            raise ConfigError(
                f"model_type is {_short(model_type)} ({supported}), but {cls.__name__} expects {cls.model_type!r}; "
                f"trivit reads model_type {list(SUPPORTED_MODEL_TYPES)}"
            )
        extra = merged.pop("extra", None) or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"extra must be an object, got {_short(extra)}")
        extra = dict(extra)
        kwargs = {}
        for k, v in merged.items():
            (kwargs if k in known else extra)[k] = v
        if "num_labels" in overrides and "id2label" not in overrides:
            kwargs.pop("id2label", None)
            kwargs.pop("label2id", None)
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls: type[C], path: str | os.PathLike[str]) -> C:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls: type[C], path: str | os.PathLike[str], **overrides: Any) -> C:
        """Read ``path/config.json`` (or ``path`` itself if it is a JSON file); ``overrides`` win."""
        p = Path(path)
        file = p / CONFIG_NAME if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} found at {p} (trivit never downloads; pass a local folder)")
        config = cls.from_json_file(file)
        return cls.from_dict(config.to_dict(), **overrides) if overrides else config

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """An HF-compatible dict (``id2label`` keys as strings, as in ``config.json``)."""
        out: dict[str, Any] = dict(self.extra)
        for name in sorted(self._field_names() - _RUNTIME_FIELDS):
            out[name] = copy.deepcopy(getattr(self, name))
        out["image_size"] = self.image_size if isinstance(self.image_size, int) else list(self.image_size)
        out["id2label"] = {str(k): v for k, v in (self.id2label or {}).items()}
        out["model_type"] = self.model_type
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``save_directory/config.json`` atomically."""
        atomic_write_json(Path(save_directory) / CONFIG_NAME, self.to_dict())

    def copy(self: C, **changes: Any) -> C:
        return type(self).from_dict({**self.to_dict(), "attn_implementation": self.attn_implementation}, **changes)

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    def output_flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """A call's ``output_attentions``, ``output_hidden_states``, ``return_dict``: each argument
        if given, else this config's default (HF semantics)."""
        return (
            self.output_attentions if output_attentions is None else bool(output_attentions),
            self.output_hidden_states if output_hidden_states is None else bool(output_hidden_states),
            self.return_dict if return_dict is None else bool(return_dict),
        )

    @property
    def _attn_implementation(self) -> str:  # HF spelling
        return self.attn_implementation

    def resolve_problem_type(self, labels_are_integers: bool) -> str:
        """``problem_type`` if set, else HF's inference: one label → regression; integer labels →
        single-label classification; otherwise multi-label. Unlike HF, the config is not mutated."""
        if self.problem_type is not None:
            return self.problem_type
        if self.num_labels == 1:
            return "regression"
        return "single_label_classification" if labels_are_integers else "multi_label_classification"
