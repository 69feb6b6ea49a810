"""From a caption's chunks and a detector's detections to a record's ``noun_chunks``/``ref_exps`` (GRIT_SPEC 3.3, 3.4).

Pure functions: the grounding actor calls them around the detector. Also here: how boxes that come with the input
(``detector.kind: annotations``) are tied to the caption's noun chunks, since that needs the caption's offsets.

Annotation input (one list per sample, in the input row or the tar's ``.json``)::

    [{"start": 2, "end": 12, "box": [x1, y1, x2, y2], "score": 1.0},   # a span of the RAW caption
     {"phrase": "red ball", "box": [...]}]                               # or the phrase's text

Boxes are normalised to [0, 1] by the upright image's width and height. A span indexes the caption as given in the
input; normalisation (HTML references decoded, NFC, white space collapsed, control characters removed, stripped)
moves offsets, so spans are mapped onto the normalised caption character by character. Where NFC itself changes the
caption the character map is not exact, and the span's text is searched for instead. An annotation then goes to
one kept noun chunk:

1. the chunk whose referring expression or own span equals the annotation's span;
2. else the first chunk that lies inside the annotation's span (an annotated phrase "a man in a blue shirt" goes to
   "a man", its head, not to "a blue shirt");
3. else the chunk that overlaps it most.

An annotation that matches no chunk is counted (``annotations_unmatched``) and ignored; one with a malformed box is
counted (``annotations_invalid``). The chunk's text, lower-cased, is the phrase the box belongs to, so every
occurrence of that text in the caption gets it, as with detector boxes.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from grit_core.record import containment_filter, sort_entries
from grit_pipeline.grounding.annotations import from_grit_entry
from grit_pipeline.grounding.detector import GroundingResult
from grit_pipeline.text import Chunk, normalize_caption, unescape_with_offsets


def unique_phrases(chunks: Sequence[Chunk]) -> tuple[list[str], list[int]]:
    """Unique lower-cased chunk texts in order of first appearance, and each chunk's index into them."""
    phrases: list[str] = []
    index: dict[str, int] = {}
    of_chunk: list[int] = []
    for chunk in chunks:
        text = chunk.prompt_text
        if text not in index:
            index[text] = len(phrases)
            phrases.append(text)
        of_chunk.append(index[text])
    return phrases, of_chunk


# ---------------------------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------------------------


def normalize_with_offsets(raw: str) -> tuple[str, list[int]] | None:
    """``normalize_caption(raw)`` and, for each raw offset 0..len(raw), its offset in the normalised caption.

    None when NFC changes the text (composed characters make the map inexact). HTML character references are
    decoded first, as ``normalize_caption`` does, with their own map.
    """
    raw, unescaped_pos = unescape_with_offsets(raw)
    if unicodedata.normalize("NFC", raw) != raw:
        return None
    out: list[str] = []
    pos = [0] * (len(raw) + 1)
    last_space = True
    for i, ch in enumerate(raw):
        pos[i] = len(out)
        if ch.isspace():
            if not last_space:
                out.append(" ")
                last_space = True
            continue
        if unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        out.append(ch)
        last_space = False
    pos[len(raw)] = len(out)
    if out and out[-1] == " ":
        out.pop()
    text = "".join(out)
    return text, [min(pos[p], len(text)) for p in unescaped_pos]


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start] == " ":
        start += 1
    while end > start and text[end - 1] == " ":
        end -= 1
    return start, end


def annotation_span(raw_caption: str | None, caption: str, ann: dict[str, Any]) -> tuple[int, int] | None:
    """The annotation's span in the normalised caption, or None when it cannot be placed."""
    if "phrase" in ann and isinstance(ann["phrase"], str):
        needle = normalize_caption(ann["phrase"]).lower()
        at = caption.lower().find(needle) if needle else -1
        return (at, at + len(needle)) if at >= 0 else None
    start, end = ann.get("start"), ann.get("end")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        return None
    raw = raw_caption if raw_caption is not None else caption
    if not 0 <= start < end <= len(raw):
        return None
    mapped = normalize_with_offsets(raw)
    if mapped is not None and mapped[0] == caption:
        s, e = _strip_span(caption, mapped[1][start], mapped[1][end])
        return (s, e) if s < e else None
    return annotation_span(None, caption, {"phrase": raw[start:end]})


