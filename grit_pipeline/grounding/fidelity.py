"""How far a fast detector path's boxes are from a reference path's (fp32 eager), image by image.

Two results of the same image are compared detection by detection: a detection of the fast path is paired with
the reference detection of the same phrase it overlaps most (IoU >= ``min_iou``, each reference detection paired
at most once, best scores first). Paired boxes give the coordinate and score differences; unpaired detections on
either side are the kept-set difference. Plain numpy: the benchmark and the tests share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grit_pipeline.grounding.detector import GroundingResult
from grit_pipeline.grounding.scoring import box_iou


@dataclass
class Fidelity:
    paired: int  # detections kept by both paths
    only_reference: int
    only_fast: int
    box_max_abs_diff: float  # normalised coordinates, over paired detections
    score_max_abs_diff: float

    @property
    def kept_set_difference(self) -> float:
        """Unpaired detections over all detections of the reference (0 when neither path kept anything)."""
        total = self.paired + self.only_reference
        return (self.only_reference + self.only_fast) / total if total else float(self.only_fast > 0)

    def as_dict(self) -> dict:
        return {
            "paired": self.paired,
            "only_reference": self.only_reference,
            "only_fast": self.only_fast,
            "box_max_abs_diff": round(self.box_max_abs_diff, 6),
            "score_max_abs_diff": round(self.score_max_abs_diff, 6),
            "kept_set_difference": round(self.kept_set_difference, 6),
        }


def compare_results(
    reference: Sequence[GroundingResult], fast: Sequence[GroundingResult], min_iou: float = 0.5
) -> Fidelity:
    """Pair the detections of two runs over the same images (see the module docstring)."""
    if len(reference) != len(fast):
        raise ValueError(f"{len(reference)} reference results but {len(fast)} fast ones")
    paired = only_ref = only_fast = 0
    box_diff = score_diff = 0.0
    for ref, fst in zip(reference, fast):
        used = np.zeros(len(ref.detections), dtype=bool)
        ref_boxes = np.array([d.box for d in ref.detections], dtype=np.float64).reshape(-1, 4)
        ref_phrases = np.array([d.phrase for d in ref.detections], dtype=np.int64)
        for d in sorted(fst.detections, key=lambda d: -d.score):
            candidates = np.nonzero((ref_phrases == d.phrase) & ~used)[0]
            if len(candidates) == 0:
                only_fast += 1
                continue
            ious = box_iou(np.asarray(d.box, dtype=np.float64), ref_boxes[candidates])
            best = int(np.argmax(ious))
            if ious[best] < min_iou:
                only_fast += 1
                continue
            j = int(candidates[best])
            used[j] = True
            paired += 1
            box_diff = max(box_diff, float(np.abs(ref_boxes[j] - np.asarray(d.box)).max()))
            score_diff = max(score_diff, abs(ref.detections[j].score - d.score))
        only_ref += int((~used).sum())
    return Fidelity(paired, only_ref, only_fast, box_diff, score_diff)
