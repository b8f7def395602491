"""vit_core.image_processing against Hugging Face's ViTImageProcessor (the oracle) on real photos."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import transformers
from PIL import Image
from sklearn.datasets import load_sample_image

from vit_core import image_processing
from vit_core.image_processing import BatchFeature, ViTFeatureExtractor, ViTImageProcessor

from tolerances import PROCESSOR_ATOL as ATOL  # noqa: E402
from tolerances import REDUCING_GAP_MAX_DIFF  # noqa: E402


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """The two 427×640 RGB uint8 sample photos shipped with scikit-learn."""
    return [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]


def hf_pixels(images, **kwargs) -> np.ndarray:
    """HF's pixel_values as one numpy array."""
    return np.asarray(transformers.ViTImageProcessor()(images, return_tensors="np", **kwargs)["pixel_values"])


def check(images, hf_images=None, **kwargs) -> np.ndarray:
    """Run ours and HF with the same settings; assert they agree to ATOL; return ours."""
    ours = ViTImageProcessor()(images, **kwargs).pixel_values
    expected = hf_pixels(images if hf_images is None else hf_images, **kwargs)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
    return ours


# ---- numerics vs HF --------------------------------------------------------------------------


def test_pil_input(photos):
    out = check(Image.fromarray(photos[0]))
    assert out.shape == (1, 3, 224, 224)


@pytest.mark.parametrize("index", [0, 1])
def test_numpy_hwc_uint8(photos, index):
    check(photos[index])


def test_numpy_chw_uint8(photos):
    chw = np.ascontiguousarray(photos[1].transpose(2, 0, 1))
    np.testing.assert_array_equal(check(chw), ViTImageProcessor()(photos[1]).pixel_values)


def test_float_unit_range_hwc(photos):
    image = photos[0].astype(np.float32) / 255
    check(image, do_rescale=False)
    with pytest.warns(UserWarning, match="already rescaled"):
        check(image)  # HF rescales twice here; we match it, and warn


def test_list_of_both_photos(photos):
    assert check(photos).shape == (2, 3, 224, 224)
    check(tuple(Image.fromarray(p) for p in photos), hf_images=[Image.fromarray(p) for p in photos])


def test_4d_batch_array(photos):
    assert check(np.stack(photos)).shape == (2, 3, 224, 224)


def test_torch_input_and_pt_output(photos):
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(photos[0].transpose(2, 0, 1)))
    ours = ViTImageProcessor()(tensor, return_tensors="pt").pixel_values
    expected = transformers.ViTImageProcessor()(tensor, return_tensors="pt")["pixel_values"]
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("resample", [Image.NEAREST, Image.BILINEAR, Image.BICUBIC])
def test_non_square_size_and_resample(photos, resample):
    out = check(photos, size={"height": 160, "width": 96}, resample=resample)
    assert out.shape == (2, 3, 160, 96)


def test_int_resample_and_int_size(photos):
    ours = ViTImageProcessor(size=128, resample=3)(photos[0]).pixel_values
    np.testing.assert_allclose(ours, hf_pixels(photos[0], size={"height": 128, "width": 128}, resample=3),
                               rtol=0, atol=ATOL)


def test_no_resize(photos):
    assert check(photos[0], do_resize=False).shape == (1, 3, 427, 640)


def test_no_normalize(photos):
    out = check(photos, do_normalize=False)
    assert 0 <= out.min() and out.max() <= 1


