"""Read: one input file into work rows, one per sample, then the file's end-of-file row (Ray tasks)."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from typing import Any

from grit_pipeline.config import StageResources
from grit_pipeline.readers import InputFile, InputSample, Skip, generated_key, iter_samples
from grit_pipeline.stages.base import STATUS_PENDING, Drop, Row, SourceStage, count

logger = logging.getLogger(__name__)


def sample_row(inp: InputFile, position: int, sample: InputSample) -> Row | Drop:
    row: dict[str, Any] = {
        "kind": "sample",
        "file_index": inp.index,
        "position": position,
        "key": sample.key,
        "source": sample.source,
        "status": STATUS_PENDING,
        "raw_caption": sample.caption,
        "id_json": json.dumps(sample.id),
        "url": sample.url,
        "clip_similarity_vitb32": sample.clip_similarity_vitb32,
        "clip_similarity_vitl14": sample.clip_similarity_vitl14,
        "annotations_json": json.dumps(sample.annotations) if sample.annotations is not None else None,
        "image": sample.image,
        "image_problem": sample.image_problem,
        "detail": sample.detail or None,
    }
    if sample.counters:
        count(row, sample.counters)
    if sample.drop_reason is not None:
        return Drop(row, sample.drop_reason, sample.detail)
    return row


class ReadStage(SourceStage):
    """Samples of one input file; ``actors`` = files read at once. The first ``skip`` samples and those of the
    ``skip_blocks`` (already in complete shards) keep their positions but are neither read nor emitted."""

    name = "read"
    resources = StageResources(actors=2, num_cpus=0.5, num_gpus=0, batch_size=32)

    def rows(self, unit: Row) -> Iterator[Row | Drop]:
        inp = InputFile(index=unit["index"], path=unit["path"], format=unit["format"])
        position = 0
        n = self.cfg.output.samples_per_shard
        skip = Skip([(0, int(unit.get("skip") or 0))] + [(b * n, (b + 1) * n) for b in unit.get("skip_blocks") or ()])
        samples = iter_samples(inp, self.cfg.input, self.cfg.image.max_bytes, skip=skip)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - an unreadable file is counted, not fatal to the job
                # The file cannot be opened or breaks part-way (corrupt parquet, bad compression): its remaining
                # samples are unknown, so one dropped row stands for them, with the error, at this position.
                detail = f"input unreadable from sample {position} on: {type(exc).__name__}: {exc}"
                logger.warning("%s: %s", inp.path, detail)
                sample = InputSample(
                    key=generated_key(posixpath.basename(inp.path), position), source=inp.path,
                    drop_reason="bad_input", detail=detail,
                )  # fmt: skip
                yield sample_row(inp, position, sample)
                position += 1
                break
            if sample.drop_reason != "skipped":
                yield sample_row(inp, position, sample)
            position += 1
        yield {"kind": "eof", "file_index": inp.index, "position": position, "status": "eof", "key": ""}


def read_file_rows(inp: InputFile, cfg, skip: int = 0) -> Iterator[list[Row]]:
    """One file's work rows in batches, exactly as the build's read tasks produce them (tests, benchmarks)."""
    from grit_pipeline.stages.ray_adapter import StageRunner

    unit = {"index": inp.index, "path": inp.path, "format": inp.format, "skip": skip}
    yield from StageRunner(ReadStage, cfg).read(unit)
