"""What a person watching ``grit build`` sees: a progress line every few seconds and a summary table at the end."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

from grit_core.record import DROP_REASONS
from grit_pipeline.writer import STAGES


def merge_stats(stats: Iterable[dict[str, Any]]) -> tuple[Counter[str], dict[str, float]]:
    """Counters and stage seconds of several shards, summed (format.md: counters merge by summing)."""
    counts: Counter[str] = Counter()
    seconds = dict.fromkeys(STAGES, 0.0)
    for s in stats:
        counts.update(s.get("counts") or {})
        for k, v in (s.get("seconds") or {}).items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
    return counts, seconds


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Prints samples/s, counts so far and, where the input's size is known, the total, percentage and ETA, to
    ``stream`` every ``interval_s`` seconds (0: never)."""

    def __init__(
        self,
        interval_s: float,
        resumed_shards: int,
        resumed_samples: int,
        stream: TextIO | None = None,
        total_samples: int | None = None,
    ):
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.last = self.started
        self.resumed_shards = resumed_shards
        self.resumed_samples = resumed_samples
        self.total_samples = total_samples
        self.rows = 0
        self.shards = 0
        self.pending = 0
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self) -> None:
        """Print a line every interval even while no result arrives (a slow detector on CPU), until :meth:`stop`."""
        self.started = self.last = time.monotonic()
        if self.interval_s <= 0 or self._ticker is not None:
            return
        self._ticker = threading.Thread(target=self._tick, name="grit-progress", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s)):
            if time.monotonic() - self.last >= self.interval_s:
                self.last = time.monotonic()
                self.print_line(self.pending)

    def set_total(self, total_samples: int | None) -> None:
        """The input's size in samples, once known (parquet metadata, a resumed build's manifest, every file read)."""
        self.total_samples = total_samples

    def shard_done(self, stats: dict[str, Any]) -> None:
        self.shards += 1
        self.counts.update(stats.get("counts") or {})

    def rows_seen(self, n: int, pending: int) -> None:
        self.rows += n
        self.pending = pending
        now = time.monotonic()
        if self.interval_s > 0 and now - self.last >= self.interval_s:
            self.last = now
            self.print_line(pending)

    def eta(self) -> tuple[int, float, float | None] | None:
        """``(done, percent, seconds left)`` when the total is known (seconds left: None before any rate)."""
        if not self.total_samples:
            return None
        done = min(self.resumed_samples + self.rows, self.total_samples)
        percent = 100.0 * done / self.total_samples
        elapsed = time.monotonic() - self.started
        rate = self.rows / elapsed if elapsed > 0 and self.rows else 0.0
        left = (self.total_samples - done) / rate if rate > 0 else None
        return done, percent, left

    def print_line(self, pending: int = 0) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        c = self.counts
        where = self.eta()
        if where is not None:
            done, percent, left = where
            eta = _fmt_duration(left) if left is not None else "?"
            head = (
                f"{done:,}/{self.total_samples:,} samples ({percent:.1f}%, ETA {eta}) | "
                f"{self.rows} processed this run ({self.rows / elapsed:.1f}/s)"
            )
        else:
            head = f"{self.rows} samples processed ({self.rows / elapsed:.1f}/s)"
        line = (
            f"[grit build {_fmt_duration(elapsed)}] {head} | "
            f"shards complete: {self.shards} this run + {self.resumed_shards} before | "
            f"in complete shards: kept {c.get('kept', 0)}, dropped {c.get('dropped', 0)}, boxes {c.get('boxes', 0)} | "
            f"open blocks: {pending}"
        )
        print(line, file=self.stream, flush=True)


def summary_table(
    counts: Counter[str], seconds: dict[str, float], wall_s: float, shards: int, status: str, warnings: list[str]
) -> str:
    """The final table: input, kept, dropped by reason, chunks, boxes, time per stage."""
    total = counts.get("input", 0)
    lines = [f"grit build: {status}, {shards} shard(s), wall time {_fmt_duration(wall_s)}"]

    def row(label: str, value: float | int, note: str = "") -> None:
        lines.append(f"  {label:<34}{value:>12,}{note}")

    def pct(n: int) -> str:
        return f"  {100.0 * n / total:5.1f}%" if total else ""

    row("input samples", total)
    row("kept", counts.get("kept", 0), pct(counts.get("kept", 0)))
    row("dropped", counts.get("dropped", 0), pct(counts.get("dropped", 0)))
    reasons = [r for r in DROP_REASONS if counts.get(f"dropped_{r}")]
    reasons += sorted(
        k[8:] for k in counts if k.startswith("dropped_") and k[8:] not in DROP_REASONS and counts[k]
    )  # fmt: skip
    for reason in reasons:
        row(f"  {reason}", counts[f"dropped_{reason}"], pct(counts[f"dropped_{reason}"]))
    row("noun chunks found", counts.get("chunks_found", 0))
    for key in sorted(k for k in counts if k.startswith("chunks_filtered_") and counts[k]):
        row(f"  filtered: {key[16:]}", counts[key])
    row("noun chunks kept", counts.get("chunks_kept", 0))
    row("noun chunks grounded", counts.get("chunks_grounded", 0))
    row("boxes over threshold (before NMS)", counts.get("boxes_raw", 0))
    row("boxes written (noun_chunks entries)", counts.get("boxes", 0))
    row("ref_exps retained (containment)", counts.get("ref_exps_retained", 0))
    for key in (
        "images_exif_reencoded",
        "images_converted_png",
        "images_converted_jpeg",
        "ids_not_integer",
        "members_ignored",
        "grounding_actor_restarts",
    ):
        if counts.get(key):
            row(key.replace("_", " "), counts[key])
    for key in ("annotations", "annotations_unmatched", "annotations_invalid"):
        if counts.get(key):
            row(key.replace("_", " "), counts[key])
    lines.append("  time per stage (summed over workers; ms per input sample):")
    for stage in STAGES:
        s = seconds.get(stage, 0.0)
        per = 1000.0 * s / total if total else 0.0
        lines.append(f"    {stage:<12}{s:>10.1f} s {per:>10.2f} ms/sample")
    for warning in warnings:
        lines.append(f"  WARNING: {warning}")
    return "\n".join(lines)
