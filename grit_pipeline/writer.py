"""Shard writing on the workers: fragments, then whole shards (GRIT_SPEC 2, docs/format.md, docs/pipeline.md).

A shard is one block of ``output.samples_per_shard`` consecutive samples of one input file, named by its place in
the input, ``<file>-<block>`` (``00003-00012``: file 3 of the resolved input list, samples 12 n .. 13 n - 1), never
by arrival order. Its samples reach the workers in several batches, in any order, possibly on different nodes, so
writing happens in two steps, both on workers, both straight to the output through fsspec:

1. :func:`write_fragments` (a Ray Data stage after grounding) writes each batch's rows, grouped by shard, as
   parquet *fragments* under the build's temporary folder ``OUTPUT/.grit-tmp/<run>/<shard>/``, and passes on only
   one small row per fragment (shard, sample count, path): image bytes never reach the driver.
2. When the driver has seen fragments covering all of a shard's samples, it runs :func:`assemble_shard` as a Ray
   task: read the fragments, check that every position of the block is there, write ``<shard>.tar`` (members in
   input order, fixed metadata: byte-identical across runs), ``<shard>.parquet`` and, last, ``<shard>_stats.json``,
   the completion marker; then delete the fragments.

Fragment names are derived from the positions they hold, so a retried task rewrites the same fragment instead of
adding a second copy. Duplicate keys are resolved inside a shard (first in input order wins, later ones are
dropped as ``duplicate_key``); keys are not compared across shards (docs/format.md).

A shard holding a ``bad_input`` row (its file could not be read from some point on, so its sample count is unknown)
is never marked complete: nothing is written for it and the build ends incomplete.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from grit_core.record import (
    STATUS_DROPPED,
    STATUS_KEPT,
    GritRecord,
    containment_filter,
    index_rows_to_table,
    validate_record,
)
from grit_pipeline.output_store import TMP_ROOT, OutputStore
from grit_pipeline.stages import STAGE_NAMES, TIME_COLUMNS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: shards named <file>-<block>, written by the workers
SHARD_NAME = re.compile(r"^(\d{5,})-(\d{5,})$")
STATS_SUFFIX = "_stats.json"
STAGES = (*STAGE_NAMES, "write")  # the plan's stages, then the sink
# Work-row columns holding a stage's seconds for that sample.
STAGE_TIME_COLUMNS = TIME_COLUMNS
# Work-row columns a fragment keeps (the detector's pixels are not needed any more).
FRAGMENT_COLUMNS = (
    "file_index", "position", "key", "source", "status", "drop_reason", "detail", "caption", "id_json", "url",
    "clip_similarity_vitb32", "clip_similarity_vitl14", "image", "image_ext", "width", "height", "noun_chunks",
    "ref_exps", "num_chunks_found", "num_boxes_raw", "counters_json", "t_read", "t_text", "t_decode", "t_grounding",
)  # fmt: skip
# What the fragment stage passes on: one row per fragment written and one per input file's end.
FRAGMENT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "fragment" or "eof"
        ("file_index", pa.int32()),
        ("block", pa.int64()),  # eof rows: -1
        ("samples", pa.int64()),  # fragment: distinct samples in it; eof: samples in the file
        ("path", pa.string()),  # fragment: path relative to the output
        ("ids_int", pa.bool_()),  # every id in the fragment is an integer (for output.id_type=auto)
        ("bad_input", pa.bool_()),
    ]
)
_INT_ID = re.compile(r"-?\d{1,18}")


class ShardWriteError(RuntimeError):
    """Writing a shard failed (disk full, permissions, ...); no shard was marked complete by the failed write."""


def shard_name(file_index: int, block: int) -> str:
    return f"{file_index:05d}-{block:05d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    m = SHARD_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def run_dir(run_id: str) -> str:
    return f"{TMP_ROOT}/{run_id}"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------------------------------------------


def _id_is_int(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and bool(_INT_ID.fullmatch(value))


def resolve_id_type(requested: str, ids: Iterable[Any]) -> str:
    """``int64`` or ``string`` for the corpus; ``auto`` looks at the given ids (int unless one is not)."""
    if requested in ("int64", "string"):
        return requested
    if requested != "auto":
        raise ValueError(f"output.id_type must be auto, int64 or string, got {requested!r}")
    return "int64" if all(_id_is_int(v) for v in ids) else "string"


def convert_id(value: Any, id_type: str) -> tuple[Any, bool]:
    """The id in the corpus's type, and whether it had to be dropped (a non-integer id in an int64 corpus)."""
    if value is None:
        return None, False
    if id_type == "string":
        return str(value), False
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value, False
    if isinstance(value, str) and _INT_ID.fullmatch(value):
        return int(value), False
    return None, True


# ---------------------------------------------------------------------------------------------------------------
# Step 1: fragments (a Ray Data stage on the workers)
# ---------------------------------------------------------------------------------------------------------------


