"""The driver's side of shard assembly: one Ray task per whole shard (``writer.assemble_shard``) launched on the
workers, and their results collected."""

from __future__ import annotations

import contextlib
from typing import Any

from grit_pipeline.config import GritConfig
from grit_pipeline.output_store import OutputStore
from grit_pipeline.shard_tracker import ReadyShard
from grit_pipeline.writer import ShardWriteError, assemble_shard, shard_name


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

    def launch(self, shard: ReadyShard, id_type: str) -> None:
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
        done, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=timeout)
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
        return out

    def cancel(self) -> None:
        import ray

        for ref in list(self.in_flight):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=False)
        self.in_flight.clear()
