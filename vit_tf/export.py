"""Export trivit Keras models for serving without trivit: a SavedModel with two signatures, TFLite files.

* :func:`export_saved_model`: signature ``serving_default`` (endpoint ``serve``) takes NCHW float32
  ``pixel_values`` (B, C, H, W) at the config's image size; signature ``serve_images`` takes uint8
  ``images`` (B, H', W', C') of any height and width and preprocesses them in the graph exactly as
  :class:`~vit_core.image_processing.ViTImageProcessor` (or the hybrid one) does. Both return the
  same dict of float32 outputs (``logits``; ``last_hidden_state`` + ``pooler_output``;
  ``reconstruction``).
* :func:`export_tflite`: the NCHW function as a ``.tflite`` file, fp32 or dynamic-range quantised
  (int8 weights, float activations); :func:`run_tflite` runs one with the LiteRT interpreter.

The in-graph resize is Pillow's, rewritten in TF ops (:func:`_resample_axis`): the same filter
windows and weights in float64, the same 22-bit fixed-point coefficients and integer sums, the same
rounding to uint8 after each of the two passes, in Pillow's order (:func:`_pil_resize`). On uint8 images
it gives Pillow's bytes, so ``serve_images`` and ``processor`` + ``serving_default`` agree to float32
rounding (the normalisation: 2.4e-7 measured on ``pixel_values``; see docs/export.md)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import tensorflow as tf

from vit_core.atomic import atomic_write
from vit_core.config import ViTConfig
from vit_core.config_hybrid import ViTHybridConfig
from vit_core.image_processing import ViTImageProcessor, _per_channel
from vit_core.image_processing_vit_hybrid import ViTHybridImageProcessor

from .modeling_tf_utils import TFPreTrainedModel

__all__ = [
    "export_saved_model", "export_tflite", "run_tflite", "image_preprocessor", "default_image_processor",
    "PIXELS_SIGNATURE", "IMAGES_SIGNATURE", "QUANTIZE_MODES",
]

#: Signature of the NCHW float32 function (also registered as the endpoint ``serve``).
PIXELS_SIGNATURE = "serving_default"
#: Signature of the uint8 NHWC function that preprocesses in the graph.
IMAGES_SIGNATURE = "serve_images"
#: ``quantize`` values of :func:`export_tflite`.
QUANTIZE_MODES = (None, "dynamic_range")

_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images: 32 - 8 - 2 bits


# ----------------------------------------------------------------------------------------------- Pillow's resize
def _sinc(x: tf.Tensor) -> tf.Tensor:
    safe = tf.where(x == 0.0, tf.ones_like(x), x * math.pi)
    return tf.where(x == 0.0, tf.ones_like(x), tf.sin(safe) / safe)


def _box(x: tf.Tensor) -> tf.Tensor:
    return tf.cast((x > -0.5) & (x <= 0.5), x.dtype)


def _triangle(x: tf.Tensor) -> tf.Tensor:
    x = tf.abs(x)
    return tf.where(x < 1.0, 1.0 - x, tf.zeros_like(x))


def _hamming(x: tf.Tensor) -> tf.Tensor:
    x = tf.abs(x)
    safe = tf.where(x == 0.0, tf.ones_like(x), x * math.pi)
    value = tf.sin(safe) / safe * (0.54 + 0.46 * tf.cos(safe))
    return tf.where(x == 0.0, tf.ones_like(x), tf.where(x >= 1.0, tf.zeros_like(x), value))


def _bicubic(x: tf.Tensor) -> tf.Tensor:
    a, x = -0.5, tf.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _lanczos(x: tf.Tensor) -> tf.Tensor:
    return tf.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), tf.zeros_like(x))


#: PIL resampling filter → (kernel on float64 distances, support in input pixels at scale 1).
_FILTERS: dict[int, tuple[Callable[[tf.Tensor], tf.Tensor], float]] = {
    1: (_lanczos, 3.0), 2: (_triangle, 1.0), 3: (_bicubic, 2.0), 4: (_box, 0.5), 5: (_hamming, 1.0),
}


def _nearest_axis(x: tf.Tensor, axis: int, size: tf.Tensor) -> tf.Tensor:
    """Pillow's NEAREST along ``axis``: source index ``int(0.5·s + k·s)`` with ``s = n_in / n_out`` summed
    step by step in float64, as Pillow's affine transform walks the output row."""
    n_in = tf.shape(x, out_type=tf.int64)[axis]
    step = tf.cast(n_in, tf.float64) / tf.cast(size, tf.float64)
    walk = tf.math.cumsum(tf.concat([[0.5 * step], tf.fill([size - 1], step)], 0))
    return tf.gather(x, tf.minimum(tf.cast(walk, tf.int64), n_in - 1), axis=axis)


