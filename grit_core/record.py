"""The GRIT record: field names and tuple layouts of the released GRIT-20M parquet files (GRIT_SPEC section 1).

A record is one kept sample. ``noun_chunks`` and ``ref_exps`` are parallel lists of
``[start, end, x1, y1, x2, y2, score]``: character offsets into ``caption`` (end exclusive), a box normalised to
[0, 1] by the stored image's ``width``/``height``, and the detector's score. A chunk with two boxes has two
entries with the same span. ``ref_exps[i]`` is the referring expression of ``noun_chunks[i]`` with the same box
and score.

This module also holds the shard index schema (one parquet row per *input* sample, kept or dropped), the drop
reasons, and the containment filter of GRIT_SPEC 3.6, which every consumer applies the same way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")

# Record fields in GRIT-20M's order.
RECORD_FIELDS = (
    "key",
    "clip_similarity_vitb32",
    "clip_similarity_vitl14",
    "id",
    "url",
    "caption",
    "width",
    "height",
    "noun_chunks",
    "ref_exps",
)
OPTIONAL_FIELDS = ("clip_similarity_vitb32", "clip_similarity_vitl14")

STATUS_KEPT = "kept"
STATUS_DROPPED = "dropped"

# Every reason a sample can be dropped for. Each appears as ``dropped_<reason>`` in ``_stats.json``.
DROP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "caption_too_long",
    "image_too_large",  # declared pixels over image.max_pixels, checked before decoding
    "image_too_many_bytes",  # encoded bytes over image.max_bytes
    "bad_image",  # undecodable
    "decode_timeout",  # decoding took longer than image.decode_timeout_s
    "image_too_small",
    "unsafe_member",  # tar member with an absolute path, "..", a link or a device entry
    "member_too_large",  # tar member over input.max_member_bytes
    "too_many_members",  # tar beyond input.max_tar_members
    "bad_input",  # an input file unreadable from here on (count of its remaining samples unknown)
    "bad_sample",  # one input sample (row, tar sample, folder entry) that could not be read; the file goes on
    "cell_too_large",  # a text cell, .json member or sidecar over input.max_text_bytes; a JSONL line too long
    "reference_not_allowed",  # an image path or URL outside input.references (whether or not it exists)
    "image_fetch_failed",  # an allowed remote image could not be fetched (timeout, connection, HTTP error)
    "duplicate_key",
    "no_noun_chunks",
    "no_grounded_phrase",
    "detector_error",  # the detector could not handle the image (GroundingResult.error; detail has the message)
)

# Reasons a single noun chunk is filtered out (the sample may still be kept).
CHUNK_DROP_REASONS = ("abstract_noun", "pronoun", "phrase_too_long")


class RecordError(ValueError):
    """A record that breaks the GRIT format; the message names the first problem found."""


Entry = list  # [start, end, x1, y1, x2, y2, score]


@dataclass
class GritRecord:
    """One kept sample, GRIT-20M layout."""

    key: str
    caption: str
    width: int
    height: int
    noun_chunks: list[Entry] = field(default_factory=list)
    ref_exps: list[Entry] = field(default_factory=list)
    id: int | str | None = None
    url: str | None = None
    clip_similarity_vitb32: float | None = None
    clip_similarity_vitl14: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """GRIT-20M field order; absent CLIP similarities are left out, as in the release."""
        out: dict[str, Any] = {}
        for name in RECORD_FIELDS:
            value = getattr(self, name)
            if name in OPTIONAL_FIELDS and value is None:
                continue
            if name in ("noun_chunks", "ref_exps"):
                value = [normalize_entry(e) for e in value]
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GritRecord:
        """Build from a GRIT-20M dict (JSON or parquet row); offsets stored as floats become ints."""
        missing = [n for n in ("key", "caption", "width", "height", "noun_chunks", "ref_exps") if n not in data]
        if missing:
            raise RecordError(f"missing field '{missing[0]}'")
        return cls(
            key=data["key"],
            caption=data["caption"],
            width=_as_int(data["width"], "width"),
            height=_as_int(data["height"], "height"),
            noun_chunks=[normalize_entry(e) for e in (data["noun_chunks"] or [])],
            ref_exps=[normalize_entry(e) for e in (data["ref_exps"] or [])],
            id=data.get("id"),
            url=data.get("url"),
            clip_similarity_vitb32=data.get("clip_similarity_vitb32"),
            clip_similarity_vitl14=data.get("clip_similarity_vitl14"),
        )

    def to_json(self) -> str:
        return record_to_json(self)

    def validate(self, check_order: bool = False) -> None:
        validate_record(self, check_order=check_order)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise RecordError(f"'{name}' must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise RecordError(f"'{name}' must be an integer, got {value!r}")
    return value


def normalize_entry(entry: Sequence[Any]) -> Entry:
    """``[start, end, x1, y1, x2, y2, score]`` with int offsets and float box/score (parquet stores all as doubles)."""
    if not isinstance(entry, (list, tuple)) and not hasattr(entry, "__len__"):
        raise RecordError(f"entry must be a list of 7 numbers, got {entry!r}")
    if len(entry) != 7:
        raise RecordError(f"entry must have 7 values [start, end, x1, y1, x2, y2, score], got {len(entry)}")
    start, end = entry[0], entry[1]
    if isinstance(start, float) and start.is_integer():
        start = int(start)
    if isinstance(end, float) and end.is_integer():
        end = int(end)
    return [start, end, *(float(v) for v in entry[2:])]


def sort_entries(chunks: list[Entry], refs: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """Sort parallel ``noun_chunks``/``ref_exps`` by the chunk's ``(start, end, -score)`` (GRIT_SPEC 1)."""
    order = sorted(range(len(chunks)), key=lambda i: (chunks[i][0], chunks[i][1], -chunks[i][6], chunks[i][2:6]))
    return [chunks[i] for i in order], [refs[i] for i in order]


