"""The shard writer (grit_pipeline.writer) on hand-made pipeline rows: order, atomicity, dedup, resume state."""

from __future__ import annotations

import json
import random
import tarfile

import pyarrow.parquet as pq
import pytest

from grit_core.record import record_from_json, validate_record
from grit_pipeline.writer import (
    TMP_DIR,
    ShardWriter,
    clean_output,
    convert_id,
    resolve_id_type,
    scan_output,
)
from tests.grit_pipeline import pipeline_corpus as corpus


def kept_row(f: int, pos: int, key: str | None = None, id_=None) -> dict:
    caption = "a dog on a sofa"
    return {
        "kind": "sample",
        "file_index": f,
        "position": pos,
        "key": key or f"k{f}_{pos}",
        "source": f"in{f}#{pos}",
        "status": "kept",
        "drop_reason": None,
        "caption": caption,
        "id_json": json.dumps(pos if id_ is None else id_),
        "url": f"http://x/{pos}",
        "clip_similarity_vitb32": None,
        "clip_similarity_vitl14": None,
        "image": corpus.jpeg(pos),
        "image_ext": "jpg",
        "width": 96,
        "height": 64,
        "noun_chunks": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9], [11, 15, 0.2, 0.2, 0.6, 0.9, 0.8]],
        "ref_exps": [[0, 15, 0.1, 0.1, 0.5, 0.5, 0.9], [11, 15, 0.2, 0.2, 0.6, 0.9, 0.8]],
        "num_chunks_found": 2,
        "num_boxes_raw": 3,
        "counters_json": json.dumps({"chunks_found": 2, "chunks_kept": 2, "chunks_grounded": 2, "boxes_raw": 3}),
        "t_read": 0.001,
        "t_text": 0.002,
        "t_decode": 0.003,
        "t_grounding": 0.004,
    }


def dropped_row(f: int, pos: int, reason: str = "bad_image") -> dict:
    row = kept_row(f, pos)
    row.update(status="dropped", drop_reason=reason, image=None, image_ext=None, noun_chunks=None, ref_exps=None)
    return row


def eof(f: int, total: int) -> dict:
    return {"kind": "eof", "file_index": f, "position": total, "status": "eof", "key": ""}


def rows_for(files: list[int]) -> list[dict]:
    rows = []
    for f, total in enumerate(files):
        for pos in range(total):
            rows.append(dropped_row(f, pos) if pos % 4 == 3 else kept_row(f, pos))
        rows.append(eof(f, total))
    return rows


def write(out, files, rows, n=3, id_type="auto"):
    state = scan_output(out, n)
    writer = ShardWriter(out, n, [f"in{i}" for i in range(len(files))], state, id_type=id_type)
    writer.add_rows(rows)
    return writer


