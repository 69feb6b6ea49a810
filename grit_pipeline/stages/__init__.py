"""The build's stages, in plan order: the one list that the plan, validation, capacity and the summary read.

::

    read (tasks: input file -> rows) -> text (spaCy) -> decode (image checks, detector input) -> grounding (detector)

Each stage is one file here, written to the contract in ``base.py``; ``ray_adapter.py`` maps any of them onto Ray
Data. Every row of :data:`WORK_SCHEMA` is one input sample (plus one end-of-file row per input file), carried from
the reader to the writer: a stage only sees rows still pending, so the writer gets every input sample exactly once
with its fate. Adding a stage: write its file, add its class to :data:`STAGES`.

Nothing here imports Ray, torch or transformers at module level: the detector is built in the grounding actor.
"""

from __future__ import annotations

from grit_pipeline.stages.base import (
    STATUS_PENDING,
    WORK_SCHEMA,
    BuildContext,
    Drop,
    Output,
    Row,
    SourceStage,
    Stage,
    count,
    to_table,
)
from grit_pipeline.stages.grounding import GroundingStage, default_detector_factory
from grit_pipeline.stages.image import DecodeStage
from grit_pipeline.stages.read import ReadStage, read_file_rows
from grit_pipeline.stages.text import CaptionStage

STAGES: tuple[type[Stage], ...] = (ReadStage, CaptionStage, DecodeStage, GroundingStage)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
# Work-row columns holding each stage's seconds for that sample.
TIME_COLUMNS: dict[str, str] = {s.name: f"t_{s.name}" for s in STAGES}

__all__ = [
    "STAGES",
    "STAGE_NAMES",
    "STATUS_PENDING",
    "TIME_COLUMNS",
    "WORK_SCHEMA",
    "BuildContext",
    "DecodeStage",
    "Drop",
    "GroundingStage",
    "Output",
    "ReadStage",
    "Row",
    "SourceStage",
    "Stage",
    "CaptionStage",
    "count",
    "default_detector_factory",
    "read_file_rows",
    "to_table",
]
