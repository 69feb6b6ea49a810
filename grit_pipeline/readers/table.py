"""Tables of samples: parquet files and JSONL files (optionally compressed), one sample per row, in row order.

Rows are isolated: whatever goes wrong with one row (a cell that is not text, invalid UTF-8, a reference the policy
refuses, a failed fetch) is that row's drop, with its reason and the exception's type in ``detail``, and the next
row is read. Parquet is read one record batch at a time; string columns are read as bytes and decoded here with
``errors="replace"``, so one invalid UTF-8 cell never makes its row group unreadable. Every cell's size is checked on
the Arrow array before it becomes a Python object (``input.max_text_bytes``, ``image.max_bytes``). A row group
that cannot be decoded at all drops each of its rows (``bad_sample``, its count is in the file's metadata) and the
next row group is read. Only a file that cannot be opened, or breaks so that the number of rows left is unknown,
raises (the caller turns that into one ``bad_input`` row).

Image cells hold bytes, a ``{"bytes", "path"}`` struct (Hugging Face datasets) or a path, which is read under the
reference policy (``references.py``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec

from grit_pipeline.config import InputConfig
from grit_pipeline.readers.references import read_referenced_image
from grit_pipeline.readers.sample import (
    InputSample,
    Skip,
    apply_metadata,
    failed_sample,
    generated_key,
    make_key,
)

BATCH_ROWS = 256  # rows per parquet record batch: bounds the Arrow memory of one read


def _skipped(source: str) -> InputSample:
    return InputSample(key="", source=source, drop_reason="skipped")


def _too_large_text(row: dict[str, Any], cfg: InputConfig) -> tuple[str, str] | None:
    """(reason, detail) when a text cell of ``row`` is over ``input.max_text_bytes``."""
    for name, value in row.items():
        if name == cfg.image_column:
            continue
        size = len(value) if isinstance(value, (str, bytes)) else 0
        if size > cfg.max_text_bytes:
            reason = "caption_too_long" if name == cfg.caption_column else "cell_too_large"
            return reason, f"column {name!r}: {size} bytes > input.max_text_bytes={cfg.max_text_bytes}"
    return None


def table_row_sample(
    row: dict[str, Any], row_index: int, stem: str, source: str, cfg: InputConfig, fs, base_dir: str, max_bytes: int
) -> InputSample:
    """One parquet or JSONL row as a sample. Image column: bytes, a path, or ``{"bytes": ..., "path": ...}``.

    Never raises: any failure is the row's drop (``bad_sample``) with the exception's type in ``detail``.
    """
    where = f"{source}#{row_index}"
    try:
        raw_key = row.get(cfg.key_column)
        if isinstance(raw_key, bytes):
            raw_key = raw_key.decode("utf-8", "replace")
        key = make_key(raw_key) if raw_key not in (None, "") else generated_key(stem, row_index)
    except Exception as exc:  # noqa: BLE001 - one row's failure is that row's drop
        return failed_sample(generated_key(stem, row_index), where, exc, "key")
    sample = InputSample(key=key, source=where)
    try:
        too_large = _too_large_text(row, cfg)
        if too_large is not None:
            sample.drop_reason, sample.detail = too_large
            return sample
        row = {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) and k != cfg.image_column else v)
               for k, v in row.items()}  # fmt: skip
        caption = row.get(cfg.caption_column)
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"caption column {cfg.caption_column!r} holds {type(caption).__name__}, not text")
        sample.caption = caption
        apply_metadata(sample, {k: v for k, v in row.items() if k not in (cfg.caption_column, cfg.image_column)})
        image = row.get(cfg.image_column)
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) > max_bytes:
                sample.image_problem = "image_too_many_bytes"
                sample.detail = f"{len(image)} bytes > image.max_bytes={max_bytes}"
            else:
                sample.image = bytes(image)
        elif isinstance(image, str) and image:
            read_referenced_image(image, fs, base_dir, cfg.references, max_bytes, sample)
        else:
            sample.image_problem = "missing_image"
    except Exception as exc:  # noqa: BLE001 - one row's failure is that row's drop
        return failed_sample(sample.key, where, exc)
    return sample


# ---------------------------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------------------------


def _as_bytes_column(column):
    """String columns viewed as binary (no copy): invalid UTF-8 then fails one cell's decode, not the batch."""
    import pyarrow as pa

    if pa.types.is_string(column.type):
        return column.view(pa.binary())
    if pa.types.is_large_string(column.type):
        return column.view(pa.large_binary())
    return column


def _cell_sizes(column) -> list[int] | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return pc.binary_length(column).to_pylist()
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        field = pc.struct_field(column, "bytes")
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            return pc.binary_length(field).to_pylist()
    return None


def _batch_rows(batch, cfg: InputConfig, max_bytes: int) -> list[dict[str, Any] | Exception]:
    """The rows of one record batch as dicts, each cell converted on its own; an oversized cell is not converted."""
    import pyarrow as pa

    n = batch.num_rows
    rows: list[dict[str, Any] | Exception] = [{} for _ in range(n)]
    for name, column in zip(batch.schema.names, batch.columns):
        was_text = column.type in (pa.string(), pa.large_string())
        column = _as_bytes_column(column)
        bound = max_bytes if name == cfg.image_column else cfg.max_text_bytes
        sizes = _cell_sizes(column)
        try:
            fits = sizes is None or max((s or 0 for s in sizes), default=0) <= bound
            values = column.to_pylist() if fits else None
        except Exception:  # noqa: BLE001 - convert cell by cell below to find the bad one
            values = None
        for i in range(n):
            row = rows[i]
            if isinstance(row, Exception):
                continue
            if sizes is not None and (sizes[i] or 0) > bound:
                # Stand-in bytes of the right length would cost the memory we refuse; keep only the size.
                row[name] = _Oversized(sizes[i])
                continue
            try:
                value = values[i] if values is not None else column[i].as_py()
                row[name] = value.decode("utf-8", "replace") if was_text and value is not None else value
            except Exception as exc:  # noqa: BLE001 - this cell's failure is this row's drop
                rows[i] = exc
    return rows


