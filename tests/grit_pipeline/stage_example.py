"""A stage as a new one would be written: one file, then one entry in ``grit_pipeline.stages.STAGES``.

Tests put it in the plan (in a module Ray workers can import) to check that nothing else needs to change.
"""

from __future__ import annotations

import pyarrow as pa

from grit_pipeline.config import StageResources
from grit_pipeline.stages import Drop, Output, Stage, count


class MarkStage(Stage):
    """A stage added by one list entry: drops captions that mention a dog, counts the words of the others."""

    name = "mark"
    resources = StageResources(actors=1, num_cpus=0.25, num_gpus=0, batch_size=3)
    columns = (pa.field("words", pa.int32()),)

    def process(self, rows):
        out = Output()
        for row in rows:
            words = len((row["caption"] or "").split())
            if "dog" in (row["caption"] or "").lower():
                out.dropped.append(Drop(row, "mentions_dog", "a dog"))
                continue
            row["words"] = words
            count(row, {"mark_words": words})
            out.kept.append(row)
        return out
