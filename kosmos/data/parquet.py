"""GRIT as parquet files with the images inside: the layout of Hub mirrors of GRIT-20M.

Such a file holds GRIT's record columns (``caption``, ``noun_chunks``, ``ref_exps``, and usually ``key``, ``url``,
``width``, ``height``, the CLIP similarities) beside a column of encoded image bytes: a Hugging Face ``datasets``
``Image`` column (a struct of ``bytes`` and ``path``, often named ``image``) or a plain binary column (``jpg``,
``image``, ...). Each row becomes the raw sample a WebDataset shard would give (``__key__``, ``jpg``, ``json``,
``txt``), so decoding, drops and their counts are those of tar shards.

A parquet file that cannot be used is refused before training starts, naming the file and what it lacks:
not a parquet file, no image bytes column (GRIT-20M's own release holds URLs only: download the images first), or
no caption.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Image columns, in the order they are looked for.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes", "img", "bytes")
KEY_COLUMNS = ("key", "id")
PARQUET_MAGIC = b"PAR1"
ROWS_PER_BATCH = 64  # rows read at once: bounds the memory of one reader to a few dozen encoded images


class ParquetSourceError(ValueError):
    """A parquet file that cannot be read as a GRIT source."""


def is_parquet(url: str) -> bool:
    return url.lower().endswith(".parquet")


@dataclass(frozen=True)
class ParquetLayout:
    image: str  # column holding the encoded image
    image_in_struct: bool  # a datasets Image column: the bytes are its "bytes" field
    caption: str
    key: str | None
    grounded: bool  # has noun_chunks or ref_exps

    @property
    def columns(self) -> list[str]:
        wanted = [self.image, self.caption, self.key, *(("noun_chunks", "ref_exps") if self.grounded else ())]
        return [c for c in wanted if c]


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def parquet_layout(schema: pa.Schema, where: str, caption_column: str = "caption") -> ParquetLayout:
    """Which columns of ``schema`` hold the image, caption, key and boxes. Raises :class:`ParquetSourceError`."""
    names = set(schema.names)
    image = in_struct = None
    for name in IMAGE_COLUMNS:
        if name not in names:
            continue
        t = schema.field(name).type
        if _is_bytes(t):
            image, in_struct = name, False
            break
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_bytes(t.field("bytes").type):
            image, in_struct = name, True
            break
    if image is None:
        hint = (
            " It has a url column, as GRIT-20M's own release does: download the images first (img2dataset, "
            "docs/data.md) or use a copy with an image column."
            if "url" in names
            else ""
        )
        raise ParquetSourceError(
            f"{where}: no column of image bytes (looked for {', '.join(IMAGE_COLUMNS)} holding binary data or a "
            f"Hugging Face Image struct); columns: {', '.join(schema.names)}.{hint}"
        )
    caption_type = schema.field(caption_column).type if caption_column in names else None
    if caption_type is None or not (pa.types.is_string(caption_type) or pa.types.is_large_string(caption_type)):
        raise ParquetSourceError(f"{where}: no {caption_column!r} text column; columns: {', '.join(schema.names)}")
    key = next((k for k in KEY_COLUMNS if k in names), None)
    grounded = bool({"noun_chunks", "ref_exps"} & names)
    return ParquetLayout(image, in_struct, caption_column, key, grounded)


def check_parquet(path: str, kind: str) -> ParquetLayout:
    """Open ``path``'s footer and check it can feed a ``kind`` source (``grit`` needs noun_chunks or ref_exps)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ParquetSourceError(f"{path}: not a readable parquet file ({exc})") from exc
    layout = parquet_layout(schema, path)
    if kind == "grit" and not layout.grounded:
        raise ParquetSourceError(
            f"{path}: no noun_chunks or ref_exps column, so no boxes: use it as a `caption` source, or give GRIT's "
            f"record columns; columns: {', '.join(schema.names)}"
        )
    return layout


def _open(url: str):
    if "://" not in url:
        return pq.ParquetFile(url)
    import fsspec

    return pq.ParquetFile(fsspec.open(url, "rb").open())


def iter_parquet_samples(url: str) -> Iterator[dict]:
    """The raw samples of one parquet file, in row order."""
    pf = _open(url)
    layout = parquet_layout(pf.schema_arrow, url)
    stem = Path(url).name.rsplit(".", 1)[0]
    row = 0
    for batch in pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=layout.columns):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            image = data[layout.image][i]
            if layout.image_in_struct and image is not None:
                image = image.get("bytes")
            key = data[layout.key][i] if layout.key else None
            key = str(key) if key not in (None, "") else f"{stem}-{row:09d}"
            caption = data[layout.caption][i]
            sample = {"__key__": key, "__url__": url, "jpg": image}
            if isinstance(caption, str):
                sample["txt"] = caption.encode("utf-8")
            if layout.grounded:
                record = {"caption": caption}
                for column in ("noun_chunks", "ref_exps"):
                    if column in data:
                        record[column] = data[column][i]
                sample["json"] = json.dumps(record).encode("utf-8")
            row += 1
            yield sample


def parquet_samples(handler: Callable[[Exception], bool]) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Pipeline stage: shard dicts ``{"url": ...}`` of parquet files to raw samples; a file that fails part-way is
    reported to ``handler`` and the stream goes on with the next file."""

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for shard in src:
            try:
                yield from iter_parquet_samples(shard["url"])
            except Exception as exn:  # noqa: BLE001 - a bad file is logged and skipped, the run goes on
                handler(exn)

    return stage
