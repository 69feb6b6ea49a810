"""The driver's shard assembly tasks (grit_pipeline.assembly_tasks) on a real Ray: how many run at once, and that
the shards queued for a slot come out the same as shards assembled at once."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from grit_pipeline.assembly_tasks import AssemblyTasks
from grit_pipeline.cluster import assembly_slots
from grit_pipeline.config import GritConfig, load_config
from grit_pipeline.output_store import OutputStore
from grit_pipeline.shard_tracker import ShardTracker
from grit_pipeline.stages import WORK_SCHEMA
from grit_pipeline.writer import assemble_shard, run_dir, write_fragments
from tests.grit_pipeline.test_writer import rows_for


def _config(*overrides: str) -> GritConfig:
    return load_config(GritConfig, None, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "cluster_cpus", "expected"),
    [
        # The pipeline benchmark's plan on the embedded local Ray (sized to the plan, rounded up: 5 CPUs): the
        # pools hold 4, and 1 CPU is 4 writing tasks of 0.25.
        (
            [
                "ray.stages.grounding.actors=2",
                "ray.stages.grounding.num_cpus=1",
                "ray.stages.grounding.num_gpus=0",
                "ray.stages.text.actors=1",
                "ray.stages.decode.actors=1",
            ],
            5,
            4,
        ),
        # docs/cluster.md's worked example on its 64 cores: the pools hold 16 + 1 + 12 = 29 CPUs, and the 35
        # left are 70 writing tasks of 0.5.
        (
            [
                "ray.stages.grounding.actors=8",
                "ray.stages.grounding.num_cpus=2",
                "ray.stages.text.actors=1",
                "ray.stages.text.num_cpus=1",
                "ray.stages.decode.actors=12",
                "ray.stages.decode.num_cpus=1",
                "output.resources.num_cpus=0.5",
            ],
            64,
            70,
        ),
        # The pools hold every CPU (an oversubscribed machine): two, never none.
        ([], 2, 2),
    ],
)
def test_assembly_slots_are_the_writing_tasks_the_pools_leave_room_for(overrides, cluster_cpus, expected):
    assert assembly_slots(_config(*overrides), cluster_cpus) == expected


def test_writing_tasks_that_reserve_no_cpu_are_not_bounded():
    assert assembly_slots(_config("output.resources.num_cpus=0"), 2) >= 1 << 20


def _ready_shards(store: OutputStore, run: str, files: list[int], n: int):
    tracker = ShardTracker(n, len(files), id_type="int64")
    table = pa.Table.from_pylist(rows_for(files), schema=WORK_SCHEMA)
    for row in write_fragments(table, store, run, n).to_pylist():
        tracker.add(row)
    return tracker.ready()


def test_shards_beyond_the_slots_wait_and_come_out_the_same(ray_session, tmp_path, monkeypatch):
    files, n = [9, 7, 5], 2  # 5 + 4 + 3 = 12 shards
    cfg = _config(f"output.samples_per_shard={n}")
    paths = [f"in{i}" for i in range(len(files))]
    # Assembled on the workers, at most two at a time.
    queued = OutputStore(str(tmp_path / "queued"))
    run = uuid.uuid4().hex
    queued.make_dir(run_dir(run))
    monkeypatch.setattr("grit_pipeline.assembly_tasks.assembly_slots", lambda cfg, cpus: 2)
    tasks = AssemblyTasks(cfg, queued, run, paths)
    shards = _ready_shards(queued, run, files, n)
    assert len(shards) == 12
    for shard in shards:
        tasks.launch(shard, "int64")
        assert len(tasks.in_flight) <= 2
    assert tasks.pending == 12 and len(tasks.queued) == 10
    results = {}
    while tasks.pending:
        for key, result in tasks.finished(5.0):
            results[key] = result
        assert len(tasks.in_flight) <= 2
    assert sorted(results) == sorted((s.file_index, s.block) for s in shards)
    assert {r["status"] for r in results.values()} == {"complete"}
    # The same shards assembled in this process, one after the other: the same bytes.
    direct = OutputStore(str(tmp_path / "direct"))
    run2 = uuid.uuid4().hex
    direct.make_dir(run_dir(run2))
    for s in _ready_shards(direct, run2, files, n):
        args = (s.expected, s.fragments, paths[s.file_index], "int64", s.last_block, s.file_total)
        assert assemble_shard(direct, run2, s.file_index, s.block, n, *args)["status"] == "complete"
    names = sorted(p.name for p in (tmp_path / "direct").glob("0*") if not p.name.endswith("_stats.json"))
    assert len(names) == 24
    for name in names:
        assert (tmp_path / "queued" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


def test_a_stopping_build_drops_the_shards_not_started(ray_session, tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path / "out"))
    run = uuid.uuid4().hex
    store.make_dir(run_dir(run))
    monkeypatch.setattr("grit_pipeline.assembly_tasks.assembly_slots", lambda cfg, cpus: 1)
    tasks = AssemblyTasks(_config("output.samples_per_shard=2"), store, run, ["in0"])
    for shard in _ready_shards(store, run, [6], 2):
        tasks.launch(shard, "int64")
    assert tasks.drop_queued() == 2
    while tasks.in_flight:
        tasks.finished(5.0)
    assert tasks.pending == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*_stats.json")) == ["00000-00000_stats.json"]
