"""Boxes that come with the input (human annotations converted from Flickr30k Entities or RefCOCO style data).

They go through the same writer and statistics as detector boxes, with the rules that make sense for them:

- ``detector.box_threshold`` applies to the annotation's ``score`` (default 1.0, so human boxes always pass);
- boxes are clipped to the image and ``detector.min_box_side`` drops slivers, as for detector boxes;
- no NMS and no per-phrase cap: overlapping human boxes are deliberate ("a man" and "his shirt", or every person
  of "the crowd"), not duplicate predictions. An exact repeat of the same box for the same phrase is dropped.

Malformed annotations (phrase index out of range, box not four finite numbers, score not a number) are skipped and
counted in ``GroundingResult.invalid_annotations``; they never fail the batch.

An input annotation is an object (``{"start", "end", "box", "score"}`` or ``{"phrase": text, ...}``) or one of GRIT's
own entries, ``[start, end, x1, y1, x2, y2, score]`` as the release's ``noun_chunks`` and ``ref_exps`` hold them
(offsets into the input caption, often stored as doubles): :func:`from_grit_entry` turns the latter into the former
before the spans are tied to noun chunks (:func:`grit_pipeline.assemble.map_annotations`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from grit_pipeline.config import DetectorConfig
from grit_pipeline.grounding.detector import Detection, GroundingInput, GroundingResult
from grit_pipeline.grounding.scoring import Candidates, finalize


def from_grit_entry(entry: Any) -> dict[str, Any] | None:
    """A GRIT ``[start, end, x1, y1, x2, y2, score]`` entry as an annotation object, or None when malformed.

    ``start``/``end`` must be whole numbers (GRIT-20M stores them as doubles: ``5.0`` is 5); the box and score are
    checked later, like those of any annotation.
    """
    if not isinstance(entry, (list, tuple)) or len(entry) != 7:
        return None
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in entry):
        return None
    start, end = entry[0], entry[1]
    if not all(math.isfinite(v) and float(v).is_integer() for v in (start, end)):
        return None
    return {"start": int(start), "end": int(end), "box": [float(v) for v in entry[2:6]], "score": float(entry[6])}


class AnnotationDetector:
    """Passes the input's own boxes through threshold, clipping and minimum side (kind ``"annotations"``)."""

    model_id = "annotations"
    random_weights = False

    def __init__(self, cfg: DetectorConfig):
        self.cfg = cfg

    def setup(self) -> None:
        """Nothing to load."""

    def __call__(self, batch: list[GroundingInput]) -> list[GroundingResult]:
        return [self._one(inp) for inp in batch]

    def _one(self, inp: GroundingInput) -> GroundingResult:
        boxes, phrases, scores = [], [], []
        invalid = 0
        seen = set()
        for ann in inp.annotations or []:
            parsed = _parse(ann, len(inp.phrases))
            if parsed is None:
                invalid += 1
                continue
            phrase, box, score = parsed
            if score < self.cfg.box_threshold or (phrase, box) in seen:
                continue
            seen.add((phrase, box))
            boxes.append(box)
            phrases.append(phrase)
            scores.append(score)
        cands = Candidates(
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(phrases, dtype=np.int64),
            np.asarray(scores, dtype=np.float64),
        )
        kept = finalize(cands, nms_iou=None, max_per_phrase=None, min_side=self.cfg.min_box_side)
        detections = [
            Detection(phrase=int(p), box=tuple(float(v) for v in b), score=float(s))
            for b, p, s in zip(kept.boxes, kept.phrases, kept.scores)
        ]
        return GroundingResult(detections=detections, num_boxes_raw=len(cands), invalid_annotations=invalid)


def _parse(ann: Any, num_phrases: int) -> tuple[int, tuple[float, ...], float] | None:
    """(phrase, box, score) of one annotation dict, or None when it is malformed."""
    if not isinstance(ann, dict):
        return None
    phrase = ann.get("phrase")
    if isinstance(phrase, bool) or not isinstance(phrase, (int, np.integer)) or not 0 <= phrase < num_phrases:
        return None
    try:
        box = tuple(float(v) for v in ann.get("box", ()))
        score = float(ann.get("score", 1.0))
    except (TypeError, ValueError):
        return None
    if len(box) != 4 or not all(math.isfinite(v) for v in (*box, score)):
        return None
    return int(phrase), box, score
