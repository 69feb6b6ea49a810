"""Image checks and decoding (grit_pipeline.image): every rule on real encoded files."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grit_pipeline.config import ImageConfig
from grit_pipeline.image import detector_target_size, process_image, to_rgb
from tests.grit_pipeline import pipeline_corpus as corpus
from tests.grit_pipeline.hostile_inputs import EPS

REPO = Path(__file__).resolve().parents[2]
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


# ---------------------------------------------------------------------------------------------------------------
# Hostile formats and exceptions (GRIT_SPEC 3.0)
# ---------------------------------------------------------------------------------------------------------------


def _fake_gs(tmp_path) -> tuple[dict, object]:
    """A ``gs`` first on PATH that leaves a marker file when run (and fails, as a broken Ghostscript would)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "gs-was-run"
    gs = bindir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}
    return env, marker


def test_eps_named_jpg_never_starts_ghostscript(tmp_path):
    env, marker = _fake_gs(tmp_path)
    (tmp_path / "photo.jpg").write_bytes(EPS)
    check = (
        "import sys; from grit_pipeline.config import ImageConfig; from grit_pipeline.image import process_image;"
        "r = process_image(open(sys.argv[1], 'rb').read(), ImageConfig(min_side=1), (800, 1333));"
        "print(r.drop_reason, r.detail)"
    )
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path / "photo.jpg")], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("bad_image") and "UnidentifiedImageError" in out.stdout
    assert not marker.exists()
    # The same file through Pillow without the allow-list does run the fake gs: the check above can fail.
    plain = "import sys; from PIL import Image; im = Image.open(sys.argv[1]); print(im.format); im.load()"
    out = subprocess.run([sys.executable, "-c", plain, str(tmp_path / "photo.jpg")], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.stdout.startswith("EPS") and marker.exists()


@pytest.mark.parametrize("fmt", ["DDS", "BLP", "PPM", "ICO", "TGA", "PCX", "SPIDER"])
def test_formats_outside_the_allow_list_are_bad_images(fmt):
    im = corpus.picture(30, 64, 64)
    if fmt == "SPIDER":
        im = im.convert("F")
    elif fmt == "BLP":
        im = im.convert("P")
    data = corpus.encode(im, fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a real file of that format
    r = process_image(data, CFG, DET)
    assert r.drop_reason == "bad_image" and "UnidentifiedImageError" in r.detail


@pytest.mark.parametrize("exc_type", [NotImplementedError, RuntimeError, AttributeError, MemoryError, AssertionError])
def test_any_exception_of_a_decoder_is_that_samples_bad_image(monkeypatch, exc_type):
    from PIL import PngImagePlugin

    def broken(self):
        raise exc_type("decoder blew up")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    r = process_image(corpus.png(31), CFG, DET)
    assert r.drop_reason == "bad_image" and r.detail.startswith(exc_type.__name__)
    assert process_image(corpus.jpeg(31), CFG, DET).drop_reason is None  # the next sample decodes


def test_32_bit_integer_and_float_tiffs_are_kept_and_rescaled():
    ramp = np.tile(np.linspace(0, 1, 96), (64, 1))  # (64, 96): left column 0, right column 1
    for arr in ((ramp * 4_000_000_000 - 2_000_000_000).astype(np.int32), ramp.astype(np.float32) * 1000):
        data = corpus.encode(Image.fromarray(arr), "TIFF")
        r = process_image(data, CFG, DET)
        assert r.drop_reason is None, r.detail
        assert r.ext == "png" and r.converted_png and (r.width, r.height) == (96, 64)
        stored = np.asarray(Image.open(io.BytesIO(r.data)).convert("L"), dtype=np.int32)
        assert stored[:, 0].max() < 10 and stored[:, -1].min() > 245  # the full range, rescaled, not clipped
        assert np.array_equal(np.asarray(r.rgb)[..., 0], stored)


def test_high_bit_depth_conversion_never_copies_the_image_as_float64(monkeypatch):
    """The rescale works a band of rows at a time: no array of the whole image in a wider type is made."""
    import grit_pipeline.image as image_module

    monkeypatch.setattr(image_module, "BAND_PIXELS", 80 * 8)
    seen = []

    def spying(real):
        def spy(obj, *args, **kwargs):
            out = real(obj, *args, **kwargs)
            seen.append((out.shape, out.dtype))
            return out

        return spy

    monkeypatch.setattr(image_module.np, "array", spying(np.array))
    monkeypatch.setattr(image_module.np, "asarray", spying(np.asarray))
    data = corpus.png16(32, 80, 48)
    r = process_image(data, CFG, DET)
    monkeypatch.undo()
    assert r.drop_reason is None
    wide = [(shape, dtype) for shape, dtype in seen if dtype.itemsize > 1 and shape and shape[0] > 8]
    assert seen and not wide  # bands of 8 rows: never the whole 48-row image in a type wider than uint8
    reference = np.rint(np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64) / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(r.rgb)[..., 0], reference)