def fragment_rel(run: str, file_index: int, block: int, positions: list[int]) -> str:
    """A fragment's path, fixed by the positions it holds (a retried batch rewrites the same fragment)."""
    digest = hashlib.sha1(",".join(map(str, positions)).encode()).hexdigest()[:12]
    return f"{run_dir(run)}/{shard_name(file_index, block)}/{positions[0]:09d}-{len(positions)}-{digest}.parquet"


def write_fragments(
    batch: pa.Table, store: OutputStore, run: str, samples_per_shard: int, skip_blocks: frozenset = frozenset()
) -> pa.Table:
    """Ray Data ``map_batches`` function: write the batch's sample rows as per-shard fragments; pass on metadata.

    ``skip_blocks`` holds ``(file, block)`` of shards already complete in the output: their rows are not written.
    """
    n = samples_per_shard
    columns = [c for c in FRAGMENT_COLUMNS if c in batch.column_names]
    groups: dict[tuple[int, int], list[int]] = {}
    out: list[dict[str, Any]] = []
    kinds = batch.column("kind").to_pylist()
    files = batch.column("file_index").to_pylist()
    positions = batch.column("position").to_pylist()
    for i, (kind, f, pos) in enumerate(zip(kinds, files, positions)):
        if kind == "eof":
            out.append({"kind": "eof", "file_index": f, "block": -1, "samples": pos})
            continue
        if (f, pos // n) in skip_blocks:
            continue
        groups.setdefault((f, pos // n), []).append(i)
    for (f, block), rows in sorted(groups.items()):
        part = batch.select(columns).take(pa.array(rows, pa.int64()))
        # Positions once each (a retried read may repeat a sample), sorted.
        seen: dict[int, int] = {}
        for j, pos in enumerate(part.column("position").to_pylist()):
            seen.setdefault(pos, j)
        order = sorted(seen)
        part = part.take(pa.array([seen[p] for p in order], pa.int64()))
        rel = fragment_rel(run, f, block, order)
        sink = io.BytesIO()
        pq.write_table(part, sink, compression="none")  # images are compressed already
        store.write_bytes(rel, sink.getvalue(), tmp_rel=run_dir(run), durable=False)  # temporary: no fsync
        ids = (json.loads(v or "null") for v in part.column("id_json").to_pylist())
        reasons = part.column("drop_reason").to_pylist()
        out.append(
            {
                "kind": "fragment", "file_index": f, "block": block, "samples": len(order), "path": rel,
                "ids_int": all(_id_is_int(v) for v in ids), "bad_input": "bad_input" in reasons,
            }
        )  # fmt: skip
    return pa.Table.from_pylist(out, schema=FRAGMENT_SCHEMA)


# ---------------------------------------------------------------------------------------------------------------
# Step 2: one whole shard (a Ray task on a worker)
# ---------------------------------------------------------------------------------------------------------------


def shard_contents(
    rows: list[dict[str, Any]], id_type: str
) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]], Counter[str], dict[str, float]]:
    """Index rows, tar members, counters and stage seconds of one shard's rows (in input order).

    Pure: the same rows give the same index and members. A key seen earlier in the shard makes a later kept
    sample a ``duplicate_key`` drop.
    """
    counts: Counter[str] = Counter()
    seconds = dict.fromkeys(STAGES, 0.0)
    index_rows: list[dict[str, Any]] = []
    members: list[tuple[str, bytes]] = []
    seen_keys: set[str] = set()
    for row in rows:
        counts["input"] += 1
        for stage, column in STAGE_TIME_COLUMNS.items():
            seconds[stage] += float(row.get(column) or 0.0)
        for k, v in json.loads(row.get("counters_json") or "{}").items():
            counts[k] += v
        key = row["key"]
        if key in seen_keys and row["status"] != STATUS_DROPPED:
            row = {**row, "status": STATUS_DROPPED, "drop_reason": "duplicate_key"}
        seen_keys.add(key)
        ident, lost = convert_id(json.loads(row.get("id_json") or "null"), id_type)
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
            members.append((f"{key}.{row['image_ext']}", row["image"]))
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
    return index_rows, members, counts, seconds


def write_tar(out: BinaryIO, members: list[tuple[str, bytes]]) -> None:
    """A PAX tar of ``members`` with fixed metadata: the same members give the same bytes."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for member_name, content in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(content))


def read_fragments(store: OutputStore, paths: list[str]) -> dict[int, dict[str, Any]]:
    """Rows of a shard's fragments by position (a position in two fragments: the first copy)."""
    rows: dict[int, dict[str, Any]] = {}
    for rel in sorted(paths):
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose first use imports pandas
        # (about 0.3 CPU-s in each worker process that assembles shards and runs nothing else).
        table = pq.ParquetFile(io.BytesIO(store.read_bytes(rel))).read()
        for row in table.to_pylist():
            rows.setdefault(row["position"], row)
    return rows


