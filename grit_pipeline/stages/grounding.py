"""Grounding: detector boxes for each row's chunks, turned into the record's entries (GRIT_SPEC 3.3, 3.4).

The detector is built in ``setup()``, once per actor (on a GPU where the cluster has one). An image the detector
could not handle (``GroundingResult.error``) is dropped as ``detector_error``, with the error type counted, never
as ``no_grounded_phrase``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from typing import Any

import numpy as np

from grit_pipeline.assemble import build_entries, map_annotations, unique_phrases
from grit_pipeline.config import GritConfig, StageResources
from grit_pipeline.stages.base import Drop, Output, Row, Stage, count
from grit_pipeline.text import Chunk


def default_detector_factory(cfg: GritConfig):
    from grit_pipeline.grounding import make_detector

    return make_detector(cfg.detector)


def error_type(error: str) -> str:
    """The exception type an error message starts with (``"RuntimeError: ..."``), else ``other``."""
    name = error.split(":", 1)[0].strip()
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,80}", name) else "other"


class GroundingStage(Stage):
    """``detector.fault_after_batches`` (tests only) makes the actor's first incarnation die on the batch after that
    many: Ray restarts the actor and retries the batch, and the job must still complete with every sample."""

    name = "grounding"
    # num_gpus -1: one GPU per actor where the cluster has GPUs, none (CPU) where it has none.
    resources = StageResources(actors=1, num_cpus=1, num_gpus=-1, batch_size=8)
    loads = ("detector",)

    def setup(self) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bar per actor in the log
        os.environ.update(self.context.env)  # HF_HUB_OFFLINE where the hub is unreachable
        self.detector = (self.context.detector_factory or default_detector_factory)(self.cfg)
        self.detector.setup()
        self.batches = 0
        # A replacement for a crashed actor says so once, in the counters of the first sample it handles (the
        # retried batch): the shard stats then show that a restart happened and the job went on.
        self.restart_to_report = self._reconstructed()

    def loaded(self) -> dict[str, Any]:
        d = self.detector
        return {
            "detector": {
                "kind": self.cfg.detector.kind,
                "model": getattr(d, "model_id", self.cfg.detector.model),
                "random_weights": bool(getattr(d, "random_weights", False)),
                "notes": list(getattr(d, "notes", [])),
            }
        }

    @staticmethod
    def _reconstructed() -> bool:
        import ray

        # Outside a Ray actor (direct use in benchmarks and tests) there is nothing to ask, and asking would start Ray.
        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Ray warns about an API it uses internally
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def _maybe_fault(self) -> None:
        limit = self.cfg.detector.fault_after_batches
        if limit <= 0 or self.batches <= limit or self._reconstructed():
            return
        print(f"grounding actor: injected fault after {limit} batches (detector.fault_after_batches)", flush=True)
        sys.stdout.flush()
        os._exit(1)  # a crash, not a clean exit: Ray must restart the actor and retry the batch

    def process(self, rows: list[Row]) -> Output:
        self.batches += 1
        self._maybe_fault()
        if self.restart_to_report and rows:
            count(rows[0], {"grounding_actor_restarts": 1})
            self.restart_to_report = False
        from grit_pipeline.grounding.detector import GroundingInput

        inputs, prepared = [], []
        for row in rows:
            chunks = [Chunk(s, e, t, es, ee) for s, e, t, es, ee in json.loads(row["chunks_json"])]
            phrases, of_chunk = unique_phrases(chunks)
            annotations = None
            if row.get("annotations_json") is not None:
                annotations, counts = map_annotations(
                    row["raw_caption"], row["caption"], chunks, of_chunk, json.loads(row["annotations_json"])
                )
                count(row, counts)
            image = None
            if row.get("pixels") is not None:
                image = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["pixels_shape"])
            inputs.append(GroundingInput(image=image, phrases=phrases, annotations=annotations))
            prepared.append((chunks, of_chunk))
        results: list[Any] = []
        step = max(1, self.cfg.detector.batch_size)
        on_gpu = str(getattr(self.detector, "device", "cpu")).startswith("cuda")
        if self.cfg.detector.deterministic_cpu and not on_gpu:
            step = 1
        for i in range(0, len(inputs), step):
            results.extend(self.detector(inputs[i : i + step]))
        out = Output()
        for row, (chunks, of_chunk), result in zip(rows, prepared, results):
            row["pixels"] = row["pixels_shape"] = None
            count(row, {"annotations_invalid": getattr(result, "invalid_annotations", 0)})
            error = getattr(result, "error", "")
            if error:
                count(row, {f"detector_errors_{error_type(error)}": 1})
                out.dropped.append(Drop(row, "detector_error", error))
                continue
            noun_chunks, ref_exps, counts = build_entries(chunks, of_chunk, result)
            count(row, counts)
            row["num_boxes_raw"] = result.num_boxes_raw
            if not noun_chunks:
                out.dropped.append(Drop(row, "no_grounded_phrase"))
                continue
            row["noun_chunks"], row["ref_exps"] = noun_chunks, ref_exps
            out.kept.append(row)
        return out
