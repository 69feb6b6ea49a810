"""What every reader yields: :class:`InputSample`, its keys, and the parsing of metadata they share.

Nothing here opens a file. Every string that leaves a reader goes through :func:`clean_sample`, which makes it valid
UTF-8 (lone surrogates from JSON and undecodable tar member names become U+FFFD), so Arrow, JSON and tar writers
downstream never meet text they cannot encode.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from grit_core.record import KEY_PATTERN

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
    # Why ``image`` is None when the reader knows (``missing_image``, ``image_too_many_bytes``,
    # ``reference_not_allowed``, ``image_fetch_failed``); the image stage applies it in rule order, after the
    # caption rules.
    image_problem: str | None = None
    id: int | str | None = None
    url: str | None = None
    clip_similarity_vitb32: float | None = None
    clip_similarity_vitl14: float | None = None
    annotations: list[dict[str, Any]] | None = None
    drop_reason: str | None = None
    detail: str = ""
    counters: dict[str, int] = field(default_factory=dict)


_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")


class Skip:
    """Positions of one file that a resume does not need (their samples are in complete shards), as ranges. Readers
    go past them without reading their data and return ``"skipped"`` placeholders there, so positions stay aligned
    with shard blocks. ``Skip.of(n)`` is the first ``n`` positions."""

    __slots__ = ("_starts", "_stops")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        merged: list[list[int]] = []
        for start, stop in sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a)):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        self._starts = [a for a, _ in merged]
        self._stops = [b for _, b in merged]

    @classmethod
    def of(cls, skip: int | Skip | None) -> Skip:
        return skip if isinstance(skip, Skip) else cls([(0, int(skip or 0))])

    def __contains__(self, position: int) -> bool:
        j = bisect_right(self._starts, position) - 1
        return j >= 0 and position < self._stops[j]

    def covers(self, start: int, stop: int) -> bool:
        """Whether every position in ``[start, stop)`` is skipped."""
        if stop <= start:
            return True
        j = bisect_right(self._starts, start) - 1
        return j >= 0 and stop <= self._stops[j]

    def __repr__(self) -> str:
        return f"Skip({list(zip(self._starts, self._stops))})"


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` for a drop's detail, without object addresses (two builds give the same index rows)."""
    return _ADDRESS.sub("", f"{type(exc).__name__}: {exc}")[:limit]


def failed_sample(key: str, source: str, exc: BaseException, what: str = "") -> InputSample:
    """The sample a per-row exception becomes: dropped as ``bad_sample``, the exception's type in ``detail``."""
    detail = f"{what}: " if what else ""
    return InputSample(key=key, source=source, drop_reason="bad_sample", detail=detail + describe_exception(exc))


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """``text`` as valid UTF-8: lone surrogates (JSON ``"\\ud800"``, ``surrogateescape`` names) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def clean_json(value: Any, depth: int = 0) -> Any:
    """A JSON-like value with every string (keys included) made valid UTF-8."""
    if isinstance(value, str):
        return clean_text(value)
    if depth > 64:  # json.loads already bounds nesting; this only guards values built elsewhere
        raise ValueError("value nested too deeply")
    if isinstance(value, list):
        return [clean_json(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v, depth + 1) for k, v in value.items()}
    return value


def clean_sample(sample: InputSample) -> InputSample:
    """Make every text field of ``sample`` valid UTF-8 (in place) and return it."""
    sample.key = clean_text(sample.key)
    sample.source = clean_text(sample.source)
    sample.detail = clean_text(sample.detail or "")
    if sample.caption is not None:
        sample.caption = clean_text(sample.caption)
    if sample.url is not None:
        sample.url = clean_text(sample.url)
    if isinstance(sample.id, str):
        sample.id = clean_text(sample.id)
    if sample.annotations is not None:
        sample.annotations = clean_json(sample.annotations)
    return sample


def decode_text(data: bytes, what: str) -> str:
    """Bytes from input as text; invalid UTF-8 is replaced (U+FFFD), never an error."""
    del what  # kept for callers naming what they decode
    return data.decode("utf-8", "replace")


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


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/photo.v2.jpg`` -> (``dir/photo.v2``, ``jpg``): the key keeps every dot but the extension's."""
    stem, dot, ext = name.rpartition(".")
    if not dot or "/" in ext:
        return name, ""
    return stem, ext.lower()


# ---------------------------------------------------------------------------------------------------------------
# Metadata shared by tar .json members, table rows and sidecar .json files
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
        if isinstance(annotations, (bytes, bytearray)):
            annotations = annotations.decode("utf-8", "replace")
        if isinstance(annotations, str):
            annotations = json.loads(annotations)
        if not isinstance(annotations, list) or not all(isinstance(a, (dict, list)) for a in annotations):
            raise ValueError("annotations must be a list of objects or of GRIT [start, end, x1, y1, x2, y2, score]")
        sample.annotations = annotations
