"""Grounding stage: give every kept noun chunk the boxes a detector finds for it (GRIT_SPEC 3.3).

Importing this package pulls in no Ray, spaCy or webdataset: the GPU benchmark runs it on machines that have
only torch, transformers, numpy and pillow.
"""

from grit_pipeline.grounding.detector import Detection, Detector, GroundingInput, GroundingResult

__all__ = ["Detection", "Detector", "GroundingInput", "GroundingResult"]