def assemble_shard(
    store: OutputStore,
    run: str,
    file_index: int,
    block: int,
    samples_per_shard: int,
    expected: int,
    fragments: list[str],
    input_path: str,
    id_type: str,
    last_block: bool,
    file_total: int | None,
) -> dict[str, Any]:
    """Write one shard from its fragments; returns ``{"status": "complete", "stats": ...}``, or ``"missing"``
    (fragments do not cover the block: nothing written) or ``"bad_input"`` (not marked complete, nothing written).
    """
    t0 = time.perf_counter()
    started = _now()
    n = samples_per_shard
    name = shard_name(file_index, block)
    by_position = read_fragments(store, fragments)
    first = block * n
    wanted = range(first, first + expected)
    if len(by_position) != expected or any(p not in by_position for p in wanted):
        return {"status": "missing", "shard": name, "have": len(by_position), "expected": expected}
    rows = [by_position[p] for p in wanted]
    bad = [r for r in rows if r.get("drop_reason") == "bad_input"]
    if bad:
        return {"status": "bad_input", "shard": name, "file": input_path, "detail": bad[0].get("detail") or ""}
    index_rows, members, counts, seconds = shard_contents(rows, id_type)
    if counts["ids_not_integer"]:
        logger.warning(
            "shard %s: %d ids are not integers and were stored as null (output.id_type=%s)",
            name, counts["ids_not_integer"], id_type,
        )  # fmt: skip
    tmp = run_dir(run)
    local_tmp = store.local_tmp_dir(tmp)
    fd, tar_path = tempfile.mkstemp(prefix=f"{name}.", suffix=".tar.part", dir=local_tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            write_tar(f, members)
            f.flush()
            os.fsync(f.fileno())
        store.put_file(tar_path, f"{name}.tar")
    finally:
        if os.path.exists(tar_path):
            os.unlink(tar_path)
    table = index_rows_to_table(index_rows, pa.int64() if id_type == "int64" else pa.string())
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.write_bytes(f"{name}.parquet", sink.getvalue(), tmp_rel=tmp)
    seconds["write"] = time.perf_counter() - t0
    stats = {
        "shard": name,
        "format_version": FORMAT_VERSION,
        "counts": dict(sorted(counts.items())),
        "seconds": {k: round(v, 6) for k, v in seconds.items()},
        "started_at": started,
        "finished_at": _now(),
        "input": {
            "file": input_path,
            "file_index": file_index,
            "block": block,
            "first_sample": first,
            "samples": len(rows),
            "samples_per_shard": n,
            "last_block": last_block,
            "file_samples": file_total if last_block else None,
        },
        "id_type": id_type,
    }
    data = (json.dumps(stats, indent=1) + "\n").encode("utf-8")
    store.write_bytes(f"{name}{STATS_SUFFIX}", data, tmp_rel=tmp)  # last: marks the shard complete
    for rel in fragments:
        with contextlib.suppress(OSError):  # the run's temporary folder goes at the end anyway
            store.delete(rel)
    return {"status": "complete", "shard": name, "stats": stats}


# ---------------------------------------------------------------------------------------------------------------
# The output's complete shards (resume)
# ---------------------------------------------------------------------------------------------------------------


def _valid_stats(data: bytes | None, name: str, samples_per_shard: int) -> dict[str, Any] | None:
    try:
        stats = json.loads(data) if data is not None else None
    except ValueError:
        return None
    if not isinstance(stats, dict) or not isinstance(stats.get("input"), dict):
        return None
    where = stats["input"]
    if parse_shard_name(name) != (where.get("file_index"), where.get("block")):
        return None
    if where.get("samples_per_shard") != samples_per_shard:
        return None
    return stats


def scan_complete(store: OutputStore, samples_per_shard: int) -> dict[tuple[int, int], dict[str, Any]]:
    """Stats of every complete shard in the output (tar, parquet and a valid stats file), by ``(file, block)``.

    Any complete shard counts, wherever it lies: shards are written in any order.
    """
    names = set(store.listdir())
    candidates = sorted(
        n[: -len(STATS_SUFFIX)]
        for n in names
        if n.endswith(STATS_SUFFIX) and parse_shard_name(n[: -len(STATS_SUFFIX)]) is not None
    )
    candidates = [c for c in candidates if f"{c}.tar" in names and f"{c}.parquet" in names]
    got = store.read_many([f"{c}{STATS_SUFFIX}" for c in candidates])
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for c in candidates:
        stats = _valid_stats(got.get(f"{c}{STATS_SUFFIX}"), c, samples_per_shard)
        if stats is not None:
            out[parse_shard_name(c)] = stats
    return out


def stale_runs(store: OutputStore) -> list[str]:
    """Temporary folders of earlier builds of this output (their fragments), to remove once the lease is held."""
    return [f"{TMP_ROOT}/{name}" for name in store.listdir(TMP_ROOT) if re.fullmatch(r"[0-9a-f]{32}", name)]
