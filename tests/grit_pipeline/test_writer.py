"""The workers' shard writing (grit_pipeline.writer) and the driver's bookkeeping (shard_tracker) on hand-made rows,
through fsspec's in-memory filesystem and a local folder: fragments, assembly, determinism, dedup, resume state."""

from __future__ import annotations

import io
import json
import random
import tarfile
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_core.record import record_from_json, validate_record
from grit_pipeline.output_store import OutputStore
from grit_pipeline.shard_tracker import ShardTracker
from grit_pipeline.stages import WORK_SCHEMA
from grit_pipeline.writer import (
    assemble_shard,
    convert_id,
    resolve_id_type,
    run_dir,
    scan_complete,
    write_fragments,
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


def memory_store() -> OutputStore:
    return OutputStore(f"memory://grit-test-{uuid.uuid4().hex[:8]}/out")


def build(store: OutputStore, files: list[int], rows: list[dict], n: int = 3, batch: int = 4, id_type="auto"):
    """The worker side and the driver side of a build, in this process: fragments per batch, then assembly."""
    run = uuid.uuid4().hex
    store.make_dir(run_dir(run))  # the driver's part: workers never create the run's folder
    tracker = ShardTracker(n, len(files), id_type=None if id_type == "auto" else id_type)
    results = []
    for i in range(0, len(rows), batch):
        meta = write_fragments(pa.Table.from_pylist(rows[i : i + batch], schema=WORK_SCHEMA), store, run, n)
        for row in meta.to_pylist():
            tracker.add(row)
        tracker.decide_id_type()
        for shard in tracker.ready():
            result = assemble_shard(
                store, run, shard.file_index, shard.block, n, shard.expected, shard.fragments,
                f"in{shard.file_index}", tracker.id_type, shard.last_block, shard.file_total,
            )  # fmt: skip
            results.append(result)
            if result["status"] == "complete":
                tracker.done((shard.file_index, shard.block))
            elif result["status"] == "bad_input":
                tracker.fail((shard.file_index, shard.block), result["detail"])
    return tracker, results


def test_shards_are_named_by_input_and_identical_whatever_the_arrival_order():
    files = [7, 0, 2]  # an empty file in the middle
    rows = rows_for(files)
    random.Random(0).shuffle(rows)
    a = memory_store()
    tracker, _ = build(a, files, rows)
    assert tracker.whole and not tracker.open
    names = sorted(n for n in a.listdir() if n != ".grit-tmp")
    shards = ["00000-00000", "00000-00001", "00000-00002", "00002-00000"]
    assert names == sorted(f"{s}{ext}" for s in shards for ext in (".parquet", ".tar", "_stats.json"))
    assert not a.fs.find(a.path(".grit-tmp"))  # each shard's fragments went once it was written
    inputs = [json.loads(a.read_bytes(f"{s}_stats.json"))["input"] for s in shards]
    assert [(s["file_index"], s["block"], s["samples"], s["last_block"]) for s in inputs] == [
        (0, 0, 3, False),
        (0, 1, 3, False),
        (0, 2, 1, True),
        (2, 0, 2, True),
    ]
    table = pq.read_table(io.BytesIO(a.read_bytes("00000-00001.parquet")))
    assert table.column("key").to_pylist() == ["k0_3", "k0_4", "k0_5"]
    assert table.column("status").to_pylist() == ["dropped", "kept", "kept"]
    with tarfile.open(fileobj=io.BytesIO(a.read_bytes("00000-00001.tar"))) as tf:
        assert tf.getnames() == ["k0_4.jpg", "k0_4.txt", "k0_4.json", "k0_5.jpg", "k0_5.txt", "k0_5.json"]
        rec = record_from_json(tf.extractfile("k0_4.json").read())
        validate_record(rec, check_order=True)
        assert tf.extractfile("k0_4.jpg").read() == corpus.jpeg(4)
    stats = json.loads(a.read_bytes("00000-00001_stats.json"))
    assert stats["counts"]["input"] == 3 and stats["counts"]["kept"] == 2 and stats["counts"]["dropped_bad_image"] == 1
    assert stats["counts"]["boxes"] == 4 and stats["counts"]["ref_exps_retained"] == 2
    assert stats["seconds"]["grounding"] == pytest.approx(0.012)
    # Byte-identical output from another arrival order and other batches.
    random.Random(1).shuffle(rows)
    b = memory_store()
    build(b, files, rows, batch=3)
    for name in ("00000-00000.tar", "00000-00001.parquet", "00002-00000.tar"):
        assert a.read_bytes(name) == b.read_bytes(name)


def test_a_shard_is_written_as_soon_as_it_is_whole_and_a_last_block_waits_for_the_end_of_its_file():
    store = memory_store()
    rows = [kept_row(1, p) for p in range(3)] + [kept_row(0, p) for p in (0, 1)]
    tracker, results = build(store, [3, 4], rows, id_type="int64")
    assert [r["shard"] for r in results] == ["00001-00000"]  # file 1 does not wait for file 0: any order
    # With output.id_type=auto nothing is assembled before the first shard in input order decides the type.
    tracker2 = ShardTracker(3, 2)
    for row in write_fragments(pa.Table.from_pylist(rows[:3], schema=WORK_SCHEMA), store, "r" * 32, 3).to_pylist():
        tracker2.add(row)
    assert tracker2.decide_id_type() is None and tracker2.ready() == []
    # File 1's last block (position 3 alone) waits for the file's end.
    meta = write_fragments(pa.Table.from_pylist([kept_row(1, 3)], schema=WORK_SCHEMA), store, "r" * 32, 3)
    tracker3 = ShardTracker(3, 2, id_type="int64")
    for row in meta.to_pylist():
        tracker3.add(row)
    assert tracker3.ready() == []
    tracker3.add({"kind": "eof", "file_index": 1, "samples": 4})
    (ready,) = tracker3.ready()
    assert (ready.file_index, ready.block, ready.expected, ready.last_block, ready.file_total) == (1, 1, 1, True, 4)


def test_first_shard_decides_the_id_type():
    store = memory_store()
    rows = [kept_row(0, 0, id_="a-1"), kept_row(0, 1, id_=5), eof(0, 2), kept_row(1, 0, id_=7), eof(1, 1)]
    tracker, _ = build(store, [2, 1], rows, n=5)
    assert tracker.id_type == "string"
    assert pq.read_table(io.BytesIO(store.read_bytes("00000-00000.parquet"))).column("id").to_pylist() == ["a-1", "5"]
    assert pq.read_table(io.BytesIO(store.read_bytes("00001-00000.parquet"))).column("id").to_pylist() == ["7"]


def test_duplicate_keys_within_a_shard_and_retried_rows():
    rows = [kept_row(0, 0, key="same"), kept_row(0, 1, key="same"), kept_row(1, 0, key="same"), eof(0, 2), eof(1, 1)]
    rows.insert(1, kept_row(0, 0, key="same"))  # a retried read sends position 0 again
    store = memory_store()
    tracker, _ = build(store, [2, 1], rows, n=5, batch=10)
    assert tracker.whole
    t0 = pq.read_table(io.BytesIO(store.read_bytes("00000-00000.parquet"))).to_pylist()
    t1 = pq.read_table(io.BytesIO(store.read_bytes("00001-00000.parquet"))).to_pylist()
    # Inside a shard the first in input order keeps the key; another shard's copy is its own (docs/format.md).
    assert [(r["status"], r["drop_reason"]) for r in t0] == [("kept", None), ("dropped", "duplicate_key")]
    assert [(r["status"], r["drop_reason"]) for r in t1] == [("kept", None)]
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes("00000-00000.tar"))) as tf:
        assert tf.getnames() == ["same.jpg", "same.txt", "same.json"]


