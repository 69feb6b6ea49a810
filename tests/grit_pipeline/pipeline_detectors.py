"""Small real detectors for pipeline tests (they implement the Detector protocol; no model files needed).

Ray workers import this module by name, so it lives in a plain file on the test path, not inside a test.
"""

from __future__ import annotations

from grit_pipeline.grounding.detector import Detection, GroundingInput, GroundingResult


class PhraseGridDetector:
    """One box per phrase, placed by the phrase's index (deterministic, independent of the batch), score 0.9.

    With ``use_annotations`` the input's annotations are returned instead, as the annotations detector does.
    """

    model_id = "test/phrase-grid"
    random_weights = False

    def __init__(self, use_annotations: bool = False):
        self.use_annotations = use_annotations

    def setup(self) -> None:
        pass

    def __call__(self, batch: list[GroundingInput]) -> list[GroundingResult]:
        out = []
        for item in batch:
            if self.use_annotations and item.annotations is not None:
                dets = [Detection(a["phrase"], tuple(a["box"]), float(a.get("score", 1.0))) for a in item.annotations]
            else:
                dets = []
                for i, _ in enumerate(item.phrases):
                    x = (i % 4) * 0.25
                    dets.append(Detection(i, (x, 0.1, x + 0.2, 0.6), 0.9))
            out.append(GroundingResult(detections=dets, num_boxes_raw=len(dets)))
        return out


def phrase_grid_factory(cfg):
    return PhraseGridDetector(use_annotations=cfg.detector.kind == "annotations")