def _resample_axis(x: tf.Tensor, axis: int, size: tf.Tensor, resample: int) -> tf.Tensor:
    """One of Pillow's 8-bit resampling passes along ``axis`` (1 = height, 2 = width) of int32 (B, H, W, C)
    pixels in [0, 255] → int32 pixels in [0, 255], ``size`` long on ``axis``.

    Output pixel ``i`` reads the input window around ``center = (i + 0.5)·scale`` (``scale = n_in / size``),
    the kernel stretched by ``max(scale, 1)``; the weights are normalised to sum 1, turned into 22-bit
    fixed point (rounded half away from zero), summed with the pixels in integers, rounded and clipped.
    """
    kernel, support = _FILTERS[resample]
    n_in = tf.shape(x, out_type=tf.int64)[axis]
    scale = tf.cast(n_in, tf.float64) / tf.cast(size, tf.float64)
    stretch = tf.maximum(scale, 1.0)
    support = support * stretch
    taps = tf.cast(tf.math.ceil(support), tf.int64) * 2 + 1
    center = (tf.cast(tf.range(size), tf.float64) + 0.5) * scale
    first = tf.maximum(tf.cast(tf.floor(center - support + 0.5), tf.int64), 0)  # (size,)
    count = tf.minimum(tf.cast(tf.floor(center + support + 0.5), tf.int64), n_in) - first
    k = tf.range(taps)[None, :]  # (1, taps)
    source = first[:, None] + k  # (size, taps)
    weights = kernel(((tf.cast(source, tf.float64) - center[:, None]) + 0.5) * (1.0 / stretch))
    weights = tf.where(k < count[:, None], weights, tf.zeros_like(weights))
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.where(total != 0.0, weights / tf.where(total != 0.0, total, 1.0), weights)
    fixed = tf.sign(weights) * tf.floor(tf.abs(weights) * float(1 << _PRECISION_BITS) + 0.5)
    window = tf.gather(x, tf.minimum(source, n_in - 1), axis=axis)  # axis → (size, taps)
    fixed = tf.cast(fixed, tf.int32)
    fixed = fixed[:, :, None, None] if axis == 1 else fixed[None, :, :, None]  # line up with window's axes
    summed = tf.reduce_sum(window * fixed[None], axis=axis + 1) + (1 << (_PRECISION_BITS - 1))
    return tf.clip_by_value(tf.bitwise.right_shift(summed, _PRECISION_BITS), 0, 255)


def _pil_resize(x: tf.Tensor, height: tf.Tensor, width: tf.Tensor, resample: int) -> tf.Tensor:
    """``PIL.Image.resize((width, height), resample)`` of int32 (B, H, W, C) pixels, in two passes that each round
    to uint8, so their order matters. Pillow < 13 always runs the width first; Pillow 13 runs the height first
    when the height shrinks by more than twice as many pixels as the width (found by experiment: it agrees with
    Pillow 13.0 on every one of ~3000 random size pairs)."""
    if resample == 0:
        return _nearest_axis(_nearest_axis(x, 1, height), 2, width)
    shape = tf.shape(x, out_type=tf.int64)
    height_first = (height < shape[1]) & (shape[1] - height > 2 * (shape[2] - width))
    if _PILLOW_MAJOR < 13:
        height_first = tf.constant(False)
    return tf.cond(
        height_first,
        lambda: _resample_axis(_resample_axis(x, 1, height, resample), 2, width, resample),
        lambda: _resample_axis(_resample_axis(x, 2, width, resample), 1, height, resample),
    )


