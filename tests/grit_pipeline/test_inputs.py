"""Input readers (grit_pipeline.readers): keys, file discovery, tars (hostile ones too), tables, image folders."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_core.record import KEY_PATTERN
from grit_pipeline.config import InputConfig
from grit_pipeline.readers import (
    InputError,
    InputFile,
    Skip,
    iter_samples,
    make_key,
    resolve_inputs,
    split_member_name,
)
from grit_pipeline.readers.webdataset import iter_tar
from tests.grit_pipeline import hostile_inputs as hostile
from tests.grit_pipeline import pipeline_corpus as corpus

CFG = InputConfig()
MAX_BYTES = 64 * 1024 * 1024


def samples_of(path, fmt, cfg=CFG, skip=0):
    return list(iter_samples(InputFile(0, str(path), fmt), cfg, MAX_BYTES, skip=skip))


# ---------------------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------------------


def test_valid_keys_are_kept_and_others_sanitised_without_collisions():
    assert make_key("000012345") == "000012345"
    assert make_key("abc_DEF-9") == "abc_DEF-9"
    sanitised = [make_key(k) for k in ("a.b", "a/b", "a b", "a..b", "a_b", "ü", "", "../../etc/passwd", "x" * 500)]
    assert all(KEY_PATTERN.fullmatch(k) for k in sanitised)
    assert len(set(sanitised)) == len(sanitised)
    assert make_key("a.b") == make_key("a.b")  # stable
    assert all(len(k) <= 128 for k in sanitised)
    assert "." not in "".join(sanitised)


def test_member_names_split_at_the_last_dot():
    assert split_member_name("dir/photo.v2.jpg") == ("dir/photo.v2", "jpg")
    assert split_member_name("000001.JSON") == ("000001", "json")
    assert split_member_name("noext") == ("noext", "")
    assert split_member_name("dir.d/noext") == ("dir.d/noext", "")


# ---------------------------------------------------------------------------------------------------------------
# Finding inputs
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_inputs_orders_and_classifies(tmp_path):
    tars = tmp_path / "wds"
    tars.mkdir()
    for name in ("00001.tar", "00000.tar"):
        corpus.write_tar(tars / name, corpus.good_samples(1))
    pq.write_table(pa.table({"url": ["x"]}), tars / "00000.parquet")  # img2dataset's metadata: not an input
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(corpus.jpeg(0))
    table = corpus.write_jsonl(tmp_path / "rows.jsonl", [{"caption": "a dog", "image": "images/a.jpg"}])
    files = resolve_inputs([str(tars), str(folder), str(table), str(tars / "*.tar")])
    assert [(os.path.basename(f.path), f.format) for f in files] == [
        ("00000.tar", "webdataset"),
        ("00001.tar", "webdataset"),
        ("images", "images"),
        ("rows.jsonl", "jsonl"),
    ]
    assert [f.index for f in files] == [0, 1, 2, 3]
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs([str(tmp_path / "missing.tar")])
    with pytest.raises(InputError, match="matches no file"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(InputError, match="no input"):
        resolve_inputs([])


# ---------------------------------------------------------------------------------------------------------------
# Tars
# ---------------------------------------------------------------------------------------------------------------


def test_webdataset_tar_groups_members_and_carries_metadata(tmp_path):
    good = corpus.good_samples(3, seed=1)
    good[1]["meta"]["id"] = "abc"
    path = corpus.write_tar(tmp_path / "a.tar", good)
    got = samples_of(path, "webdataset")
    assert [s.key for s in got] == [g["key"] for g in good]
    assert [s.caption for s in got] == [g["caption"] for g in good]
    assert all(s.image == g["image"] for s, g in zip(got, good))
    assert got[0].id == good[0]["meta"]["id"] and got[1].id == "abc"
    assert got[0].url == good[0]["meta"]["url"]
    assert got[2].clip_similarity_vitb32 == pytest.approx(good[2]["meta"]["clip_similarity_vitb32"])
    assert got[0].clip_similarity_vitl14 is None


def test_missing_members_and_dotted_keys(tmp_path):
    samples = [
        {"key": "dir/photo.v2", "image": corpus.jpeg(1), "caption": "a red car"},
        {"key": "nocap", "image": corpus.jpeg(2)},
        {"key": "noimg", "caption": "a cat"},
    ]
    got = samples_of(corpus.write_tar(tmp_path / "a.tar", samples), "webdataset")
    assert len(got) == 3
    assert KEY_PATTERN.fullmatch(got[0].key) and got[0].key.startswith("dir_photo_v2-")
    assert got[1].caption is None and got[1].image is not None and got[1].drop_reason is None
    assert got[2].image is None and got[2].image_problem == "missing_image"


def test_hostile_members_are_refused_and_never_followed(tmp_path):
    good = corpus.good_samples(4, seed=2)
    path = tmp_path / "hostile.tar"
    expected = corpus.write_hostile_tar(path, good)
    before = set(os.listdir(tmp_path))
    got = samples_of(path, "webdataset")
    refused = [s for s in got if s.drop_reason == "unsafe_member"]
    assert len(refused) == expected["unsafe_member"]
    assert all(s.image is None and s.caption is None for s in refused)
    kept = [s for s in got if s.drop_reason is None]
    assert [s.key for s in kept] == [g["key"] for g in good]
    assert all(KEY_PATTERN.fullmatch(s.key) for s in got)
    assert set(os.listdir(tmp_path)) == before  # nothing extracted anywhere
    assert not os.path.exists("/tmp/absolute-escape.jpg")


def test_member_and_count_bounds(tmp_path):
    good = corpus.good_samples(5, seed=3)
    good[1]["image"] = corpus.png(5, 600, 600)
    path = corpus.write_tar(tmp_path / "a.tar", good)
    cfg = InputConfig(max_member_bytes=len(good[1]["image"]) - 1)
    got = samples_of(path, "webdataset", cfg)
    assert [s.drop_reason for s in got] == [None, "member_too_large", None, None, None]
    cfg = InputConfig(max_tar_members=7)  # 3 members per sample: two samples, then the bound
    got = samples_of(path, "webdataset", cfg)
    assert [s.drop_reason for s in got] == [None, None, "too_many_members"]


def test_truncated_tar_keeps_what_came_before(tmp_path):
    good = corpus.good_samples(4, seed=4)
    path = corpus.write_tar(tmp_path / "a.tar", good)
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        offsets = {m.name: m.offset_data for m in tf}
    cut = offsets[f"{good[2]['key']}.jpg"] + 100  # in the middle of the third image
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    got = samples_of(tmp_path / "cut.tar", "webdataset")
    assert [s.drop_reason for s in got] == [None, None, "bad_input"]
    assert got[2].key == good[2]["key"]
    (tmp_path / "empty.tar").write_bytes(b"")
    got = samples_of(tmp_path / "empty.tar", "webdataset")
    assert [s.drop_reason for s in got] == ["bad_input"]


def test_oversized_pax_header_is_refused_before_it_is_read(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        corpus.add_member(tf, "ok.jpg", corpus.jpeg(1))
        corpus.add_member(tf, "ok.txt", b"a dog")
        info = tarfile.TarInfo("x" * 50)
        info.pax_headers = {"comment": "y" * (2 << 20)}  # a 2 MiB extended header
        tf.addfile(info, io.BytesIO(b""))
    got = list(iter_tar(io.BytesIO(out.getvalue()), "mem.tar", CFG))
    # The sample being read when the archive breaks may miss members: it is dropped with the error.
    assert [(s.key, s.drop_reason) for s in got] == [("ok", "bad_input")]
    assert "extended header" in got[0].detail


def test_skip_returns_placeholders_without_reading(tmp_path):
    good = corpus.good_samples(5, seed=5)
    path = corpus.write_tar(tmp_path / "a.tar", good)
    got = samples_of(path, "webdataset", skip=3)
    assert [s.drop_reason for s in got] == ["skipped"] * 3 + [None, None]
    assert all(s.image is None for s in got[:3])
    assert [s.key for s in got[3:]] == [g["key"] for g in good[3:]]


def test_skipped_ranges_anywhere_in_a_file_are_placeholders_in_every_format(tmp_path):
    """A resume skips complete shards after a gap too: those positions are read past, in every reader."""
    good = corpus.good_samples(7, seed=7)
    captions = [g["caption"] for g in good]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, caption in enumerate(captions):
        (folder / f"im{i}.jpg").write_bytes(corpus.jpeg(i))
        (folder / f"im{i}.txt").write_text(caption)
    images = [corpus.jpeg(i) for i in range(7)]
    pq.write_table(pa.table({"caption": captions, "image": images}), tmp_path / "t.parquet", row_group_size=2)
    with open(tmp_path / "t.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            f.write(json.dumps({"caption": caption, "image": f"images/im{i}.jpg"}) + "\n")
    inputs = {
        "webdataset": corpus.write_tar(tmp_path / "a.tar", good),
        "parquet": tmp_path / "t.parquet",
        "jsonl": tmp_path / "t.jsonl",
        "images": folder,
    }
    skip = Skip([(0, 1), (3, 5)])
    assert [i in skip for i in range(7)] == [True, False, False, True, True, False, False]
    assert skip.covers(3, 5) and not skip.covers(2, 4) and skip.covers(4, 4)
    for fmt, path in inputs.items():
        whole = samples_of(path, fmt)
        got = samples_of(path, fmt, skip=skip)
        assert len(got) == len(whole) == 7, fmt
        assert [s.drop_reason == "skipped" for s in got] == [i in skip for i in range(7)], fmt
        assert all(s.image is None for i, s in enumerate(got) if i in skip), fmt
        kept = [(s.key, s.caption, s.image) for i, s in enumerate(got) if i not in skip]
        assert kept == [(s.key, s.caption, s.image) for i, s in enumerate(whole) if i not in skip], fmt
        assert all(s.drop_reason is None for i, s in enumerate(whole)), fmt


# ---------------------------------------------------------------------------------------------------------------
# Tables and folders
# ---------------------------------------------------------------------------------------------------------------


def test_parquet_with_bytes_paths_and_struct_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "b.jpg").write_bytes(corpus.jpeg(2))
    blobs = pa.table({"caption": ["a dog", None], "image": [corpus.jpeg(1), corpus.jpeg(3)]})
    pq.write_table(blobs, tmp_path / "blobs.parquet")
    got = samples_of(tmp_path / "blobs.parquet", "parquet")
    assert [s.key for s in got] == [f"blobs_{i:09d}" for i in range(2)]
    assert got[0].image == corpus.jpeg(1) and got[0].caption == "a dog"
    assert got[1].caption is None
    # Paths are relative to the parquet's folder.
    captions = ["a cat", "a bird", "a cow", "a fox"]
    paths = pa.table({"caption": captions, "image": ["imgs/b.jpg", "imgs/no.jpg", None, ""]})
    pq.write_table(paths, tmp_path / "t.parquet", row_group_size=2)
    got = samples_of(tmp_path / "t.parquet", "parquet")
    assert got[0].image == corpus.jpeg(2)
    assert [s.image_problem for s in got] == [None, "missing_image", "missing_image", "missing_image"]
    skipped = samples_of(tmp_path / "t.parquet", "parquet", skip=3)
    assert [s.drop_reason for s in skipped] == ["skipped"] * 3 + [None]
    hf = pa.table({"caption": ["a dog"], "image": [{"bytes": corpus.jpeg(4), "path": "x.jpg"}], "key": ["k.1"]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    (s,) = samples_of(tmp_path / "hf.parquet", "parquet")
    assert s.image == corpus.jpeg(4) and s.key == make_key("k.1")


def test_jsonl_rows_bad_lines_and_bounds(tmp_path):
    (tmp_path / "a.jpg").write_bytes(corpus.png(1, 300, 300))
    box = {"start": 2, "end": 5, "box": [0, 0, 1, 1]}
    lines = [
        json.dumps({"caption": "a dog", "image": "a.jpg", "key": "x/1", "id": 7, "url": "u"}),
        "",
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"caption": 5, "image": "a.jpg"}),
        json.dumps({"caption": "a dog", "image": "a.jpg", "annotations": [box]}),
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    got = samples_of(tmp_path / "r.jsonl", "jsonl")
    assert [s.drop_reason for s in got] == [None, "bad_sample", "bad_sample", "bad_sample", None]
    assert got[0].key == make_key("x/1") and got[0].id == 7 and got[0].url == "u"
    assert got[0].image == (tmp_path / "a.jpg").read_bytes()
    assert got[4].annotations == [{"start": 2, "end": 5, "box": [0, 0, 1, 1]}]
    small = InputConfig()
    got = list(iter_samples(InputFile(0, str(tmp_path / "r.jsonl"), "jsonl"), small, 100))
    assert got[0].image is None and got[0].image_problem == "image_too_many_bytes"


def test_image_folder_with_captions_and_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.json").write_text(json.dumps({"id": 1}))  # a sidecar, not a JSONL input
    assert [f.format for f in resolve_inputs([str(tmp_path)])] == ["images"]
    (tmp_path / "b.jpg").write_bytes(corpus.jpeg(1))
    (tmp_path / "b.txt").write_text("a brown dog")
    (tmp_path / "sub" / "a.png").write_bytes(corpus.png(2))
    (tmp_path / "sub" / "a.txt").write_text("a white cat")
    (tmp_path / "sub" / "a.json").write_text(json.dumps({"id": 3, "url": "http://x"}))
    (tmp_path / "c.jpg").write_bytes(corpus.jpeg(3))
    (tmp_path / "notes.md").write_text("not an image")
    got = samples_of(tmp_path, "images")
    assert [s.key for s in got] == ["b", "c", make_key("sub/a")]
    assert [s.caption for s in got] == ["a brown dog", None, "a white cat"]
    assert got[2].id == 3 and got[2].url == "http://x"


def test_remote_filesystems_through_fsspec():
    """The same readers on a non-local fsspec filesystem (in-memory here; s3/gs/http go through the same calls)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "memory://grit-inputs"
    try:
        good = corpus.good_samples(2, seed=7)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for s in good:
                corpus.add_member(tf, f"{s['key']}.jpg", s["image"])
                corpus.add_member(tf, f"{s['key']}.txt", s["caption"].encode())
        fs.pipe(f"{root}/wds/00000.tar", buf.getvalue())
        fs.pipe(f"{root}/tables/img/a.jpg", corpus.jpeg(3))
        fs.pipe(f"{root}/tables/rows.jsonl", (json.dumps({"caption": "a cat", "image": "img/a.jpg"}) + "\n").encode())
        files = resolve_inputs([f"{root}/wds/*.tar", f"{root}/tables/rows.jsonl"])
        assert [(f.path, f.format) for f in files] == [
            ("memory:///grit-inputs/wds/00000.tar", "webdataset"),
            ("memory:///grit-inputs/tables/rows.jsonl", "jsonl"),
        ]
        tar_samples = list(iter_samples(files[0], CFG, MAX_BYTES))
        assert [s.image for s in tar_samples] == [g["image"] for g in good]
        (row,) = list(iter_samples(files[1], CFG, MAX_BYTES))
        assert row.image == corpus.jpeg(3) and row.caption == "a cat"  # relative path resolved on the same filesystem
    finally:
        fs.rm(root, recursive=True)


