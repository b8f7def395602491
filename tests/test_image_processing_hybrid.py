"""vit_core's ViTHybridImageProcessor against Hugging Face's (the oracle) on real photos."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import transformers
from PIL import Image
from sklearn.datasets import load_sample_image

from vit_core.image_processing_vit_hybrid import ViTHybridImageProcessor

from conftest import MAX_DIFFS  # noqa: E402
from tolerances import PROCESSOR_ATOL as ATOL  # noqa: E402

#: (width, height) for PIL: portrait, landscape, square, smaller than the crop, odd, extreme.
SIZES = [(427, 640), (640, 427), (224, 224), (225, 223), (150, 100), (97, 301), (301, 97), (50, 50),
         (1000, 225), (31, 517)]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """The two 427×640 RGB uint8 sample photos shipped with scikit-learn."""
    return [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]


def resized(photo: np.ndarray, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(photo).resize(size, resample=Image.LANCZOS)


def hf_pixels(images, hf=None, **kwargs) -> np.ndarray:
    """HF's pixel_values as one numpy array."""
    hf = transformers.ViTHybridImageProcessor() if hf is None else hf
    return np.asarray(hf(images, return_tensors="np", **kwargs)["pixel_values"])


def compare(group: str, ours: np.ndarray, expected: np.ndarray) -> None:
    """Assert ours == HF's to ATOL (same shape, float32); record the worst difference per group."""
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    assert ours.shape == expected.shape
    diff = float(np.max(np.abs(ours.astype(np.float64) - expected.astype(np.float64))))
    MAX_DIFFS[f"hybrid processor: {group}"] = max(MAX_DIFFS.get(f"hybrid processor: {group}", 0.0), diff)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)


def check(group: str, images, hf_images=None, ours=None, hf=None, **kwargs) -> np.ndarray:
    """Run ours and HF with the same settings; assert they agree to ATOL; return ours."""
    ours = ViTHybridImageProcessor() if ours is None else ours
    out = ours(images, return_tensors="np", **kwargs).pixel_values
    compare(group, out, hf_pixels(images if hf_images is None else hf_images, hf, **kwargs))
    return out


# ---- numerics vs HF --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("index", [0, 1], ids=["china", "flower"])
def test_photos_at_many_sizes_pil_and_numpy(photos, index, size):
    image = resized(photos[index], size)
    assert check("photos, PIL", image).shape == (1, 3, 224, 224)
    check("photos, numpy HWC", np.array(image))
    check("photos, numpy CHW", np.ascontiguousarray(np.array(image).transpose(2, 0, 1)))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_no_resize_crops_or_pads(photos, size):
    """Without a resize the crop sees the raw size: cropped on long axes, zero-padded on short ones."""
    image = np.array(resized(photos[0], size))
    out = check("no resize (crop / zero pad)", image, do_resize=False)
    assert out.shape == (1, 3, 224, 224)


def test_padding_really_happens(photos):
    """A 50×50 image in a 224×224 crop: a 87-pixel border of (0 - mean) / std, as HF pads."""
    out = check("no resize (crop / zero pad)", np.array(resized(photos[1], (50, 50))), do_resize=False)
    border = (0 - np.array(transformers.image_utils.OPENAI_CLIP_MEAN)) / transformers.image_utils.OPENAI_CLIP_STD
    np.testing.assert_allclose(out[0, :, :87, :], np.broadcast_to(border[:, None, None], (3, 87, 224)),
                               rtol=0, atol=ATOL)
    assert not np.allclose(out[0, :, 87:137, 87:137], border[:, None, None])


def test_batch_of_mixed_sizes(photos):
    images = [resized(photos[i % 2], size) for i, size in enumerate(SIZES)]
    assert check("batch of mixed sizes", images).shape == (len(SIZES), 3, 224, 224)
    check("batch of mixed sizes", [np.array(image) for image in images])


