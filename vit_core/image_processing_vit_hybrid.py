"""ViT-hybrid (BiT backbone + ViT) image preprocessing: a drop-in for HF's ``ViTHybridImageProcessor``.

It is :class:`~vit_core.image_processing.ViTImageProcessor` with a center crop between resize and
rescale, and the hybrid checkpoints' defaults (transformers 4.x):

* ``size={"shortest_edge": 224}``: the shortest edge becomes 224, the other ``int(224 * long /
  short)`` (HF's ``get_resize_output_image_size`` rounding); an int ``size`` means a shortest edge;
* ``resample=BICUBIC``;
* ``do_center_crop=True``, ``crop_size={"height": 224, "width": 224}`` (an int is a square): the
  crop starts at ``((h - crop_h) // 2, (w - crop_w) // 2)``; an image smaller than the crop on
  an axis is first zero-padded there, ``ceil((crop - size) / 2)`` before it, as HF's
  ``image_transforms.center_crop`` — so the output is always exactly the crop size, and the padding
  reads ``(0 * rescale_factor - mean) / std`` after normalization;
* ``do_rescale=True``, ``rescale_factor=1/255``, ``do_normalize=True``, OpenAI CLIP mean / std;
* ``do_convert_rgb=True``.

Input kinds (paths and image bytes included), layouts, ``return_tensors``, the errors naming
``images[i]``, the speed paths (``num_threads``, ``reducing_gap``, the exact uint8 table) and
``preprocessor_config.json`` handling are those of ``ViTImageProcessor`` (its module docstring lists
where it deliberately differs from HF: arrays with 1, 2 or 4 channels are converted to RGB, channel
layout is inferred per image, ``pixel_values`` is always one float32 array, unknown keyword arguments
raise ``TypeError``). The crop works on the resized uint8 pixels, before the table. Here, in addition:

* :meth:`~ViTHybridImageProcessor.preprocess` takes every argument but ``images`` by keyword only
  (HF also accepts them by position);
* as in HF, a ``size`` dict's ``longest_edge`` is ignored (HF's hybrid resize reads only
  ``shortest_edge``), and a ``crop_size`` without ``height`` and ``width`` is rejected up front.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .image_processing import _FIELDS, BatchFeature, ViTImageProcessor, _pick, _size_dict, _target_hw

__all__ = ["ViTHybridImageProcessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

#: transformers' ``image_utils.OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``.
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _crop_dict(crop_size: Any) -> dict[str, int]:
    """``crop_size`` (int, (height, width) or ``{"height", "width"}``) as a validated dict."""
    return _size_dict(crop_size, name="crop_size", allowed=(("height", "width"),))


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """HF's ``center_crop`` on a channels-last array: crop, zero-padding axes shorter than the crop."""
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    if top >= 0 and left >= 0:
        return image[top:top + height, left:left + width]
    # HF pads ceil((crop - n) / 2) = -((n - crop) // 2) before a short axis, then crops that axis at 0.
    kept = image[max(top, 0):max(top, 0) + height, max(left, 0):max(left, 0) + width]
    out = np.zeros((height, width, image.shape[2]), dtype=image.dtype)
    out[max(-top, 0):max(-top, 0) + kept.shape[0], max(-left, 0):max(-left, 0) + kept.shape[1]] = kept
    return out


class ViTHybridImageProcessor(ViTImageProcessor):
    """Resize (shortest edge) → center crop → rescale → normalize, bit-compatible with HF.

    Args mirror ``transformers.ViTHybridImageProcessor`` (same order): ``do_resize`` / ``size``
    (default ``{"shortest_edge": 224}``) / ``resample`` (default bicubic), ``do_center_crop`` /
    ``crop_size`` (default 224×224), ``do_rescale`` / ``rescale_factor`` (1/255), ``do_normalize`` /
    ``image_mean`` / ``image_std`` (OpenAI CLIP), ``do_convert_rgb`` (True). Extra keyword
    arguments are kept as attributes and saved back, as in :class:`ViTImageProcessor`.
    """

    _fields = (*_FIELDS, "do_center_crop", "crop_size")

    def __init__(self, do_resize: bool = True, size: Any = None, resample: Any = Image.BICUBIC,
                 do_center_crop: bool = True, crop_size: Any = None, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | Sequence[float] | None = None,
                 image_std: float | Sequence[float] | None = None,
                 do_convert_rgb: bool | None = True, **kwargs: Any) -> None:
        super().__init__(do_resize=do_resize, size={"shortest_edge": 224} if size is None else size,
                         resample=resample, do_rescale=do_rescale, rescale_factor=rescale_factor,
                         do_normalize=do_normalize,
                         image_mean=list(OPENAI_CLIP_MEAN) if image_mean is None else image_mean,
                         image_std=list(OPENAI_CLIP_STD) if image_std is None else image_std,
                         do_convert_rgb=do_convert_rgb, **kwargs)
        self.do_center_crop = do_center_crop
        self.crop_size = _crop_dict({"height": 224, "width": 224} if crop_size is None else crop_size)

    def preprocess(self, images: Any, *, do_center_crop: bool | None = None, crop_size: Any = None,
                   **kwargs: Any) -> BatchFeature:
        """:meth:`ViTImageProcessor.preprocess` with a center crop after the resize.

        ``do_center_crop`` / ``crop_size`` override the instance's crop for this call only; every
        other keyword argument is that of :meth:`ViTImageProcessor.preprocess`.
        """
        call = copy.copy(self)  # this call's crop settings, leaving the instance untouched
        call.do_center_crop = _pick(do_center_crop, self.do_center_crop)
        call.crop_size = _crop_dict(_pick(crop_size, self.crop_size))
        return ViTImageProcessor.preprocess(call, images, **kwargs)

    __call__ = preprocess

    def _parse_size(self, size: Any) -> dict[str, int]:
        """An int ``size`` is a shortest edge here (HF's ``default_to_square=False``)."""
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"shortest_edge": size}
        return _size_dict(size)

    def _resize_hw(self, size: Mapping[str, int], height: int, width: int) -> tuple[int, int]:
        """As HF's hybrid resize: only ``shortest_edge`` is read from a shortest-edge dict."""
        if "shortest_edge" in size:
            size = {"shortest_edge": size["shortest_edge"]}
        return _target_hw(size, height, width)

    def _after_resize(self, image: np.ndarray) -> np.ndarray:
        if not self.do_center_crop:
            return image
        return _center_crop(image, self.crop_size["height"], self.crop_size["width"])
