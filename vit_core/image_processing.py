"""ViT image preprocessing: a framework-agnostic drop-in for Hugging Face's ``ViTImageProcessor``.

Only numpy and Pillow are needed; torch / TensorFlow / JAX are imported lazily, and only when the
caller hands in one of their arrays or asks for ``return_tensors="pt" | "tf" | "jax"``.

The numerics follow transformers 4.x step for step, so outputs match HF to float32 rounding:

1. resize through Pillow: a float image that is all integers is cast to uint8 as is, a float image
   in [0, 1] is scaled by 255 (float64, then float32) and *truncated* to uint8, resized, then
   scaled back by 1/255 (any other float range is an error, as in HF);
2. rescale: ``(x.astype(float64) * rescale_factor).astype(float32)``;
3. normalize: ``(x - mean) / std`` in the image's float dtype (float32 for integer images).

Deliberate differences from HF (each only where HF fails or is ambiguous):

* ``do_convert_rgb`` defaults to True, and ``None`` (as HF configs store it) also means "convert":
  PIL images of any mode become RGB via ``Image.convert("RGB")``; arrays with 1 (or no) channel are
  repeated to 3, 2-channel (gray + alpha) arrays keep the gray channel, 4-channel (RGBA) arrays drop
  alpha — the same as Pillow's own conversions. HF raises on all such inputs.
* ``pixel_values`` is always one stacked float32 array (HF gives a list for ``return_tensors=None``
  and keeps uint8/float64 when every step is switched off).
* Each image's channel layout is inferred on its own (HF infers from the first image only).
* ``size={"shortest_edge": s[, "longest_edge": m]}`` resizes keeping the aspect ratio, with HF's
  rounding (HF's ViT processor raises on it); other HF size dicts are rejected up front.
* Unknown ``preprocess`` keyword arguments raise ``TypeError`` instead of being dropped with a warning.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import atomic_write_json

__all__ = ["BatchFeature", "ViTFeatureExtractor", "ViTImageProcessor", "CONFIG_NAME"]

CONFIG_NAME = "preprocessor_config.json"
_FIELDS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
           "image_mean", "image_std", "do_convert_rgb")
_DROPPED_KEYS = ("image_processor_type", "feature_extractor_type")
_SIZE_KEYS = (("height", "width"), ("shortest_edge",), ("shortest_edge", "longest_edge"))
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_FRAMEWORKS = {"pt": ("torch", "torch"), "tf": ("tensorflow", "tf"), "jax": ("jax.numpy", "flax")}
_feature_extractor_warned = False


class BatchFeature(dict):  # type: ignore[type-arg]
    """A ``dict`` of model inputs whose keys can also be read as attributes (``out.pixel_values``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no key {name!r}") from None


def _enum_value(value: Any) -> Any:
    """Unwrap HF's string enums (``ChannelDimension``, ``TensorType``) to their plain value."""
    return getattr(value, "value", value)


def _pick(value: Any, default: Any) -> Any:
    """A per-call override, or the instance default when the override is None."""
    return default if value is None else value


def _size_dict(size: Any, name: str = "size",
               allowed: Sequence[tuple[str, ...]] = _SIZE_KEYS) -> dict[str, int]:
    """Normalize ``size`` (int, (height, width) or an HF size dict) to a validated dict.

    ``name`` is the argument named in errors; ``allowed`` the key sets accepted.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, Mapping) or set(size) not in [set(keys) for keys in allowed]:
        keys = ["{" + ", ".join(map(repr, keys)) + "}" for keys in allowed]
        keys = " or ".join(filter(None, (", ".join(keys[:-1]), keys[-1])))
        raise ValueError(f"`{name}` must be an int, a (height, width) pair or a dict with keys "
                         f"{keys}; got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
        raise ValueError(f"`{name}` values must be positive ints, got {dict(size)!r}")
    return dict(size)


def _resample(resample: Any) -> int:
    """Validate a PIL resampling filter (enum or int) and return it as an int."""
    if isinstance(resample, bool) or not isinstance(resample, int) or resample not in _RESAMPLE_NAMES:
        raise ValueError(f"`resample` must be a PIL resampling filter {_RESAMPLE_NAMES}, got {resample!r}")
    return int(resample)


def _target_hw(size: Mapping[str, int], height: int, width: int) -> tuple[int, int]:
    """Output (height, width) for an image of the given size, with HF's rounding."""
    if "height" in size:
        return size["height"], size["width"]
    short, long = sorted((height, width))
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    max_size = size.get("longest_edge")
    if max_size is not None:
        if max_size <= new_short:
            raise ValueError(f"`size['longest_edge']` ({max_size}) must exceed `size['shortest_edge']`")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _as_array(image: Any) -> np.ndarray:
    """numpy view of a numpy / torch / TensorFlow / JAX array, found by duck typing (no imports)."""
    if isinstance(image, np.ndarray):
        array = image
    else:
        root = type(image).__module__.split(".")[0]
        if root == "torch":
            tensor = image.detach().cpu()
            array = (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
        elif root in ("tensorflow", "keras"):
            array = image.numpy()
        elif root in ("jax", "jaxlib"):
            array = np.asarray(image)
        else:
            raise TypeError("images must be PIL images, numpy arrays or torch / TensorFlow / JAX "
                            f"tensors (or a list of them), got {type(image).__module__}.{type(image).__name__}")
    if array.dtype.kind not in "uif":
        raise TypeError(f"image arrays must have an integer or float dtype, got {array.dtype}")
    return array


def _flatten(images: Any) -> list[Image.Image | np.ndarray]:
    """One image, a 4-D batch or (nested) lists of them → a flat list of PIL images and arrays."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    array = _as_array(images)
    if array.ndim == 4:
        return list(array)
    if array.ndim not in (2, 3):
        raise ValueError("each image must be a 2-D (H, W) or 3-D (H, W, C) / (C, H, W) array, or a "
                         f"4-D batch of those; got a {array.ndim}-D array of shape {array.shape}")
    return [array]


def _to_hwc(image: Image.Image | np.ndarray, layout: str | None, convert_rgb: bool) -> tuple[np.ndarray, str]:
    """Channels-last array for one image, plus the layout it came in (given or inferred as HF does)."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB") if convert_rgb and image.mode != "RGB" else image)
        layout = "channels_last"
    if image.ndim == 2:
        image, layout = image[..., None], "channels_last"
    elif layout is None:  # HF's rule: a leading axis of size 1 or 3 wins, then a trailing one.
        for counts in ((1, 3), (2, 4)):
            if image.shape[0] in counts or image.shape[-1] in counts:
                layout = "channels_first" if image.shape[0] in counts else "channels_last"
                break
        else:
            raise ValueError(f"cannot infer the channel axis of an image of shape {image.shape}: "
                             "expected 1-4 channels first or last; pass `input_data_format`")
    elif layout not in ("channels_first", "channels_last"):
        raise ValueError(f"`input_data_format` must be 'channels_first' or 'channels_last', got {layout!r}")
    if layout == "channels_first":
        image = image.transpose(1, 2, 0)
    if not 1 <= image.shape[-1] <= 4 or 0 in image.shape:
        raise ValueError(f"images must have 1-4 channels and non-zero height and width; got an "
                         f"image of shape {image.shape} (channels last)")
    if convert_rgb and image.shape[-1] != 3:  # gray → RGB, gray + alpha → RGB, RGBA → RGB
        image = image[..., :3] if image.shape[-1] == 4 else np.repeat(image[..., :1], 3, axis=-1)
    return image, layout


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize a channels-last array through Pillow exactly as HF's ``image_transforms.resize``."""
    scaled = False
    if image.dtype != np.uint8:
        if np.allclose(image, image.astype(int)):
            if image.min() < 0 or image.max() > 255:
                raise ValueError(f"integer-valued images must lie in [0, 255], got "
                                 f"[{image.min()}, {image.max()}]")
        elif image.min() >= 0 and image.max() <= 1:
            scaled = True
            image = (image.astype(np.float64) * 255).astype(np.float32)
        else:
            raise ValueError(f"float images must lie in [0, 1] or hold integers in [0, 255], got "
                             f"[{image.min()}, {image.max()}]")
    pil = Image.fromarray((image[..., 0] if image.shape[-1] == 1 else image).astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=resample))
    out = out[..., None] if out.ndim == 2 else out
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else out