# ----------------------------------------------------------------------------------------------- preprocessing
def default_image_processor(config: ViTConfig) -> ViTImageProcessor:
    """The processor trivit assumes when none is given: HF's defaults for the model type, sized to the config
    (ViT: bilinear resize to ``image_size``, mean = std = 0.5; hybrid: bicubic shortest-edge resize + center
    crop to ``image_size``, OpenAI CLIP mean / std)."""
    h, w = config.image_hw
    if isinstance(config, ViTHybridConfig):
        return ViTHybridImageProcessor(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w})
    return ViTImageProcessor(size={"height": h, "width": w})


def _output_hw(processor: ViTImageProcessor) -> tuple[int, int] | None:
    """The (height, width) ``processor`` gives every image, or None when it keeps the input size."""
    if getattr(processor, "do_center_crop", False):
        return processor.crop_size["height"], processor.crop_size["width"]
    if not processor.do_resize:
        return None
    if "height" not in processor.size:
        raise ValueError(
            f"processor.size={processor.size!r} keeps the aspect ratio, so images of different shapes come out "
            "in different sizes, but the exported model takes one size: use size={'height': H, 'width': W}, "
            "or a processor with a center crop (ViTHybridImageProcessor)"
        )
    return processor.size["height"], processor.size["width"]


