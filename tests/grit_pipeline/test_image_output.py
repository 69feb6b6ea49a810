"""``output.image_format``: one extension per corpus by default, every re-encoding counted (GRIT_SPEC 2)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from grit_pipeline.config import ImageConfig
from grit_pipeline.image import process_image
from grit_pipeline.image_output import stored_image
from tests.grit_pipeline import pipeline_corpus as corpus

CFG = ImageConfig(min_side=8)


def store(data: bytes, image_format: str, want_rgb: bool = True):
    result = process_image(data, CFG, (224, 320), want_rgb=want_rgb)
    assert result.drop_reason is None, result.detail
    return result, stored_image(result, image_format)


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_jpeg_bytes_are_stored_as_they_came():
    data = corpus.jpeg(1, 120, 80)
    for fmt in ("jpg", "original"):
        _, (stored, ext, counts) = store(data, fmt)
        assert (stored, ext) == (data, "jpg")
        assert not any(counts.values())


@pytest.mark.parametrize("want_rgb", [True, False])
@pytest.mark.parametrize(
    "name, data",
    [
        ("png", corpus.png(2, 90, 70)),
        ("webp", corpus.encode(corpus.picture(3, 90, 70), "WEBP", quality=90)),
        ("sixteen-bit png", corpus.png16(4)),
    ],
)
def test_other_formats_are_reencoded_to_jpeg_and_counted(name, data, want_rgb):
    result, (stored, ext, counts) = store(data, "jpg", want_rgb)
    assert ext == "jpg" and stored[:3] == b"\xff\xd8\xff"
    im = decoded(stored)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (result.width, result.height)
    assert counts == {"images_exif_reencoded": 0, "images_converted_png": 0, "images_converted_jpeg": 1}
    # The pixels are the image's (JPEG at quality 95 is close), whichever path produced them.
    original = np.asarray(decoded(result.data).convert("RGB"), dtype=np.float64) if name != "sixteen-bit png" else None
    if original is not None:
        assert np.abs(np.asarray(im, dtype=np.float64) - original).mean() < 6


@pytest.mark.parametrize("want_rgb", [True, False])
def test_transparency_is_composited_on_white(want_rgb):
    data = corpus.palette_png(6, transparent=True)
    transparent = np.asarray(Image.open(io.BytesIO(data))) == 0
    assert transparent.any()
    _, (stored, ext, _) = store(data, "jpg", want_rgb)
    pixels = np.asarray(decoded(stored)).astype(int)
    assert ext == "jpg" and pixels[transparent].mean() > 245  # white (JPEG blurs the edges), not black


def test_original_keeps_each_format():
    png = corpus.png(7, 90, 70)
    webp = corpus.encode(corpus.picture(8, 90, 70), "WEBP", quality=90)
    assert store(png, "original")[1][:2] == (png, "png")
    assert store(webp, "original")[1][:2] == (webp, "webp")


def test_gif_counts_once_under_what_it_became():
    gif = corpus.animated_gif(9)
    assert store(gif, "jpg")[1][1:] == (
        "jpg",
        {"images_exif_reencoded": 0, "images_converted_png": 0, "images_converted_jpeg": 1},
    )
    assert store(gif, "original")[1][1:] == (
        "png",
        {"images_exif_reencoded": 0, "images_converted_png": 1, "images_converted_jpeg": 0},
    )


def test_exif_rotated_image_is_stored_upright_in_both_modes():
    data = corpus.exif_rotated_jpeg(10, 96, 64, orientation=6)
    for fmt in ("jpg", "original"):
        result, (stored, ext, counts) = store(data, fmt)
        im = decoded(stored)
        assert ext == "jpg" and im.size == (64, 96) and im.getexif().get(0x0112, 1) == 1
        assert counts["images_exif_reencoded"] == 1 and counts["images_converted_jpeg"] == 0


def test_unknown_format_is_refused():
    result = process_image(corpus.jpeg(11), CFG)
    with pytest.raises(ValueError, match="'jpg' or 'original'"):
        stored_image(result, "png")
