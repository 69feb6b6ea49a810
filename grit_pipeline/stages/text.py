"""Text: caption rules, noun chunks, chunk filters and expressions (GRIT_SPEC 3.1, 3.2, 3.4), spaCy per actor.

The rules live in ``grit_pipeline/text.py``; this stage runs them over a batch and records the result on each row.
``no_noun_chunks`` is decided here but the image stage re-checks such rows first (it ``reconsiders`` the reason):
image rules come before noun chunks in GRIT_SPEC order.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from grit_pipeline.config import StageResources
from grit_pipeline.stages.base import Drop, Output, Row, Stage, count
from grit_pipeline.text import TextStage as TextRules  # the rules over a batch of captions

# Caption rules: the sample is dropped before any parse, and nothing about chunks is known.
CAPTION_REASONS = ("missing_caption", "empty_caption", "caption_too_long")


class CaptionStage(Stage):
    name = "text"
    resources = StageResources(actors=1, num_cpus=1, num_gpus=0, batch_size=256)
    loads = ("spacy_model",)

    def setup(self) -> None:
        self.rules = TextRules(self.cfg.text).setup()

    def loaded(self) -> dict[str, Any]:
        meta = self.rules.nlp.meta
        described = {"name": self.cfg.text.spacy_model, "pipeline": f"{meta.get('lang')}_{meta.get('name')}"}
        return {"spacy_model": {**described, "version": meta.get("version")}}

    def process(self, rows: list[Row]) -> Output:
        out = Output()
        for row, res in zip(rows, self.rules([r["raw_caption"] for r in rows])):
            row["caption"] = res.caption or None
            if res.drop_reason in CAPTION_REASONS:
                out.dropped.append(Drop(row, res.drop_reason))
                continue
            counts = Counter({"chunks_found": res.num_chunks_found, "chunks_kept": len(res.chunks)})
            for d in res.dropped_chunks:
                counts[f"chunks_filtered_{d.reason}"] += 1
            count(row, counts)
            row["num_chunks_found"] = res.num_chunks_found
            row["chunks_json"] = json.dumps([[c.start, c.end, c.text, c.expr_start, c.expr_end] for c in res.chunks])
            if res.drop_reason is not None:
                out.dropped.append(Drop(row, res.drop_reason))
            else:
                out.kept.append(row)
        return out
