"""Robust decoding: every odd mode to upright 8-bit RGB, every broken file a clear DecodeError."""

import io

import numpy as np
import pytest
from PIL import Image
from zoo import exif_rotated_jpeg, noise_image, zoo_cases

from lvd.pretrain.data.decode import DecodeError, decode, load_resized, probe

CASES = zoo_cases()


@pytest.mark.parametrize("case", [c for c in CASES if c.ok], ids=lambda c: c.name)
def test_odd_files_decode_to_upright_rgb(case):
    img = decode(case.data, max_pixels=100_000_000)
    assert img.mode == "RGB"
    assert img.size == case.size
    arr = np.asarray(img).astype(int)
    for (x, y), expected in case.pixels.items():
        got = arr[y, x]
        assert np.abs(got - np.array(expected)).max() <= case.tol, (case.name, (x, y), got.tolist(), expected)


@pytest.mark.parametrize("case", [c for c in CASES if c.ok], ids=lambda c: c.name)
def test_probe_reports_upright_size_without_decoding(case):
    assert (probe(case.data).width, probe(case.data).height) == case.size


@pytest.mark.parametrize("case", [c for c in CASES if not c.ok], ids=lambda c: c.name)
def test_broken_files_raise_decode_error_with_reason(case):
    with pytest.raises(DecodeError) as info:
        decode(case.data, max_pixels=100_000_000)
    assert case.error_has in str(info.value)


def test_pixel_limit_is_configurable():
    data = next(c for c in CASES if c.name == "noisy.jpeg").data  # 120 x 90 = 10800 px
    decode(data, max_pixels=10800)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode(data, max_pixels=10799)


def test_animated_gif_has_its_frame_count():
    data = next(c for c in CASES if c.name == "animated.gif").data
    assert probe(data).frames == 3


def _jpeg(img, quality=92):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_draft_mode_resize_matches_full_decode():
    # A smooth 1600x1200 photo-like image: draft decoding (reduced DCT scale) then resizing
    # must give nearly the same 224 px picture as decoding at full size and resizing.
    yy, xx = np.mgrid[0:1200, 0:1600]
    arr = np.stack([(xx / 1600 * 255), (yy / 1200 * 255), ((xx + yy) % 256)], -1).astype(np.uint8)
    data = _jpeg(Image.fromarray(arr))
    fast = np.asarray(load_resized(data, 224)).astype(float)
    ref_img = Image.open(io.BytesIO(data)).convert("RGB")
    ref_img = ref_img.resize((299, 224), Image.Resampling.BICUBIC)
    left = (299 - 224) // 2
    ref = np.asarray(ref_img.crop((left, 0, left + 224, 224))).astype(float)
    assert fast.shape == (224, 224, 3)
    assert np.abs(fast - ref).mean() < 3.0


def test_draft_mode_keeps_exif_orientation():
    img = load_resized(exif_rotated_jpeg(), 10, crop=False)
    assert img.size == (10, 20)  # upright: taller than wide
    arr = np.asarray(img).astype(int)
    assert arr[2, 5, 0] > 200 and arr[2, 5, 2] < 60  # red on top
    assert arr[17, 5, 2] > 200 and arr[17, 5, 0] < 60  # blue below


def test_load_resized_never_upsamples_below_target():
    data = _jpeg(noise_image(640, 480))
    for size in (16, 100, 224, 479):
        assert load_resized(data, size).size == (size, size)
