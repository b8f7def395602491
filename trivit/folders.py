"""What every verb that takes a checkpoint folder needs: its config.json, its processor, a framework.

``trivit predict`` and ``trivit export`` read folders the same way, with the same error wording:
problems with the command line or the folder are :class:`UsageError` (exit code 2, one line on stderr).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trivit.quiet import import_quietly

__all__ = ["UsageError", "FRAMEWORKS", "PREFIXES", "MODEL_TYPES", "read_json", "load_processor", "read_image",
           "import_framework", "load_pretrained", "read_config_json"]

FRAMEWORKS = ("torch", "tf", "flax")
#: Class-name prefix of each framework's twins (``TFViTModel``, ``FlaxViTModel``).
PREFIXES = {"torch": "", "tf": "TF", "flax": "Flax"}
_MODULES = {"torch": "vit_torch", "tf": "vit_tf", "flax": "vit_flax"}
#: config.json ``model_type`` -> (its classifier's class name without the framework prefix, vit_core config class).
MODEL_TYPES = {"vit": ("ViTForImageClassification", "ViTConfig"),
               "vit-hybrid": ("ViTHybridForImageClassification", "ViTHybridConfig")}
#: ``image_processor_type`` values read as the hybrid processor (HF's BiT processor has the same steps).
_HYBRID_PROCESSORS = {"ViTHybridImageProcessor", "BitImageProcessor"}
_PLAIN_PROCESSORS = {"ViTImageProcessor", "ViTImageProcessorFast", "ViTFeatureExtractor", None}


class UsageError(Exception):
    """A problem with the command line or the model folder: exit code 2, one line on stderr."""


def read_json(file: Path) -> dict[str, Any]:
    """``file``'s JSON object; a file that is not valid JSON or not an object is a :class:`UsageError`."""
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise UsageError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config_json(folder: Path, flag: str) -> tuple[Path, dict[str, Any]]:
    """``(folder/config.json, its JSON object)``; a missing folder or file is a :class:`UsageError` naming ``flag``."""
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: no such folder")
    file = folder / "config.json"
    if not file.is_file():
        raise UsageError(f"{flag} {folder}: no config.json in that folder")
    return file, read_json(file)


def load_processor(folder: Path, config: Any, note: Callable[[str], None]) -> Any:
    """The folder's saved processor, or a ``ViTImageProcessor`` sized to the config (said through ``note``)."""
    from vit_core import ViTHybridImageProcessor, ViTImageProcessor
    from vit_core.image_processing import CONFIG_NAME

    file = folder / CONFIG_NAME
    if not file.is_file():
        h, w = config.image_hw
        note(f"no {CONFIG_NAME} in {folder}: using ViTImageProcessor defaults resized to {h}x{w} "
             "(bilinear, mean/std 0.5)")
        return ViTImageProcessor(size={"height": h, "width": w})
    data = read_json(file)
    kind = data.get("image_processor_type", data.get("feature_extractor_type"))
    cls = ViTHybridImageProcessor if kind in _HYBRID_PROCESSORS else ViTImageProcessor
    if kind not in _HYBRID_PROCESSORS | _PLAIN_PROCESSORS:
        note(f"{file}: image_processor_type {kind!r} is not a ViT processor; reading it as ViTImageProcessor")
    data.pop("feature_extractor_type", None)
    try:
        return cls.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{file}: {e}") from None


def read_image(path: Path) -> Any:
    """Decode one file into an RGB-convertible PIL image, EXIF orientation applied (as HF's ``load_image``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except IsADirectoryError:
        raise ValueError("is a folder") from None
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror or e}") from None
    except (SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read it: {e}") from None


def import_framework(framework: str, flag: str = "--framework") -> Any:
    """``vit_torch`` / ``vit_tf`` / ``vit_flax``, imported quietly; one that does not import is a :class:`UsageError`."""
    module = _MODULES[framework]
    try:
        return import_quietly(module)
    except ImportError as e:
        raise UsageError(f"{flag} {framework}: {module} does not import ({e}); "
                         f"install it with pip install 'trivit[{framework}]'") from None


def load_pretrained(framework: str, class_name: str, folder: Path, note: Callable[[str], None],
                    flag: str = "--model") -> tuple[Any, dict[str, list]]:
    """``(model, loading info)``: ``<prefix><class_name>.from_pretrained(folder)`` in ``framework``, its warnings said
    through ``note``; a folder it cannot load is a :class:`UsageError` naming ``flag``."""
    import warnings

    from vit_core import CheckpointError
    from vit_core.config import ConfigError

    from trivit.quiet import quiet_frameworks

    quiet_frameworks()
    cls = getattr(import_framework(framework), PREFIXES[framework] + class_name)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = cls.from_pretrained(folder, output_loading_info=True)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        raise UsageError(f"{flag} {folder}: {e}") from None
    for w in caught:
        note(f"warning: {w.message}")
    return model, info