# ---------------------------------------------------------------------------------------------------------------
# Hostile text and per-row isolation (GRIT_SPEC 3.0)
# ---------------------------------------------------------------------------------------------------------------


def _all_text(sample) -> list[str]:
    texts = [sample.key, sample.source, sample.detail, sample.caption, sample.url]
    texts += [sample.id] if isinstance(sample.id, str) else []
    texts += [json.dumps(sample.annotations, ensure_ascii=False)] if sample.annotations is not None else []
    return [t for t in texts if t is not None]


def assert_valid_utf8(samples) -> None:
    for s in samples:
        for text in _all_text(s):
            text.encode("utf-8")  # raises on a lone surrogate


def test_lone_surrogates_from_json_become_valid_utf8(tmp_path):
    (tmp_path / "a.jpg").write_bytes(corpus.jpeg(1))
    expected = hostile.write_surrogate_jsonl(tmp_path / "s.jsonl", "a.jpg")
    got = samples_of(tmp_path / "s.jsonl", "jsonl")
    assert {s.key: s.drop_reason for s in got} == expected  # every row kept, none lost
    assert_valid_utf8(got)
    assert "\ufffd" in got[0].caption and "\ufffd" in got[0].url and "\ufffd" in got[1].id
    assert "\ufffd" in got[2].annotations[0]["phrase"]
    pa.Table.from_pylist([{"caption": s.caption, "source": s.source} for s in got])  # Arrow accepts them


