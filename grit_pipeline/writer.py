"""Our own shard sink: tar + parquet + ``_stats.json`` per shard, complete or absent (GRIT_SPEC 2, docs/format.md).

Shard assignment is fixed by the input, never by the order in which Ray delivers results: input file ``f`` (in the
global input order) is cut into blocks of ``output.samples_per_shard`` consecutive samples, and the blocks, in
``(file, block)`` order, become shards ``00000``, ``00001``, ... . Samples arrive in any order; each goes to its
block's buffer (kept samples' bytes to a spool file on disk, index rows in memory). Blocks are finalised strictly in
order, so the complete shards of an output are always a prefix ``00000 .. k-1``: resuming means skipping the inputs
those shards cover, and the first-seen-wins rule for duplicate keys gives the same answer on every run.

Finalising a shard writes its tar (members in input order, fixed metadata: byte-identical across runs) and parquet
to temporary names under ``OUTPUT/.tmp``, fsyncs them, renames them into place, and writes ``<shard>_stats.json``
last, the same way. A crash or a failed write (disk full, permissions) at any point leaves at most a tar or parquet
without its stats file, which readers and resume ignore and the next run removes.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import re
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from grit_core.durable import atomic_file, atomic_write_bytes, fsync_dir
from grit_core.record import (
    STATUS_DROPPED,
    STATUS_KEPT,
    GritRecord,
    containment_filter,
    index_rows_to_table,
    validate_record,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TMP_DIR = ".tmp"
SHARD_NAME = re.compile(r"^(\d{5,})$")
STATS_SUFFIX = "_stats.json"
STAGES = ("read", "decode", "text", "grounding", "write")
# Work-row columns holding a stage's seconds for that sample.
STAGE_TIME_COLUMNS = {"read": "t_read", "decode": "t_decode", "text": "t_text", "grounding": "t_grounding"}


class ShardWriteError(RuntimeError):
    """Writing a shard failed (disk full, permissions, ...); no shard was marked complete by the failed write."""


def shard_name(number: int) -> str:
    return f"{number:05d}"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Reading the state of an output folder (resume)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class OutputState:
    """What an output folder already holds: the complete prefix of shards and where the next one starts."""

    shards: list[dict[str, Any]] = field(default_factory=list)  # stats of shards 00000 .. k-1, in order
    next_file: int = 0  # first input file not wholly covered by complete shards
    next_block: int = 0  # first block of ``next_file`` not covered
    seen_keys: set[str] = field(default_factory=set)  # keys of every row (kept or dropped) in complete shards

    @property
    def next_number(self) -> int:
        return len(self.shards)


def read_stats(path: Path) -> dict[str, Any] | None:
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and isinstance(stats.get("input"), dict) else None


def scan_output(out_dir: Path, samples_per_shard: int, load_keys: bool = True) -> OutputState:
    """The complete prefix of shards in ``out_dir`` (each with its tar, parquet and stats) and the resume point.

    A shard after a gap, or whose input position does not follow its predecessor's, is not part of the prefix: it
    will be written again (with the same content, since assignment is deterministic).
    """
    state = OutputState()
    if not out_dir.is_dir():
        return state
    number = 0
    f, b = 0, 0
    while True:
        name = shard_name(number)
        stats = read_stats(out_dir / f"{name}{STATS_SUFFIX}")
        if stats is None or not (out_dir / f"{name}.tar").is_file() or not (out_dir / f"{name}.parquet").is_file():
            break
        where = stats["input"]
        sf, sb = where.get("file_index"), where.get("block")
        # Shards are finalised in input order: the next block of the same file, or block 0 of a later file
        # (the writer only moves on once a file is exhausted).
        follows = isinstance(sf, int) and isinstance(sb, int) and ((sf == f and sb == b) or (sf > f and sb == 0))
        if not follows or where.get("samples_per_shard") != samples_per_shard:
            break
        state.shards.append(stats)
        f, b = (sf + 1, 0) if where.get("last_block") else (sf, sb + 1)
        number += 1
    state.next_file, state.next_block = f, b
    if load_keys:
        for i in range(len(state.shards)):
            keys = pq.read_table(out_dir / f"{shard_name(i)}.parquet", columns=["key"]).column("key").to_pylist()
            state.seen_keys.update(keys)
    return state


def clean_output(out_dir: Path, state: OutputState) -> list[str]:
    """Remove what a crashed run left: the temporary folder and shard files outside the complete prefix that have
    no stats file. Returns the names removed."""
    removed = []
    tmp = out_dir / TMP_DIR
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(TMP_DIR)
    for path in sorted(out_dir.glob("*")):
        stem = path.name.split(".", 1)[0]
        if path.suffix not in (".tar", ".parquet") or not SHARD_NAME.match(stem):
            continue
        if int(stem) >= state.next_number and not (out_dir / f"{stem}{STATS_SUFFIX}").exists():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Buffer:
    """One block being collected: index rows in memory, kept samples' bytes in a spool file."""

    file_index: int
    block: int
    spool_path: Path
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # position -> row (no image bytes)
    spool: Any = None
    spool_size: int = 0
    started_at: str = field(default_factory=_now)

    def append(self, data: bytes) -> tuple[int, int]:
        if self.spool is None:
            self.spool = open(self.spool_path, "wb")  # noqa: SIM115 - lives until the shard is finalised
        offset = self.spool_size
        self.spool.write(data)
        self.spool_size += len(data)
        return offset, len(data)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


