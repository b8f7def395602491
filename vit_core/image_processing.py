"""ViT image preprocessing: a framework-agnostic drop-in for Hugging Face's ``ViTImageProcessor``.

Only numpy and Pillow are needed; torch / TensorFlow / JAX are imported lazily, and only when the
caller hands in one of their arrays or asks for ``return_tensors="pt" | "tf" | "jax"``.

The numerics follow transformers 4.x step for step, so outputs are HF's, bit for bit in every case tested:

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
* A path (``str`` / ``os.PathLike``) or the encoded bytes of an image file is read as HF's
  ``image_utils.load_image`` reads a path: decoded by Pillow, then its EXIF orientation applied. A PIL
  image is used as given, its EXIF orientation *not* applied, as in HF. Undecodable, truncated or
  missing files, images over Pillow's ``Image.MAX_IMAGE_PIXELS`` and float images holding NaN or
  infinity raise one ``ValueError`` naming the image (``images[3]: ...``); HF raises whatever Pillow or
  numpy raise, or passes NaN through.

Speed (see docs/image_processing.md): each image is resized as a PIL image (a PIL input is never turned
into an array first), images are spread over a thread pool (Pillow and numpy release the GIL), and a
uint8 image is rescaled and normalized in one step through a 256-entry table per channel, computed by
the float steps above, so the output is the same bits as HF's. ``reducing_gap`` opts into Pillow's
faster, inexact two-step downscale.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .atomic import atomic_write_json

__all__ = ["BatchFeature", "ViTFeatureExtractor", "ViTImageProcessor", "ViTImageProcessorFast", "CONFIG_NAME"]

CONFIG_NAME = "preprocessor_config.json"
_FIELDS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
           "image_mean", "image_std", "do_convert_rgb")
_DROPPED_KEYS = ("image_processor_type", "feature_extractor_type")
_SIZE_KEYS = (("height", "width"), ("shortest_edge",), ("shortest_edge", "longest_edge"))
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_FRAMEWORKS = {"pt": ("torch", "torch"), "tf": ("tensorflow", "tf"), "jax": ("jax.numpy", "flax"),
               "flax": ("jax.numpy", "flax")}
#: PIL modes resized as they are (Pillow's resize is the one HF reaches through ``Image.fromarray``).
_PIL_RESIZE_MODES = ("RGB", "L", "RGBA")
#: PIL modes an array can be made of without ``do_convert_rgb`` (others, e.g. "1" or "P", need it).
_PIL_ARRAY_MODES = ("RGB", "L", "LA", "RGBA", "I;16", "I", "F")
_BYTES = (bytes, bytearray, memoryview)
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
    if size.get("longest_edge", np.inf) <= size.get("shortest_edge", 0):
        raise ValueError(f"`{name}['longest_edge']` ({size['longest_edge']}) must exceed "
                         f"`{name}['shortest_edge']` ({size['shortest_edge']})")
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
            raise TypeError("images must be PIL images, numpy arrays, torch / TensorFlow / JAX tensors, "
                            "image file paths or encoded image bytes (or a list of them), got "
                            f"{type(image).__module__}.{type(image).__name__}")
    if array.dtype.kind not in "uif":
        raise TypeError(f"image arrays must have an integer or float dtype, got {array.dtype}")
    return array


def _flatten(images: Any) -> list[Any]:
    """One image, a 4-D batch or (nested) lists of them → a flat list of PIL images, arrays, paths, bytes."""
    if isinstance(images, (Image.Image, str, os.PathLike, *_BYTES)):
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


def _open(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> Image.Image:
    """Decode an image file (path or bytes) as HF's ``load_image`` does: Pillow, then EXIF orientation.

    Raises ValueError for a missing, unreadable, truncated or oversized (``Image.MAX_IMAGE_PIXELS``) file.
    """
    if isinstance(source, _BYTES):
        data = bytes(source)
        what, file = f"{len(data)} bytes", io.BytesIO(data)
    else:
        what, file = repr(os.fspath(source)), source
        if not os.path.isfile(file):
            raise ValueError(f"no image file at {what} (URLs are not fetched)")
    try:
        with Image.open(file) as image:  # closes the file; exif_transpose returns a new image
            _check_pixels(image)
            image.load()
            return ImageOps.exif_transpose(image)
    except Image.UnidentifiedImageError as err:
        raise ValueError(f"cannot read an image from {what}: UnidentifiedImageError: not a format Pillow "
                         "identifies") from err
    except ValueError as err:
        raise ValueError(f"cannot read an image from {what}: {err}") from err
    except Exception as err:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"cannot read an image from {what}: {type(err).__name__}: {err}") from err


def _check_pixels(image: Image.Image) -> None:
    """Refuse an image over Pillow's decompression-bomb limit (Pillow itself only warns below 2x)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ValueError(f"the image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                         f"over PIL.Image.MAX_IMAGE_PIXELS = {limit}")


