"""From chunks and detections to record entries, and input annotations to chunks (grit_pipeline.assemble)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from grit_core.record import GritRecord, validate_record
from grit_pipeline.assemble import (
    annotation_span,
    build_entries,
    map_annotations,
    match_chunk,
    normalize_with_offsets,
    unique_phrases,
)
from grit_pipeline.config import TextConfig
from grit_pipeline.grounding.detector import Detection, GroundingResult
from grit_pipeline.text import Chunk, TextStage, normalize_caption


def test_unique_phrases_lowercase_in_first_order():
    chunks = [Chunk(0, 5, "A dog", 0, 5), Chunk(10, 15, "a cat", 10, 15), Chunk(20, 25, "a Dog", 20, 25)]
    assert unique_phrases(chunks) == (["a dog", "a cat"], [0, 1, 0])


def test_every_occurrence_gets_its_phrase_boxes_sorted():
    caption = "a dog and a cat and a dog"
    chunks = [Chunk(0, 5, "a dog", 0, 5), Chunk(10, 15, "a cat", 10, 15), Chunk(20, 25, "a dog", 20, 25)]
    phrases, of_chunk = unique_phrases(chunks)
    result = GroundingResult(
        detections=[
            Detection(0, (0.1, 0.1, 0.4, 0.4), 0.5),
            Detection(0, (0.5, 0.5, 0.9, 0.9), 0.8),
            Detection(1, (0.2, 0.2, 0.3, 0.3), 0.7),
            Detection(1, (0.3, 0.3, 0.3, 0.9), 0.7),  # empty box: never from a correct detector, counted
        ],
        num_boxes_raw=6,
    )
    nc, re, counts = build_entries(chunks, of_chunk, result)
    assert [e[:2] + [e[6]] for e in nc] == [[0, 5, 0.8], [0, 5, 0.5], [10, 15, 0.7], [20, 25, 0.8], [20, 25, 0.5]]
    assert counts == {"chunks_grounded": 3, "boxes_raw": 6, "boxes_invalid": 1}
    rec = GritRecord(key="k", caption=caption, width=10, height=10, noun_chunks=nc, ref_exps=re)
    validate_record(rec, check_order=True)


def test_phrases_too_long_are_counted_per_occurrence():
    chunks = [Chunk(0, 5, "a dog", 0, 5), Chunk(10, 15, "a dog", 10, 15)]
    result = GroundingResult(detections=[], too_long_phrases=[0])
    nc, re, counts = build_entries(chunks, [0, 0], result)
    assert nc == [] and counts["chunks_filtered_phrase_too_long"] == 2


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_offset_map_agrees_with_normalize_caption(raw):
    mapped = normalize_with_offsets(raw)
    if mapped is None:
        return  # NFC changes the text: annotations fall back to text search
    text, pos = mapped
    assert text == normalize_caption(raw)
    assert len(pos) == len(raw) + 1
    assert all(0 <= p <= len(text) for p in pos) and pos == sorted(pos)


def test_annotation_spans_follow_normalisation():
    raw = "  A\tred  ball\non the\u200b grass "
    caption = normalize_caption(raw)
    assert caption == "A red ball on the grass"
    start = raw.index("red")
    assert annotation_span(raw, caption, {"start": start, "end": start + len("red  ball")}) == (2, 10)
    assert annotation_span(raw, caption, {"phrase": "THE GRASS"}) == (14, 23)
    assert annotation_span(raw, caption, {"start": 5, "end": 500}) is None
    nfc_raw = "a cafe\u0301 table"  # NFC composes e + combining accent: fall back to the span's text
    nfc_caption = normalize_caption(nfc_raw)
    span = annotation_span(nfc_raw, nfc_caption, {"start": 2, "end": 8})
    assert nfc_caption[span[0] : span[1]] == "café"


def test_annotations_go_to_the_head_chunk(spacy_model_name):
    raw = "a man in a blue shirt riding a horse"
    (res,) = TextStage(TextConfig(spacy_model=spacy_model_name))([raw])
    chunks = res.chunks
    texts = [c.text for c in chunks]
    assert texts == ["a man", "a blue shirt", "a horse"]
    _, of_chunk = unique_phrases(chunks)
    anns = [
        {"start": 0, "end": len("a man in a blue shirt"), "box": [0.1, 0.1, 0.5, 0.9]},
        {"start": raw.index("a blue"), "end": raw.index(" riding"), "box": [0.2, 0.3, 0.4, 0.5], "score": 0.7},
        {"phrase": "horse", "box": [0.5, 0.4, 1.2, 1.0]},  # clipped to the image
        {"phrase": "zebra", "box": [0.1, 0.1, 0.2, 0.2]},
        {"start": 0, "end": 5, "box": [0.5, 0.5, 0.4, 0.9]},
        {"start": 0, "end": 5, "box": "nope"},
    ]
    mapped, counts = map_annotations(raw, res.caption, chunks, of_chunk, anns)
    assert mapped == [
        {"phrase": 0, "box": [0.1, 0.1, 0.5, 0.9], "score": 1.0},
        {"phrase": 1, "box": [0.2, 0.3, 0.4, 0.5], "score": 0.7},
        {"phrase": 2, "box": [0.5, 0.4, 1.0, 1.0], "score": 1.0},
    ]
    assert counts == {"annotations": 6, "annotations_unmatched": 1, "annotations_invalid": 2}


def test_match_chunk_prefers_exact_then_contained_then_overlap():
    chunks = [Chunk(0, 5, "a man", 0, 21), Chunk(9, 21, "a blue shirt", 9, 21)]
    assert match_chunk((0, 21), chunks) == 0  # the expression of "a man"
    assert match_chunk((9, 21), chunks) == 1
    assert match_chunk((3, 14), chunks) == 1  # contains no chunk; overlaps "a blue shirt" most
    assert match_chunk((6, 8), chunks) is None


def test_annotation_spans_follow_html_decoding():
    raw = "&quot;Tom &amp; Jerry&quot; on a poster"
    caption = normalize_caption(raw)
    assert caption == '"Tom & Jerry" on a poster'
    start = raw.index("Tom")
    end = raw.index("&quot; on")
    assert annotation_span(raw, caption, {"start": start, "end": end}) == (1, 12)
    start = raw.index("a poster")
    assert annotation_span(raw, caption, {"start": start, "end": len(raw)}) == (17, 25)


@given(
    st.lists(
        st.one_of(
            st.sampled_from(["&amp;", "&quot;", "&#39;", "&#x41;", "&not", "&nbsp;", "&#8203;", "&bogus;", "&", " "]),
            st.text(alphabet="ab ;#&\t", max_size=4),
        ),
        max_size=20,
    ).map("".join)
)
def test_offset_map_agrees_with_normalize_caption_on_html_references(raw):
    import html

    from grit_pipeline.text import unescape_with_offsets

    decoded, pos = unescape_with_offsets(raw)
    assert decoded == html.unescape(raw)
    assert len(pos) == len(raw) + 1 and pos == sorted(pos) and pos[-1] == len(decoded)
    mapped = normalize_with_offsets(raw)
    if mapped is not None:
        assert mapped[0] == normalize_caption(raw)
        assert all(0 <= p <= len(mapped[0]) for p in mapped[1])
