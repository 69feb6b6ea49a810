"""Stages onto Ray Data: the one place that converts Arrow, filters pending rows, times, counts and drops.

:func:`add_stage` appends one stage to a dataset: a :class:`~grit_pipeline.stages.base.SourceStage` as Ray tasks
(``flat_map`` style, one unit in, many tables out), any other stage as an actor pool whose actors call ``setup()``
once. For each batch the adapter hands ``process`` only the rows still pending (and those with a reason the stage
``reconsiders``), shares the batch's seconds evenly over them in the stage's ``t_<name>`` column, applies the
drops, merges what each row counted into ``counters_json``, and marks survivors ``kept`` after the last stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from grit_core.record import STATUS_DROPPED, STATUS_KEPT
from grit_pipeline.config import GritConfig
from grit_pipeline.stages.base import (
    STATUS_PENDING,
    WORK_SCHEMA,
    BuildContext,
    Drop,
    Row,
    SourceStage,
    Stage,
    drop_row,
    merge_counts,
    to_table,
    with_fields,
)


def _report(gate, loaded: dict[str, Any], error: str | None = None) -> None:
    """Tell the build's StartGate what this actor's setup loaded (or its error), waiting for it to be recorded: an
    actor that fails must be heard before its failure stops the job."""
    import ray

    with contextlib.suppress(Exception):  # the gate is gone (the build ended): nothing to tell
        ray.get(gate.report.remote(loaded, error), timeout=60)


class StageRunner:
    """One stage instance plus the plumbing around ``process``; what each actor of a pool holds."""

    def __init__(
        self,
        stage_cls: type[Stage],
        cfg: GritConfig,
        context: BuildContext | None = None,
        final: bool = False,
        keep_image_for: tuple[str, ...] = (),
    ):
        self.stage = stage_cls(cfg, context)
        gate = self.stage.context.gate if stage_cls.loads else None
        try:
            self.stage.setup()
        except Exception as exc:
            if gate is not None:
                _report(gate, {}, str(exc))
            raise
        if gate is not None:
            _report(gate, self.stage.loaded())
        self.final = final  # the plan's last stage: rows still pending here are kept
        self.keep_image_for = keep_image_for  # drop reasons a later stage reconsiders (it needs the image)

    def _takes(self, row: Row) -> bool:
        if row["kind"] != "sample":
            return False
        status = row["status"]
        return status == STATUS_PENDING or (status == STATUS_DROPPED and row["drop_reason"] in self.stage.reconsiders)

    def __call__(self, table: pa.Table) -> pa.Table:
        schema = with_fields(table.schema, self.stage.fields())
        rows = table.to_pylist()
        live = [r for r in rows if self._takes(r)]
        if not live:  # nothing for this stage: the table goes on as it came, with this stage's columns (nulls)
            for f in schema:
                if table.schema.get_field_index(f.name) < 0:
                    table = table.append_column(f, pa.nulls(table.num_rows, f.type))
            return table
        t0 = time.perf_counter()
        out = self.stage.process(live)
        seconds = time.perf_counter() - t0
        column, per = self.stage.time_column, seconds / len(live)
        for row in live:
            row[column] = (row.get(column) or 0.0) + per
        for drop in out.dropped:
            drop_row(drop.row, drop.reason, drop.detail, keep_image=drop.reason in self.keep_image_for)
        if self.final:
            for row in out.kept:
                if row["status"] == STATUS_PENDING:
                    row["status"] = STATUS_KEPT
        for row in live:
            merge_counts(row)
        return to_table(rows, schema)

    def read(self, unit: Row) -> Iterator[list[Row]]:
        """Rows of one unit in batches of the stage's ``batch_size``, each timed from the previous one."""
        stage = self.stage
        assert isinstance(stage, SourceStage)
        size = max(1, stage.resources_for(stage.cfg).batch_size or 1)
        batch: list[Row] = []
        t0 = time.perf_counter()
        for item in stage.rows(unit):
            row = item.row if isinstance(item, Drop) else item
            if row["kind"] == "sample":
                row[stage.time_column] = time.perf_counter() - t0
                if isinstance(item, Drop):
                    drop_row(row, item.reason, item.detail, keep_image=item.reason in self.keep_image_for)
                merge_counts(row)
            batch.append(row)
            if len(batch) >= size:
                yield batch
                batch = []
            t0 = time.perf_counter()
        if batch:
            yield batch


def _read_units(units: pa.Table, runner_args: dict[str, Any]) -> Iterator[pa.Table]:
    runner = StageRunner(**runner_args)  # per task: reading has no model to keep between files
    schema = with_fields(WORK_SCHEMA, runner.stage.fields())
    for unit in units.to_pylist():
        for rows in runner.read(unit):
            yield to_table(rows, schema)


def add_stage(
    ds,
    stage_cls: type[Stage],
    cfg: GritConfig,
    context: BuildContext,
    max_tasks: int = 0,
    block_rows: int = 0,
    **runner_args,
):
    """``ds`` with ``stage_cls`` applied, sized by the stage's resources under ``cfg``.

    ``max_tasks`` caps a source stage's concurrent tasks (the number of units); ``num_gpus: -1`` resolves to
    ``context.auto_gpus``. ``block_rows`` (the next step's batch size) caps the rows of each block the stage puts
    out: Ray Data otherwise joins a task's batches into blocks of up to 128 MiB, and one such block goes to one
    actor of the next pool, so a pool of several actors would work on one block at a time.
    """
    import ray

    res = stage_cls.resources_for(cfg)
    args = {"stage_cls": stage_cls, "cfg": cfg, "context": context, **runner_args}
    if issubclass(stage_cls, SourceStage):
        ds = ds.map_batches(
            _read_units,
            fn_kwargs={"runner_args": args},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=res.num_cpus,
            compute=ray.data.TaskPoolStrategy(size=max(1, min(res.actors, max_tasks or res.actors))),
        )
        return _cap_blocks(ds, block_rows)
    num_gpus = context.auto_gpus if res.num_gpus is not None and res.num_gpus < 0 else res.num_gpus
    ds = ds.map_batches(
        type(f"{stage_cls.__name__}Actor", (StageRunner,), {}),
        fn_constructor_kwargs=args,
        batch_size=res.batch_size,
        batch_format="pyarrow",
        num_cpus=res.num_cpus,
        num_gpus=num_gpus or None,
        compute=ray.data.ActorPoolStrategy(size=max(1, res.actors)),
    )
    return _cap_blocks(ds, block_rows)


def _cap_blocks(ds, block_rows: int):
    """Blocks of at most ``block_rows`` rows (0: as they come). A streaming repartition: no barrier, but after an
    actor pool Ray Data fuses it into nothing, so it runs as a task of its own per block (``build_dataset`` cuts
    only before a step of several workers)."""
    if block_rows <= 0:
        return ds
    try:
        return ds.repartition(target_num_rows_per_block=block_rows)
    except TypeError:  # a Ray Data before streaming repartition (2.43): blocks as Ray Data makes them
        return ds
