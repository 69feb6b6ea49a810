"""Input readers: img2dataset WebDataset tars, parquet and JSONL tables, and folders of images with captions.

Each reader turns one input file into :class:`InputSample` objects in a fixed order (tar member order, table row
order, sorted paths), which is what makes shard assignment deterministic (see ``docs/pipeline.md``). Readers never
extract anything to disk and never raise on a bad sample: a sample they cannot read becomes a dropped
``InputSample`` with its reason. Files are opened through fsspec, so anything fsspec or pyarrow can open
(``s3://``, ``gs://``, ``hf://``, ``http(s)://``) works where the matching fsspec back end is installed.

WebDataset tars, which may be hostile, are read by ``tar_reader.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from grit_pipeline.config import InputConfig
from grit_pipeline.record import KEY_PATTERN

logger = logging.getLogger(__name__)

IMAGE_EXTS = frozenset(
    ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
)
CAPTION_EXTS = frozenset(("txt",))
META_EXTS = frozenset(("json",))
FORMATS = ("webdataset", "parquet", "jsonl", "images")
MAX_KEY_CHARS = 128
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class InputError(ValueError):
    """An input pattern that matches nothing or a format that cannot be read; the message names it."""


@dataclass
class InputFile:
    """One input file (or folder of images) and its position in the global input order."""

    index: int
    path: str  # absolute local path, or an fsspec URL
    format: str  # one of FORMATS


@dataclass
class InputSample:
    """One input sample as read, before any check. ``drop_reason`` set: the reader could not use it."""

    key: str
    source: str
    caption: str | None = None
    image: bytes | None = None
    # Why ``image`` is None when the reader knows (``missing_image``, ``image_too_many_bytes``); the image stage
    # applies it in rule order, after the caption rules.
    image_problem: str | None = None
    id: int | str | None = None
    url: str | None = None
    clip_similarity_vitb32: float | None = None
    clip_similarity_vitl14: float | None = None
    annotations: list[dict[str, Any]] | None = None
    drop_reason: str | None = None
    detail: str = ""
    counters: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------


def make_key(raw: Any) -> str:
    """A shard key (``[A-Za-z0-9_-]+``, no dots) derived from an input key, stable across runs.

    A key that is already valid is kept as it is. Otherwise disallowed runs become ``_`` and a short hash of the
    original is appended, so ``a.b`` and ``a/b`` (both ``a_b`` once sanitised) stay distinct. Any collision left
    (a hash collision, or an input key that happens to equal another's sanitised form) is caught by the writer
    and counted as ``duplicate_key``.
    """
    text = "" if raw is None else str(raw)
    if KEY_PATTERN.fullmatch(text) and len(text) <= MAX_KEY_CHARS:
        return text
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    base = _UNSAFE_KEY_CHARS.sub("_", text).strip("_")[: MAX_KEY_CHARS - 9] or "key"
    return f"{base}-{digest}"


def generated_key(stem: str, row: int) -> str:
    """Key for a table row without a key column: the file's stem and the row number."""
    base = _UNSAFE_KEY_CHARS.sub("_", stem).strip("_")[: MAX_KEY_CHARS - 10] or "row"
    return f"{base}_{row:09d}"


# ---------------------------------------------------------------------------------------------------------------
# Finding input files
# ---------------------------------------------------------------------------------------------------------------


def _format_of(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):  # not .json: a folder of images may hold .json sidecars
        return "jsonl"
    return None


def _url(fs, path: str) -> str:
    if _is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def resolve_inputs(patterns: list[str], fmt: str = "auto") -> list[InputFile]:
    """Expand paths, globs and folders into the ordered list of input files.

    Order: patterns as given, matches of one pattern sorted; a file named twice is read once. A folder is read as
    the files it holds of one format (tars first, as img2dataset output folders also hold metadata parquet files),
    or, holding none, as a folder of images with same-named ``.txt`` captions.
    """
    if fmt not in ("auto", *FORMATS):
        raise InputError(f"input.format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if not patterns:
        raise InputError("no input given: pass --input PATTERN or set input.paths in the config")
    found: list[tuple[str, str]] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
            if not matches:
                raise InputError(f"input pattern {pattern!r} matches no file")
            for match in matches:
                found.extend(_classify(fs, match, fmt, pattern))
        elif fs.exists(path):
            found.extend(_classify(fs, path, fmt, pattern))
        else:
            raise InputError(f"input {pattern!r} does not exist")
    seen: set[str] = set()
    files: list[InputFile] = []
    for path, kind in found:
        if path in seen:
            continue
        seen.add(path)
        files.append(InputFile(index=len(files), path=path, format=kind))
    return files


def _classify(fs, path: str, fmt: str, pattern: str) -> list[tuple[str, str]]:
    if not fs.isdir(path):
        kind = fmt if fmt != "auto" else _format_of(path)
        if kind is None or kind == "images":
            raise InputError(f"cannot tell the format of {pattern!r} from its name: set input.format")
        return [(_url(fs, path), kind)]
    if fmt == "images":
        return [(_url(fs, path), "images")]
    children = sorted(p for p in fs.ls(path, detail=False) if not fs.isdir(p))
    for kind in ("webdataset", "parquet", "jsonl"):
        if fmt not in ("auto", kind):
            continue
        chosen = [p for p in children if _format_of(p) == kind]
        if chosen:
            return [(_url(fs, p), kind) for p in chosen]
    if fmt == "auto":
        return [(_url(fs, path), "images")]
    raise InputError(f"folder {pattern!r} holds no {fmt} files")


# ---------------------------------------------------------------------------------------------------------------
# Shared parsing of metadata (tar .json members, table rows, sidecar .json files)
# ---------------------------------------------------------------------------------------------------------------


def parse_id(value: Any) -> int | str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        return value
    return None


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def apply_metadata(sample: InputSample, meta: dict[str, Any], caption_key: str = "caption") -> None:
    """Carry ``id``, ``url``, CLIP similarities, annotations (and a caption, when none was given) from ``meta``."""
    if "id" in meta:
        sample.id = parse_id(meta["id"])
    url = meta.get("url")
    if isinstance(url, str):
        sample.url = url
    for name in ("clip_similarity_vitb32", "clip_similarity_vitl14"):
        if name in meta:
            setattr(sample, name, _finite_float(meta[name]))
    if sample.caption is None and isinstance(meta.get(caption_key), str):
        sample.caption = meta[caption_key]
    if meta.get("annotations") is not None:
        annotations = meta["annotations"]
        if isinstance(annotations, str):
            annotations = json.loads(annotations)
        if not isinstance(annotations, list) or not all(isinstance(a, (dict, list)) for a in annotations):
            raise ValueError("annotations must be a list of objects or of GRIT [start, end, x1, y1, x2, y2, score]")
        sample.annotations = annotations


def decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


# ---------------------------------------------------------------------------------------------------------------
# WebDataset member names (the tar reader itself is in tar_reader.py)
# ---------------------------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/photo.v2.jpg`` -> (``dir/photo.v2``, ``jpg``): the key keeps every dot but the extension's."""
    stem, dot, ext = name.rpartition(".")
    if not dot or "/" in ext:
        return name, ""
    return stem, ext.lower()


# ---------------------------------------------------------------------------------------------------------------
# Tables: parquet and JSONL
# ---------------------------------------------------------------------------------------------------------------


def _resolve_ref(fs, base_dir: str, ref: str):
    """A table's image reference as (filesystem, path): a URL, an absolute path, or relative to the table's folder."""
    if "://" in ref:
        return fsspec.core.url_to_fs(ref)
    return fs, (ref if posixpath.isabs(ref) else posixpath.join(base_dir, ref))


def _read_image_file(fs, path: str, max_bytes: int, sample: InputSample) -> None:
    """Fill ``sample.image`` from ``path``, or say why not (``missing_image``, ``image_too_many_bytes``)."""
    try:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            sample.image_problem = "image_too_many_bytes"
            sample.detail = f"{path}: {size} bytes > image.max_bytes={max_bytes}"
            return
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            sample.image_problem = "image_too_many_bytes"
            return
        sample.image = data
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        sample.image_problem, sample.detail = "missing_image", f"{path}: {type(exc).__name__}"


def table_row_sample(
    row: dict[str, Any], row_index: int, stem: str, source: str, cfg: InputConfig, fs, base_dir: str, max_bytes: int
) -> InputSample:
    """One parquet or JSONL row as a sample. Image column: bytes, a path, or ``{"bytes": ..., "path": ...}``."""
    raw_key = row.get(cfg.key_column)
    key = make_key(raw_key) if raw_key not in (None, "") else generated_key(stem, row_index)
    sample = InputSample(key=key, source=f"{source}#{row_index}")
    try:
        caption = row.get(cfg.caption_column)
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"caption column {cfg.caption_column!r} holds {type(caption).__name__}, not text")
        sample.caption = caption
        apply_metadata(sample, {k: v for k, v in row.items() if k != cfg.caption_column})
        image = row.get(cfg.image_column)
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray, memoryview)):
            sample.image = bytes(image)
            if len(sample.image) > max_bytes:
                sample.image, sample.image_problem = None, "image_too_many_bytes"
        elif isinstance(image, str) and image:
            _read_image_file(*_resolve_ref(fs, base_dir, image), max_bytes, sample)
        else:
            sample.image_problem = "missing_image"
    except (ValueError, TypeError, RecursionError) as exc:
        sample.drop_reason, sample.detail = "bad_input", str(exc)
    return sample