def test_a_retried_batch_rewrites_the_same_fragment():
    store = memory_store()
    table = pa.Table.from_pylist([kept_row(0, p) for p in range(2)], schema=WORK_SCHEMA)
    first = write_fragments(table, store, "a" * 32, 3).to_pylist()
    again = write_fragments(table, store, "a" * 32, 3).to_pylist()
    assert first == again
    tracker = ShardTracker(3, 1, id_type="int64")
    for row in first + again:
        tracker.add(row)
    assert tracker.samples_seen == 2 and tracker.ready() == []  # counted once: not mistaken for a whole block


def test_a_shard_with_unreadable_input_is_never_marked_complete():
    rows = [kept_row(0, 0), dropped_row(0, 1, "bad_input"), eof(0, 2)]
    store = memory_store()
    tracker, results = build(store, [2], rows, n=5)
    assert [r["status"] for r in results] == ["bad_input"] and not tracker.whole
    assert not any(name.startswith("00000-00000") for name in store.listdir())


def test_a_late_worker_cannot_bring_back_a_removed_run_folder(tmp_path):
    """A stopping build removes its run's folder while workers may still be writing: they fail, it stays gone."""
    store = OutputStore(str(tmp_path / "out"))
    run = "c" * 32
    with pytest.raises(FileNotFoundError):  # the driver makes the folder; a worker never does
        write_fragments(pa.Table.from_pylist([kept_row(0, 0)], schema=WORK_SCHEMA), store, run, 2)
    assert not (tmp_path / "out" / ".grit-tmp").exists()
    store.make_dir(run_dir(run))
    errors, written = [], []

    def worker():
        position = 0
        while position < 2000:  # ends by the error long before
            rows = [kept_row(0, position), kept_row(0, position + 1)]
            try:
                written.append(write_fragments(pa.Table.from_pylist(rows, schema=WORK_SCHEMA), store, run, 2))
            except FileNotFoundError as exc:
                errors.append(exc)
                return
            position += 2

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    while len(written) < 20:
        threading.Event().wait(0.005)
    store.delete_tree(run_dir(run))
    for t in threads:
        t.join()
    assert len(errors) == 3 and not (tmp_path / "out" / ".grit-tmp").exists()
    with pytest.raises(FileNotFoundError):
        assemble_shard(store, run, 0, 0, 2, 2, [written[0].to_pylist()[0]["path"]], "in0", "int64", False, None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_fragments_short_of_the_block_write_nothing():
    store = memory_store()
    meta = write_fragments(pa.Table.from_pylist([kept_row(0, 0)], schema=WORK_SCHEMA), store, "b" * 32, 2)
    (frag,) = [r["path"] for r in meta.to_pylist()]
    result = assemble_shard(store, "b" * 32, 0, 0, 2, 2, [frag, frag], "in0", "int64", False, None)
    assert result["status"] == "missing" and not any(n.endswith(".tar") for n in store.listdir())


def test_scan_finds_every_complete_shard_not_only_a_prefix(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    files = [7, 2]
    build(store, files, rows_for(files))
    done = scan_complete(store, 3)
    assert sorted(done) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert scan_complete(store, 4) == {}  # another shard size: nothing reusable
    # A crash between 00000-00001's tar and its stats: that shard is not complete; those after it still are.
    (tmp_path / "out" / "00000-00001_stats.json").unlink()
    (tmp_path / "out" / "00000-00002.parquet").unlink()  # and a shard whose parquet is missing
    (tmp_path / "out" / "99999-00000_stats.json").write_text("{not json")
    assert sorted(scan_complete(store, 3)) == [(0, 0), (1, 0)]


def test_id_types():
    assert resolve_id_type("auto", [1, None, "22"]) == "int64"
    assert resolve_id_type("auto", [1, "a7"]) == "string"
    assert resolve_id_type("string", [1]) == "string"
    assert convert_id("12", "int64") == (12, False)
    assert convert_id("x", "int64") == (None, True)
    assert convert_id(3, "string") == ("3", False)