class _Oversized(bytes):
    """Marks a cell over its byte bound; ``len`` is the cell's real size, nothing of it was converted."""

    def __new__(cls, size: int):
        obj = super().__new__(cls, b"")
        obj.size = size
        return obj

    def __len__(self) -> int:
        return self.size


def _reread_row_group(fs, fpath: str, rg: int, columns: list[str]):
    """Row group ``rg`` read again from a fresh handle: its table, or None when it fails again (the data is bad).

    Raises when the file itself cannot be opened again: then the failure is the file's (maybe transient, a network
    error), its remaining rows are unknown, and the caller's ``bad_input`` row makes a re-run retry it.
    """
    import pyarrow.parquet as pq

    with fs.open(fpath, "rb") as f:
        pf = pq.ParquetFile(f)
        try:
            return pf.read_row_group(rg, columns=columns)
        except Exception:  # noqa: BLE001 - fails twice from a fresh handle: the row group's own data is bad
            return None


def iter_parquet(path: str, cfg: InputConfig, max_bytes: int, skip: int | Skip = 0) -> Iterator[InputSample]:
    """Rows of a parquet file, in order; row groups wholly inside ``skip`` are not read.

    A row group whose read fails is read once more from a fresh handle (a transient read error costs nothing);
    failing again, each of its rows is dropped (``bad_sample``) and the next row group is read.
    """
    import pyarrow.parquet as pq

    skip = Skip.of(skip)
    fs, fpath = fsspec.core.url_to_fs(path)
    stem = posixpath.basename(fpath).rsplit(".", 1)[0]
    base_dir = posixpath.dirname(fpath)

    def emit(batch, first: int) -> Iterator[InputSample]:
        for offset, row in enumerate(_batch_rows(batch, cfg, max_bytes)):
            i = first + offset
            if i in skip:
                yield _skipped(path)
            elif isinstance(row, Exception):
                yield failed_sample(generated_key(stem, i), f"{path}#{i}", row, "row unreadable")
            else:
                yield table_row_sample(row, i, stem, path, cfg, fs, base_dir, max_bytes)

    with fs.open(fpath, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        wanted = [cfg.key_column, cfg.caption_column, cfg.image_column, "id", "url", "annotations"]
        wanted += ["clip_similarity_vitb32", "clip_similarity_vitl14"]
        columns = [c for c in dict.fromkeys(wanted) if c in names]
        start = 0
        for rg in range(pf.num_row_groups):
            rows = pf.metadata.row_group(rg).num_rows
            if skip.covers(start, start + rows):
                yield from (_skipped(path) for _ in range(rows))
                start += rows
                continue
            done = 0
            try:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=columns):
                    yield from emit(batch, start + done)
                    done += batch.num_rows
            except Exception as exc:  # noqa: BLE001 - the row group's damage drops its rows, not the file
                table = _reread_row_group(fs, fpath, rg, columns)
                if table is not None and table.num_rows == rows:
                    for batch in table.slice(done).to_batches(max_chunksize=BATCH_ROWS):
                        yield from emit(batch, start + done)
                        done += batch.num_rows
                else:
                    for i in range(start + done, start + rows):
                        if i in skip:
                            yield _skipped(path)
                        else:
                            what = f"row group {rg} unreadable"
                            yield failed_sample(generated_key(stem, i), f"{path}#{i}", exc, what)
            start += rows


# ---------------------------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------------------------


def iter_jsonl(path: str, cfg: InputConfig, max_bytes: int, skip: int | Skip = 0) -> Iterator[InputSample]:
    """Lines of a JSONL file (optionally compressed), one object each; a line that is not one is ``bad_sample``.

    A line over ``input.max_member_bytes`` is skipped without being held whole (``cell_too_large``).
    """
    skip = Skip.of(skip)
    fs, fpath = fsspec.core.url_to_fs(path)
    name = posixpath.basename(fpath)
    stem = name.split(".", 1)[0]
    base_dir = posixpath.dirname(fpath)
    limit = cfg.max_member_bytes
    with fsspec.open(path, "rb", compression="infer") as f:
        row_index = 0
        while True:
            line = f.readline(limit + 1)
            if not line:
                break
            if len(line) > limit and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the over-long line
                    line = f.readline(limit + 1)
                if row_index in skip:
                    yield _skipped(path)
                else:
                    sample = InputSample(key=generated_key(stem, row_index), source=f"{path}#{row_index}")
                    sample.drop_reason = "cell_too_large"
                    sample.detail = f"line longer than input.max_member_bytes={limit}"
                    yield sample
                row_index += 1
                continue
            if not line.strip():
                continue
            if row_index in skip:
                yield _skipped(path)
                row_index += 1
                continue
            try:
                row = json.loads(line.decode("utf-8", "replace"))
                if not isinstance(row, dict):
                    raise ValueError("line is not a JSON object")
            except Exception as exc:  # noqa: BLE001 - a bad line is that row's drop
                yield failed_sample(generated_key(stem, row_index), f"{path}#{row_index}", exc, "not a JSON object")
            else:
                yield table_row_sample(row, row_index, stem, path, cfg, fs, base_dir, max_bytes)
            row_index += 1