def test_grayscale_jpeg(photos):
    buffer = io.BytesIO()
    Image.fromarray(photos[0]).convert("L").resize((333, 500)).save(buffer, format="JPEG", quality=90)
    gray = Image.open(io.BytesIO(buffer.getvalue()))
    assert gray.mode == "L"
    check("grayscale JPEG (PIL)", gray)  # HF's do_convert_rgb=True turns PIL images into RGB
    check("grayscale JPEG (2-D array)", np.array(gray), hf_images=gray)


@pytest.mark.parametrize("index", [0, 1])
def test_shortest_edge_384_crop_384(photos, index):
    ours = ViTHybridImageProcessor(size={"shortest_edge": 384}, crop_size={"height": 384, "width": 384})
    hf = transformers.ViTHybridImageProcessor(size={"shortest_edge": 384}, crop_size={"height": 384, "width": 384})
    for size in SIZES[:6]:
        image = resized(photos[index], size)
        assert check("384 / 384", image, ours=ours, hf=hf).shape == (1, 3, 384, 384)
    # the same settings per call, and an int size (a shortest edge for this processor, as in HF)
    check("384 / 384", photos[index], size=384, crop_size=384)
    assert ViTHybridImageProcessor(size=384).size == transformers.ViTHybridImageProcessor(size=384).size


@pytest.mark.parametrize("crop", [(200, 320), (321, 97), (250, 250)], ids=str)
def test_non_square_crop(photos, crop):
    """Non-square crops, some larger than the resized image on one axis (padding after the resize)."""
    for size in SIZES[:5]:
        image = resized(photos[1], size)
        out = check("non-square crop", image, size={"shortest_edge": 240}, crop_size=crop)
        assert out.shape == (1, 3, *crop)
    ours = ViTHybridImageProcessor(crop_size={"height": crop[0], "width": crop[1]}, resample=Image.BILINEAR)
    hf = transformers.ViTHybridImageProcessor(crop_size={"height": crop[0], "width": crop[1]},
                                              resample=Image.BILINEAR)
    check("non-square crop", photos, ours=ours, hf=hf)


def test_exact_size_and_no_crop(photos):
    assert check("switches", photos, size={"height": 200, "width": 300}).shape == (2, 3, 224, 224)
    assert check("switches", photos, do_center_crop=False).shape == (2, 3, 224, 335)
    assert check("switches", photos[0], do_normalize=False, do_rescale=False).shape == (1, 3, 224, 224)


def test_longest_edge_is_ignored_as_in_hf(photos):
    """HF's hybrid resize reads only size['shortest_edge']; so do we."""
    out = check("switches", photos[0], size={"shortest_edge": 256, "longest_edge": 300}, do_center_crop=False)
    assert out.shape == (1, 3, 256, 383)


def test_per_call_overrides_do_not_stick(photos):
    processor = ViTHybridImageProcessor()
    assert processor(photos[0], crop_size=(32, 48)).pixel_values.shape == (1, 3, 32, 48)
    assert processor(photos[0], do_center_crop=False).pixel_values.shape == (1, 3, 224, 335)
    assert processor(photos[0]).pixel_values.shape == (1, 3, 224, 224)
    assert processor.crop_size == {"height": 224, "width": 224} and processor.do_center_crop is True


# ---- layouts and frameworks -----------------------------------------------------------------


def test_channels_last_output(photos):
    out = check("channels_last", photos, data_format="channels_last")
    assert out.shape == (2, 224, 224, 3)
    chw = [np.ascontiguousarray(p.transpose(2, 0, 1)) for p in photos]
    check("channels_last", chw, data_format="channels_last", input_data_format="channels_first")


def test_return_tensors_pt(photos):
    import torch

    out = ViTHybridImageProcessor()(photos, return_tensors="pt").pixel_values
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    compare("return_tensors pt", out.numpy(), hf_pixels(photos))
    tensor = torch.from_numpy(np.ascontiguousarray(photos[0].transpose(2, 0, 1)))
    compare("return_tensors pt", ViTHybridImageProcessor()(tensor, return_tensors="pt").pixel_values.numpy(),
            transformers.ViTHybridImageProcessor()(tensor, return_tensors="pt")["pixel_values"].numpy())


