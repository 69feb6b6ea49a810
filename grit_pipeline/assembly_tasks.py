"""The driver's side of shard assembly: one Ray task per whole shard (``writer.assemble_shard``) launched on the
workers, at most ``cluster.assembly_slots`` at once (the rest wait here, in order), and their results collected."""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any

from grit_pipeline.cluster import assembly_slots
from grit_pipeline.config import GritConfig
from grit_pipeline.output_store import OutputStore
from grit_pipeline.shard_tracker import ReadyShard
from grit_pipeline.writer import ShardWriteError, assemble_shard, shard_name

SLOTS_REFRESH_S = 10.0  # how often a build with shards waiting for a slot looks at the cluster's CPUs again


class AssemblyTasks:
    """Launches shard assembly tasks on the workers and collects their results (driver side)."""

    def __init__(self, cfg: GritConfig, store: OutputStore, run: str, paths: list[str]):
        import ray

        opts: dict[str, Any] = {"num_cpus": cfg.output.write_resources().num_cpus, "max_retries": 3}
        if cfg.output.ray_resources:
            opts["resources"] = dict(cfg.output.ray_resources)
        self.remote = ray.remote(**opts)(assemble_shard)
        self.cfg, self.store, self.run, self.paths = cfg, store, run, paths
        self.in_flight: dict[Any, tuple[int, int]] = {}
        self.queued: collections.deque[tuple[ReadyShard, str]] = collections.deque()
        self.max_in_flight = 0
        self._slots_at = -SLOTS_REFRESH_S

    @property
    def pending(self) -> int:
        """Shards launched and not finished: being assembled, or queued for a free slot."""
        return len(self.in_flight) + len(self.queued)

    def launch(self, shard: ReadyShard, id_type: str) -> None:
        self.queued.append((shard, id_type))
        self._submit()

    def _slots(self) -> int:
        """``cluster.assembly_slots`` for the cluster as it is now (re-read every few seconds: a cluster may grow)."""
        if time.monotonic() - self._slots_at >= SLOTS_REFRESH_S:
            import ray

            self.max_in_flight = assembly_slots(self.cfg, float(ray.cluster_resources().get("CPU", 0.0)))
            self._slots_at = time.monotonic()
        return self.max_in_flight

    def _submit(self) -> None:
        while self.queued and len(self.in_flight) < self._slots():
            self._start(*self.queued.popleft())

    def _start(self, shard: ReadyShard, id_type: str) -> None:
        ref = self.remote.remote(
            self.store, self.run, shard.file_index, shard.block, self.cfg.output.samples_per_shard, shard.expected,
            shard.fragments, self.paths[shard.file_index], id_type, shard.last_block, shard.file_total,
        )  # fmt: skip
        self.in_flight[ref] = (shard.file_index, shard.block)

    def finished(self, timeout: float = 0.0) -> list[tuple[tuple[int, int], dict[str, Any]]]:
        """Results of the tasks done within ``timeout`` seconds; a task's error is raised (ShardWriteError)."""
        import ray

        if not self.in_flight:
            return []
        refs = list(self.in_flight)
        # With shards queued, a slot that frees up is filled at once; otherwise wait for all (up to timeout).
        done, rest = ray.wait(refs, num_returns=1 if self.queued else len(refs), timeout=timeout)
        if done and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        out = []
        for ref in done:
            key = self.in_flight.pop(ref)
            try:
                out.append((key, ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None) or exc
                where = getattr(cause, "filename", None) or self.store.url
                text = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[-1]
                raise ShardWriteError(
                    f"writing shard {shard_name(*key)} to {self.store.url} failed: {type(cause).__name__}: {text} "
                    f"({where}). No shard was marked complete by the failed write. Fix the cause (space, "
                    "permissions, credentials) and run the same command again to resume."
                ) from None
        self._submit()
        return out

    def drop_queued(self) -> int:
        """Forget the shards not started yet (a build that stops: they stay incomplete); returns how many."""
        n = len(self.queued)
        self.queued.clear()
        return n

    def cancel(self) -> None:
        import ray

        self.drop_queued()
        for ref in list(self.in_flight):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)
        self.in_flight.clear()