def _load(image: Image.Image) -> None:
    """Decode a lazily opened PIL image now, so that a truncated or broken file is one ValueError."""
    try:
        image.load()
    except Exception as err:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"cannot decode the PIL image: {type(err).__name__}: {err}") from err


def _convert_rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")`` (as HF's ``convert_to_rgb``), a failure as one ValueError."""
    try:
        return image.convert("RGB")
    except Exception as err:  # a decoded file of an exotic mode or with a broken palette
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: "
                         f"{type(err).__name__}: {err}") from err


def _to_hwc(image: Image.Image | np.ndarray, layout: str | None, convert_rgb: bool) -> tuple[np.ndarray, str]:
    """Channels-last array for one image, plus the layout it came in (given or inferred as HF does)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image)
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
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError("the image holds NaN or infinite values")
    if convert_rgb and image.shape[-1] != 3:  # gray → RGB, gray + alpha → RGB, RGBA → RGB
        image = image[..., :3] if image.shape[-1] == 4 else np.repeat(image[..., :1], 3, axis=-1)
    return image, layout


def _as_uint8(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """HF's cast of a channels-last array to uint8 for Pillow, and whether it was scaled from [0, 1]."""
    if image.dtype == np.uint8:
        return image, False
    low, high = image.min(), image.max()
    if low < 0 or high > 255:
        raise ValueError(f"images must hold integers in [0, 255] or floats in [0, 1] to be resized, got "
                         f"values in [{low}, {high}] (pass do_resize=False, or rescale them)")
    if image.dtype.kind == "f" and not np.allclose(image, image.astype(int)):  # HF's "integer-valued" test
        if high > 1:
            raise ValueError(f"float images must lie in [0, 1] or hold integers in [0, 255] to be resized, "
                             f"got values in [{low}, {high}]")
        return (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    return image.astype(np.uint8), False


def _pil_resize(image: np.ndarray | Image.Image, height: int, width: int, resample: int,
                reducing_gap: float | None = None) -> np.ndarray:
    """Resize through Pillow exactly as HF's ``image_transforms.resize``; a channels-last array back.

    A PIL image (of a mode in ``_PIL_RESIZE_MODES``) is resized as it is, which is what HF's
    array → ``Image.fromarray`` round trip hands to Pillow. A float array in [0, 1] comes back float32.
    """
    scaled = False
    if not isinstance(image, Image.Image):
        image, scaled = _as_uint8(image)
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(image.resize((width, height), resample=resample, reducing_gap=reducing_gap))
    out = out[..., None] if out.ndim == 2 else out
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else out


def _per_channel(values: Any, channels: int, name: str, dtype: np.dtype) -> np.ndarray:
    """``image_mean`` / ``image_std`` as an array broadcastable over the channel axis."""
    array = np.array(values, dtype=dtype)
    if array.ndim != 0 and array.shape != (channels,):
        raise ValueError(f"`{name}` must be a float or {channels} floats (one per channel), got {values!r}")
    return array


def _tensor_kind(return_tensors: Any) -> str | None:
    """``return_tensors`` validated: None, "np" or a key of ``_FRAMEWORKS``."""
    kind = _enum_value(return_tensors)
    if kind not in (None, "np", *_FRAMEWORKS):
        raise ValueError(f"`return_tensors` must be None, 'np', 'pt', 'tf', 'jax' or 'flax', got {kind!r}")
    return kind


def _to_framework(array: np.ndarray, return_tensors: Any) -> Any:
    """Hand ``array`` back as numpy (None / "np") or as a torch / TensorFlow / JAX array."""
    kind = _tensor_kind(return_tensors)
    if kind in (None, "np"):
        return array
    module, extra = _FRAMEWORKS[kind]
    try:
        lib = importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"return_tensors={kind!r} needs {module.split('.')[0]}: "
                          f"pip install 'trivit[{extra}]'") from err
    return getattr(lib, {"pt": "from_numpy", "tf": "convert_to_tensor"}.get(kind, "asarray"))(array)


