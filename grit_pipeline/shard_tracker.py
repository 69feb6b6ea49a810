"""The driver's whole view of a build: which shards are complete, open (fragments seen) or ready to assemble.

It sees one small row per fragment and one per input file's end (``writer.FRAGMENT_SCHEMA``), never a sample, so
its memory is O(open shards x fragments per shard + complete shards + input files), whatever the number of samples.
Pure Python, no Ray: the benchmark drives it with a synthetic plan of millions of samples.

A shard ``(file, block)`` is ready when its fragments hold ``expected`` samples: ``samples_per_shard``, or for a
file's last block what is left once the file's end (its sample count) is known. With ``output.id_type=auto`` the
corpus's id type is decided by the first shard in input order (its fragments say whether all its ids are
integers); until then no shard is assembled, so every shard of a corpus is written with the same type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class OpenShard:
    fragments: dict[str, int] = field(default_factory=dict)  # path -> samples
    ids_int: bool = True
    bad_input: bool = False
    launched: bool = False
    tried_with: int = 0  # fragments at the last assembly that found the block short

    @property
    def samples(self) -> int:
        return sum(self.fragments.values())


@dataclass
class ReadyShard:
    file_index: int
    block: int
    expected: int
    fragments: list[str]
    last_block: bool
    file_total: int | None


class ShardTracker:
    """Counts fragments per shard and says which shards can be assembled and whether the build is whole."""

    def __init__(
        self,
        samples_per_shard: int,
        num_files: int,
        complete: set[tuple[int, int]] | None = None,
        file_totals: dict[int, int] | None = None,
        id_type: str | None = None,
    ):
        self.n = samples_per_shard
        self.num_files = num_files
        self.complete: set[tuple[int, int]] = set(complete or ())
        self.file_totals: dict[int, int] = dict(file_totals or {})
        self.id_type = id_type  # None: not decided yet (output.id_type=auto)
        self.open: dict[tuple[int, int], OpenShard] = {}
        self.failed: dict[tuple[int, int], str] = {}  # shards that cannot be completed this run, with the reason
        self.samples_seen = 0

    # -- intake ---------------------------------------------------------------------------------------------

    def add(self, row: dict[str, Any]) -> None:
        f = row["file_index"]
        if row["kind"] == "eof":
            self.file_totals[f] = row["samples"]
            return
        key = (f, row["block"])
        if key in self.complete:
            return
        shard = self.open.get(key)
        if shard is None:
            shard = self.open[key] = OpenShard()
        if row["path"] not in shard.fragments:
            shard.fragments[row["path"]] = row["samples"]
            self.samples_seen += row["samples"]
        shard.ids_int = shard.ids_int and bool(row.get("ids_int", True))
        shard.bad_input = shard.bad_input or bool(row.get("bad_input"))

    def expected(self, f: int, block: int) -> int | None:
        total = self.file_totals.get(f)
        if total is None:
            return None
        return max(0, min(self.n, total - block * self.n))

    def blocks_of(self, f: int) -> int | None:
        total = self.file_totals.get(f)
        return None if total is None else -(-total // self.n)

    def _whole(self, key: tuple[int, int], shard: OpenShard) -> bool:
        expected = self.expected(*key)
        return shard.samples >= (self.n if expected is None else expected) and (expected is None or expected > 0)

    # -- the id type (output.id_type=auto) ------------------------------------------------------------------

    def decide_id_type(self, complete_stats: dict[tuple[int, int], dict[str, Any]] | None = None) -> str | None:
        """The corpus's id type once the first shard in input order is known; None while it is not."""
        if self.id_type is not None:
            return self.id_type
        for f in range(self.num_files):
            if self.file_totals.get(f) == 0:
                continue
            key = (f, 0)
            if complete_stats and key in complete_stats and complete_stats[key].get("id_type"):
                self.id_type = complete_stats[key]["id_type"]
                return self.id_type
            shard = self.open.get(key)
            if shard is None or not self._whole(key, shard):
                return None
            self.id_type = "int64" if shard.ids_int else "string"
            return self.id_type
        self.id_type = "int64"  # no samples at all
        return self.id_type

    # -- what to do next ------------------------------------------------------------------------------------

    def ready(self) -> list[ReadyShard]:
        """Shards whose fragments are all in and that are not launched yet (marks them launched)."""
        if self.id_type is None:
            return []
        out = []
        for key, shard in self.open.items():
            if shard.launched or key in self.failed or not self._whole(key, shard):
                continue
            if shard.tried_with and len(shard.fragments) <= shard.tried_with:
                continue
            f, block = key
            expected = self.expected(f, block)
            expected = self.n if expected is None else expected
            total = self.file_totals.get(f)
            last = total is not None and (block + 1) * self.n >= total
            shard.launched = True
            out.append(ReadyShard(f, block, expected, sorted(shard.fragments), last, total if last else None))
        return out

    def done(self, key: tuple[int, int]) -> None:
        self.complete.add(key)
        self.open.pop(key, None)

    def fail(self, key: tuple[int, int], reason: str) -> None:
        self.failed[key] = reason
        shard = self.open.get(key)
        if shard is not None:
            shard.launched = False

    def retry(self, key: tuple[int, int]) -> None:
        """The assembler found the fragments short of the block (overlapping retries): wait for more."""
        shard = self.open.get(key)
        if shard is not None:
            shard.launched = False
            shard.tried_with = len(shard.fragments)  # assembled again once another fragment arrives

    def file_complete(self, f: int) -> bool:
        blocks = self.blocks_of(f)
        return blocks is not None and all((f, b) in self.complete for b in range(blocks))

    @property
    def whole(self) -> bool:
        """Every input file's end is known and every one of its blocks is a complete shard."""
        return all(self.file_complete(f) for f in range(self.num_files))

    def missing(self) -> list[str]:
        """Shards not complete, for the error message (at most a few)."""
        out = []
        for f in range(self.num_files):
            blocks = self.blocks_of(f)
            if blocks is None:
                out.append(f"input file {f} (not read to its end)")
                continue
            out.extend(f"{f:05d}-{b:05d}" for b in range(blocks) if (f, b) not in self.complete)
        return out