def _per_channel(values: Any, channels: int, name: str, dtype: np.dtype) -> np.ndarray:
    """``image_mean`` / ``image_std`` as an array broadcastable over the channel axis."""
    array = np.array(values, dtype=dtype)
    if array.ndim != 0 and array.shape != (channels,):
        raise ValueError(f"`{name}` must be a float or {channels} floats (one per channel), got {values!r}")
    return array


def _to_framework(array: np.ndarray, return_tensors: Any) -> Any:
    """Hand ``array`` back as numpy (None / "np") or as a torch / TensorFlow / JAX array."""
    kind = _enum_value(return_tensors)
    if kind in (None, "np"):
        return array
    if kind not in _FRAMEWORKS:
        raise ValueError(f"`return_tensors` must be None, 'np', 'pt', 'tf' or 'jax', got {kind!r}")
    module, extra = _FRAMEWORKS[kind]
    try:
        lib = importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"return_tensors={kind!r} needs {module.split('.')[0]}: "
                          f"pip install 'trivit[{extra}]'") from err
    return getattr(lib, {"pt": "from_numpy", "tf": "convert_to_tensor", "jax": "asarray"}[kind])(array)


class ViTImageProcessor:
    """Resize → rescale → normalize images into ViT ``pixel_values``, bit-compatible with HF.

    Args mirror ``transformers.ViTImageProcessor``: ``do_resize`` / ``size`` (default 224×224;
    int, (height, width) or HF size dict) / ``resample`` (PIL filter, default bilinear),
    ``do_rescale`` / ``rescale_factor`` (1/255), ``do_normalize`` / ``image_mean`` / ``image_std``
    (0.5 each), ``do_convert_rgb`` (default True, see the module docstring). Extra keyword
    arguments (e.g. unknown keys of a loaded config) are kept as attributes and saved back.
    """

    model_input_names = ["pixel_values"]
    #: The settings :meth:`to_dict` writes (subclasses with more settings extend it).
    _fields: tuple[str, ...] = _FIELDS

    def __init__(self, do_resize: bool = True, size: Any = None, resample: Any = Image.BILINEAR,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | Sequence[float] | None = None,
                 image_std: float | Sequence[float] | None = None,
                 do_convert_rgb: bool | None = True, **kwargs: Any) -> None:
        self.do_resize = do_resize
        self.size = self._parse_size({"height": 224, "width": 224} if size is None else size)
        self.resample = _resample(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = [0.5, 0.5, 0.5] if image_mean is None else image_mean
        self.image_std = [0.5, 0.5, 0.5] if image_std is None else image_std
        self.do_convert_rgb = do_convert_rgb
        self._extra_keys: list[str] = []
        for key, value in kwargs.items():
            if key in _DROPPED_KEYS:
                continue
            if hasattr(type(self), key) or key.startswith("_"):
                raise ValueError(f"config key {key!r} clashes with a ViTImageProcessor attribute")
            setattr(self, key, value)
            self._extra_keys.append(key)

    def preprocess(self, images: Any, do_resize: bool | None = None, size: Any = None,
                   resample: Any = None, do_rescale: bool | None = None,
                   rescale_factor: float | None = None, do_normalize: bool | None = None,
                   image_mean: float | Sequence[float] | None = None,
                   image_std: float | Sequence[float] | None = None,
                   do_convert_rgb: bool | None = None, return_tensors: str | None = None,
                   data_format: str | None = "channels_first",
                   input_data_format: str | None = None) -> BatchFeature:
        """Turn one image or a batch into ``BatchFeature(pixel_values=(N, C, H, W) float32)``.

        ``images``: a PIL image, a numpy / torch / TF / JAX array (H, W), (H, W, C), (C, H, W) or a
        4-D batch of those, or a list of any of these. Every other argument overrides the
        instance's setting for this call only. ``data_format`` is "channels_first",
        "channels_last" or None (same layout as the input); ``input_data_format`` is inferred
        per image when None.
        """
        do_resize, do_rescale = _pick(do_resize, self.do_resize), _pick(do_rescale, self.do_rescale)
        do_normalize = _pick(do_normalize, self.do_normalize)
        size = self._parse_size(_pick(size, self.size))
        resample = _resample(_pick(resample, self.resample))
        rescale_factor = _pick(rescale_factor, self.rescale_factor)
        mean, std = _pick(image_mean, self.image_mean), _pick(image_std, self.image_std)
        convert_rgb = bool(_pick(_pick(do_convert_rgb, self.do_convert_rgb), True))
        layout = _enum_value(input_data_format)

        flat = _flatten(images)
        if not flat:
            raise ValueError("`images` is empty")
        arrays, layouts = zip(*(_to_hwc(image, layout, convert_rgb) for image in flat))
        first = arrays[0]
        if do_rescale and first.dtype != np.uint8 and first.min() >= 0 and first.max() <= 1:
            warnings.warn("images look already rescaled to [0, 1] but do_rescale=True rescales them "
                          "again; pass do_rescale=False for such images", UserWarning, stacklevel=2)
        out = []
        for image in arrays:
            if do_resize:
                image = _pil_resize(image, *self._resize_hw(size, *image.shape[:2]), resample)
            image = self._after_resize(image)
            if do_rescale:
                image = (image.astype(np.float64) * rescale_factor).astype(np.float32)
            if do_normalize:
                if not np.issubdtype(image.dtype, np.floating):
                    image = image.astype(np.float32)
                channels = image.shape[-1]
                image = (image - _per_channel(mean, channels, "image_mean", image.dtype)) / _per_channel(
                    std, channels, "image_std", image.dtype)
            out.append(image.astype(np.float32))
        if len({image.shape for image in out}) > 1:
            raise ValueError("images differ in shape after preprocessing and cannot be batched: "
                             f"{sorted({image.shape for image in out})}; resize them to one size")
        batch = np.stack(out)
        data_format = _enum_value(data_format) or layouts[0]
        if data_format == "channels_first":
            batch = batch.transpose(0, 3, 1, 2)
        elif data_format != "channels_last":
            raise ValueError(f"`data_format` must be 'channels_first' or 'channels_last', got {data_format!r}")
        return BatchFeature(pixel_values=_to_framework(np.ascontiguousarray(batch), return_tensors))

    __call__ = preprocess

    # ---- hooks for subclasses (ViTHybridImageProcessor) -----------------------------------------

    def _parse_size(self, size: Any) -> dict[str, int]:
        """``size`` as a validated dict; an int means a square here."""
        return _size_dict(size)

    def _resize_hw(self, size: Mapping[str, int], height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of the given size is resized to."""
        return _target_hw(size, height, width)

    def _after_resize(self, image: np.ndarray) -> np.ndarray:
        """A step between resize and rescale, on a channels-last array; none here."""
        return image

    # ---- configuration (HF's preprocessor_config.json) -----------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All settings as HF writes them, ``image_processor_type`` included."""
        keys = (*self._fields, *self._extra_keys)
        out = {key: copy.deepcopy(getattr(self, key)) for key in keys}
        for key, value in out.items():
            if isinstance(value, (np.ndarray, tuple)):
                out[key] = np.asarray(value).tolist()
        out["image_processor_type"] = type(self).__name__
        return out

    def to_json_string(self) -> str:
        """The JSON text of :meth:`to_dict`, formatted like HF (indent 2, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> list[str]:
        """Write ``preprocessor_config.json`` into ``save_directory`` (created if needed), atomically."""
        path = Path(save_directory) / CONFIG_NAME
        if Path(save_directory).is_file():
            raise ValueError(f"save_directory must be a folder, got the file {save_directory}")
        atomic_write_json(path, self.to_dict())
        return [str(path)]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> ViTImageProcessor:
        """Build from an HF-style config dict; ``overrides`` replace its entries."""
        return cls(**{**config, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **overrides: Any) -> ViTImageProcessor:
        """Load a folder holding ``preprocessor_config.json``, or that JSON file itself."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        with open(file, encoding="utf-8") as fh:
            config = json.load(fh)
        if not isinstance(config, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
        return cls.from_dict(config, **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class ViTFeatureExtractor(ViTImageProcessor):
    """Deprecated alias of :class:`ViTImageProcessor` (warns once per process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _feature_extractor_warned
        if not _feature_extractor_warned:
            _feature_extractor_warned = True
            warnings.warn("ViTFeatureExtractor is deprecated; use ViTImageProcessor instead.",
                          FutureWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