def resolve_id_type(requested: str, ids: Iterable[Any]) -> str:
    """``int64`` or ``string`` for the corpus; ``auto`` looks at the first shard's ids (int unless one is not)."""
    if requested in ("int64", "string"):
        return requested
    if requested != "auto":
        raise ValueError(f"output.id_type must be auto, int64 or string, got {requested!r}")
    for value in ids:
        if value is None:
            continue
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not integer and not (isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value)):
            return "string"
    return "int64"


def convert_id(value: Any, id_type: str) -> tuple[Any, bool]:
    """The id in the corpus's type, and whether it had to be dropped (a non-integer id in an int64 corpus)."""
    if value is None:
        return None, False
    if id_type == "string":
        return str(value), False
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value, False
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value):
        return int(value), False
    return None, True


class ShardWriter:
    """Collects pipeline rows and writes complete shards in input order. Not thread-safe; lives on the driver."""

    def __init__(
        self,
        out_dir: str | Path,
        samples_per_shard: int,
        input_paths: list[str],
        state: OutputState,
        id_type: str = "auto",
    ):
        if samples_per_shard < 1:
            raise ValueError("output.samples_per_shard must be at least 1")
        self.out_dir = Path(out_dir)
        self.tmp_dir = self.out_dir / TMP_DIR
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.n = samples_per_shard
        self.input_paths = input_paths
        self.id_type_requested = id_type
        self.id_type: str | None = id_type if id_type in ("int64", "string") else None
        self.seen_keys = state.seen_keys
        self.next_number = state.next_number
        self.cursor = (state.next_file, state.next_block)
        self.buffers: dict[tuple[int, int], _Buffer] = {}
        self.file_totals: dict[int, int] = {}
        self.written: list[dict[str, Any]] = []  # stats of shards written by this run
        self.rows_received = 0

    # -- intake ---------------------------------------------------------------------------------------------

    def add_rows(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take pipeline rows (samples and end-of-file markers); returns stats of shards finalised by them."""
        try:
            for row in rows:
                if row["kind"] == "eof":
                    self.file_totals[row["file_index"]] = row["position"]
                    continue
                self._take(row)
            return self._flush()
        except OSError as exc:
            raise ShardWriteError(self._write_failure(exc)) from exc

    def _take(self, row: dict[str, Any]) -> None:
        f, pos = row["file_index"], row["position"]
        block = pos // self.n
        if (f, block) < self.cursor:
            return  # a retried task re-sent a sample of a shard that is already complete
        buf = self.buffers.get((f, block))
        if buf is None:
            buf = self.buffers[(f, block)] = _Buffer(f, block, self.tmp_dir / f"{f:05d}-{block:05d}.spool")
        if pos in buf.rows:
            return  # the same sample again (task retry): first copy wins; both are identical
        self.rows_received += 1
        meta = {k: v for k, v in row.items() if k not in ("image", "pixels")}
        if row["status"] == STATUS_KEPT:
            meta["image_span"] = buf.append(row["image"])
        buf.rows[pos] = meta

    def _expected(self, f: int, block: int) -> int | None:
        total = self.file_totals.get(f)
        if total is None:
            return None
        return max(0, min(self.n, total - block * self.n))

    def _is_complete(self, f: int, block: int) -> bool:
        buf = self.buffers.get((f, block))
        got = len(buf.rows) if buf else 0
        expected = self._expected(f, block)
        return got == self.n if expected is None else got == expected

    def _flush(self) -> list[dict[str, Any]]:
        done = []
        while True:
            f, block = self.cursor
            if f >= len(self.input_paths):
                break
            expected = self._expected(f, block)
            if expected == 0:  # past the end of file f (or an empty file): next file
                self.cursor = (f + 1, 0)
                continue
            if not self._is_complete(f, block):
                break
            total = self.file_totals.get(f)
            last = total is not None and (block + 1) * self.n >= total
            done.append(self._finalise(self.buffers.pop((f, block)), last_block=last, file_total=total))
            self.cursor = (f + 1, 0) if last else (f, block + 1)
        return done

    # -- finalising one shard ---------------------------------------------------------------------------------

    def _finalise(self, buf: _Buffer, last_block: bool, file_total: int | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        buf.close()
        name = shard_name(self.next_number)
        rows = [buf.rows[p] for p in sorted(buf.rows)]
        if self.id_type is None:
            self.id_type = resolve_id_type(self.id_type_requested, (json.loads(r["id_json"] or "null") for r in rows))
        counts: Counter[str] = Counter()
        seconds = dict.fromkeys(STAGES, 0.0)
        index_rows = []
        members: list[tuple[str, bytes | tuple[int, int]]] = []
        for row in rows:
            counts["input"] += 1
            for stage, column in STAGE_TIME_COLUMNS.items():
                seconds[stage] += float(row.get(column) or 0.0)
            for k, v in json.loads(row.get("counters_json") or "{}").items():
                counts[k] += v
            key = row["key"]
            if key in self.seen_keys and row["status"] != STATUS_DROPPED:
                row = {**row, "status": STATUS_DROPPED, "drop_reason": "duplicate_key"}
                row.update(noun_chunks=None, ref_exps=None, image_ext=None)
            self.seen_keys.add(key)
            ident, lost = convert_id(json.loads(row.get("id_json") or "null"), self.id_type)
            if lost:
                counts["ids_not_integer"] += 1
            index_row = {
                "key": key,
                "clip_similarity_vitb32": row.get("clip_similarity_vitb32"),
                "clip_similarity_vitl14": row.get("clip_similarity_vitl14"),
                "id": ident,
                "url": row.get("url"),
                "caption": row.get("caption") or None,
                "width": row.get("width") or None,
                "height": row.get("height") or None,
                "noun_chunks": row.get("noun_chunks"),
                "ref_exps": row.get("ref_exps"),
                "status": row["status"],
                "drop_reason": row.get("drop_reason"),
                "detail": row.get("detail") if row["status"] != STATUS_KEPT else None,
                "source": row.get("source"),
                "image_ext": row.get("image_ext"),
                "num_chunks_found": row.get("num_chunks_found"),
                "num_boxes_raw": row.get("num_boxes_raw"),
            }
            if row["status"] == STATUS_KEPT:
                record = GritRecord.from_dict(index_row)
                validate_record(record, check_order=True)
                members.append((f"{key}.{row['image_ext']}", row["image_span"]))
                members.append((f"{key}.txt", record.caption.encode("utf-8")))
                members.append((f"{key}.json", record.to_json().encode("utf-8")))
                counts["kept"] += 1
                counts["boxes"] += len(record.noun_chunks)
                counts["ref_exps"] += len(record.ref_exps)
                counts["ref_exps_retained"] += len(containment_filter(record.ref_exps))
            else:
                counts["dropped"] += 1
                counts[f"dropped_{row['drop_reason']}"] += 1
                index_row.update(noun_chunks=None, ref_exps=None, image_ext=None)
            index_rows.append(index_row)
        if counts["ids_not_integer"]:
            logger.warning(
                "shard %s: %d ids are not integers and were stored as null (output.id_type=%s)",
                name, counts["ids_not_integer"], self.id_type,
            )  # fmt: skip
        with atomic_file(self.out_dir / f"{name}.tar", self.tmp_dir) as f:
            self._write_tar(f, buf, members)
        table = index_rows_to_table(index_rows, pa.int64() if self.id_type == "int64" else pa.string())
        with atomic_file(self.out_dir / f"{name}.parquet", self.tmp_dir) as f:
            pq.write_table(table, f)
        buf.spool_path.unlink(missing_ok=True)
        seconds["write"] = time.perf_counter() - t0
        stats = {
            "shard": name,
            "format_version": FORMAT_VERSION,
            "counts": dict(sorted(counts.items())),
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
            "started_at": buf.started_at,
            "finished_at": _now(),
            "input": {
                "file": self.input_paths[buf.file_index],
                "file_index": buf.file_index,
                "block": buf.block,
                "first_sample": buf.block * self.n,
                "samples": len(rows),
                "samples_per_shard": self.n,
                "last_block": last_block,
                "file_samples": file_total if last_block else None,
            },
            "id_type": self.id_type,
        }
        data = (json.dumps(stats, indent=1) + "\n").encode("utf-8")
        atomic_write_bytes(self.out_dir / f"{name}{STATS_SUFFIX}", data, self.tmp_dir)  # last: marks complete
        fsync_dir(self.out_dir)
        self.next_number += 1
        self.written.append(stats)
        return stats

    @staticmethod
    def _write_tar(out: BinaryIO, buf: _Buffer, members: list[tuple[str, bytes | tuple[int, int]]]) -> None:
        spool = open(buf.spool_path, "rb") if buf.spool_size else None  # noqa: SIM115
        try:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for member_name, content in members:
                    if isinstance(content, tuple):
                        spool.seek(content[0])
                        content = spool.read(content[1])
                    info = tarfile.TarInfo(member_name)
                    info.size = len(content)
                    info.mtime = 0  # fixed metadata: the same input gives the same bytes
                    info.mode = 0o644
                    tf.addfile(info, io.BytesIO(content))
        finally:
            if spool is not None:
                spool.close()

    # -- end of the run ---------------------------------------------------------------------------------------

    def pending(self) -> dict[str, int]:
        """Blocks still open (samples collected so far per block), for progress and error messages."""
        return {f"{f:05d}-{b:05d}": len(buf.rows) for (f, b), buf in sorted(self.buffers.items())}

    @property
    def complete(self) -> bool:
        """Whether every input file is wholly covered by complete shards."""
        return self.cursor[0] >= len(self.input_paths)

    def close(self) -> None:
        """End of a complete run: remove the (empty) temporary folder."""
        self.abort()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def abort(self) -> None:
        """Close and delete the spool files (a failed run); complete shards are untouched."""
        for buf in self.buffers.values():
            buf.close()
            buf.spool_path.unlink(missing_ok=True)
        self.buffers.clear()

    def _write_failure(self, exc: OSError) -> str:
        where = getattr(exc, "filename", None) or self.out_dir
        return (
            f"writing shard {shard_name(self.next_number)} to {self.out_dir} failed: {exc.strerror or exc} ({where}). "
            f"No shard was marked complete by the failed write; {self.next_number} complete shard(s) are intact. "
            "Fix the cause (disk space, permissions) and run the same command again to resume."
        )
