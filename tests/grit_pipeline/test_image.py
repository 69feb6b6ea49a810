"""Image checks and decoding (grit_pipeline.image): every rule on real encoded files."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from grit_pipeline.config import ImageConfig
from grit_pipeline.image import detector_target_size, process_image, to_rgb
from tests.grit_pipeline import pipeline_corpus as corpus

CFG = ImageConfig()
DET = (800, 1333)


def test_good_jpeg_is_stored_unchanged():
    data = corpus.jpeg(1, 96, 64)
    r = process_image(data, CFG, DET)
    assert r.drop_reason is None
    assert r.data is data and r.ext == "jpg"
    assert (r.width, r.height) == (96, 64)
    assert r.rgb.mode == "RGB" and r.rgb.size == (96, 64)
    assert not r.exif_reencoded and not r.converted_png


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "missing_image"),
        (b"", "bad_image"),
        (b"this is a caption, not an image", "bad_image"),
        (corpus.truncated(corpus.jpeg(2, 200, 150)), "bad_image"),
        (corpus.truncated(corpus.png(3, 200, 150)), "bad_image"),
        (corpus.jpeg(4, 16, 16), "image_too_small"),
    ],
    ids=["none", "zero-bytes", "not-an-image", "truncated-jpeg", "truncated-png", "too-small"],
)
def test_bad_images_are_dropped_with_their_reason(data, reason):
    r = process_image(data, CFG, DET)
    assert r.drop_reason == reason
    assert r.data is None and r.rgb is None


def test_declared_size_is_refused_before_decoding():
    bomb = corpus.huge_declared_png()
    t0 = time.perf_counter()
    r = process_image(bomb, CFG, DET)
    assert r.drop_reason == "image_too_large"
    assert time.perf_counter() - t0 < 1.0  # nothing was decoded: 10^10 pixels would take minutes
    # Between 1x and 2x Pillow's own limit Pillow only warns; we still drop.
    r = process_image(corpus.huge_declared_png(10_000, 10_000), CFG, DET)
    assert r.drop_reason == "image_too_large"
    small_limit = ImageConfig(max_pixels=96 * 64 - 1)
    assert process_image(corpus.jpeg(5), small_limit, DET).drop_reason == "image_too_large"


def test_encoded_byte_bound():
    data = corpus.png(6, 200, 200)
    assert process_image(data, ImageConfig(max_bytes=len(data) - 1), DET).drop_reason == "image_too_many_bytes"
    assert process_image(data, ImageConfig(max_bytes=len(data)), DET).drop_reason is None


def test_decode_is_bounded_in_time():
    data = corpus.png(7, 2000, 2000)
    r = process_image(data, ImageConfig(decode_timeout_s=1e-4), DET)
    assert r.drop_reason == "decode_timeout"


def test_exif_orientation_is_applied_and_stored_upright():
    im = corpus.picture(8, 96, 64)
    im.paste((255, 0, 0), (0, 0, 12, 12))  # red mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = corpus.encode(im, "JPEG", quality=95, exif=exif.tobytes())
    r = process_image(data, CFG, DET)
    assert r.drop_reason is None and r.exif_reencoded and not r.converted_png
    assert (r.width, r.height) == (64, 96)  # as displayed, and as stored now
    stored = Image.open(io.BytesIO(r.data))
    assert stored.format == "JPEG" and stored.size == (64, 96)
    assert stored.getexif().get(0x0112, 1) == 1
    # After a clockwise turn the mark is in the top-right corner, in the stored bytes and in the detector's pixels.
    for picture in (stored.convert("RGB"), r.rgb):
        arr = np.asarray(picture)
        assert arr[3, -4, 0] > 200 and arr[3, -4, 1] < 60
        assert arr[3, 3, 0] < 200 or arr[3, 3, 1] > 60


def test_cmyk_jpeg_is_kept_and_converted_for_the_detector():
    data = corpus.cmyk_jpeg(9)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r = process_image(data, CFG, DET)
    assert r.drop_reason is None and r.data is data and r.ext == "jpg"
    assert r.rgb.mode == "RGB"


def test_16_bit_png_is_rescaled_not_clipped():
    data = corpus.png16(10)
    r = process_image(data, CFG, DET)
    assert r.drop_reason is None and r.ext == "png" and r.data is data
    arr = np.asarray(r.rgb)
    # Pillow's plain convert("RGB") would clip everything above 255 to white; rescaling spreads the range.
    assert arr.min() < 20 and arr.max() > 235 and 90 < arr.mean() < 165


def test_palette_png_with_transparency_is_composited_on_white():
    data = corpus.palette_png(11, transparent=True)
    r = process_image(data, CFG, DET)
    assert r.drop_reason is None and r.data is data
    src = Image.open(io.BytesIO(data))
    transparent = np.asarray(src) == 0
    assert transparent.any()
    assert (np.asarray(r.rgb)[transparent] == 255).all()


def test_other_formats_become_png_and_animations_use_their_first_frame():
    gif = corpus.animated_gif(12)
    r = process_image(gif, CFG, DET)
    assert r.drop_reason is None and r.converted_png and r.ext == "png"
    stored = Image.open(io.BytesIO(r.data))
    assert stored.format == "PNG" and getattr(stored, "n_frames", 1) == 1
    first = Image.open(io.BytesIO(gif)).convert("RGB")
    assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(first))
    bmp = corpus.encode(corpus.picture(13), "BMP")
    r = process_image(bmp, CFG, DET)
    assert r.converted_png and Image.open(io.BytesIO(r.data)).format == "PNG"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB")), np.asarray(corpus.picture(13)))


def test_webp_is_kept():
    data = corpus.encode(corpus.picture(14), "WEBP", quality=80)
    r = process_image(data, CFG, DET)
    assert r.drop_reason is None and r.ext == "webp" and r.data is data and not r.converted_png


def test_large_jpeg_is_decoded_at_the_detector_scale():
    data = corpus.jpeg(15, 3200, 2400)
    r = process_image(data, CFG, DET)
    target = detector_target_size(3200, 2400, *DET)
    assert (r.width, r.height) == (3200, 2400)  # the stored size is the real one
    assert target[0] <= r.rgb.size[0] < 3200 and target[1] <= r.rgb.size[1] < 2400
    full = process_image(data, ImageConfig(jpeg_draft=False), DET)
    assert full.rgb.size == (3200, 2400)


def test_validation_only_decode_still_catches_truncation():
    data = corpus.jpeg(16, 400, 300)
    assert process_image(data, CFG, DET, want_rgb=False).drop_reason is None
    assert process_image(data, CFG, DET, want_rgb=False).rgb is None
    assert process_image(corpus.truncated(data, 0.6), CFG, DET, want_rgb=False).drop_reason == "bad_image"


@pytest.mark.parametrize("mode", ["I", "F", "LA", "RGBA", "L", "1"])
def test_to_rgb_handles_every_mode(mode):
    base = corpus.picture(17, 40, 40)
    if mode == "I":
        im = Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 1000, mode="I")
    elif mode == "F":
        im = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0, mode="F")
    else:
        im = base.convert(mode)
    rgb = to_rgb(im)
    assert rgb.mode == "RGB" and rgb.size == (40, 40)
    arr = np.asarray(rgb)
    assert arr.max() > 128  # scaled into range, not all black