def iter_parquet(path: str, cfg: InputConfig, max_bytes: int, skip: int = 0) -> Iterator[InputSample]:
    """Rows of a parquet file, in order; row groups wholly inside ``skip`` are not read."""
    import pyarrow.parquet as pq

    fs, fpath = fsspec.core.url_to_fs(path)
    stem = posixpath.basename(fpath).rsplit(".", 1)[0]
    base_dir = posixpath.dirname(fpath)
    with fs.open(fpath, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        wanted = [cfg.key_column, cfg.caption_column, cfg.image_column, "id", "url", "annotations"]
        wanted += ["clip_similarity_vitb32", "clip_similarity_vitl14"]
        columns = [c for c in dict.fromkeys(wanted) if c in names]
        start = 0
        for rg in range(pf.num_row_groups):
            rows = pf.metadata.row_group(rg).num_rows
            if start + rows <= skip:
                yield from (InputSample(key="", source=path, drop_reason="skipped") for _ in range(rows))
                start += rows
                continue
            table = pf.read_row_group(rg, columns=columns)
            for offset, row in enumerate(table.to_pylist()):
                i = start + offset
                if i < skip:
                    yield InputSample(key="", source=path, drop_reason="skipped")
                    continue
                yield table_row_sample(row, i, stem, path, cfg, fs, base_dir, max_bytes)
            start += rows


def iter_jsonl(path: str, cfg: InputConfig, max_bytes: int, skip: int = 0) -> Iterator[InputSample]:
    """Lines of a JSONL file (optionally compressed), one object each; a line that is not one is ``bad_input``."""
    fs, fpath = fsspec.core.url_to_fs(path)
    name = posixpath.basename(fpath)
    stem = name.split(".", 1)[0]
    base_dir = posixpath.dirname(fpath)
    with fsspec.open(path, "rb", compression="infer") as f:
        row_index = 0
        while True:
            line = f.readline(cfg.max_member_bytes + 1)
            if not line:
                break
            if len(line) > cfg.max_member_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the over-long line
                    line = f.readline(cfg.max_member_bytes + 1)
                sample = InputSample(key=generated_key(stem, row_index), source=f"{path}#{row_index}")
                sample.drop_reason, sample.detail = "bad_input", "line longer than input.max_member_bytes"
                yield sample
                row_index += 1
                continue
            if not line.strip():
                continue
            if row_index < skip:
                yield InputSample(key="", source=path, drop_reason="skipped")
                row_index += 1
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("line is not a JSON object")
            except (ValueError, RecursionError) as exc:
                sample = InputSample(key=generated_key(stem, row_index), source=f"{path}#{row_index}")
                sample.drop_reason, sample.detail = "bad_input", f"not a JSON object: {exc}"[:300]
                yield sample
            else:
                yield table_row_sample(row, row_index, stem, path, cfg, fs, base_dir, max_bytes)
            row_index += 1


# ---------------------------------------------------------------------------------------------------------------
# Folder of images with same-named captions
# ---------------------------------------------------------------------------------------------------------------


def iter_image_folder(path: str, cfg: InputConfig, max_bytes: int, skip: int = 0) -> Iterator[InputSample]:
    """Every image under ``path`` (sorted, recursive) with ``<stem>.txt`` as caption and optional ``<stem>.json``."""
    fs, root = fsspec.core.url_to_fs(path)
    files = sorted(p for p in fs.find(root) if not fs.isdir(p))
    present = set(files)
    images = [p for p in files if split_member_name(p)[1] in IMAGE_EXTS]
    for i, image_path in enumerate(images):
        stem = split_member_name(image_path)[0]
        rel = posixpath.relpath(stem, root)
        sample = InputSample(
            key=make_key(rel), source=image_path if _is_local(fs) else fs.unstrip_protocol(image_path)
        )
        if i < skip:
            sample.drop_reason = "skipped"
            yield sample
            continue
        try:
            if stem + ".txt" in present:
                with fs.open(stem + ".txt", "rb") as f:
                    sample.caption = decode_text(f.read(cfg.max_member_bytes), "caption file")
            if stem + ".json" in present:
                with fs.open(stem + ".json", "rb") as f:
                    meta = json.loads(decode_text(f.read(cfg.max_member_bytes), "metadata file"))
                if not isinstance(meta, dict):
                    raise ValueError("metadata file is not a JSON object")
                apply_metadata(sample, meta)
        except (ValueError, RecursionError, OSError) as exc:
            sample.drop_reason, sample.detail = "bad_input", str(exc)
            yield sample
            continue
        _read_image_file(fs, image_path, max_bytes, sample)
        yield sample


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def iter_samples(inp: InputFile, cfg: InputConfig, max_image_bytes: int, skip: int = 0) -> Iterator[InputSample]:
    """Samples of one input file in their fixed order. The first ``skip`` come back as ``drop_reason="skipped"``
    placeholders (counted, data unread) so positions stay aligned with shard blocks."""
    readers: dict[str, Callable[..., Iterator[InputSample]]] = {
        "parquet": iter_parquet,
        "jsonl": iter_jsonl,
        "images": iter_image_folder,
    }
    if inp.format == "webdataset":
        from grit_pipeline.tar_reader import iter_tar

        fs, fpath = fsspec.core.url_to_fs(inp.path)
        with fs.open(fpath, "rb") as f:
            seekable = bool(getattr(f, "seekable", lambda: False)()) and not inp.path.lower().endswith((".gz", ".tgz"))
            yield from iter_tar(f, inp.path, cfg, skip=skip, seekable=seekable)
        return
    if inp.format not in readers:
        raise InputError(f"unknown input format {inp.format!r}")
    yield from readers[inp.format](inp.path, cfg, max_image_bytes, skip=skip)