def test_return_tensors_tf(photos):
    tf = pytest.importorskip("tensorflow")
    out = ViTHybridImageProcessor()(photos, return_tensors="tf").pixel_values
    assert isinstance(out, tf.Tensor) and out.dtype == tf.float32
    compare("return_tensors tf", out.numpy(), hf_pixels(photos))


def test_return_tensors_jax(photos):
    jnp = pytest.importorskip("jax.numpy")
    out = ViTHybridImageProcessor()(photos, return_tensors="jax").pixel_values
    assert isinstance(out, jnp.ndarray) and out.dtype == jnp.float32
    compare("return_tensors jax", np.asarray(out), hf_pixels(photos))


# ---- config round trips ---------------------------------------------------------------------


def test_default_config_matches_hf():
    ours = ViTHybridImageProcessor().to_dict()
    assert ours == json.loads(transformers.ViTHybridImageProcessor().to_json_string())
    assert ours["image_mean"] == transformers.image_utils.OPENAI_CLIP_MEAN
    assert ours["image_std"] == transformers.image_utils.OPENAI_CLIP_STD


def test_hf_loads_our_config(photos, tmp_path):
    ours = ViTHybridImageProcessor(size=256, crop_size=(240, 200), resample=Image.BILINEAR,
                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    assert ours.save_pretrained(tmp_path) == [str(tmp_path / "preprocessor_config.json")]
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ViTHybridImageProcessor"
    assert saved["size"] == {"shortest_edge": 256} and saved["crop_size"] == {"height": 240, "width": 200}
    for hf in (transformers.ViTHybridImageProcessor.from_pretrained(tmp_path),
               transformers.AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)):
        assert type(hf) is transformers.ViTHybridImageProcessor
        assert hf.to_json_string() == ours.to_json_string()
        compare("config: ours saved, HF loaded", ours(photos, return_tensors="np").pixel_values,
                hf_pixels(photos, hf))


def test_we_load_hf_config(photos, tmp_path):
    hf = transformers.ViTHybridImageProcessor(size={"shortest_edge": 300}, crop_size={"height": 288, "width": 256},
                                              resample=Image.NEAREST, do_normalize=False, crop_pct=0.9)
    hf.save_pretrained(tmp_path)
    ours = ViTHybridImageProcessor.from_pretrained(tmp_path)
    assert ours.crop_pct == 0.9 and ours.crop_size == {"height": 288, "width": 256}
    assert ours.resample == Image.NEAREST and ours.do_normalize is False
    assert json.loads(ours.to_json_string()) == json.loads(hf.to_json_string())
    compare("config: HF saved, ours loaded", ours(photos, return_tensors="np").pixel_values, hf_pixels(photos, hf))


def test_to_dict_from_dict_round_trip():
    processor = ViTHybridImageProcessor(do_center_crop=False, crop_size=160, processor_class="ViTHybridProcessor")
    clone = ViTHybridImageProcessor.from_dict(processor.to_dict())
    assert type(clone) is ViTHybridImageProcessor and clone.to_dict() == processor.to_dict()
    assert clone.crop_size == {"height": 160, "width": 160} and clone.do_center_crop is False
    assert "ViTHybridImageProcessor {" in repr(processor)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop_size", [{"shortest_edge": 224}, {"height": 224}, {"height": 0, "width": 5}, "224"])
def test_bad_crop_size(photos, crop_size):
    with pytest.raises(ValueError, match="`crop_size`"):
        ViTHybridImageProcessor(crop_size=crop_size)
    with pytest.raises(ValueError, match="`crop_size`"):
        ViTHybridImageProcessor()(photos[0], crop_size=crop_size)


def test_unknown_argument_raises(photos):
    with pytest.raises(TypeError):
        ViTHybridImageProcessor()(photos[0], crop_pct=0.9)