@dataclass(frozen=True)
class _Steps:
    """One call's settings, after validation."""

    do_resize: bool
    size: dict[str, int]
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: Any
    std: Any
    convert_rgb: bool
    layout: str | None
    reducing_gap: float | None

    def rescale_normalize(self, image: np.ndarray) -> np.ndarray:
        """HF's rescale then normalize on a channels-last array, in HF's dtypes and order of operations."""
        if self.do_rescale:
            image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(image.dtype, np.floating):
                image = image.astype(np.float32)
            channels = image.shape[-1]
            image = (image - _per_channel(self.mean, channels, "image_mean", image.dtype)) / _per_channel(
                self.std, channels, "image_std", image.dtype)
        return image

    def table(self, channels: int) -> np.ndarray:
        """(channels, 256) float32: :meth:`rescale_normalize` of every uint8 value, per channel.

        The steps are elementwise, so looking a pixel up here gives the bits they would give it.
        """
        values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], channels, axis=2)
        return np.ascontiguousarray(self.rescale_normalize(values)[0].T, dtype=np.float32)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools() -> None:
    """In a forked child (a DataLoader worker): the parent's threads are gone, so are their pools."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _default_threads() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _map(function: Callable[[int, Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``[function(i, item) ...]`` over a pool of ``threads`` threads when that is > 1; the first error, in order."""
    threads = min(threads, len(items))
    if threads <= 1:
        return [function(index, item) for index, item in enumerate(items)]
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, "trivit-images")
    # Chunks of a few items (a few per thread and round): one future per item costs more than the look-up
    # phase itself, while a chunk per thread would leave a thread idle behind one slow, large image.
    step = max(1, len(items) // (4 * threads))
    chunks = [range(start, min(start + step, len(items))) for start in range(0, len(items), step)]
    done = pool.map(lambda chunk: [function(index, items[index]) for index in chunk], chunks)
    return [result for results in done for result in results]


def _indexed(index: int, function: Callable[[], Any]) -> Any:
    """Run ``function``; a ValueError / TypeError it raises is re-raised naming ``images[index]``."""
    try:
        return function()
    except ValueError as err:
        raise ValueError(f"images[{index}]: {err}") from err
    except TypeError as err:
        raise TypeError(f"images[{index}]: {err}") from err


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
                   input_data_format: str | None = None, *, reducing_gap: float | None = None,
                   num_threads: int | None = None) -> BatchFeature:
        """Turn one image or a batch into ``BatchFeature(pixel_values=(N, C, H, W) float32)``.

        ``images``: a PIL image, a numpy / torch / TF / JAX array (H, W), (H, W, C), (C, H, W) or a
        4-D batch of those, an image file path or its bytes, or a list of any of these. Every other
        argument but the last two overrides the instance's setting for this call only.
        ``data_format`` is "channels_first", "channels_last" or None (same layout as the first
        input); ``input_data_format`` is inferred per image when None. ``return_tensors``: None /
        "np" (numpy), "pt", "tf", "jax" (or "flax").

        Keyword only, trivit's own: ``reducing_gap`` (None: exact; a float >= 1: Pillow's faster
        two-step downscale, *not* equal to HF, see docs/image_processing.md); ``num_threads`` (images
        processed at once; default: the CPUs this process may use; 1: all in the calling thread).
        """
        do_resize, do_rescale = _pick(do_resize, self.do_resize), _pick(do_rescale, self.do_rescale)
        if reducing_gap is not None and (isinstance(reducing_gap, bool) or not isinstance(reducing_gap, (int, float))
                                         or not reducing_gap >= 1):
            raise ValueError(f"`reducing_gap` must be None or a number >= 1, got {reducing_gap!r}")
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"`num_threads` must be None or an int >= 1, got {num_threads!r}")
        steps = _Steps(
            do_resize=do_resize, size=self._parse_size(_pick(size, self.size)),
            resample=_resample(_pick(resample, self.resample)), do_rescale=do_rescale,
            rescale_factor=_pick(rescale_factor, self.rescale_factor),
            do_normalize=_pick(do_normalize, self.do_normalize), mean=_pick(image_mean, self.image_mean),
            std=_pick(image_std, self.image_std),
            convert_rgb=bool(_pick(_pick(do_convert_rgb, self.do_convert_rgb), True)),
            layout=_enum_value(input_data_format), reducing_gap=reducing_gap)
        data_format = _enum_value(data_format)
        if data_format not in (None, "channels_first", "channels_last"):
            raise ValueError(f"`data_format` must be 'channels_first' or 'channels_last', got {data_format!r}")
        _tensor_kind(return_tensors)  # before the work

        flat = _flatten(images)
        if not flat:
            raise ValueError("`images` is empty")
        for index, image in enumerate(flat):  # here, not in the pool: lazily opened files are not thread-safe
            if isinstance(image, Image.Image):
                _indexed(index, lambda: _load(image))
        threads = _default_threads() if num_threads is None else num_threads
        prepared = _map(lambda i, image: _indexed(i, lambda: self._prepare(i, image, steps)), flat, threads)
        first_of: dict[tuple[int, ...], int] = {}
        for index, (array, _) in enumerate(prepared):
            first_of.setdefault(array.shape, index)
        if len(first_of) > 1:
            shapes = ", ".join(f"images[{index}] is {shape}" for shape, index in first_of.items())
            raise ValueError(f"images differ in shape after preprocessing and cannot be batched ({shapes}, "
                             "height, width, channels); resize them to one size")
        height, width, channels = prepared[0][0].shape
        channels_first = (data_format or prepared[0][1]) == "channels_first"
        table = steps.table(channels)  # also validates image_mean / image_std against the channels
        out = np.empty((len(flat), channels, height, width) if channels_first else (len(flat), height, width, channels),
                       dtype=np.float32)

        def finish(index: int, item: tuple[np.ndarray, str]) -> None:
            image, target = item[0], out[index]
            if image.dtype == np.uint8:  # one table look-up per pixel: HF's float steps, bit for bit
                for c in range(channels):
                    np.take(table[c], image[..., c], out=target[c] if channels_first else target[..., c], mode="clip")
            else:
                image = steps.rescale_normalize(image)
                target[...] = image.transpose(2, 0, 1) if channels_first else image

        _map(finish, prepared, threads)
        return BatchFeature(pixel_values=_to_framework(out, return_tensors))

    __call__ = preprocess

    def _prepare(self, index: int, image: Any, steps: _Steps) -> tuple[np.ndarray, str]:
        """One input → (channels-last array after resize and :meth:`_after_resize`, its input layout).

        The array is uint8 except for float / int inputs that are not resized (then their own dtype)
        and float inputs in [0, 1] that are (float32, as HF).
        """
        if isinstance(image, (str, os.PathLike, *_BYTES)):
            image = _open(image)
        if isinstance(image, Image.Image):
            if steps.convert_rgb and image.mode != "RGB":
                image = _convert_rgb(image)
            elif image.mode not in _PIL_ARRAY_MODES:
                raise ValueError(f"a PIL image of mode {image.mode!r} needs do_convert_rgb=True "
                                 f"(modes used as they are: {', '.join(_PIL_ARRAY_MODES)})")
            if steps.do_resize and image.mode in _PIL_RESIZE_MODES:  # straight to Pillow, no array round trip
                height, width = self._resize_hw(steps.size, image.height, image.width)
                resized = _pil_resize(image, height, width, steps.resample, steps.reducing_gap)
                return self._after_resize(resized), "channels_last"
        array, layout = _to_hwc(image, steps.layout, steps.convert_rgb)
        if index == 0 and steps.do_rescale and array.dtype != np.uint8 and array.min() >= 0 and array.max() <= 1:
            warnings.warn("images look already rescaled to [0, 1] but do_rescale=True rescales them "
                          "again; pass do_rescale=False for such images", UserWarning, stacklevel=5)
        if steps.do_resize:
            height, width = self._resize_hw(steps.size, *array.shape[:2])
            array = _pil_resize(array, height, width, steps.resample, steps.reducing_gap)
        return self._after_resize(array), layout

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


class ViTImageProcessorFast(ViTImageProcessor):
    """HF's name for the batched processor, so ``ViTImageProcessorFast`` imports and configs keep working.

    trivit's :class:`ViTImageProcessor` already is the fast, batched path (same code, same bits);
    this class differs only in its name, which :meth:`to_dict` writes as ``image_processor_type``.
    HF's own ``ViTImageProcessorFast`` resizes with torchvision, whose output differs from Pillow's;
    this one gives the Pillow (HF ``ViTImageProcessor``) result.
    """


class ViTFeatureExtractor(ViTImageProcessor):
    """Deprecated alias of :class:`ViTImageProcessor` (warns once per process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _feature_extractor_warned
        if not _feature_extractor_warned:
            _feature_extractor_warned = True
            warnings.warn("ViTFeatureExtractor is deprecated; use ViTImageProcessor instead.",
                          FutureWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
