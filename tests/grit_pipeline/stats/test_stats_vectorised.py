"""The vectorised pieces of the stats pass against plain Python written from the format's definitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grit_core.record import ENTRY_TYPE, retained_spans
from grit_pipeline.stats.accumulators import BottomKSample, CountHistogram, Histogram, TopCounter
from grit_pipeline.stats.entries import CaptionBytes, flatten_entries, group_spans, head_words, word_counts

ALPHABET = st.sampled_from(list("ab cé🐶\t") + ["ü", "  ", "x"])


@st.composite
def batch(draw):
    """Captions (some null, some non-ASCII) with entries, some of them malformed."""
    captions, entries = [], []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()) and draw(st.booleans()):
            captions.append(None)
            entries.append(None)
            continue
        caption = "".join(draw(st.lists(ALPHABET, min_size=1, max_size=14)))
        captions.append(caption)
        rows = []
        for _ in range(draw(st.integers(0, 5))):
            s = draw(st.integers(0, len(caption) + 1))
            e = draw(st.integers(0, len(caption) + 2))
            box = [0.1, 0.2, draw(st.sampled_from([0.5, 0.05, 1.0])), 0.9]
            rows.append([float(s), float(e), *box, draw(st.sampled_from([0.5, 1.0, 1.5]))])
        entries.append(rows)
    return captions, entries


def _valid(entry, caption):
    s, e, x1, y1, x2, y2, score = entry
    return 0 <= s < e <= len(caption) and x1 < x2 and y1 < y2 and 0 <= score <= 1


@settings(max_examples=150, deadline=None)
@given(batch(), st.integers(0, 2))
def test_spans_texts_and_containment_match_python(data, offset):
    captions, entries = data
    # A sliced batch: the arrays' offsets must be honoured.
    pad_c, pad_e = ["zz"] * offset, [[[0.0, 1.0, 0.1, 0.1, 0.2, 0.2, 0.5]]] * offset
    cap_arr = pa.array(pad_c + captions, pa.string()).slice(offset)
    ent_arr = pa.array(pad_e + entries, ENTRY_TYPE).slice(offset)
    cb = CaptionBytes.from_column(cap_arr)
    assert cb.length.tolist() == [len(c) if c is not None else 0 for c in captions]
    flat = flatten_entries(ent_arr, cb.length)
    expected = [
        (r, int(e[0]), int(e[1])) for r, rows in enumerate(entries) for e in rows or [] if _valid(e, captions[r])
    ]
    assert list(zip(flat.rec.tolist(), flat.start.tolist(), flat.end.tolist())) == expected
    assert flat.malformed == sum(len(rows or []) for rows in entries) - len(expected)
    spans = group_spans(flat)
    got = {(r, s, e): bool(k) for r, s, e, k in zip(spans.rec, spans.start, spans.end, spans.retained)}
    want = {}
    for r, rows in enumerate(entries):
        valid = [e for e in rows or [] if _valid(e, captions[r])]
        keep = retained_spans(valid)
        for s, e in {(int(v[0]), int(v[1])) for v in valid}:
            want[(r, s, e)] = (s, e) in keep
    assert got == want
    assert [tuple(x) for x in zip(spans.rec[spans.inverse], spans.start[spans.inverse])] == [
        (r, s) for r, s, _ in expected
    ]
    texts = cb.slice(spans.rec, spans.start, spans.end).to_pylist()
    assert texts == [captions[r][s:e] for r, s, e in zip(spans.rec, spans.start, spans.end)]
    assert word_counts(pa.array(texts, pa.string())).tolist() == [len(t.split()) for t in texts]


def test_head_words_is_last_word_lowercased_without_edge_punctuation():
    texts = pa.array(["a small Red car", "the dog's bone,", "Café", "   ", "'quoted'", "x\ty"])
    assert head_words(texts).to_pylist() == ["car", "bone", "café", None, "quoted", "y"]


def test_histogram_matches_numpy_and_counts_out_of_range():
    rng = np.random.default_rng(0)
    edges = np.linspace(0, 1, 11)
    values = np.concatenate([rng.random(1000), [0.0, 1.0, -0.5, 1.5, np.nan]])
    h = Histogram(edges)
    for chunk in np.array_split(values, 7):
        h.add(chunk)
    d = h.to_dict()
    assert d["counts"] == np.histogram(values[np.isfinite(values)], bins=edges)[0].tolist()
    assert (d["underflow"], d["overflow"], d["invalid"], d["n"]) == (1, 1, 1, 1004)
    assert d["mean"] == pytest.approx(np.nanmean(values))
    assert d["p50"] == pytest.approx(np.nanmedian(values), abs=0.1)


def test_count_histogram_caps_into_last_bin():
    h = CountHistogram(4)
    h.add([0, 1, 1, 3, 4, 9])
    d = h.to_dict()
    assert d["counts"] == [1, 2, 0, 1, 2] and d["values"][-1] == "4+"
    assert (d["total"], d["max"], d["mean"]) == (18, 9, 3.0)


def test_top_counter_exact_then_bounded():
    c = TopCounter(capacity=3)
    c.add(pa.array(["a", "b", "a", None, "c"]))
    c.add(pa.array(["a", "d"]))
    assert c.most_common(2) == [("a", 3), ("b", 1)] and c.exact and c.n == 6
    for i in range(10):
        c.add(pa.array([f"rare{i}"]))
    c.add(pa.array(["a"] * 5))
    assert c.most_common(1) == [("a", 8)] and not c.exact and len(c.counts) <= 6


def test_bottom_k_sample_is_seeded_uniform_and_batch_independent_in_size():
    def pick(seed, sizes):
        s = BottomKSample(5, seed)
        base = 0
        for n in sizes:
            idx, prio = s.offer(n)
            s.add(prio, (idx + base).tolist())
            base += n
        return s.sample()

    a = pick(1, [10, 10, 10])
    assert a == pick(1, [10, 10, 10]) and len(set(a)) == 5
    assert a != pick(2, [10, 10, 10])
    assert len(pick(1, [2, 1])) == 3  # fewer items than k: all of them
    # Uniform: over many seeds every position is picked about equally often.
    counts = np.bincount(np.concatenate([pick(s, [7, 13]) for s in range(800)]), minlength=20)
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