def validate_record(record: GritRecord | Mapping[str, Any], check_order: bool = False) -> None:
    """Raise :class:`RecordError` naming the first problem; return None for a valid record.

    ``check_order`` also requires entries sorted by ``(start, end, -score)``, which our writer guarantees;
    GRIT-20M's own rows are not sorted, so it is off by default.
    """
    rec = record.to_dict() if isinstance(record, GritRecord) else dict(record)
    for name in ("key", "caption", "width", "height", "noun_chunks", "ref_exps"):
        if name not in rec:
            raise RecordError(f"missing field '{name}'")
    key = rec["key"]
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise RecordError(f"bad key {key!r}: must match [A-Za-z0-9_-]+ (no dots, slashes or spaces)")
    caption = rec["caption"]
    if not isinstance(caption, str) or not caption:
        raise RecordError(f"caption must be a non-empty string, got {caption!r}")
    for name in ("width", "height"):
        value = rec[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RecordError(f"'{name}' must be a positive integer, got {value!r}")
    ident = rec.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (int, str))):
        raise RecordError(f"'id' must be an integer, a string or null, got {ident!r}")
    url = rec.get("url")
    if url is not None and not isinstance(url, str):
        raise RecordError(f"'url' must be a string or null, got {url!r}")
    for name in OPTIONAL_FIELDS:
        value = rec.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise RecordError(f"'{name}' must be a finite number, got {value!r}")
    chunks, refs = rec["noun_chunks"], rec["ref_exps"]
    if not isinstance(chunks, (list, tuple)) or not isinstance(refs, (list, tuple)):
        raise RecordError("noun_chunks and ref_exps must be lists")
    if len(chunks) != len(refs):
        raise RecordError(f"noun_chunks has {len(chunks)} entries but ref_exps has {len(refs)}")
    n = len(caption)
    for field_name, entries in (("noun_chunks", chunks), ("ref_exps", refs)):
        for i, entry in enumerate(entries):
            _validate_entry(entry, f"{field_name}[{i}]", n)
    for i, (c, r) in enumerate(zip(chunks, refs)):
        if [float(v) for v in c[2:]] != [float(v) for v in r[2:]]:
            raise RecordError(f"ref_exps[{i}] box/score differ from noun_chunks[{i}]")
        if not (r[0] <= c[0] and c[1] <= r[1]):
            raise RecordError(f"ref_exps[{i}] span [{r[0]}, {r[1]}) does not contain its chunk [{c[0]}, {c[1]})")
    if check_order:
        keys = [(c[0], c[1], -c[6]) for c in chunks]
        for i in range(1, len(keys)):
            if keys[i] < keys[i - 1]:
                raise RecordError(f"noun_chunks[{i}] is out of order: entries must be sorted by (start, end, -score)")


def _validate_entry(entry: Any, where: str, caption_len: int) -> None:
    if not isinstance(entry, (list, tuple)) or len(entry) != 7:
        raise RecordError(f"{where} must be [start, end, x1, y1, x2, y2, score], got {entry!r}")
    start, end = entry[0], entry[1]
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise RecordError(f"{where}: {name} must be an integer offset, got {value!r}")
    start, end = int(start), int(end)
    if not (0 <= start < end <= caption_len):
        raise RecordError(f"{where}: offset [{start}, {end}) outside the caption (length {caption_len})")
    values = entry[2:]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecordError(f"{where}: box and score must be finite numbers, got {entry!r}")
    x1, y1, x2, y2, score = (float(v) for v in values)
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise RecordError(f"{where}: box ({x1}, {y1}, {x2}, {y2}) outside [0, 1]")
    if not (x1 < x2 and y1 < y2):
        raise RecordError(f"{where}: box ({x1}, {y1}, {x2}, {y2}) is inverted or empty (need x1 < x2 and y1 < y2)")
    if not 0.0 <= score <= 1.0:
        raise RecordError(f"{where}: score {score} outside [0, 1]")


