"""``grit export``: a build's kept records as GRIT-20M-schema parquet, checked against the shards' own records."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_core.record import RECORD_FIELDS
from grit_pipeline.cli import main as grit_main
from tests.grit_pipeline.stats.stats_corpus_factory import make_corpus, read_tar_records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export") / "corpus"
    make_corpus(root, shards=3, inputs_per_shard=20, seed=11, incomplete=True)
    return root


def tar_records(root: Path) -> list[dict]:
    """The kept records as a WebDataset reader sees them, shard by shard (complete shards only)."""
    out = []
    for stats in sorted(root.glob("*_stats.json")):
        records, _ = read_tar_records(root / stats.name.replace("_stats.json", ".tar"))
        out += records
    return out


def test_export_to_one_file_has_grit20m_schema_and_only_kept_records(corpus, tmp_path, capsys):
    dest = tmp_path / "grit.parquet"
    assert grit_main(["export", str(corpus), "--out", str(dest)]) == 0
    printed = capsys.readouterr()
    expected = tar_records(corpus)
    index_rows = sum(pq.read_metadata(corpus / f"{i:05d}.parquet").num_rows for i in range(3))
    assert f"{len(expected):,} kept records of {index_rows:,} input samples (3 shards)" in printed.out
    assert "1 unfinished shard(s) left out: 00003" in printed.err
    table = pq.read_table(dest)
    assert table.schema.names == list(RECORD_FIELDS)
    assert table.schema.field("width").type == pa.int64() and table.schema.field("height").type == pa.int64()
    assert table.schema.field("noun_chunks").type == pa.list_(pa.list_(pa.float64()))
    assert table.num_rows == len(expected) < index_rows
    rows = table.to_pylist()
    # Row for row the tar's records (which leave out absent CLIP similarities; the table has them as null).
    optional = ("clip_similarity_vitb32", "clip_similarity_vitl14")
    assert [{k: v for k, v in row.items() if v is not None or k not in optional} for row in rows] == expected


def test_export_to_a_folder_splits_files(corpus, tmp_path):
    dest = tmp_path / "parts"
    assert grit_main(["export", str(corpus), "--out", str(dest), "--rows-per-file", "7"]) == 0
    files = sorted(dest.glob("*.parquet"))
    n = len(tar_records(corpus))
    assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range((n + 6) // 7)]
    assert [pq.read_metadata(f).num_rows for f in files] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
    keys = [k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]
    assert keys == [r["key"] for r in tar_records(corpus)]
    assert not list(dest.glob("*.tmp"))


def test_export_refuses_what_it_cannot_export(corpus, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"caption": ["a"]}), bare / "a.parquet")
    assert grit_main(["export", str(bare), "--out", str(tmp_path / "o.parquet")]) == 1
    assert "not a grit build output" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert grit_main(["export", str(corpus), "--out", str(busy)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert grit_main(["export", str(corpus), "--out", str(corpus / "grit.parquet")]) == 1
    assert "inside the build output" in capsys.readouterr().err
    assert grit_main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o.parquet")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
    assert json.loads((corpus / "00000_stats.json").read_text())  # the corpus is untouched
