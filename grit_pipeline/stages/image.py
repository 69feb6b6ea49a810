"""Decode: image checks, EXIF re-encode, decode and the detector's preprocessing (GRIT_SPEC 3.1), actor pool.

Rows the text stage dropped for ``no_noun_chunks`` come here too: the image rules come first in GRIT_SPEC order, so
a bad image is reported as such even when the caption has no chunks. Such rows are only checked, never decoded for
the detector, and leave without their image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grit_core.record import STATUS_DROPPED
from grit_pipeline.config import StageResources
from grit_pipeline.image import process_image
from grit_pipeline.image_output import stored_image
from grit_pipeline.stages.base import Drop, Output, Row, Stage, count


class DecodeStage(Stage):
    name = "decode"
    resources = StageResources(actors=1, num_cpus=1, num_gpus=0, batch_size=32)
    reconsiders = ("no_noun_chunks",)

    def setup(self) -> None:
        self.needs_pixels = self.cfg.detector.kind != "annotations"
        self.prepare: Any = None
        if self.needs_pixels:
            from grit_pipeline.grounding.preprocess import prepare_image

            self.prepare = prepare_image
        self.detector_size = (self.cfg.detector.image_short_side, self.cfg.detector.image_long_side_max)

    def process(self, rows: list[Row]) -> Output:
        out = Output()
        for row in rows:
            drop = self._one(row, provisional=row["status"] == STATUS_DROPPED)
            if drop is not None:
                out.dropped.append(drop)
            else:
                out.kept.append(row)
        return out

    def _one(self, row: Row, provisional: bool) -> Drop | None:
        if row["image"] is None:
            return Drop(row, row.get("image_problem") or "missing_image", row.get("detail") or "")
        want_rgb = self.needs_pixels and not provisional
        result = process_image(row["image"], self.cfg.image, self.detector_size, want_rgb=want_rgb)
        if result.drop_reason is not None:
            return Drop(row, result.drop_reason, result.detail)
        row["width"], row["height"] = result.width, result.height
        if provisional:
            row["image"] = None  # the caption decided: dropped, and dropped rows carry no image
            return None
        row["image"], row["image_ext"], counts = stored_image(result, self.cfg.output.image_format)
        count(row, counts)
        if want_rgb:
            pixels = np.ascontiguousarray(self.prepare(result.rgb, self.cfg.detector), dtype=np.uint8)
            row["pixels"], row["pixels_shape"] = pixels.tobytes(), list(pixels.shape)
        return None