# ---------------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------------


def record_to_json(record: GritRecord) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":"))


def record_from_json(text: str | bytes) -> GritRecord:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise RecordError("a record must be a JSON object")
    return GritRecord.from_dict(data)


# ---------------------------------------------------------------------------------------------------------------
# Arrow / parquet: the shard index has one row per input sample, kept or dropped.
# ---------------------------------------------------------------------------------------------------------------

ENTRY_TYPE = pa.list_(pa.list_(pa.float64()))  # GRIT-20M stores the 7-tuples as lists of doubles


def index_schema(id_type: pa.DataType | None = None) -> pa.Schema:
    """Schema of ``<shard>.parquet``. ``id_type`` is int64 (default) or string, one per corpus."""
    id_type = pa.int64() if id_type is None else id_type
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("clip_similarity_vitb32", pa.float64()),
            pa.field("clip_similarity_vitl14", pa.float64()),
            pa.field("id", id_type),
            pa.field("url", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("noun_chunks", ENTRY_TYPE),
            pa.field("ref_exps", ENTRY_TYPE),
            pa.field("status", pa.string(), nullable=False),
            pa.field("drop_reason", pa.string()),
            # Our additions: a drop's detail (for a failed read or decode, the exception's type and message),
            # where the sample came from, the stored image's extension, and per-sample text/grounding counts
            # that the stats report turns into per-image distributions.
            pa.field("detail", pa.string()),
            pa.field("source", pa.string()),
            pa.field("image_ext", pa.string()),
            pa.field("num_chunks_found", pa.int32()),
            pa.field("num_boxes_raw", pa.int32()),
        ]
    )


def index_rows_to_table(rows: Iterable[Mapping[str, Any]], id_type: pa.DataType | None = None) -> pa.Table:
    """Rows (dicts with record fields + ``status``/``drop_reason`` and any of our additions) to an Arrow table."""
    schema = index_schema(id_type)
    columns: dict[str, list[Any]] = {f.name: [] for f in schema}
    for row in rows:
        for name in columns:
            columns[name].append(row.get(name))
    return pa.Table.from_pydict(columns, schema=schema)


def records_to_table(records: Iterable[GritRecord], id_type: pa.DataType | None = None) -> pa.Table:
    """Kept records as index rows."""
    rows = []
    for rec in records:
        row = rec.to_dict()
        row["status"] = STATUS_KEPT
        rows.append(row)
    return index_rows_to_table(rows, id_type)


def table_to_records(table: pa.Table) -> list[GritRecord]:
    """Kept rows of an index table (or every row of a GRIT-20M parquet, which has no ``status``) as records."""
    out = []
    has_status = "status" in table.column_names
    for row in table.to_pylist():
        if has_status and row.get("status") != STATUS_KEPT:
            continue
        out.append(GritRecord.from_dict(row))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Containment filter (GRIT_SPEC 3.6), shared by the trainer and the stats report.
# ---------------------------------------------------------------------------------------------------------------


def retained_spans(entries: Iterable[Sequence[Any]]) -> set[tuple[int, int]]:
    """Spans ``(start, end)`` among ``entries`` that no other span strictly contains.

    Entries with the same span are one phrase (with several boxes). "a dog in a field of flowers" keeps itself
    and drops "a field of flowers" and "flowers".
    """
    spans = sorted({(int(e[0]), int(e[1])) for e in entries}, key=lambda s: (s[0], -s[1]))
    kept: set[tuple[int, int]] = set()
    max_end = -1
    # Sorted by start ascending, end descending: every earlier span starts at or before this one, and one that
    # starts at the same place is longer. So this span is contained iff an earlier one reaches its end.
    for start, end in spans:
        if max_end < end:
            kept.add((start, end))
        max_end = max(max_end, end)
    return kept


def containment_filter(entries: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    """The entries whose span is retained by :func:`retained_spans`, in their original order."""
    keep = retained_spans(entries)
    return [e for e in entries if (int(e[0]), int(e[1])) in keep]


def group_phrases(entries: Sequence[Sequence[Any]]) -> list[tuple[int, int, list[list[float]]]]:
    """Entries grouped by span, in order of first appearance: ``(start, end, [[x1, y1, x2, y2, score], ...])``."""
    groups: dict[tuple[int, int], list[list[float]]] = {}
    for e in entries:
        groups.setdefault((int(e[0]), int(e[1])), []).append([float(v) for v in e[2:7]])
    return [(s, t, boxes) for (s, t), boxes in groups.items()]
