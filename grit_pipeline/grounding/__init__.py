"""Grounding stage: give every kept noun chunk the boxes a detector finds for it (GRIT_SPEC 3.3).

Importing this package pulls in no Ray, spaCy or webdataset: the GPU benchmark runs it on machines that have
only torch, transformers, numpy and pillow. torch and transformers themselves load only when a Grounding DINO
detector is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from grit_pipeline.config import DetectorConfig
from grit_pipeline.grounding.detector import Detection, Detector, GroundingInput, GroundingResult
from grit_pipeline.grounding.preprocess import prepare_image

if TYPE_CHECKING:
    from grit_pipeline.grounding.grounding_dino import DetectorUnavailable, GroundingDinoDetector

DETECTOR_KINDS = ("grounding_dino", "annotations")


def make_detector(cfg: DetectorConfig) -> Detector:
    """The detector ``cfg.kind`` names; call ``setup()`` on it once per worker before use."""
    if cfg.kind == "grounding_dino":
        from grit_pipeline.grounding.grounding_dino import GroundingDinoDetector

        return GroundingDinoDetector(cfg)
    if cfg.kind == "annotations":
        from grit_pipeline.grounding.annotations import AnnotationDetector

        return AnnotationDetector(cfg)
    raise ValueError(f"detector.kind must be one of {', '.join(DETECTOR_KINDS)}, got {cfg.kind!r}")


def __getattr__(name: str):
    # DetectorUnavailable and GroundingDinoDetector import torch and transformers: load them on first use only.
    if name in ("DetectorUnavailable", "GroundingDinoDetector"):
        from grit_pipeline.grounding import grounding_dino

        return getattr(grounding_dino, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DETECTOR_KINDS",
    "Detection",
    "Detector",
    "DetectorUnavailable",
    "GroundingDinoDetector",
    "GroundingInput",
    "GroundingResult",
    "make_detector",
    "prepare_image",
]
