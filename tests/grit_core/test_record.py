"""The GRIT record: the GRIT-20M example validates, round trips through JSON and Arrow, and bad records are named."""

from __future__ import annotations

import copy
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_core.record import (
    GritRecord,
    RecordError,
    group_phrases,
    index_rows_to_table,
    index_schema,
    record_from_json,
    records_to_table,
    retained_spans,
    sort_entries,
    table_to_records,
    validate_record,
)

# The example record of microsoft/unilm kosmos-2/README.md (GRIT-20M release notes).
GRIT20M_EXAMPLE = {
    "key": "000373938",
    "clip_similarity_vitb32": 0.353271484375,
    "clip_similarity_vitl14": 0.2958984375,
    "id": 1795296605919,
    "url": "https://www.thestrapsaver.com/wp-content/uploads/customerservice-1.jpg",
    "caption": "a wire hanger with a paper cover that reads we heart our customers",
    "width": 1024,
    "height": 693,
    "noun_chunks": [
        [19, 32, 0.019644069503434333, 0.31054004033406574, 0.9622142865754519, 0.9603442351023356, 0.79298526],
        [0, 13, 0.019422357885505368, 0.027634161214033764, 0.9593302408854166, 0.969467560450236, 0.67520964],
    ],
    "ref_exps": [
        [19, 66, 0.019644069503434333, 0.31054004033406574, 0.9622142865754519, 0.9603442351023356, 0.79298526],
        [0, 66, 0.019422357885505368, 0.027634161214033764, 0.9593302408854166, 0.969467560450236, 0.67520964],
    ],
}


def test_grit20m_example_validates():
    validate_record(GRIT20M_EXAMPLE)
    rec = GritRecord.from_dict(GRIT20M_EXAMPLE)
    assert rec.caption[0:13] == "a wire hanger"
    assert rec.caption[19:32] == "a paper cover"
    # The release does not sort its entries; our writer does, and the strict check sees the difference.
    with pytest.raises(RecordError, match="out of order"):
        validate_record(GRIT20M_EXAMPLE, check_order=True)
    chunks, refs = sort_entries(rec.noun_chunks, rec.ref_exps)
    validate_record({**GRIT20M_EXAMPLE, "noun_chunks": chunks, "ref_exps": refs}, check_order=True)


def test_json_round_trip_keeps_field_order_and_values():
    rec = GritRecord.from_dict(GRIT20M_EXAMPLE)
    text = rec.to_json()
    back = record_from_json(text)
    assert back == rec
    assert list(back.to_dict()) == list(GRIT20M_EXAMPLE)
    assert back.to_dict() == GRIT20M_EXAMPLE


def test_arrow_and_parquet_round_trip():
    rec = GritRecord.from_dict(GRIT20M_EXAMPLE)
    plain = GritRecord(key="k-2", caption="a cat", width=10, height=20, id=7, url=None)
    table = records_to_table([rec, plain])
    assert table.schema == index_schema()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    back = table_to_records(pq.read_table(io.BytesIO(buf.getvalue())))
    assert back == [rec, plain]
    # Offsets stored as doubles come back as ints.
    assert isinstance(back[0].noun_chunks[0][0], int)


def test_index_rows_keep_dropped_samples_and_string_ids():
    rows = [
        {"key": "a", "id": "x1", "caption": "a dog", "status": "dropped", "drop_reason": "bad_image"},
        {**GRIT20M_EXAMPLE, "id": "1795296605919", "status": "kept"},
    ]
    table = index_rows_to_table(rows, id_type=pa.string())
    assert table.column("status").to_pylist() == ["dropped", "kept"]
    assert [r.key for r in table_to_records(table)] == ["000373938"]


def test_grit20m_parquet_without_status_reads_as_records():
    table = pa.Table.from_pylist([GRIT20M_EXAMPLE])
    (rec,) = table_to_records(table)
    validate_record(rec)


def _broken(**changes):
    rec = copy.deepcopy(GRIT20M_EXAMPLE)
    for path, value in changes.items():
        field, _, index = path.partition("__")
        if index:
            i, j = (int(x) for x in index.split("_"))
            rec[field][i][j] = value
            if field == "noun_chunks" and j >= 2:
                rec["ref_exps"][i][j] = value
        else:
            rec[field] = value
    return rec


@pytest.mark.parametrize(
    "record, message",
    [
        (_broken(key="a.b"), "bad key 'a.b'"),
        (_broken(key="a/b"), "bad key"),
        (_broken(noun_chunks__0_1=99), r"noun_chunks\[0\]: offset \[19, 99\) outside the caption"),
        (_broken(noun_chunks__1_0=-1), r"offset \[-1, 13\) outside"),
        (_broken(noun_chunks__0_4=1.5), r"box .* outside \[0, 1\]"),
        (_broken(noun_chunks__0_2=0.99), "inverted"),
        (_broken(noun_chunks__0_6=1.2), r"score 1.2 outside \[0, 1\]"),
        (_broken(width=0), "'width' must be a positive integer"),
        (_broken(caption=""), "caption must be a non-empty string"),
        (_broken(noun_chunks__0_6=float("nan")), "finite"),
    ],
)
def test_invalid_records_name_the_first_problem(record, message):
    with pytest.raises(RecordError, match=message):
        validate_record(record)


def test_ref_exp_must_match_its_chunk():
    rec = copy.deepcopy(GRIT20M_EXAMPLE)
    rec["ref_exps"][0][6] = 0.1
    with pytest.raises(RecordError, match=r"ref_exps\[0\] box/score differ"):
        validate_record(rec)
    rec = copy.deepcopy(GRIT20M_EXAMPLE)
    rec["ref_exps"][0][0] = 20
    with pytest.raises(RecordError, match="does not contain its chunk"):
        validate_record(rec)
    rec = copy.deepcopy(GRIT20M_EXAMPLE)
    rec["ref_exps"].pop()
    with pytest.raises(RecordError, match="noun_chunks has 2 entries but ref_exps has 1"):
        validate_record(rec)


def test_missing_field():
    rec = dict(GRIT20M_EXAMPLE)
    del rec["height"]
    with pytest.raises(RecordError, match="missing field 'height'"):
        validate_record(rec)


def test_retained_spans_paper_example_and_ties():
    # "a dog in a field of flowers": (0, 27) contains (9, 27) and (20, 27).
    assert retained_spans([(0, 27), (9, 27), (20, 27)]) == {(0, 27)}
    # Same span twice is one phrase; overlapping but not containing spans both stay.
    assert retained_spans([(0, 5), (0, 5), (3, 9)]) == {(0, 5), (3, 9)}
    # Same start, longer end contains; same end, earlier start contains.
    assert retained_spans([(0, 5), (0, 9)]) == {(0, 9)}
    assert retained_spans([(2, 9), (0, 9)]) == {(0, 9)}
    assert retained_spans([]) == set()


def test_retained_spans_matches_a_brute_force_definition():
    import random

    rng = random.Random(0)
    for _ in range(300):
        spans = []
        for _ in range(rng.randint(0, 7)):
            s = rng.randint(0, 12)
            spans.append((s, s + rng.randint(1, 6)))
        brute = {a for a in spans if not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in spans)}
        assert retained_spans(spans) == brute


def test_group_phrases():
    e = [[0, 5, 0.1, 0.1, 0.2, 0.2, 0.9], [6, 9, 0.3, 0.3, 0.4, 0.4, 0.8], [0, 5, 0.5, 0.5, 0.6, 0.6, 0.7]]
    groups = group_phrases(e)
    assert [(s, t, len(b)) for s, t, b in groups] == [(0, 5, 2), (6, 9, 1)]
