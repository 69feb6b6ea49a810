"""Vectorised views of the ``noun_chunks``/``ref_exps`` columns (``list<list<double>>``) for a batch of records.

The report reads millions of records, so nothing here loops over records in Python: the nested lists are
flattened once into an ``(entries, 7)`` array with the record index of each entry, spans are grouped with one
sort, the containment filter of GRIT_SPEC 3.6 is a running maximum, and span texts are cut out of the caption
column's UTF-8 buffer with one gather. Offsets in the format are Python ``str`` (code point) offsets, so the
gather maps code points to bytes first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Spans are packed into one int64 sort key: record index, start and end get 21 bits each.
_BITS = 21
_LIMIT = 1 << _BITS
_ASCII_PUNCT = "\"'()[]{}.,;:!?`*_-"


@dataclass
class Entries:
    """The valid entries of one list column: record index, span and box/score, plus what was rejected."""

    rec: np.ndarray  # (E,) int64, index of the entry's record within the batch
    start: np.ndarray  # (E,) int64, code point offsets
    end: np.ndarray  # (E,) int64
    box: np.ndarray  # (E, 4) float64 x1, y1, x2, y2 normalised
    score: np.ndarray  # (E,) float64
    malformed: int  # entries not 7 numbers, with a span outside the caption, or a box out of range


@dataclass
class Spans:
    """Distinct spans of a record, one per (record, start, end), sorted by (record, start, -end)."""

    rec: np.ndarray
    start: np.ndarray
    end: np.ndarray
    inverse: np.ndarray  # entry -> its span
    retained: np.ndarray  # span not strictly contained by another span of the same record (GRIT_SPEC 3.6)


def as_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def flatten_entries(column: pa.Array | pa.ChunkedArray, caption_len: np.ndarray) -> Entries:
    """Flatten a ``list<list<number>>`` column; keep entries that are 7 finite numbers with a span inside the
    caption (``0 <= start < end <= len``) and a box inside [0, 1] with ``x1 < x2``, ``y1 < y2``."""
    outer = as_array(column)
    inner = outer.flatten()
    rec = np.asarray(pc.list_parent_indices(outer), dtype=np.int64)
    if len(inner) == 0:
        empty = np.empty(0, dtype=np.int64)
        return Entries(empty, empty, empty, np.empty((0, 4)), np.empty(0), 0)
    lengths = pc.list_value_length(inner).fill_null(0).to_numpy(zero_copy_only=False)
    values = inner.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False)
    malformed = 0
    if (lengths != 7).any():
        ok_entry = lengths == 7
        malformed += int((~ok_entry).sum())
        owner = np.repeat(np.arange(len(lengths)), lengths)
        values = values[ok_entry[owner]]
        rec = rec[ok_entry]
    table = values.reshape(-1, 7)
    start, end = table[:, 0], table[:, 1]
    box, score = table[:, 2:6], table[:, 6]
    with np.errstate(invalid="ignore"):
        ok = (
            np.isfinite(table).all(axis=1)
            & (start == np.floor(start))
            & (end == np.floor(end))
            & (start >= 0)
            & (start < end)
            & (end <= caption_len[rec])
            & (end < _LIMIT)
            & (box >= 0).all(axis=1)
            & (box <= 1).all(axis=1)
            & (box[:, 0] < box[:, 2])
            & (box[:, 1] < box[:, 3])
            & (score >= 0)
            & (score <= 1)
        )
    malformed += int((~ok).sum())
    return Entries(
        rec=rec[ok],
        start=start[ok].astype(np.int64),
        end=end[ok].astype(np.int64),
        box=box[ok],
        score=score[ok],
        malformed=malformed,
    )


def group_spans(entries: Entries) -> Spans:
    """Distinct spans per record and, for each, whether the containment filter keeps it.

    Sorted by start ascending and end descending, every earlier span of the record starts at or before this one
    (and is longer when it starts at the same place), so a span is strictly contained by another iff the running
    maximum of earlier ends reaches its end. Packing the record index above the end keeps the running maximum
    from leaking across records.
    """
    if entries.rec.size and entries.rec.max() >= _LIMIT:
        raise ValueError(f"a batch may hold at most {_LIMIT} records")
    key = (entries.rec << (2 * _BITS)) | (entries.start << _BITS) | (_LIMIT - 1 - entries.end)
    uniq, inverse = np.unique(key, return_inverse=True)
    rec = uniq >> (2 * _BITS)
    start = (uniq >> _BITS) & (_LIMIT - 1)
    end = _LIMIT - 1 - (uniq & (_LIMIT - 1))
    packed_end = (rec << _BITS) | end
    if packed_end.size:
        earlier = np.concatenate(([-1], np.maximum.accumulate(packed_end)[:-1]))
    else:
        earlier = packed_end
    return Spans(rec=rec, start=start, end=end, inverse=inverse.ravel(), retained=earlier < packed_end)


@dataclass
class CaptionBytes:
    """A caption column as one UTF-8 buffer with a code-point-to-byte map, for cutting spans out of it."""

    data: np.ndarray  # uint8, the whole values buffer
    cp_to_byte: np.ndarray | None  # global code point index -> byte position; None when all ASCII
    first_cp: np.ndarray  # (rows,) index of each caption's first code point (its byte offset when ASCII)
    length: np.ndarray  # (rows,) caption length in code points, 0 for null

    @classmethod
    def from_column(cls, column: pa.Array | pa.ChunkedArray) -> CaptionBytes:
        arr = as_array(column)
        if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
            arr = arr.cast(pa.large_string())
        elif not pa.types.is_string(arr.type):
            raise TypeError(f"caption column must hold strings, not {arr.type}")
        buffers = arr.buffers()
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(buffers[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
        buf = buffers[2]
        data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.empty(0, dtype=np.uint8)
        lo, hi = int(offsets[0]), int(offsets[-1])
        used = data[lo:hi]
        if used.size == 0 or used.max() < 0x80:
            return cls(data, None, offsets[:-1].copy(), np.diff(offsets))
        is_start = (used & 0xC0) != 0x80  # UTF-8 continuation bytes are 10xxxxxx
        cum = np.concatenate(([0], np.cumsum(is_start)))
        first_cp = cum[offsets[:-1] - lo]
        length = cum[offsets[1:] - lo] - first_cp
        cp_to_byte = np.concatenate((np.flatnonzero(is_start) + lo, [hi]))
        return cls(data, cp_to_byte, first_cp, length)

    def byte_offsets(self, rec: np.ndarray, cp: np.ndarray) -> np.ndarray:
        pos = self.first_cp[rec] + cp
        return pos if self.cp_to_byte is None else self.cp_to_byte[pos]

    def slice(self, rec: np.ndarray, start: np.ndarray, end: np.ndarray) -> pa.StringArray:
        """``caption[rec][start:end]`` for every span, as one Arrow string array, without a Python loop."""
        b0 = self.byte_offsets(rec, start)
        b1 = self.byte_offsets(rec, end)
        lengths = b1 - b0
        out_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_offsets[1:])
        total = int(out_offsets[-1])
        gather = np.repeat(b0 - out_offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
        values = self.data[gather]
        if total < 2**31:
            return pa.StringArray.from_buffers(
                len(lengths), pa.py_buffer(out_offsets.astype(np.int32)), pa.py_buffer(values)
            )
        return pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(out_offsets), pa.py_buffer(values))


def _split_words(texts: pa.Array) -> tuple[pa.ListArray, np.ndarray]:
    """Words of each string (split on runs of Unicode white space) and how many there are."""
    trimmed = pc.utf8_trim_whitespace(texts)
    words = pc.utf8_split_whitespace(trimmed)
    n = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    n[pc.utf8_length(trimmed).to_numpy(zero_copy_only=False) == 0] = 0  # "" splits into [""]
    return words, n


def word_counts(texts: pa.Array) -> np.ndarray:
    """Words per string, split on runs of Unicode white space."""
    if len(texts) == 0:
        return np.empty(0, dtype=np.int64)
    return _split_words(texts)[1]


def head_words(texts: pa.Array) -> pa.Array:
    """The last word of each chunk, lower-cased, edge punctuation trimmed: the chunk's head noun, approximately.

    English noun chunks are head-final ("a small red car" -> "car"), and the pipeline's chunks carry no
    prepositional phrases, so the last word is the spaCy root for nearly all of them, without needing spaCy.
    Empty results become null.
    """
    if len(texts) == 0:
        return pa.array([], pa.string())
    words, n = _split_words(texts)
    flat = words.flatten()
    if len(flat) == 0:
        return pa.nulls(len(texts), pa.string())
    ends = np.asarray(words.offsets)[1:] - words.offsets[0].as_py()
    has = n > 0
    last = pc.take(flat, pa.array(np.where(has, ends - 1, 0)))
    last = pc.if_else(pa.array(has), last, pa.scalar(None, pa.string()))
    trimmed = pc.utf8_trim(pc.utf8_lower(last), _ASCII_PUNCT)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def lower(texts: pa.Array) -> pa.Array:
    return pc.utf8_lower(texts)