def test_custom_mean_std(photos):
    check(photos, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    check(photos[0], image_mean=0.4, image_std=0.3)


def test_channels_last_output(photos):
    assert check(photos, data_format="channels_last").shape == (2, 224, 224, 3)


def test_hf_enum_arguments(photos):
    from transformers.image_utils import ChannelDimension

    chw = photos[0].transpose(2, 0, 1)
    out = ViTImageProcessor()(chw, input_data_format=ChannelDimension.FIRST,
                              data_format=ChannelDimension.LAST).pixel_values
    np.testing.assert_allclose(out, hf_pixels(photos[0], data_format="channels_last"), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I"])
def test_non_rgb_pil_modes_become_rgb(photos, mode):
    image = Image.fromarray(photos[0]).convert(mode)
    out = check(image, hf_images=image.convert("RGB"))
    assert out.shape == (1, 3, 224, 224)


def test_grayscale_and_rgba_arrays(photos):
    gray = np.array(Image.fromarray(photos[0]).convert("L"))
    check(gray, hf_images=Image.fromarray(gray).convert("RGB"))
    check(gray[..., None], hf_images=Image.fromarray(gray).convert("RGB"))
    rgba = np.array(Image.fromarray(photos[1]).convert("RGBA"))
    rgba[..., 3] = 7  # alpha is dropped, not composited (as Pillow's RGBA -> RGB)
    check(rgba, hf_images=photos[1])
    check(rgba.transpose(2, 0, 1), hf_images=photos[1])


def test_per_call_overrides_do_not_stick(photos):
    processor = ViTImageProcessor()
    assert processor(photos[0], size={"height": 32, "width": 48}).pixel_values.shape == (1, 3, 32, 48)
    assert processor(photos[0]).pixel_values.shape == (1, 3, 224, 224)
    assert processor.size == {"height": 224, "width": 224}


def test_shortest_edge_keeps_aspect_ratio(photos):
    out = ViTImageProcessor(size={"shortest_edge": 200})(photos[0]).pixel_values
    assert out.shape == (1, 3, 200, 299)  # int(200 * 640 / 427), HF's rounding
    out = ViTImageProcessor(size={"shortest_edge": 200, "longest_edge": 250})(photos[0]).pixel_values
    assert out.shape == (1, 3, 167, 250)


def test_batch_feature_attribute_access(photos):
    out = ViTImageProcessor()(photos[0])
    assert isinstance(out, BatchFeature) and isinstance(out, dict)
    assert out.pixel_values is out["pixel_values"] and list(out) == ["pixel_values"]
    with pytest.raises(AttributeError, match="nope"):
        out.nope  # noqa: B018


# ---- speed paths: threads, the uint8 table, reducing_gap -------------------------------------------


def test_threads_and_table_are_bit_exact(photos):
    """Every thread count gives HF's bits exactly (uint8 pixels go through the table, floats do not)."""
    images = [Image.fromarray(p) for p in photos] * 3
    expected = hf_pixels(images)
    for threads in (None, 1, 2, 5):
        np.testing.assert_array_equal(ViTImageProcessor()(images, num_threads=threads).pixel_values, expected)
    floats = [p.astype(np.float32) / 255 for p in photos]
    np.testing.assert_array_equal(ViTImageProcessor()(floats, do_rescale=False, num_threads=2).pixel_values,
                                  hf_pixels(floats, do_rescale=False))
    custom = {"rescale_factor": 1 / 127, "image_mean": [0.1, 0.7, 0.3], "image_std": [0.05, 2.0, 0.9]}
    np.testing.assert_array_equal(ViTImageProcessor(**custom)(images[:2]).pixel_values,
                                  hf_pixels(images[:2], **custom))


def test_reducing_gap_is_opt_in_and_bounded(photos):
    """Pillow's two-step downscale: faster, not HF's pixels; the bound is the one measured (tolerances.py)."""
    images = [Image.fromarray(p) for p in photos]
    out = ViTImageProcessor()(images, reducing_gap=1.0).pixel_values
    diff = np.abs(out - hf_pixels(images))
    assert 1e-3 < diff.max() <= REDUCING_GAP_MAX_DIFF
    np.testing.assert_array_equal(ViTImageProcessor()(images, reducing_gap=3.0).pixel_values, hf_pixels(images))


def test_thread_pool_after_fork(photos):
    """A forked child (a DataLoader worker) gets its own pool instead of the parent's dead threads."""
    code = ("import os, numpy as np; from vit_core import ViTImageProcessor as P\n"
            "x = [np.zeros((40, 30, 3), np.uint8)] * 4; a = P()(x, num_threads=2).pixel_values\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    os._exit(0 if np.array_equal(P()(x, num_threads=2).pixel_values, a) else 3)\n"
            "_, status = os.waitpid(pid, 0); raise SystemExit(os.waitstatus_to_exitcode(status))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("kwargs", [{"num_threads": 0}, {"num_threads": 1.5}, {"num_threads": True},
                                    {"reducing_gap": 0.5}, {"reducing_gap": "2"}])
def test_bad_speed_arguments(photos, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}` must be None or"):
        ViTImageProcessor()(photos[0], **kwargs)


# ---- other frameworks ---------------------------------------------------------------------------


def test_return_tensors_tf(photos):
    tf = pytest.importorskip("tensorflow")
    out = ViTImageProcessor()(photos[0], return_tensors="tf").pixel_values
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy(), hf_pixels(photos[0]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["jax", "flax"])
def test_return_tensors_jax(photos, name):
    jnp = pytest.importorskip("jax.numpy")
    out = ViTImageProcessor()(photos[0], return_tensors=name).pixel_values
    assert isinstance(out, jnp.ndarray)
    np.testing.assert_allclose(np.asarray(out), hf_pixels(photos[0]), rtol=0, atol=ATOL)


def test_missing_framework_names_the_extra(photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    with pytest.raises(ImportError, match=r"trivit\[tf\]"):
        ViTImageProcessor()(photos[0], return_tensors="tf")


def test_core_import_pulls_in_no_framework():
    code = ("import sys, vit_core.image_processing; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- config round trips ---------------------------------------------------------------------


def test_hf_loads_our_config(photos, tmp_path):
    ours = ViTImageProcessor(size={"height": 160, "width": 96}, resample=Image.BICUBIC,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    assert ours.save_pretrained(tmp_path) == [str(tmp_path / "preprocessor_config.json")]
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ViTImageProcessor" and saved["resample"] == 3
    assert (tmp_path / "preprocessor_config.json").read_text() == ours.to_json_string()
    hf = transformers.ViTImageProcessor.from_pretrained(tmp_path)
    assert hf.to_json_string() == ours.to_json_string()
    np.testing.assert_allclose(ours(photos).pixel_values, hf(photos, return_tensors="np")["pixel_values"],
                               rtol=0, atol=ATOL)


def test_we_load_hf_config(photos, tmp_path):
    hf = transformers.ViTImageProcessor(size={"height": 96, "width": 160}, resample=Image.NEAREST,
                                        do_normalize=False, crop_pct=0.9)
    hf.save_pretrained(tmp_path)
    ours = ViTImageProcessor.from_pretrained(tmp_path)
    assert ours.crop_pct == 0.9 and ours.do_convert_rgb is None  # unknown keys and nulls kept
    assert json.loads(ours.to_json_string()) == json.loads(hf.to_json_string())
    np.testing.assert_allclose(ours(photos).pixel_values, hf(photos, return_tensors="np")["pixel_values"],
                               rtol=0, atol=ATOL)
    # a JSON file path works too, and keyword overrides win
    again = ViTImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json", size=64)
    assert again.size == {"height": 64, "width": 64} and again.resample == Image.NEAREST


def test_to_dict_from_dict_round_trip():
    processor = ViTImageProcessor(do_rescale=False, image_mean=0.3, processor_class="ViTProcessor")
    clone = ViTImageProcessor.from_dict(processor.to_dict())
    assert clone.to_dict() == processor.to_dict()
    assert processor.to_dict()["processor_class"] == "ViTProcessor"
    assert "ViTImageProcessor {" in repr(processor)


def test_default_config_matches_hf_except_convert_rgb():
    ours, hf = ViTImageProcessor().to_dict(), json.loads(transformers.ViTImageProcessor().to_json_string())
    assert ours.pop("do_convert_rgb") is True and hf.pop("do_convert_rgb") is None
    assert ours == hf


# ---- deprecated alias ------------------------------------------------------------------------


def test_feature_extractor_warns_once_and_matches(photos, monkeypatch):
    monkeypatch.setattr(image_processing, "_feature_extractor_warned", False)
    with pytest.warns(FutureWarning, match="ViTImageProcessor"):
        extractor = ViTFeatureExtractor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ViTFeatureExtractor()  # second construction is silent
    np.testing.assert_array_equal(extractor(photos).pixel_values, ViTImageProcessor()(photos).pixel_values)
    assert extractor.to_dict()["image_processor_type"] == "ViTFeatureExtractor"


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [{"height": 224}, {"width": 9, "shortest_edge": 3}, {"max_height": 5, "max_width": 5},
                                  {"height": 0, "width": 5}, "224", (1, 2, 3)])
def test_bad_size(size):
    with pytest.raises(ValueError, match="`size`"):
        ViTImageProcessor(size=size)


def test_bad_size_per_call(photos):
    with pytest.raises(ValueError, match="`size`"):
        ViTImageProcessor()(photos[0], size={"shortest": 3})


def test_bad_resample():
    with pytest.raises(ValueError, match="`resample`"):
        ViTImageProcessor(resample=17)


@pytest.mark.parametrize("bad", [3.0, None, [[1.0, 2.0]]])
def test_wrong_input_type(bad):
    with pytest.raises(TypeError, match="images must be"):
        ViTImageProcessor()(bad)


def test_wrong_dtype():
    with pytest.raises(TypeError, match="dtype"):
        ViTImageProcessor()(np.zeros((8, 8, 3), dtype=np.complex64))


def test_5d_array():
    with pytest.raises(ValueError, match="5-D"):
        ViTImageProcessor()(np.zeros((1, 2, 3, 8, 8), dtype=np.uint8))


def test_bad_channel_count():
    with pytest.raises(ValueError, match="channel"):
        ViTImageProcessor()(np.zeros((8, 9, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="channels"):
        ViTImageProcessor()(np.zeros((8, 9, 5), dtype=np.uint8), input_data_format="channels_last")


def test_empty_and_mismatched_batches(photos):
    with pytest.raises(ValueError, match="empty"):
        ViTImageProcessor()([])
    with pytest.raises(ValueError, match="cannot be batched"):
        ViTImageProcessor()([photos[0], photos[0][:100]], do_resize=False)


def test_bad_mean_and_formats(photos):
    with pytest.raises(ValueError, match="`image_mean`"):
        ViTImageProcessor(image_mean=[0.5, 0.5])(photos[0])
    with pytest.raises(ValueError, match="`data_format`"):
        ViTImageProcessor()(photos[0], data_format="nchw")
    with pytest.raises(ValueError, match="`return_tensors`"):
        ViTImageProcessor()(photos[0], return_tensors="mx")
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        ViTImageProcessor()(np.full((8, 8, 3), 1.5, dtype=np.float32))
