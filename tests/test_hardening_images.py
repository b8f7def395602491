"""Hardening of both image processors (issue #14): awkward and broken images, one row each.

Every row runs through ``ViTImageProcessor`` and ``ViTHybridImageProcessor``. Where HF produces a result
the output must equal HF's to PROCESSOR_ATOL; otherwise ours raises one ValueError naming the image
(``images[i]: ...``), with the same wording from both processors.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import transformers
from PIL import Image
from sklearn.datasets import load_sample_image
from transformers.image_utils import load_image

from vit_core import ViTHybridImageProcessor, ViTImageProcessor, ViTImageProcessorFast

from tolerances import PROCESSOR_ATOL as ATOL  # noqa: E402

KINDS = ["vit", "hybrid"]


def ours_for(kind: str) -> ViTImageProcessor:
    return ViTImageProcessor() if kind == "vit" else ViTHybridImageProcessor()


def hf_for(kind: str):
    """HF's processor with our conversion to RGB (HF's ViT default, None, converts nothing)."""
    if kind == "vit":
        return transformers.ViTImageProcessor(do_convert_rgb=True)
    return transformers.ViTHybridImageProcessor()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """china.jpg shrunk to 96x64 (W x H): small, real, not square."""
    return Image.fromarray(load_sample_image("china.jpg")).resize((96, 64), Image.LANCZOS)


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def check(kind: str, images, hf_images=None, **kwargs) -> np.ndarray:
    """Ours vs HF (same settings) to ATOL; returns ours."""
    ours = ours_for(kind)(images, return_tensors="np", **kwargs).pixel_values
    expected = np.asarray(hf_for(kind)(images if hf_images is None else hf_images, return_tensors="np",
                                       **kwargs)["pixel_values"])
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
    return ours


def error_of(images, **kwargs) -> str:
    """The one ValueError both processors raise for ``images``; asserts they word it identically."""
    messages = []
    for kind in KINDS:
        with pytest.raises(ValueError) as info:
            ours_for(kind)(images, **kwargs)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    return messages[0]


# ---- modes ---------------------------------------------------------------------------------------


def _modes(photo: Image.Image) -> dict[str, Image.Image]:
    gray16 = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)  # mode I;16
    palette = photo.convert("P")
    palette.info["transparency"] = 3
    return {
        "L": photo.convert("L"), "LA": photo.convert("LA"), "RGBA": photo.convert("RGBA"),
        "P": photo.convert("P"), "P+transparency": Image.open(io.BytesIO(encode(palette))),
        "CMYK": photo.convert("CMYK"), "I;16 PNG": Image.open(io.BytesIO(encode(gray16))),
        "1": photo.convert("1"),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16 PNG", "1"])
@pytest.mark.parametrize("kind", KINDS)
def test_pil_modes_match_hf(photo, kind, mode):
    image = _modes(photo)[mode]
    assert image.mode == mode.split(" ")[0].split("+")[0]
    assert check(kind, image).shape == (1, 3, 224, 224)
    check(kind, [photo, image, photo])  # and inside a batch


@pytest.mark.parametrize("kind", KINDS)
def test_modes_without_convert_rgb(photo, kind):
    """do_convert_rgb=False: modes that are arrays as they are follow HF; the others are one clear error."""
    gray = photo.convert("L")
    out = ours_for(kind)(gray, do_convert_rgb=False, image_mean=0.5, image_std=0.5).pixel_values
    expected = hf_for(kind)(np.asarray(gray)[..., None], do_convert_rgb=False, image_mean=0.5, image_std=0.5,
                            return_tensors="np")  # HF cannot take the 2-D array of an L image
    assert out.shape == (1, 1, 224, 224)
    np.testing.assert_allclose(out, expected["pixel_values"], rtol=0, atol=ATOL)
    assert "images[1]: a PIL image of mode '1' needs do_convert_rgb=True" in error_of(
        [photo, photo.convert("1")], do_convert_rgb=False)


# ---- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_float_outside_unit_range_without_rescale(photo, kind):
    """Floats in [-1, 1.5]: used as they are without resize (as HF); with a resize, one error (HF errs too)."""
    image = np.asarray(photo, dtype=np.float32) / 255 * 2.5 - 1
    check(kind, image, do_rescale=False, do_resize=False)
    with pytest.raises(ValueError):
        hf_for(kind)(image, do_rescale=False)
    message = error_of([photo, image], do_rescale=False)
    assert message.startswith("images[1]: images must hold integers in [0, 255] or floats in [0, 1]")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("do_resize", [True, False])
def test_nan_and_inf_are_one_error(photo, bad, do_resize):
    image = np.asarray(photo, dtype=np.float32) / 255
    image[10, 20, 1] = bad
    message = error_of([photo, photo, image], do_rescale=False, do_resize=do_resize)
    assert message == "images[2]: the image holds NaN or infinite values"


@pytest.mark.parametrize("kind", KINDS)
def test_one_by_one_pixel(kind):
    """A 1x1 PIL image is channels last; HF infers (1, 1, 3) as channels first, so it is told here."""
    pixel = Image.new("RGB", (1, 1), (200, 30, 90))
    out = check(kind, pixel, input_data_format="channels_last")
    np.testing.assert_array_equal(out[0, :, 0, 0], out[0, :, -1, -1])  # one colour everywhere
    check(kind, np.asarray(pixel), input_data_format="channels_last")


# ---- files and bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_exif_orientation(photo, kind, tmp_path):
    """A PIL image is used as stored (HF ignores EXIF there); a path or bytes is rotated, as HF's load_image."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    path.write_bytes(encode(photo, "JPEG", exif=exif.tobytes(), quality=95))
    as_stored = Image.open(path)
    assert as_stored.size == (96, 64)
    kwargs = {"do_center_crop": False} if kind == "hybrid" else {"size": {"height": 96, "width": 64}}
    out = check(kind, as_stored, **kwargs)
    from_path = check(kind, str(path), hf_images=load_image(str(path)), **kwargs)
    from_bytes = ours_for(kind)(path.read_bytes(), **kwargs).pixel_values
    np.testing.assert_array_equal(from_bytes, from_path)
    if kind == "hybrid":  # shortest edge 224, no crop: the rotation swaps the output's height and width
        assert out.shape[2:] == (224, 336) and from_path.shape[2:] == (336, 224)
    else:  # a fixed size: same shape, other pixels
        assert not np.allclose(from_path, out, atol=0.1)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds none (IHDR + IEND only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def _jpeg_claiming(photo: Image.Image, width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(encode(photo, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_huge_image_header_is_refused(photo, fmt):
    """20000x20000 (4e8 pixels, over 2x MAX_IMAGE_PIXELS): Pillow refuses at open, before decoding."""
    data = _png_header(20000, 20000) if fmt == "PNG" else _jpeg_claiming(photo, 20000, 20000)
    message = error_of([photo, data])
    assert message.startswith(f"images[1]: cannot read an image from {len(data)} bytes: DecompressionBombError")


def test_huge_image_header_allocates_nothing(photo, tmp_path):
    """In a fresh process (its own peak RSS): both 20000x20000 headers refused; an RGB decode would take 1.5 GiB."""
    (tmp_path / "huge.png").write_bytes(_png_header(20000, 20000))
    (tmp_path / "huge.jpg").write_bytes(_jpeg_claiming(photo, 20000, 20000))
    code = ("import sys; from pathlib import Path; from vit_core import ViTImageProcessor as P\n"
            "for f in sys.argv[1:]:\n"
            "    try: P()(Path(f).read_bytes())\n"
            "    except ValueError as e: assert 'DecompressionBombError' in str(e), e\n"
            "    else: raise SystemExit('not refused')\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "huge.png"), str(tmp_path / "huge.jpg")],
                            capture_output=True, text=True, check=True, timeout=60)
    assert int(result.stdout.split()[-1]) / 1024 < 200  # MiB: numpy + Pillow + vit_core is ~60


def test_image_over_max_pixels_is_refused(photo, monkeypatch):
    """Between MAX_IMAGE_PIXELS and 2x, Pillow only warns; we refuse, honouring the limit as set."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 64 - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        message = error_of(encode(photo))
    assert message.endswith("the image is 96x64 = 6144 pixels, over PIL.Image.MAX_IMAGE_PIXELS = 6143")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 64)
    ViTImageProcessor()(encode(photo))  # at the limit: fine


def test_truncated_jpeg(photo, tmp_path):
    data = encode(photo, "JPEG")[:700]
    assert "images[0]: cannot read an image from 700 bytes: OSError: image file is truncated" in error_of(data)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data)
    with pytest.raises(OSError):  # HF: Pillow's error, from deep inside
        hf_for("vit")(load_image(str(path)))
    assert error_of([photo, Image.open(path)]).startswith(
        "images[1]: cannot decode the PIL image: OSError: image file is truncated")
    assert error_of(str(path)).startswith(f"images[0]: cannot read an image from {str(path)!r}: OSError")


def test_non_image_bytes_and_paths(tmp_path):
    assert error_of(b"definitely not an image").startswith(
        "images[0]: cannot read an image from 23 bytes: UnidentifiedImageError: not a format Pillow identifies")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "UnidentifiedImageError" in error_of([str(text)])
    assert error_of(tmp_path / "missing.png") == (
        f"images[0]: no image file at {str(tmp_path / 'missing.png')!r} (URLs are not fetched)")
    assert error_of(str(tmp_path)).startswith("images[0]: no image file at")  # a folder
    with pytest.raises(TypeError, match="images must be PIL images"):
        ViTImageProcessor()(object())


@pytest.mark.parametrize("kind", KINDS)
def test_files_and_bytes_match_hf(photo, kind, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(photo.convert("LA")))
    check(kind, [str(path), path, path.read_bytes()], hf_images=[load_image(str(path))] * 3)


# ---- batches ---------------------------------------------------------------------------------------


def test_empty_batches():
    assert error_of([]) == "`images` is empty"
    assert error_of([[], ()]) == "`images` is empty"


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_sizes(photo, kind):
    """Resized (and cropped) to one size, images of mixed sizes batch, as in HF."""
    assert check(kind, [photo, photo.resize((31, 77)), photo.resize((300, 17)), photo.resize((2, 2))]).shape == (
        4, 3, 224, 224)


def test_mixed_sizes_error_wording(photo):
    images = [photo, photo, photo.resize((31, 77))]
    with pytest.raises(ValueError) as info:
        ViTImageProcessor()(images, do_resize=False)
    assert str(info.value) == ("images differ in shape after preprocessing and cannot be batched (images[0] is "
                               "(64, 96, 3), images[2] is (77, 31, 3), height, width, channels); resize them to "
                               "one size")
    with pytest.raises(ValueError) as hybrid:
        ViTHybridImageProcessor()(images, do_resize=False, do_center_crop=False)
    assert str(hybrid.value) == str(info.value)


def test_fast_name_is_the_same_processor(photo):
    """ViTImageProcessorFast: HF's name, our batched path, every return_tensors."""
    fast, plain = ViTImageProcessorFast(), ViTImageProcessor()
    reference = plain([photo] * 3).pixel_values
    for tensors in (None, "np", "pt", "tf", "jax", "flax"):
        out = np.asarray(fast([photo] * 3, return_tensors=tensors).pixel_values)
        np.testing.assert_array_equal(out, reference)
    assert fast.to_dict()["image_processor_type"] == "ViTImageProcessorFast"
    check("vit", [photo] * 3)