def test_tar_member_names_and_captions_that_are_not_utf8(tmp_path):
    expected = hostile.write_non_utf8_tar(tmp_path / "n.tar", seed=2)
    got = samples_of(tmp_path / "n.tar", "webdataset")
    assert {s.key: s.drop_reason for s in got} == expected
    assert_valid_utf8(got)
    assert "\ufffd" in got[0].source and got[0].caption.endswith("\ufffdt\ufffd")
    assert all(KEY_PATTERN.fullmatch(s.key) for s in got)


def test_bad_tar_metadata_drops_its_sample_and_the_next_is_read(tmp_path):
    data = hostile.tar_bytes(
        {
            "a.jpg": corpus.jpeg(1), "a.txt": b"a dog", "a.json": b'{"annotations": 5}',
            "b.jpg": corpus.jpeg(2), "b.txt": b"a dog", "b.json": b"[" * 900,
            "c.jpg": corpus.jpeg(3), "c.txt": b"x" * 2000,
            "d.jpg": corpus.jpeg(4), "d.txt": b"a dog",
        }
    )  # fmt: skip
    (tmp_path / "t.tar").write_bytes(data)
    got = samples_of(tmp_path / "t.tar", "webdataset", InputConfig(max_text_bytes=1000))
    assert [(s.key, s.drop_reason) for s in got] == [
        ("a", "bad_sample"),
        ("b", "bad_sample"),
        ("c", "caption_too_long"),
        ("d", None),
    ]
    assert "ValueError" in got[0].detail and "JSONDecodeError" in got[1].detail