def test_shards_are_written_in_input_order_whatever_the_arrival_order(tmp_path):
    files = [7, 0, 2]  # an empty file in the middle
    rows = rows_for(files)
    random.Random(0).shuffle(rows)
    writer = write(tmp_path / "a", files, rows)
    assert writer.complete and not writer.buffers
    assert not list((tmp_path / "a" / TMP_DIR).iterdir())
    writer.close()
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{i:05d}{ext}" for i in range(4) for ext in (".parquet", ".tar", "_stats.json")]
    inputs = [json.loads((tmp_path / "a" / f"{i:05d}_stats.json").read_text())["input"] for i in range(4)]
    assert [(s["file_index"], s["block"], s["samples"], s["last_block"]) for s in inputs] == [
        (0, 0, 3, False),
        (0, 1, 3, False),
        (0, 2, 1, True),
        (2, 0, 2, True),
    ]
    table = pq.read_table(tmp_path / "a" / "00001.parquet")
    assert table.column("key").to_pylist() == ["k0_3", "k0_4", "k0_5"]
    assert table.column("status").to_pylist() == ["dropped", "kept", "kept"]
    with tarfile.open(tmp_path / "a" / "00001.tar") as tf:
        names = tf.getnames()
        assert names == ["k0_4.jpg", "k0_4.txt", "k0_4.json", "k0_5.jpg", "k0_5.txt", "k0_5.json"]
        rec = record_from_json(tf.extractfile("k0_4.json").read())
        validate_record(rec, check_order=True)
        assert tf.extractfile("k0_4.jpg").read() == corpus.jpeg(4)
    stats = json.loads((tmp_path / "a" / "00001_stats.json").read_text())
    assert stats["counts"]["input"] == 3 and stats["counts"]["kept"] == 2 and stats["counts"]["dropped_bad_image"] == 1
    assert stats["counts"]["boxes"] == 4 and stats["counts"]["ref_exps_retained"] == 2
    assert stats["seconds"]["grounding"] == pytest.approx(0.012)
    # Byte-identical output from a different arrival order.
    random.Random(1).shuffle(rows)
    write(tmp_path / "b", files, rows)
    for name in ("00000.tar", "00001.parquet", "00003.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_shard_waits_for_its_predecessors(tmp_path):
    writer = write(tmp_path, [3, 3], [])
    assert writer.add_rows([kept_row(1, p) for p in range(3)] + [eof(1, 3)]) == []
    assert writer.pending() == {"00001-00000": 3}
    assert not any(tmp_path.glob("*_stats.json"))
    done = writer.add_rows([kept_row(0, p) for p in range(3)])
    assert [s["shard"] for s in done] == ["00000"]  # a full block is complete before its file's end is known
    assert not writer.complete
    done = writer.add_rows([eof(0, 3)])  # only now is file 0 known to be over, so file 1 may follow
    assert [s["shard"] for s in done] == ["00001"] and writer.complete


def test_duplicate_keys_and_retried_rows(tmp_path):
    rows = [kept_row(0, 0, key="same"), kept_row(0, 1, key="same"), kept_row(1, 0, key="same"), eof(0, 2), eof(1, 1)]
    rows.insert(1, kept_row(0, 0, key="same"))  # a retried task sends position 0 again
    write(tmp_path, [2, 1], rows, n=5)
    t0 = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    t1 = pq.read_table(tmp_path / "00001.parquet").to_pylist()
    assert [(r["status"], r["drop_reason"]) for r in t0 + t1] == [
        ("kept", None),
        ("dropped", "duplicate_key"),
        ("dropped", "duplicate_key"),
    ]
    with tarfile.open(tmp_path / "00000.tar") as tf:
        assert tf.getnames() == ["same.jpg", "same.txt", "same.json"]


def test_id_types():
    assert resolve_id_type("auto", [1, None, "22"]) == "int64"
    assert resolve_id_type("auto", [1, "a7"]) == "string"
    assert resolve_id_type("string", [1]) == "string"
    assert convert_id("12", "int64") == (12, False)
    assert convert_id("x", "int64") == (None, True)
    assert convert_id(3, "string") == ("3", False)


def test_string_ids_make_a_string_column(tmp_path):
    rows = [kept_row(0, 0, id_="a-1"), kept_row(0, 1, id_=5), eof(0, 2)]
    writer = write(tmp_path, [2], rows, n=5)
    assert writer.id_type == "string"
    assert pq.read_table(tmp_path / "00000.parquet").column("id").to_pylist() == ["a-1", "5"]


def test_scan_output_finds_the_complete_prefix_and_clean_removes_leftovers(tmp_path):
    files = [7, 2]
    write(tmp_path, files, rows_for(files))
    state = scan_output(tmp_path, 3)
    assert state.next_number == 4 and (state.next_file, state.next_block) == (2, 0)
    assert "k0_0" in state.seen_keys and len(state.seen_keys) == 9
    assert scan_output(tmp_path, 4).next_number == 0  # another shard size: nothing reusable
    # A crash after 00002's tar was renamed but before its stats: 00002 and later are not complete.
    (tmp_path / "00002_stats.json").unlink()
    (tmp_path / TMP_DIR / "00002.parquet.part").write_bytes(b"partial")
    state = scan_output(tmp_path, 3)
    assert state.next_number == 2 and (state.next_file, state.next_block) == (0, 2)
    removed = clean_output(tmp_path, state)
    assert sorted(removed) == [TMP_DIR, "00002.parquet", "00002.tar"]
    assert (tmp_path / "00003_stats.json").exists()  # beyond the gap: rewritten when the run gets there
    # The resumed writer continues at shard 00002 and rewrites 00003 identically.
    before = (tmp_path / "00003.tar").read_bytes()
    rest = [r for r in rows_for(files) if (r["file_index"], r["position"] // 3) >= (0, 2)]
    writer = ShardWriter(tmp_path, 3, ["in0", "in1"], state)
    writer.add_rows(rest)
    assert writer.complete and [s["shard"] for s in writer.written] == ["00002", "00003"]
    assert (tmp_path / "00003.tar").read_bytes() == before


def test_failed_write_marks_nothing_complete(tmp_path):
    writer = write(tmp_path, [3], [])
    (tmp_path / "00000.parquet").mkdir()  # the rename onto this path fails: a write error like any other
    with pytest.raises(Exception, match="writing shard 00000") as info:
        writer.add_rows([kept_row(0, p) for p in range(3)] + [eof(0, 3)])
    assert "run the same command again" in str(info.value)
    assert not (tmp_path / "00000_stats.json").exists()
    assert scan_output(tmp_path, 3).next_number == 0
