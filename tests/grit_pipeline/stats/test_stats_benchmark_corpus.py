"""The stats benchmark's synthetic corpus stays a valid grit output: its index has the writer's schema, so a change
to the index format breaks this test, not the benchmark run."""

from __future__ import annotations

import pyarrow.parquet as pq

from benchmarks.stats_report import generate
from grit_core.record import index_schema
from grit_pipeline.stats.corpus import open_corpus


def test_the_benchmark_corpus_has_the_index_schema_and_loads(tmp_path):
    root = generate(tmp_path / "corpus", records=2_000, shards=2)
    files = sorted(root.glob("*.parquet"))
    assert len(files) == 2
    schema = pq.read_schema(files[0])
    assert set(schema.names) == set(index_schema().names)
    corpus = open_corpus(root)
    assert not corpus.problems and len(corpus.index_files()) == 2
    assert sum(pq.read_metadata(p).num_rows for _, p in corpus.index_files()) == 2_000
