"""What image bytes a shard stores, and under which extension: ``output.image_format`` (GRIT_SPEC 2).

Readers of WebDataset shards pick the image by extension: ``.decode("pil").to_tuple("jpg", "json")``,
``ray.data.read_webdataset`` (whose columns come from the first shard's members) and Hugging Face ``datasets``
(which returns ``jpg=None`` for a row whose image is a ``.png``) all assume one extension per corpus. So:

- ``jpg`` (default, as img2dataset writes): every image is ``<key>.jpg``. JPEG input bytes are stored as they came;
  any other format is re-encoded to JPEG (quality 95, colour profile kept, transparency composited on white), and
  counted (``images_converted_jpeg``).
- ``original``: each input keeps its own bytes and format (``.jpg``, ``.png`` or ``.webp``); other formats (GIF, BMP,
  TIFF) are converted to PNG (``images_converted_png``).

In both, an image whose EXIF orientation is not 1 has already been re-encoded upright by the image rules
(``images_exif_reencoded``), so boxes and pixels agree for every reader. This module only takes the image stage's
result; it needs no Ray.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grit_pipeline.image import ImageResult

JPEG_QUALITY = 95


def _to_jpeg(result: ImageResult) -> bytes:
    from PIL import Image

    from grit_pipeline.image import to_rgb

    rgb = result.rgb
    if rgb is None or rgb.size != (result.width, result.height):
        # No full-size detector image to reuse (the annotations detector needs none): decode the stored bytes, which
        # are upright already.
        with Image.open(io.BytesIO(result.data)) as im:
            im.load()
            icc = im.info.get("icc_profile")
            rgb = to_rgb(im)
    else:
        icc = None
    out = io.BytesIO()
    options = {"quality": JPEG_QUALITY}
    if icc:
        options["icc_profile"] = icc
    rgb.save(out, format="JPEG", **options)
    return out.getvalue()


def stored_image(result: ImageResult, image_format: str) -> tuple[bytes, str, dict[str, int]]:
    """``(bytes, extension, counters)`` to store for a kept sample's image under ``output.image_format``.

    ``result`` is what :func:`grit_pipeline.image.process_image` returned for it (not dropped). The counters are
    ``images_exif_reencoded``, ``images_converted_png`` and ``images_converted_jpeg``: every re-encoding is counted
    once, under what it produced.
    """
    if image_format not in ("jpg", "original"):
        raise ValueError(f"output.image_format must be 'jpg' or 'original', got {image_format!r}")
    data, ext = result.data, result.ext
    converted_jpeg = image_format == "jpg" and ext != "jpg"
    if converted_jpeg:
        data, ext = _to_jpeg(result), "jpg"
    counts = {
        "images_exif_reencoded": int(result.exif_reencoded),
        "images_converted_png": int(result.converted_png and ext == "png"),
        "images_converted_jpeg": int(converted_jpeg),
    }
    return data, ext, counts
