"""The build driver's own cost, per sample and per shard, on synthetic plans of up to millions of samples.

The driver of ``grit build`` never sees a sample: the workers write fragments and pass on one metadata row per
fragment (``writer.FRAGMENT_SCHEMA``), and the driver's :class:`ShardTracker` counts them, says which shards are
whole and records each complete shard's stats. This benchmark feeds the tracker exactly what a build of N samples
would send (fragments of ``output.resources.batch_size`` rows, two input files read at once, as Arrow batches that
the driver turns into Python rows, one end-of-file row per file), marks each ready shard complete with a stats dict
of the size real ones have, and measures CPU seconds and peak Python memory (tracemalloc) of that loop.

Target: memory flat in the number of samples (it grows with shards, by the stats kept for the summary, not with
samples) and CPU per sample flat (a few hundred nanoseconds: the cost is per fragment).
"""

from __future__ import annotations

import time
import tracemalloc

SAMPLES_PER_SHARD = 1000
FRAGMENT_ROWS = 64
SAMPLES_PER_FILE = 10_000
PLANS = (100_000, 1_000_000, 3_000_000)
RUN = "0" * 32


def _stats(f: int, b: int) -> dict:
    counts = {f"dropped_{r}": 3 for r in ("bad_image", "no_noun_chunks", "no_grounded_phrase", "image_too_small")}
    counts.update(input=SAMPLES_PER_SHARD, kept=990, dropped=10, boxes=1500, chunks_found=1400, chunks_kept=1300)
    return {
        "shard": f"{f:05d}-{b:05d}",
        "counts": counts,
        "seconds": {"read": 1.0, "decode": 2.0, "text": 3.0, "grounding": 40.0, "write": 0.5},
        "input": {"file_index": f, "block": b, "samples": SAMPLES_PER_SHARD, "last_block": False},
    }


def _plan_batches(samples: int):
    """Metadata batches in a streaming order: files two at a time, fragments interleaved."""
    import pyarrow as pa

    from grit_pipeline.writer import FRAGMENT_SCHEMA

    files = samples // SAMPLES_PER_FILE
    for first in range(0, files, 2):
        pair = [f for f in (first, first + 1) if f < files]
        rows = []
        for start in range(0, SAMPLES_PER_FILE, FRAGMENT_ROWS):
            for f in pair:
                count = min(FRAGMENT_ROWS, SAMPLES_PER_FILE - start)
                # A fragment never spans two shards: split at the shard boundary as write_fragments does.
                pos = start
                while pos < start + count:
                    block = pos // SAMPLES_PER_SHARD
                    end = min(start + count, (block + 1) * SAMPLES_PER_SHARD)
                    path = f".grit-tmp/{RUN}/{f:05d}-{block:05d}/{pos:09d}-{end - pos}-abcdef012345.parquet"
                    rows.append(
                        {"kind": "fragment", "file_index": f, "block": block, "samples": end - pos, "path": path,
                         "ids_int": True, "bad_input": False}
                    )  # fmt: skip
                    pos = end
            if len(rows) >= 16:
                yield pa.Table.from_pylist(rows, schema=FRAGMENT_SCHEMA)
                rows = []
        rows += [{"kind": "eof", "file_index": f, "block": -1, "samples": SAMPLES_PER_FILE} for f in pair]
        yield pa.Table.from_pylist(rows, schema=FRAGMENT_SCHEMA)


def _drive(samples: int) -> dict:
    from grit_pipeline.shard_tracker import ShardTracker

    batches = list(_plan_batches(samples))  # made before measuring: on a cluster they come from the workers
    files = samples // SAMPLES_PER_FILE
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cpu0 = time.process_time()
    tracker = ShardTracker(SAMPLES_PER_SHARD, files)
    written = []
    fragments = 0
    max_open = 0
    for batch in batches:
        for row in batch.to_pylist():
            tracker.add(row)
            fragments += row["kind"] == "fragment"
        tracker.decide_id_type()
        for shard in tracker.ready():
            tracker.done((shard.file_index, shard.block))
            written.append(_stats(shard.file_index, shard.block))
        max_open = max(max_open, len(tracker.open))
    cpu = time.process_time() - cpu0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert tracker.whole and len(written) == samples // SAMPLES_PER_SHARD
    shards = len(written)
    return {
        "samples": samples,
        "shards": shards,
        "fragments": fragments,
        "driver_cpu_s": round(cpu, 4),
        "cpu_ns_per_sample": round(1e9 * cpu / samples, 1),
        "cpu_us_per_shard": round(1e6 * cpu / shards, 2),
        "peak_python_mib": round(peak / 2**20, 3),
        "peak_bytes_per_shard": round(peak / shards, 1),
        "peak_bytes_per_sample": round(peak / samples, 3),
        "max_open_shards": max_open,
    }


def run(device: str) -> dict:
    if device != "cpu":
        raise ValueError("the driver benchmark is pure Python on CPU")
    plans = [_drive(n) for n in PLANS]
    small, big = plans[0], plans[-1]
    return {
        "samples_per_shard": SAMPLES_PER_SHARD,
        "fragment_rows": FRAGMENT_ROWS,
        "samples_per_file": SAMPLES_PER_FILE,
        "plans": plans,
        "cpu_per_sample_ratio_largest_to_smallest": round(big["cpu_ns_per_sample"] / small["cpu_ns_per_sample"], 3),
        "memory_per_shard_ratio_largest_to_smallest": round(
            big["peak_bytes_per_shard"] / small["peak_bytes_per_shard"], 3
        ),
        "note": "Peak memory is Python allocations of the driver's bookkeeping (tracemalloc), the shard stats kept "
        "for the summary included; it scales with shards, not samples. Image bytes never reach the driver.",
    }