def _resize_hw(processor: ViTImageProcessor, shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The in-graph (height, width) an image of ``shape`` (B, H, W, C) is resized to: a fixed size, or the
    hybrid processor's shortest edge (the other edge ``int(edge · long / short)``, as HF rounds)."""
    size = processor.size
    if "height" in size:
        return tf.constant(size["height"], tf.int64), tf.constant(size["width"], tf.int64)
    h, w = tf.cast(shape[1], tf.int64), tf.cast(shape[2], tf.int64)
    edge = tf.constant(size["shortest_edge"], tf.int64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.cast(tf.floor(tf.cast(edge * long, tf.float64) / tf.cast(short, tf.float64)), tf.int64)
    portrait = w <= h
    return tf.where(portrait, new_long, edge), tf.where(portrait, edge, new_long)


def _center_crop(x: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """HF's center crop of (B, H, W, C): offsets ``(n - crop) // 2``; a short axis is zero-padded first,
    ``ceil((crop - n) / 2)`` before it."""
    shape = tf.shape(x)
    pads = []
    for n, crop in ((shape[1], height), (shape[2], width)):
        before = tf.maximum(-tf.math.floordiv(n - crop, 2), 0)
        pads.append([before, tf.maximum(crop - n - before, 0)])
    x = tf.pad(x, [[0, 0], *pads, [0, 0]])
    shape = tf.shape(x)
    top, left = (shape[1] - height) // 2, (shape[2] - width) // 2
    return x[:, top:top + height, left:left + width, :]


def _to_rgb(x: tf.Tensor) -> tf.Tensor:
    """The processor's RGB conversion of (B, H, W, 1..4): gray (and gray + alpha) repeated to 3, alpha dropped."""
    channels = tf.shape(x)[-1]
    checks = [tf.debugging.assert_less_equal(channels, 4, message="images must have 1-4 channels (last axis)")]
    with tf.control_dependencies(checks):
        return tf.cond(channels >= 3, lambda: x[..., :3], lambda: tf.repeat(x[..., :1], 3, axis=-1))


def image_preprocessor(processor: ViTImageProcessor, config: ViTConfig) -> Callable[[tf.Tensor], tf.Tensor]:
    """The TF function doing ``processor(images).pixel_values`` in the graph: uint8 (B, H, W, C) → float32
    (B, C, h, w) at ``config.image_hw``. Raises ValueError now if the processor's output size cannot be the
    model's; with ``do_resize=False`` (and no crop), images must already have the model's size.

    ``C``: 1-4 when the processor converts to RGB (``do_convert_rgb``, trivit's default), else
    ``config.num_channels``.
    """
    if not isinstance(processor, ViTImageProcessor):
        raise TypeError(f"processor must be a vit_core ViTImageProcessor, got {type(processor).__name__}")
    h, w = config.image_hw
    out_hw = _output_hw(processor)
    if out_hw is not None and out_hw != (h, w):
        raise ValueError(
            f"the processor makes {out_hw[0]}x{out_hw[1]} images but the model takes {h}x{w} "
            f"(config.image_size={config.image_size!r}); set the processor's size (and crop_size) to the model's"
        )
    convert_rgb = bool(processor.do_convert_rgb is None or processor.do_convert_rgb)
    channels = 3 if convert_rgb else config.num_channels
    if channels != config.num_channels:
        raise ValueError(
            f"the processor converts images to RGB (do_convert_rgb={processor.do_convert_rgb!r}) but the model "
            f"takes num_channels={config.num_channels}; pass a processor with do_convert_rgb=False"
        )
    mean = _per_channel(processor.image_mean, channels, "image_mean", np.dtype(np.float32))
    std = _per_channel(processor.image_std, channels, "image_std", np.dtype(np.float32))
    resample = int(processor.resample)
    crop = getattr(processor, "do_center_crop", False)

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        x = tf.cast(images, tf.int32)
        if convert_rgb:
            x = _to_rgb(x)
        if processor.do_resize:
            x = _pil_resize(x, *_resize_hw(processor, tf.shape(x)), resample)
        if crop:
            x = _center_crop(x, h, w)
        x = tf.ensure_shape(x, (None, h, w, channels))  # no resize: a wrong input size fails here
        if processor.do_rescale:  # float64 product, then float32: the processor's arithmetic
            x = tf.cast(tf.cast(x, tf.float64) * processor.rescale_factor, tf.float32)
        else:
            x = tf.cast(x, tf.float32)
        if processor.do_normalize:
            x = (x - tf.constant(mean)) / tf.constant(std)
        return tf.transpose(x, (0, 3, 1, 2))

    return preprocess


# ----------------------------------------------------------------------------------------------- SavedModel
def _require_tf_model(model: Any, where: str) -> None:
    if not isinstance(model, TFPreTrainedModel):
        kind = f"{type(model).__module__}.{type(model).__name__}"
        raise TypeError(f"{where} exports vit_tf models (TFPreTrainedModel subclasses), got {kind}")


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (dynamic), got {batch_size!r}")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def _staged_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` that replaces it (renamed into place) only if the block succeeds.

    An existing ``path`` is replaced only if it is an empty folder or a SavedModel (holds ``saved_model.pb``).
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} is a file; a SavedModel is written as a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / "saved_model.pb").is_file():
        raise ValueError(f"path {str(path)!r} is a non-empty folder that is not a SavedModel; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Path | None = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder mkdir's usual permissions
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # onto an empty folder: atomic on POSIX
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_saved_model(
    model: TFPreTrainedModel,
    path: str | os.PathLike[str],
    *,
    processor: ViTImageProcessor | None = None,
    batch_size: int | None = None,
) -> Path:
    """Write a SavedModel (a folder) that serves ``model`` without trivit, atomically; returns its path.

    Signatures (``tf.saved_model.load(path).signatures[...]``, or the endpoints as methods):

    * ``serving_default`` (endpoint ``serve``): ``pixel_values`` float32 (B, C, H, W) at the config's
      image size → ``{field: float32 tensor}``.
    * ``serve_images`` (endpoint ``serve_images``): ``images`` uint8 (B, H', W', C') of any size (one size per
      batch; C' 1-4 with RGB conversion) → the same outputs, preprocessed in the graph with ``processor``'s
      settings (default :func:`default_image_processor`); pass ``ViTImageProcessor.from_pretrained(checkpoint)``
      for a checkpoint's own settings. Its ``preprocessor_config.json`` is kept in ``assets.extra/``.

    ``batch_size``: None keeps the batch dynamic; an int fixes it in both signatures.
    """
    _require_tf_model(model, "export_saved_model")
    _check_batch_size(batch_size)
    import keras

    processor = default_image_processor(model.config) if processor is None else processor
    preprocess = image_preprocessor(processor, model.config)
    convert_rgb = processor.do_convert_rgb is None or processor.do_convert_rgb
    image_spec = tf.TensorSpec((batch_size, None, None, None if convert_rgb else model.config.num_channels),
                               tf.uint8, name="images")

    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return model.serve(preprocess(images))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", model.serve, model.serving_signature(batch_size))  # first: serving_default
    archive.add_endpoint(IMAGES_SIGNATURE, serve_images, [image_spec])
    path = Path(path)
    with _staged_folder(path) as tmp:
        archive.write_out(str(tmp), verbose=False)
        processor.save_pretrained(tmp / "assets.extra")
    return path


# ----------------------------------------------------------------------------------------------- TFLite
def export_tflite(
    model: TFPreTrainedModel,
    path: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    batch_size: int | None = 1,
) -> Path:
    """Convert ``model``'s NCHW function (``serving_default`` of :func:`export_saved_model`) to a ``.tflite``
    file, written atomically; returns its path.

    ``quantize``: None (float32) or ``"dynamic_range"`` (``tf.lite.Optimize.DEFAULT``: int8 weights,
    activations quantised on the fly, float32 in and out). ``batch_size``: 1 (default) fixes the input to
    (1, C, H, W); None keeps the batch dynamic (:func:`run_tflite` resizes the input).
    """
    _require_tf_model(model, "export_tflite")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    _check_batch_size(batch_size)
    import keras

    archive = keras.export.ExportArchive()  # a SavedModel of the NCHW endpoint only: its signature names the I/O
    archive.track(model)
    archive.add_endpoint(PIXELS_SIGNATURE, model.serve, model.serving_signature(batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[PIXELS_SIGNATURE])
        if quantize == "dynamic_range":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        blob = converter.convert()
    path = Path(path)
    atomic_write(path, blob)
    return path


def _interpreter(path: Path) -> Any:
    """A LiteRT interpreter for ``path``; without ai-edge-litert, TF's deprecated one, with a warning."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        warnings.warn(
            "ai-edge-litert is not installed: running the .tflite file with tf.lite.Interpreter, which "
            "TensorFlow deprecates; pip install ai-edge-litert (or 'trivit[export]')",
            UserWarning, stacklevel=3,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            return tf.lite.Interpreter(model_path=str(path))
    return Interpreter(model_path=str(path))


def run_tflite(path: str | os.PathLike[str], pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    """Run a ``.tflite`` file of :func:`export_tflite` on ``pixel_values`` (B, C, H, W) with LiteRT →
    ``{field: (B, ...) float32}``. A file with a fixed batch of b runs B / b times (B must be a multiple of b)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .tflite file at {str(path)!r}")
    x = np.asarray(pixel_values)
    if x.size == 0:
        raise ValueError(f"pixel_values is empty (shape {x.shape})")
    if x.dtype.kind != "f":
        raise TypeError(f"pixel_values must be a float array, got dtype {x.dtype}")
    interpreter = _interpreter(path)
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise ValueError(f"{str(path)!r} has signatures {sorted(signatures)}; expected one, as export_tflite writes")
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    ((name, detail),) = runner.get_input_details().items()
    expected = [int(d) for d in detail["shape_signature"]]
    if x.ndim != len(expected) or list(x.shape[1:]) != expected[1:]:
        want = tuple("B" if d == -1 else d for d in expected)
        raise ValueError(f"pixel_values must have shape {want} for {path.name}, got {x.shape}")
    batch = expected[0]
    if batch != -1 and x.shape[0] % batch:
        raise ValueError(f"{path.name} takes batches of {batch}: pixel_values' batch ({x.shape[0]}) must be a "
                         f"multiple of {batch} (export with batch_size=None for any batch)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    chunks = [x] if batch == -1 else np.split(x, x.shape[0] // batch)
    outputs = [runner(**{name: chunk}) for chunk in chunks]
    return {key: np.concatenate([out[key] for out in outputs]) for key in outputs[0]}
