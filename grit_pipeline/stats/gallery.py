"""The report's gallery: sampled records with their images, boxes and phrases.

Only the sampled members are read from the shard tars (one sequential scan of each tar that holds a sample,
stopping once its samples are found), decoded with Pillow at reduced size, drawn on and embedded as base64 JPEG
thumbnails. Everything about a sample that ends up in HTML goes through :func:`html.escape`: captions are
untrusted web text.
"""

from __future__ import annotations

import base64
import io
import tarfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from grit_core.record import group_phrases, retained_spans
from grit_pipeline.image import to_rgb

PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#9a6324",
    "#800000",
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # never read a larger member into memory for a thumbnail
MAX_PIXELS = 89_478_485  # the pipeline's default image.max_pixels: never decode a larger image for a thumbnail
# Shards may come from elsewhere: open images only with the plugins the pipeline itself accepts (no EPS, no gs).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass
class Phrase:
    start: int
    end: int
    text: str
    boxes: list[list[float]]  # [x1, y1, x2, y2, score], normalised
    color: str


@dataclass
class GalleryItem:
    key: str
    shard: str
    caption: str
    width: int
    height: int
    chunks: list[Phrase]
    expressions: list[Phrase]  # retained by the containment filter
    image_uri: str | None = None  # data:image/jpeg;base64,...
    problem: str | None = None  # why there is no image
    notes: list[str] = field(default_factory=list)


def make_item(row: dict[str, Any]) -> GalleryItem:
    """A gallery entry from an index row (no image yet): grounded chunks with colours, retained expressions."""
    caption = row.get("caption") or ""
    chunk_groups = group_phrases(_valid(row.get("noun_chunks"), len(caption)))
    chunks = [
        Phrase(s, e, caption[s:e], boxes, PALETTE[i % len(PALETTE)]) for i, (s, e, boxes) in enumerate(chunk_groups)
    ]
    refs = _valid(row.get("ref_exps"), len(caption))
    keep = retained_spans(refs)
    expressions = [Phrase(s, e, caption[s:e], boxes, "") for s, e, boxes in group_phrases(refs) if (s, e) in keep]
    return GalleryItem(
        key=str(row.get("key") or ""),
        shard=str(row.get("shard") or ""),
        caption=caption,
        width=int(row.get("width") or 0),
        height=int(row.get("height") or 0),
        chunks=chunks,
        expressions=expressions,
    )


def _valid(entries: Any, n: int) -> list[list[float]]:
    out = []
    for e in entries or []:
        if e is not None and len(e) == 7 and all(v is not None for v in e) and 0 <= e[0] < e[1] <= n:
            out.append(list(e))
    return out


def caption_html(caption: str, phrases: list[Phrase]) -> str:
    """The caption with each phrase's span wrapped in a coloured ``<mark>``; every piece of text is escaped.

    Overlapping spans (not produced by our pipeline, possible in other corpora) keep the first one.
    """
    out, pos = [], 0
    for p in sorted(phrases, key=lambda p: (p.start, -p.end)):
        if p.start < pos:
            continue
        out.append(escape(caption[pos : p.start], quote=True))
        title = f"{p.text} ({len(p.boxes)} box{'es' if len(p.boxes) != 1 else ''})"
        style = f"background:{p.color}33;border-bottom:2px solid {p.color}"
        out.append(f'<mark style="{style}" title="{escape(title, quote=True)}">{escape(p.text, quote=True)}</mark>')
        pos = p.end
    out.append(escape(caption[pos:], quote=True))
    return "".join(out)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_thumbnail(data: bytes, chunks: list[Phrase], max_side: int = 360) -> Image.Image:
    """Decode (at reduced size where the format allows), fit to ``max_side``, draw boxes with their phrases."""
    image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(f"{image.width}x{image.height} is over {MAX_PIXELS} pixels")
    image.draft("RGB", (max_side * 2, max_side * 2))  # JPEG decodes straight to a smaller scale
    image = to_rgb(image)
    # Fit max_side both ways: small images are enlarged so that the labels stay readable beside them.
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR)
    w, h = image.size
    draw = ImageDraw.Draw(image)
    font = _font(12)
    for p in chunks:
        label = p.text if len(p.text) <= 32 else p.text[:31] + "…"
        for x1, y1, x2, y2, score in p.boxes:
            box = (x1 * (w - 1), y1 * (h - 1), x2 * (w - 1), y2 * (h - 1))
            draw.rectangle(box, outline=p.color, width=2)
            text = f"{label} {score:.2f}"
            tx, ty = box[0], max(0.0, box[1] - 14)
            bbox = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle(bbox, fill=p.color)
            draw.text((tx, ty), text, fill="white", font=font)
    return image


def to_data_uri(image: Image.Image, quality: int = 80) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_members(tar_path: Path, wanted: dict[str, str | None]) -> dict[str, bytes | str]:
    """Image bytes for each key in ``wanted`` (key -> expected extension, or None for any image extension).

    Scans the tar's headers in order and stops when every key is found. A key that is missing, or a member too
    large to read, maps to a message saying so instead of bytes.
    """
    found: dict[str, bytes | str] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            base, _, ext = member.name.rpartition("/")[2].partition(".")
            if base not in wanted or base in found:
                continue
            expected = wanted[base]
            is_image = (ext.lower() == expected) if expected else (ext.lower() in IMAGE_EXTS)
            if not is_image:
                continue
            if not member.isfile():
                found[base] = f"member {member.name} is not a regular file"
            elif member.size > MAX_MEMBER_BYTES:
                found[base] = f"member {member.name} is {member.size} bytes, over {MAX_MEMBER_BYTES}"
            else:
                found[base] = tar.extractfile(member).read()
            if len(found) == len(wanted):
                break
    for key in wanted:
        found.setdefault(key, f"no image member for {key} in {tar_path.name}")
    return found


def build_gallery(rows: list[dict[str, Any]], tar_of: Any, max_side: int = 360) -> list[GalleryItem]:
    """Gallery items for sampled rows; ``tar_of(shard)`` gives the shard's tar path or None.

    A sample whose image cannot be read or decoded (whatever Pillow raises) is still shown, with the reason in place
    of the picture; the report never fails on it.
    """
    items = [make_item(r) for r in rows]
    by_shard: dict[str, list[tuple[GalleryItem, dict[str, Any]]]] = {}
    for item, row in zip(items, rows):
        by_shard.setdefault(item.shard, []).append((item, row))
    for shard, members in by_shard.items():
        tar = tar_of(shard)
        if tar is None:
            for item, _ in members:
                item.problem = f"shard {shard} has no tar"
            continue
        wanted = {item.key: (row.get("image_ext") or None) for item, row in members}
        try:
            images = read_members(tar, wanted)
        except (OSError, tarfile.TarError) as exc:
            images = {k: f"cannot read {tar.name}: {exc}" for k in wanted}
        for item, _ in members:
            data = images[item.key]
            if isinstance(data, str):
                item.problem = data
                continue
            try:
                thumb = draw_thumbnail(data, item.chunks, max_side)
            except Exception as exc:  # noqa: BLE001 - one bad image is shown as such; the report goes on
                item.problem = f"image does not decode: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            item.image_uri = to_data_uri(thumb)
    return items
