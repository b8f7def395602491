"""Property tests (Hypothesis, against HF) and a byte fuzzer for both image processors (issue #14).

Properties: random sizes (1..600 px), dtypes, channel layouts, PIL modes and switches give HF's pixel_values to
PROCESSOR_ATOL. HF takes only 3-channel arrays, so a 1-channel or 2-D array (which trivit turns into RGB,
see vit_core.image_processing) is compared with HF on its 3-channel repeat; the layout is passed to both
(HF infers it from the first image only). The default run is bounded (few examples, a deadline).

Fuzz: mutated JPEG / PNG bytes and random bytes go through the processors in a child process (so its peak
RSS is the fuzzer's own): each case either gives finite float32 pixel_values or raises the documented
ValueError; any other exception, a case slower than FUZZ_CASE_SECONDS or a peak RSS over FUZZ_RSS_MIB fails.
The default run has FUZZ_DEFAULT_CASES cases; ``-m slow`` runs FUZZ_SLOW_CASES.

    python tests/test_fuzz_images.py 10000 0    # the fuzzer by hand: cases, seed; prints a JSON summary
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vit_core import ViTHybridImageProcessor, ViTImageProcessor  # noqa: E402

from tolerances import PROCESSOR_ATOL as ATOL  # noqa: E402

FUZZ_DEFAULT_CASES = 200
FUZZ_SLOW_CASES = 10_000
#: A case (decode + preprocess of a <= 2**20-pixel image) takes ~1-20 ms; this bound is for hangs.
FUZZ_CASE_SECONDS = 2.0
#: The child's peak RSS: numpy + Pillow + vit_core (~60 MiB) plus at most one 2**20-pixel decode.
FUZZ_RSS_MIB = 400
#: The fuzzer lowers Image.MAX_IMAGE_PIXELS to this: a header claiming more is refused before decoding.
FUZZ_MAX_PIXELS = 2**20


# ---- properties against HF ---------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402  (a test dependency: no skip)
from hypothesis import strategies as st  # noqa: E402

PROPERTY_SETTINGS = settings(max_examples=25, deadline=timedelta(seconds=3), derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def warm_hf():
    """HF's first call imports its vision stack (seconds): done here, outside Hypothesis' deadline."""
    import transformers

    for processor in (transformers.ViTImageProcessor(), transformers.ViTHybridImageProcessor()):
        processor(np.zeros((8, 8, 3), np.uint8), return_tensors="np")


@st.composite
def images(draw) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(ours, HF's 3-channel equivalent, input_data_format) for one random image."""
    height, width = draw(st.integers(1, 600)), draw(st.integers(1, 600))
    if draw(st.booleans()):  # keep most examples small, so the properties run in seconds
        height, width = 1 + height % 64, 1 + width % 64
    channels = draw(st.sampled_from([1, 3]))
    layout = draw(st.sampled_from(["hwc", "chw", "2d"] if channels == 1 else ["hwc", "chw"]))
    dtype = draw(st.sampled_from(["uint8", "float32", "float64", "int64", "uint16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pixels = rng.integers(0, 256, (height, width, channels))
    if dtype.startswith("float") and draw(st.booleans()):
        array = rng.random((height, width, channels)).astype(dtype)  # in [0, 1)
    else:
        array = pixels.astype(dtype)  # integer-valued, in [0, 255]
    hf = np.repeat(array, 3, axis=2) if channels == 1 else array
    if dtype == "uint8" and draw(st.booleans()):  # a PIL image of a random mode (HF converts it to RGB too)
        mode = draw(st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "CMYK", "I", "F", "1"]))
        image = Image.fromarray(array[..., 0] if channels == 1 else array).convert(mode)
        return image, image, None
    if layout == "2d":
        return array[..., 0], hf, "channels_last"
    if layout == "chw":
        return array.transpose(2, 0, 1), hf.transpose(2, 0, 1), "channels_first"
    return array, hf, "channels_last"


def _compare(ours_processor, hf_processor, image, **kwargs) -> None:
    ours, hf_image, layout = image
    if isinstance(ours, Image.Image):
        layout = "channels_last"  # HF would infer a 1- or 3-pixel-high image as channels first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "already rescaled"
        expected = hf_processor(hf_image, input_data_format=layout, return_tensors="np", **kwargs)["pixel_values"]
        given = layout if isinstance(ours, np.ndarray) and ours.ndim == 3 else None
        out = ours_processor(ours, input_data_format=given, **kwargs).pixel_values
    expected = np.asarray(expected).astype(np.float32)  # HF keeps float64 / uint8 where ours is float32
    assert out.dtype == np.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)


switches = st.fixed_dictionaries({"do_resize": st.booleans(), "do_rescale": st.booleans(),
                                  "do_normalize": st.booleans()})


@PROPERTY_SETTINGS
@given(image=images(), flags=switches, height=st.integers(1, 64), width=st.integers(1, 64),
       resample=st.sampled_from([0, 2, 3]))
def test_vit_processor_matches_hf(image, flags, height, width, resample):
    import transformers

    _compare(ViTImageProcessor(), transformers.ViTImageProcessor(do_convert_rgb=True), image,
             size={"height": height, "width": width}, resample=resample, **flags)


@PROPERTY_SETTINGS
@given(image=images(), flags=switches, shortest=st.integers(1, 64), crop=st.tuples(st.integers(1, 64),
       st.integers(1, 64)), do_center_crop=st.booleans())