def annotation_box(ann: dict[str, Any]) -> tuple[list[float], float] | None:
    """``([x1, y1, x2, y2], score)`` clipped to [0, 1], or None for a malformed or empty box."""
    box = ann.get("box")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = (min(1.0, max(0.0, float(v))) for v in box)
    if not (x1 < x2 and y1 < y2):
        return None
    score = ann.get("score", 1.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return [x1, y1, x2, y2], min(1.0, max(0.0, float(score)))


def match_chunk(span: tuple[int, int], chunks: Sequence[Chunk]) -> int | None:
    """Index of the chunk an annotated span belongs to (rules in the module docstring), or None."""
    s, e = span
    for i, c in enumerate(chunks):
        if (c.expr_start, c.expr_end) == (s, e) or (c.start, c.end) == (s, e):
            return i
    for i, c in enumerate(chunks):
        if s <= c.start and c.end <= e:
            return i
    best, best_overlap = None, 0
    for i, c in enumerate(chunks):
        overlap = min(e, c.end) - max(s, c.start)
        if overlap > best_overlap:
            best, best_overlap = i, overlap
    return best


def map_annotations(
    raw_caption: str | None,
    caption: str,
    chunks: Sequence[Chunk],
    chunk_phrase: Sequence[int],
    annotations: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Input annotations as the detector's ``{"phrase": index, "box": [...], "score": s}`` list, and counts."""
    counts: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    for ann in annotations:
        counts["annotations"] += 1
        ann = from_grit_entry(ann) if isinstance(ann, (list, tuple)) else ann  # GRIT's own 7-number entries
        box = annotation_box(ann) if isinstance(ann, dict) else None
        if box is None:
            counts["annotations_invalid"] += 1
            continue
        span = annotation_span(raw_caption, caption, ann)
        chunk = match_chunk(span, chunks) if span is not None else None
        if chunk is None:
            counts["annotations_unmatched"] += 1
            continue
        out.append({"phrase": chunk_phrase[chunk], "box": box[0], "score": box[1]})
    return out, counts


# ---------------------------------------------------------------------------------------------------------------
# Detections -> record entries
# ---------------------------------------------------------------------------------------------------------------


def _valid_box(box: Sequence[float], score: float) -> bool:
    values = (*box, score)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return False
    x1, y1, x2, y2 = box
    return 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0 and 0.0 <= score <= 1.0


def build_entries(
    chunks: Sequence[Chunk], chunk_phrase: Sequence[int], result: GroundingResult
) -> tuple[list[list], list[list], Counter[str]]:
    """``noun_chunks`` and ``ref_exps`` (sorted) for one caption, and the grounding counters.

    Every occurrence of a phrase gets all of that phrase's boxes; its expression inherits them. Counters:
    ``chunks_grounded`` (occurrences with a box), ``chunks_filtered_phrase_too_long`` (occurrences whose phrase could
    not fit a prompt), ``boxes_invalid`` (boxes outside [0, 1] or empty, which a correct detector never returns).
    """
    counts: Counter[str] = Counter()
    by_phrase: dict[int, list[tuple[list[float], float]]] = defaultdict(list)
    for det in result.detections:
        box = [float(v) for v in det.box]
        if _valid_box(box, float(det.score)):
            by_phrase[det.phrase].append((box, float(det.score)))
        else:
            counts["boxes_invalid"] += 1
    too_long = set(result.too_long_phrases)
    noun_chunks: list[list] = []
    ref_exps: list[list] = []
    for chunk, phrase in zip(chunks, chunk_phrase):
        if phrase in too_long:
            counts["chunks_filtered_phrase_too_long"] += 1
            continue
        boxes = by_phrase.get(phrase, [])
        if boxes:
            counts["chunks_grounded"] += 1
        for box, score in boxes:
            noun_chunks.append([chunk.start, chunk.end, *box, score])
            ref_exps.append([chunk.expr_start, chunk.expr_end, *box, score])
    noun_chunks, ref_exps = sort_entries(noun_chunks, ref_exps)
    counts["boxes_raw"] += result.num_boxes_raw
    return noun_chunks, ref_exps, counts


def retained_count(ref_exps: Sequence[Sequence[Any]]) -> int:
    """Entries that survive the containment filter (the ``ref_exps_retained`` counter)."""
    return len(containment_filter(ref_exps))
