"""``grit export OUTPUT_DIR --out PATH``: the kept records of a build as GRIT-20M-schema parquet.

A build's ``<shard>.parquet`` index holds every input sample, dropped ones beside kept ones, and our own columns
(``status``, ``source``...). Users who want the release's table get it here: kept rows only, GRIT-20M's columns in
GRIT-20M's order (:data:`~grit_pipeline.record.RECORD_FIELDS`), ``width``/``height`` as int64 like the release,
read from the complete shards (those with their ``_stats.json``) in shard order, streamed batch by batch.

``PATH`` ending in ``.parquet`` is one file; any other ``PATH`` is a folder of ``part-00000.parquet``, ... of at
most ``--rows-per-file`` rows each. Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path


def export_schema(id_type):
    """GRIT-20M's columns and types; ``id`` keeps the corpus's own type (int64 unless its ids are strings)."""
    import pyarrow as pa

    from grit_core.record import ENTRY_TYPE, RECORD_FIELDS

    types = {
        "key": pa.string(),
        "clip_similarity_vitb32": pa.float64(),
        "clip_similarity_vitl14": pa.float64(),
        "id": id_type,
        "url": pa.string(),
        "caption": pa.string(),
        "width": pa.int64(),
        "height": pa.int64(),
        "noun_chunks": ENTRY_TYPE,
        "ref_exps": ENTRY_TYPE,
    }
    return pa.schema([pa.field(name, types[name]) for name in RECORD_FIELDS])


class ExportError(ValueError):
    """The path is not a build output this command can export; the message says why."""


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    rows: int = 0  # kept records written
    index_rows: int = 0  # index rows read (kept and dropped)
    shards: int = 0
    incomplete: list[str] = field(default_factory=list)  # unfinished shards, left out


class _Sink:
    """Parquet files under ``dest``, rolling over every ``rows_per_file`` rows; each renamed into place when done."""

    def __init__(self, dest: Path, schema, rows_per_file: int):
        self.dest, self.schema, self.rows_per_file = dest, schema, rows_per_file
        self.single = dest.suffix == ".parquet"
        self.writer = None
        self.tmp: Path | None = None
        self.in_file = 0
        self.files: list[Path] = []

    def _target(self) -> Path:
        return self.dest if self.single else self.dest / f"part-{len(self.files):05d}.parquet"

    def _open(self) -> None:
        import pyarrow.parquet as pq

        target = self._target()
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = target.with_name(target.name + ".tmp")
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.in_file = 0

    def _close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        target = self._target()
        self.tmp.replace(target)
        self.files.append(target)
        self.writer = None

    def write(self, table) -> None:
        while table.num_rows:
            if self.writer is None:
                self._open()
            room = table.num_rows if self.single else self.rows_per_file - self.in_file
            part, table = table.slice(0, room), table.slice(room)
            self.writer.write_table(part)
            self.in_file += part.num_rows
            if not self.single and self.in_file >= self.rows_per_file:
                self._close()

    def finish(self) -> list[Path]:
        if self.writer is None and not self.files:
            self._open()  # no kept record: still an empty, readable file with the schema
        self._close()
        return self.files


def export_kept(output_dir: str | Path, dest: str | Path, rows_per_file: int = 1_000_000) -> ExportResult:
    """Write the kept records of the build at ``output_dir`` to ``dest`` (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from grit_core.record import RECORD_FIELDS, STATUS_KEPT
    from grit_pipeline.stats.corpus import CorpusError, open_corpus

    try:
        corpus = open_corpus(output_dir)
    except CorpusError as exc:
        raise ExportError(str(exc)) from None
    if corpus.mode != "shards":
        raise ExportError(
            f"{output_dir} is not a grit build output (read as {corpus.mode}): only a build's index holds dropped "
            "rows to leave out"
        )
    if corpus.problems:
        raise ExportError(f"{output_dir}: {corpus.problems[0]}; the export would miss records")
    files = corpus.index_files()
    dest = Path(dest)
    root = Path(output_dir).resolve()
    if dest.resolve() == root or root in dest.resolve().parents:
        # A parquet file beside the shards would read as an unfinished shard to every reader of the output.
        raise ExportError(f"{dest} is inside the build output {output_dir}: write the export elsewhere")
    if dest.suffix != ".parquet" and dest.exists() and any(dest.iterdir()):
        raise ExportError(f"{dest} exists and is not empty: give a new folder or a .parquet file name")
    id_type = None
    for _, path in files:
        id_type = pq.read_schema(path).field("id").type
        break
    schema = export_schema(id_type if id_type is not None and not pa.types.is_null(id_type) else pa.int64())
    result = ExportResult(shards=len(files), incomplete=list(corpus.incomplete))
    sink = _Sink(dest, schema, rows_per_file)
    for _, path in files:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(columns=[*RECORD_FIELDS, "status"], batch_size=65_536):
            result.index_rows += batch.num_rows
            kept = pa.Table.from_batches([batch]).filter(
                pc.fill_null(pc.equal(batch.column("status"), STATUS_KEPT), False)
            )
            kept = kept.select(list(RECORD_FIELDS))
            try:
                kept = kept.cast(schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ExportError(f"{path.name}: its columns do not fit GRIT-20M's schema ({exc})") from None
            result.rows += kept.num_rows
            sink.write(kept)
    result.files = sink.finish()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="a grit build output")
    parser.add_argument(
        "--out", required=True, metavar="PATH", help="a .parquet file, or a new folder for part-NNNNN.parquet files"
    )
    parser.add_argument(
        "--rows-per-file", type=int, default=1_000_000, help="records per file in a folder (default %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    if args.rows_per_file < 1:
        print("grit export: --rows-per-file must be >= 1", file=sys.stderr)
        return 2
    try:
        result = export_kept(args.output_dir, args.out, args.rows_per_file)
    except ExportError as exc:
        print(f"grit export: {exc}", file=sys.stderr)
        return 1
    print(
        f"{result.rows:,} kept records of {result.index_rows:,} input samples ({result.shards} shards) "
        f"in {len(result.files)} file(s)"
    )
    if result.incomplete:
        print(
            f"warning: {len(result.incomplete)} unfinished shard(s) left out: {', '.join(result.incomplete)}",
            file=sys.stderr,
        )
    for path in result.files:
        print(path)
    return 0
