"""Image checks and decoding for one sample (GRIT_SPEC 3.1 and 2): pure functions, no Ray.

Every byte here is untrusted, so the order of checks matters:

1. encoded size against ``image.max_bytes`` (nothing parsed yet);
2. the header only (``Image.open`` reads no pixels): declared pixels against ``image.max_pixels`` (the
   decompression-bomb limit holds before any pixel is decoded), then ``image.min_side``;
3. the decode itself, with Pillow restricted to an allow-list of formats (:data:`ALLOWED_FORMATS`: JPEG, PNG,
   WebP, GIF, BMP, TIFF), so no plugin that starts an external program (EPS and PostScript run Ghostscript) is
   ever chosen, whatever the file's name or content; bounded in time by ``image.decode_timeout_s`` and in memory by
   the pixel limit. Every exception of decode or conversion is this sample's ``bad_image``, its type in the detail;
4. what is stored: the input bytes unchanged, except that an image whose EXIF orientation is not 1 is re-encoded
   upright (so boxes and pixels agree for every reader) and a format WebDataset readers cannot decode (anything but
   JPEG, PNG and WebP) is converted to PNG. Both are counted by the caller from the flags on the result.

For the detector, the first frame is converted to 8-bit RGB (16-bit, 32-bit integer and float images rescaled a band
of rows at a time, never as a float64 copy of the whole image; transparency composited on white). Peak memory of
one decode is measured by ``benchmarks/image_decode_memory.py``. JPEGs that need no re-encoding are decoded with
Pillow's ``draft`` at the smallest DCT scale that still covers the detector's input size: the same pixels the
detector would get after resizing, several times faster.
"""

from __future__ import annotations

import io
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from grit_pipeline.config import ImageConfig
from grit_pipeline.readers.sample import describe_exception

# Formats stored as they came; their extension in the shard. MPO is how Pillow names camera JPEGs that carry extra
# preview frames: the bytes are a JPEG every reader decodes.
STORED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# The only Pillow plugins ever used to open input (GRIT_SPEC 3.0). JPEG's opener also returns MPO files.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
BAND_PIXELS = 1 << 20  # pixels per band when rescaling high bit-depth images
EXIF_ORIENTATION = 0x0112
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "PNG": {}, "WEBP": {"quality": 95}}

# A truncated file must fail, never decode as a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeTimeout(Exception):
    """Decoding one image took longer than ``image.decode_timeout_s``."""


@dataclass
class ImageResult:
    """What the image stage keeps of one sample. ``drop_reason`` is set when the sample is dropped."""

    drop_reason: str | None = None
    detail: str = ""
    data: bytes | None = None  # bytes to store in the shard
    ext: str | None = None  # "jpg", "png" or "webp"
    width: int = 0  # size of the stored image (upright)
    height: int = 0
    rgb: Image.Image | None = None  # upright 8-bit RGB first frame for the detector (may be draft-reduced)
    exif_reencoded: bool = False
    converted_png: bool = False


def drop(reason: str, detail: str = "") -> ImageResult:
    return ImageResult(drop_reason=reason, detail=detail)


@contextmanager
def decode_deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`DecodeTimeout` inside the block once ``seconds`` have passed.

    On the main thread (where Ray runs actor methods) a real-time interval timer interrupts the decode: Pillow
    decodes in a Python loop over blocks of input, so the signal lands within one block. Elsewhere the elapsed time
    is checked when the block ends, which still drops the sample but cannot stop the work early.
    """
    if seconds <= 0:
        yield
        return
    start = time.monotonic()
    use_signal = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    previous = None
    if use_signal:

        def on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
            raise DecodeTimeout(f"decoding took longer than {seconds} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_signal:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if time.monotonic() - start > seconds:
        raise DecodeTimeout(f"decoding took longer than {seconds} s")


def detector_target_size(width: int, height: int, short_side: int, long_side_max: int) -> tuple[int, int]:
    """Size the detector resizes an image to: shorter side ``short_side``, longer side at most ``long_side_max``."""
    scale = min(short_side / min(width, height), long_side_max / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_gray8(im: Image.Image) -> Image.Image:
    """8-bit grey (mode L) of a 16-bit, 32-bit integer or float image, rescaled, one band of rows at a time.

    16-bit: value / 257. 32-bit integer and float: values already in 0-255 kept, float in [0, 1] scaled by 255,
    anything else mapped linearly from its own range (extrema from Pillow, no copy). Temporary memory is one band.
    """
    width, height = im.size
    mode = im.mode
    lo = scale = 0.0
    if mode.startswith("I;16"):
        lo, scale = 0.0, 1.0 / 257.0
    else:
        extrema = im.getextrema()
        low, top = (float(extrema[0]), float(extrema[1])) if extrema else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(top)):
            raise ValueError(f"mode {mode} image with non-finite values")
        if top > 255.0 or low < 0.0:
            lo = min(0.0, low)
            scale = 255.0 / max(top - lo, 1e-12)
        elif mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, BAND_PIXELS // max(1, width))
    for y in range(0, height, rows):
        band = np.array(im.crop((0, y, width, min(height, y + rows))), dtype=np.float32)  # (rows, W), a copy
        band -= lo
        band *= scale
        np.rint(band, out=band)
        np.clip(band, 0, 255, out=band)
        out[y : y + band.shape[0]] = band
    return Image.fromarray(out)  # uint8 (H, W): mode L


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode: 16-bit and 32-bit integer and float images rescaled to 0-255, alpha on white."""
    mode = im.mode
    if mode in HIGH_DEPTH_MODES:
        return to_gray8(im).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