def test_hybrid_processor_matches_hf(image, flags, shortest, crop, do_center_crop):
    import transformers

    _compare(ViTHybridImageProcessor(), transformers.ViTHybridImageProcessor(), image, size={"shortest_edge": shortest},
             crop_size={"height": crop[0], "width": crop[1]}, do_center_crop=do_center_crop, **flags)


@PROPERTY_SETTINGS
@given(size=st.one_of(st.integers(-3, 3), st.text(max_size=3), st.dictionaries(
    st.sampled_from(["height", "width", "shortest_edge", "longest_edge", "max"]), st.integers(-2, 5), max_size=3)))
def test_bad_size_dicts_are_our_error(size):
    """Any size: either valid (positive ints under HF's key sets) or one ValueError naming `size`."""
    try:
        processor = ViTImageProcessor(size=size)
    except ValueError as err:
        assert "`size" in str(err)
        return
    assert processor.size and all(isinstance(v, int) and v > 0 for v in processor.size.values())


# ---- byte fuzzing ------------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    """Small encodings of a real photo in the formats and modes files come in."""
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("flower.jpg")).resize((48, 32), Image.LANCZOS)
    out = []
    for image, fmt, save in [(photo, "JPEG", {"quality": 80}), (photo, "JPEG", {"progressive": True}),
                             (photo.convert("L"), "JPEG", {}), (photo, "PNG", {}), (photo.convert("RGBA"), "PNG", {}),
                             (photo.convert("P"), "PNG", {"transparency": 3}), (photo.convert("LA"), "PNG", {}),
                             (Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257), "PNG", {}),
                             (photo, "GIF", {}), (photo, "BMP", {}), (photo, "WEBP", {}), (photo, "TIFF", {})]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **save)
        out.append(buffer.getvalue())
    return out


def _mutate(rng: np.random.Generator, seeds: list[bytes]) -> bytes:
    data = bytearray(seeds[rng.integers(len(seeds))])
    kind = rng.integers(6)
    if kind == 0:  # random bytes
        return rng.bytes(int(rng.integers(0, 2048)))
    if kind == 1:  # truncate
        return bytes(data[:rng.integers(0, len(data))])
    if kind == 2:  # splice two seeds
        other = seeds[rng.integers(len(seeds))]
        return bytes(data[:rng.integers(len(data))] + other[rng.integers(len(other)):])
    for _ in range(int(rng.integers(1, 9))):  # flip / overwrite / insert / delete a few bytes, header-heavy
        where = int(rng.integers(min(len(data), 64 if rng.random() < 0.5 else len(data))))
        if kind == 3:
            data[where] ^= 1 << int(rng.integers(8))
        elif kind == 4:
            data[where:where + 4] = rng.bytes(4)
        else:
            data[where:where] = rng.bytes(int(rng.integers(1, 16))) if rng.random() < 0.5 else b""
            del data[where:where + int(rng.integers(0, 16))]
    return bytes(data)


def fuzz(cases: int, seed: int) -> dict:
    """Run ``cases`` mutated inputs through both processors; a summary (crashes listed, not raised)."""
    Image.MAX_IMAGE_PIXELS = FUZZ_MAX_PIXELS
    warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, EXIF / palette warnings
    processors = [ViTImageProcessor(size=16), ViTHybridImageProcessor(size=16, crop_size=16)]
    rng, seeds = np.random.default_rng(seed), _seeds()
    counts = {"ok": 0, "ValueError": 0}
    crashes, slowest, start = [], 0.0, time.perf_counter()
    for case in range(cases):
        data = _mutate(rng, seeds)
        begin = time.perf_counter()
        try:
            out = processors[case % 2](data, num_threads=1).pixel_values
            assert out.dtype == np.float32 and out.shape[:2] == (1, 3) and np.isfinite(out).all()
            counts["ok"] += 1
        except ValueError as err:
            assert str(err).startswith("images[0]: "), str(err)
            counts["ValueError"] += 1
        except Exception as err:  # noqa: BLE001 - the point: anything else is a crash
            crashes.append({"case": case, "error": f"{type(err).__name__}: {err}"[:300], "bytes": data[:64].hex()})
        slowest = max(slowest, time.perf_counter() - begin)
    return {"cases": cases, "seed": seed, **counts, "crashes": crashes, "slowest_s": round(slowest, 4),
            "total_s": round(time.perf_counter() - start, 2),
            "peak_rss_mib": round(_peak_rss_mib(), 1)}


def _peak_rss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM (ru_maxrss would include the forking parent's peak across exec)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def _run_fuzz(cases: int, seed: int) -> dict:
    result = subprocess.run([sys.executable, __file__, str(cases), str(seed)], capture_output=True, text=True,
                            timeout=60 + cases * FUZZ_CASE_SECONDS / 10, check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"fuzz summary: {summary}")
    assert summary["crashes"] == [], summary["crashes"][:5]
    assert summary["ok"] + summary["ValueError"] == cases
    assert summary["ok"] > 0 and summary["ValueError"] > 0  # both outcomes really happen
    assert summary["slowest_s"] < FUZZ_CASE_SECONDS
    assert summary["peak_rss_mib"] < FUZZ_RSS_MIB
    return summary


def test_fuzz_image_bytes_short():
    _run_fuzz(FUZZ_DEFAULT_CASES, seed=0)


@pytest.mark.slow
def test_fuzz_image_bytes_long():
    _run_fuzz(FUZZ_SLOW_CASES, seed=1)


if __name__ == "__main__":
    print(json.dumps(fuzz(int(sys.argv[1]), int(sys.argv[2]))))
