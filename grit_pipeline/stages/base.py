"""The stage contract: what every step of a build declares and does, free of Ray and Arrow.

A stage is a class with a ``name``, its default :class:`~grit_pipeline.config.StageResources`, a ``setup()`` that
loads what it needs once per worker (spaCy, the detector), and a pure ``process(rows)`` over work rows (plain dicts
of :data:`WORK_SCHEMA`): it returns the rows it keeps and the ones it drops, each with its reason. It never touches
Arrow, timing, counters in ``counters_json`` or rows that earlier stages dropped: ``ray_adapter.py`` does that, the
same way for every stage. A stage reports what it counted with :func:`count` on the row, and the adapter merges it.

A :class:`SourceStage` (reading) turns one unit of work (an input file) into rows instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from grit_core.record import ENTRY_TYPE, STATUS_DROPPED
from grit_pipeline.config import GritConfig, StageResources

STATUS_PENDING = "pending"

Row = dict[str, Any]

WORK_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "sample" or "eof" (position = number of samples in the file)
        ("file_index", pa.int32()),
        ("position", pa.int64()),  # index of the sample in its input file
        ("key", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),  # pending -> kept | dropped
        ("drop_reason", pa.string()),
        ("detail", pa.string()),
        ("raw_caption", pa.string()),
        ("caption", pa.string()),
        ("id_json", pa.string()),  # JSON, so an int stays an int and a string a string until the writer
        ("url", pa.string()),
        ("clip_similarity_vitb32", pa.float64()),
        ("clip_similarity_vitl14", pa.float64()),
        ("annotations_json", pa.string()),
        ("image", pa.binary()),
        ("image_problem", pa.string()),
        ("image_ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.binary()),  # the detector's input, uint8 HWC
        ("pixels_shape", pa.list_(pa.int32())),
        ("chunks_json", pa.string()),
        ("noun_chunks", ENTRY_TYPE),
        ("ref_exps", ENTRY_TYPE),
        ("num_chunks_found", pa.int32()),
        ("num_boxes_raw", pa.int32()),
        ("counters_json", pa.string()),
        ("t_read", pa.float64()),
        ("t_text", pa.float64()),
        ("t_decode", pa.float64()),
        ("t_grounding", pa.float64()),
    ]
)

# A row's counts not yet merged into its ``counters_json`` (never part of a table).
_COUNTS = "_counts"


@dataclass
class Drop:
    """A row a stage drops, and why (a ``DROP_REASONS`` name); ``detail`` goes to the index, cut to 500 chars."""

    row: Row
    reason: str
    detail: str = ""


@dataclass
class Output:
    """What ``process`` returns: rows kept (still pending for later stages) and rows dropped."""

    kept: list[Row] = field(default_factory=list)
    dropped: list[Drop] = field(default_factory=list)


@dataclass
class BuildContext:
    """What the driver decided before the plan is built, shared with every stage."""

    detector_factory: Callable[[GritConfig], Any] | None = None
    env: dict[str, str] = field(default_factory=dict)  # environment for the workers (HF_HUB_OFFLINE)
    auto_gpus: float = 0.0  # what ``num_gpus: -1`` means: 1 where the cluster has GPUs, 0 where it has none
    # The build's StartGate actor (embedded local Ray): each actor's setup reports to it what it loaded, or how it
    # failed, and the output is opened once every model is reported (grit_pipeline.plan.StartGate).
    gate: Any = None


def count(row: Row, counts: Mapping[str, int]) -> None:
    """Add ``counts`` to what this row reports (zeros are left out); the adapter merges them once."""
    pending = row.setdefault(_COUNTS, Counter())
    pending.update({k: v for k, v in counts.items() if v})


def merge_counts(row: Row) -> None:
    """Fold the row's reported counts into its ``counters_json``."""
    counts = row.pop(_COUNTS, None)
    if not counts:
        return
    merged = Counter(json.loads(row.get("counters_json") or "{}"))
    merged.update(counts)
    row["counters_json"] = json.dumps(dict(sorted(merged.items())))


def drop_row(row: Row, reason: str, detail: str = "", keep_image: bool = False) -> None:
    """Mark ``row`` dropped; a dropped row carries no image unless a later stage re-checks its reason."""
    row["status"], row["drop_reason"] = STATUS_DROPPED, reason
    if detail:
        row["detail"] = detail[:500]
    row["pixels"] = row["pixels_shape"] = None
    if not keep_image:
        row["image"] = None


def to_table(rows: list[Row], schema: pa.Schema = WORK_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def with_fields(schema: pa.Schema, fields: list[pa.Field]) -> pa.Schema:
    """``schema`` plus those of ``fields`` it lacks, appended in order."""
    for f in fields:
        if schema.get_field_index(f.name) < 0:
            schema = schema.append(f)
    return schema


class Stage:
    """One step of the build. Subclasses set the class attributes and implement ``process``.

    ``reconsiders`` names drop reasons of earlier stages that this stage's rules come before in GRIT_SPEC order:
    such rows reach ``process`` too (status still ``dropped``), keep their image until then, and a drop returned
    for one replaces its reason. (The text stage runs before the image stage so that decoded pixels never travel
    through it, yet image rules precede ``no_noun_chunks``.)
    """

    name: ClassVar[str]
    resources: ClassVar[StageResources]  # declared defaults; ray.stages.<name> overrides field by field
    reconsiders: ClassVar[tuple[str, ...]] = ()
    # Columns this stage adds to the work rows beyond WORK_SCHEMA (its ``t_<name>`` seconds column is added for it).
    columns: ClassVar[tuple[pa.Field, ...]] = ()
    # What the stage's setup loads that the manifest records (keys of ``loaded()``): a model the build cannot run
    # without, whose failure to load refuses the build before the output is touched.
    loads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: GritConfig, context: BuildContext | None = None):
        self.cfg = cfg
        self.context = context or BuildContext()

    @classmethod
    def resources_for(cls, cfg: GritConfig) -> StageResources:
        """The resources this stage runs with under ``cfg``."""
        return cfg.ray.stages.get(cls.name, StageResources()).over(cls.resources)

    @property
    def time_column(self) -> str:
        return f"t_{self.name}"

    @classmethod
    def fields(cls) -> list[pa.Field]:
        """What this stage adds to the row schema (nothing for the stages WORK_SCHEMA already describes)."""
        return [*cls.columns, pa.field(f"t_{cls.name}", pa.float64())]

    def setup(self) -> None:
        """Load models and other state, once per worker, before the first ``process``."""

    def loaded(self) -> dict[str, Any]:
        """After ``setup``: what it loaded, one entry for each name in ``loads`` (the manifest's description)."""
        return {}

    def process(self, rows: list[Row]) -> Output:
        raise NotImplementedError


class SourceStage(Stage):
    """The first stage: turns one unit of work (an input file) into rows, in order, ending with an ``eof`` row.

    ``rows`` yields a row or a :class:`Drop` per sample; the adapter times each one and batches them.
    """

    def rows(self, unit: Row) -> Iterator[Row | Drop]:
        raise NotImplementedError
