"""The detector interface every source of boxes implements.

A detector is set up once per worker (``setup()`` loads weights onto the device), then maps a batch of
:class:`GroundingInput` to one :class:`GroundingResult` per input, in order. Boxes are normalised to [0, 1] by
the size of the image the detector saw; since preprocessing keeps the aspect ratio, they hold for the stored
image too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class GroundingInput:
    """One image and the phrases to ground in it.

    ``image`` is an RGB ``uint8`` array (H, W, 3), already decoded, upright and resized on a CPU worker.
    ``phrases`` are the unique, lower-cased chunk texts of the caption. ``annotations`` carries boxes that came
    with the input (the "annotations" detector): dicts with ``phrase`` (index into ``phrases``), ``box``
    (normalised x1, y1, x2, y2) and optional ``score``.
    """

    image: np.ndarray | None
    phrases: list[str]
    annotations: list[dict[str, Any]] | None = None


@dataclass
class Detection:
    phrase: int  # index into GroundingInput.phrases
    box: tuple[float, float, float, float]  # normalised x1, y1, x2, y2, clipped to [0, 1]
    score: float


@dataclass
class GroundingResult:
    """Final detections of one image (after threshold, NMS, per-phrase cap and minimum side), and counts."""

    detections: list[Detection] = field(default_factory=list)
    num_boxes_raw: int = 0  # boxes over the threshold before NMS
    too_long_phrases: list[int] = field(default_factory=list)  # phrase indices dropped as phrase_too_long
    # Why the image could not be grounded at all ("" when it was): the pipeline counts it as a drop reason.
    error: str = ""
    # Input annotations ignored as malformed (phrase index out of range, box not 4 finite numbers).
    invalid_annotations: int = 0


class Detector(Protocol):
    """What the pipeline needs from a source of boxes."""

    model_id: str
    random_weights: bool  # True when a randomly initialised model stands in for missing weights (known after setup)

    def setup(self) -> None: ...

    def __call__(self, batch: list[GroundingInput]) -> list[GroundingResult]: ...