def test_parquet_bad_rows_and_a_corrupt_row_group_spare_the_rest(tmp_path):
    expected = hostile.write_hostile_parquet(tmp_path / "h.parquet", seed=3)
    got = samples_of(tmp_path / "h.parquet", "parquet")
    assert {s.key: s.drop_reason for s in got} == expected  # rows after the damage are still read
    assert_valid_utf8(got)
    assert got[0].caption == "a dog \ufffd\ufffd on the beach"
    assert "input.max_text_bytes" in got[1].detail and got[1].caption is None
    assert "row group 1 unreadable" in got[3].detail and "OSError" in got[3].detail
    assert [s.image for s in got[6:]] == [corpus.jpeg(3 + i) for i in range(6, 9)]
    skipped = samples_of(tmp_path / "h.parquet", "parquet", skip=4)
    assert [s.drop_reason for s in skipped] == ["skipped"] * 4 + list(expected.values())[4:]


def test_parquet_oversized_cells_are_refused_before_they_become_python_objects(tmp_path):
    import tracemalloc

    huge = 8 << 20
    table = pa.table(
        {"caption": ["a dog", "x" * huge, "a cat"], "image": [corpus.jpeg(4), b"\0" * huge, corpus.jpeg(6)]}
    )
    pq.write_table(table, tmp_path / "b.parquet", compression="zstd")
    del table
    inp = InputFile(0, str(tmp_path / "b.parquet"), "parquet")
    tracemalloc.start()
    try:
        got = list(iter_samples(inp, InputConfig(max_text_bytes=1000), 1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s.drop_reason for s in got] == [None, "caption_too_long", None]
    assert got[1].image is None and got[2].image == corpus.jpeg(6) and got[0].caption == "a dog"
    # Neither the 8 MiB caption nor the 8 MiB image became a Python object (Arrow's buffers are not traced).
    assert peak < huge // 2, peak


def test_jsonl_over_long_line_and_bad_lines_never_end_the_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(corpus.jpeg(1))
    good = json.dumps({"caption": "a dog", "image": "a.jpg"})
    lines = [good, json.dumps({"caption": "y" * 5000, "image": "a.jpg"}), "[" * 50_000, "\x00\xff garbage", good]
    (tmp_path / "r.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    got = samples_of(tmp_path / "r.jsonl", "jsonl", InputConfig(max_text_bytes=1000, max_member_bytes=20_000))
    assert [s.drop_reason for s in got] == [None, "caption_too_long", "cell_too_large", "bad_sample", None]


def test_image_folder_skips_links_out_fifos_and_loops_without_blocking(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"SECRET-" + corpus.jpeg(9))
    expected = hostile.make_hostile_folder(tmp_path / "f", secret, seed=10)
    done = {}

    def read():
        done["got"] = samples_of(tmp_path / "f", "images")

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert "got" in done, "reading the folder blocked (a FIFO was opened)"
    got = done["got"]
    assert [s.key for s in got] == list(expected)
    assert all(b"SECRET" not in (s.image or b"") for s in got)
    assert got[0].caption.endswith("\ufffd") and got[2].image == corpus.jpeg(10)  # c -> a, inside the folder
    assert got[3].caption is None and got[3].image == corpus.jpeg(12)
    assert_valid_utf8(got)


def test_an_unopenable_file_is_the_only_case_that_raises(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    with pytest.raises(Exception):  # noqa: B017 - the caller turns any of these into one bad_input row
        samples_of(tmp_path / "bad.parquet", "parquet")


def test_a_transient_parquet_read_error_is_retried_and_a_vanished_file_is_the_files_failure(tmp_path, monkeypatch):
    from grit_pipeline.config import GritConfig
    from grit_pipeline.stages import read_file_rows

    table = pa.table({"caption": [f"a dog {i}" for i in range(6)], "image": [corpus.jpeg(i) for i in range(6)]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    real = pq.ParquetFile.iter_batches
    failures = []

    def flaky(self, *args, row_groups=None, **kwargs):
        if row_groups == [1] and not failures:
            failures.append(1)
            on_failure()
            raise OSError("connection reset by peer")
        return real(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", flaky)
    on_failure = lambda: None  # noqa: E731 - a transient error: the file is still there
    got = samples_of(tmp_path / "t.parquet", "parquet")
    assert failures and [s.drop_reason for s in got] == [None] * 6
    assert [s.caption for s in got] == [f"a dog {i}" for i in range(6)]

    failures.clear()
    on_failure = (tmp_path / "t.parquet").unlink  # noqa: E731 - the file is gone: its rest is unknown
    rows = [r for batch in read_file_rows(InputFile(0, str(tmp_path / "t.parquet"), "parquet"), GritConfig())
            for r in batch]  # fmt: skip
    assert [r.get("drop_reason") for r in rows if r["kind"] == "sample"] == [None, None, "bad_input"]
    assert rows[-1]["kind"] == "eof"


def test_a_resume_reads_past_complete_shards_after_a_gap(tmp_path):
    """Shards 0 and 2 of a file are complete, 1 is not: only shard 1's samples are read and sent on."""
    from grit_pipeline.config import GritConfig, load_config
    from grit_pipeline.pipeline import _units
    from grit_pipeline.readers import resolve_inputs
    from grit_pipeline.shard_tracker import ShardTracker
    from grit_pipeline.stages.read import ReadStage

    path = corpus.write_tar(tmp_path / "a.tar", corpus.good_samples(7, seed=3))
    cfg = load_config(GritConfig, None, ["output.samples_per_shard=2"])
    files = resolve_inputs([str(path)])
    tracker = ShardTracker(2, len(files), {(0, 0), (0, 2)})
    units, skip_blocks = _units(files, tracker)
    assert skip_blocks == {(0, 2)} and [(u["skip"], u["skip_blocks"]) for u in units] == [(2, [2])]
    rows = list(ReadStage(cfg).rows(units[0]))
    rows = [getattr(r, "row", r) for r in rows]
    assert [r["position"] for r in rows if r["kind"] == "sample"] == [2, 3, 6]
    assert rows[-1]["kind"] == "eof" and rows[-1]["position"] == 7