def _encode(im: Image.Image, fmt: str, info: dict) -> bytes:
    """Encode ``im`` as ``fmt`` keeping its colour profile and (orientation-free) EXIF."""
    options = dict(_SAVE_OPTIONS.get(fmt, {}))
    for name in ("icc_profile", "exif"):
        if info.get(name):
            options[name] = info[name]
    if fmt == "PNG" and im.mode in ("P", "L", "RGB") and info.get("transparency") is not None:
        options["transparency"] = info["transparency"]
    if fmt == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        im = to_rgb(im)
    if fmt == "PNG" and im.mode in ("I", "F"):  # PNG has no 32-bit or float pixels
        im = to_gray8(im)
    if fmt == "PNG" and im.mode not in ("1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA"):
        im = to_rgb(im) if im.mode != "CMYK" else im.convert("RGB")
    if fmt == "WEBP" and im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.mode else "RGB")
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def process_image(
    data: bytes | None,
    cfg: ImageConfig,
    detector_size: tuple[int, int] | None = None,
    want_rgb: bool = True,
) -> ImageResult:
    """Check, decode and (where needed) re-encode one image; see the module docstring for the order of checks.

    ``detector_size`` is ``(short_side, long_side_max)`` of the detector's input: JPEGs are decoded reduced to
    just cover it. ``want_rgb=False`` still decodes every pixel (a truncated or corrupt image must be caught) but at
    the smallest scale, and returns no RGB image: the annotations detector needs none.
    """
    if data is None:
        return drop("missing_image")
    if len(data) > cfg.max_bytes:
        return drop("image_too_many_bytes", f"{len(data)} bytes > image.max_bytes={cfg.max_bytes}")
    if len(data) == 0:
        return drop("bad_image", "zero-byte image")
    try:
        with decode_deadline(cfg.decode_timeout_s):
            return _process(data, cfg, detector_size, want_rgb)
    except DecodeTimeout as exc:
        return drop("decode_timeout", str(exc))
    except Image.DecompressionBombError as exc:
        return drop("image_too_large", str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure of one image is that sample's drop
        # Pillow's plugins raise almost anything on hostile files (OSError, SyntaxError, NotImplementedError,
        # RuntimeError, AttributeError...); MemoryError too. The type goes into the index with the message.
        return drop("bad_image", describe_exception(exc))


def _process(data: bytes, cfg: ImageConfig, detector_size: tuple[int, int] | None, want_rgb: bool) -> ImageResult:
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its own limit; our limit is checked just below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    width, height = im.size
    if width * height > cfg.max_pixels:
        return drop("image_too_large", f"{width}x{height} declared > image.max_pixels={cfg.max_pixels}")
    if min(width, height) < cfg.min_side:
        return drop("image_too_small", f"{width}x{height} < image.min_side={cfg.min_side}")
    fmt = im.format or ""
    orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in range(1, 9):
        orientation = 1
    rotate = orientation != 1
    convert = fmt not in STORED_FORMATS
    keep_bytes = not (rotate or convert)

    if keep_bytes and fmt in ("JPEG", "MPO"):
        # Scale-only draft (same mode): the DCT decoder skips the detail the detector would resize away.
        if not want_rgb:
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
        elif detector_size is not None and cfg.jpeg_draft:
            im.draft(im.mode, detector_target_size(width, height, *detector_size))
    im.load()  # the whole decode happens here: truncation and corrupt data raise now

    result = ImageResult(width=width, height=height)
    if keep_bytes:
        result.data, result.ext = data, STORED_FORMATS[fmt]
        upright = im
    else:
        upright = ImageOps.exif_transpose(im) if rotate else im
        target_fmt = "JPEG" if fmt in ("JPEG", "MPO") else fmt if fmt in ("PNG", "WEBP") else "PNG"
        result.data = _encode(upright, target_fmt, upright.info)
        result.ext = STORED_FORMATS[target_fmt]
        result.width, result.height = upright.size
        result.exif_reencoded = rotate
        result.converted_png = convert
    if want_rgb:
        if upright.mode in HIGH_DEPTH_MODES:
            # Rescale first and let the wide pixels go before the RGB copy (4 bytes a pixel in Pillow) is made.
            upright = to_gray8(upright)
            im = None  # noqa: F841 - the last reference to the decoded 16/32-bit image
        result.rgb = to_rgb(upright)
    return result
