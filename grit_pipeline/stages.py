"""The pipeline's stages as plain callables over Arrow tables, which ``pipeline.py`` maps onto Ray Data.

Every stage takes and returns tables of :data:`WORK_SCHEMA`: one row per input sample (plus one end-of-file marker
row per input file), carried from the reader to the writer. A stage only touches rows still ``pending``; rows dropped
earlier pass through untouched, so the writer sees every input sample exactly once with its fate. Each stage adds its
own seconds per sample (batch time shared evenly) and its counters to the row.

Rule order (GRIT_SPEC 3.1-3.3): caption rules, then image rules, then noun chunks, then grounding. The text stage
runs before the image stage so that decoded pixels never travel through it, so ``no_noun_chunks`` is provisional
until the image stage has checked the image: a bad image is reported as such even when the caption has no chunks.

Nothing here imports Ray, torch or transformers at module level: the detector is built inside the grounding actor.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from grit_pipeline.assemble import build_entries, map_annotations, unique_phrases
from grit_pipeline.config import GritConfig
from grit_pipeline.image import process_image
from grit_pipeline.image_output import stored_image
from grit_pipeline.inputs import InputFile, InputSample, generated_key, iter_samples
from grit_pipeline.record import ENTRY_TYPE, STATUS_DROPPED, STATUS_KEPT
from grit_pipeline.text import Chunk, TextStage

logger = logging.getLogger(__name__)

STATUS_PENDING = "pending"

WORK_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "sample" or "eof" (position = number of samples in the file)
        ("file_index", pa.int32()),
        ("position", pa.int64()),  # index of the sample in its input file
        ("key", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),  # pending -> kept | dropped
        ("drop_reason", pa.string()),
        ("detail", pa.string()),
        ("raw_caption", pa.string()),
        ("caption", pa.string()),
        ("id_json", pa.string()),  # JSON, so an int stays an int and a string a string until the writer
        ("url", pa.string()),
        ("clip_similarity_vitb32", pa.float64()),
        ("clip_similarity_vitl14", pa.float64()),
        ("annotations_json", pa.string()),
        ("image", pa.binary()),
        ("image_problem", pa.string()),
        ("image_ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.binary()),  # the detector's input, uint8 HWC
        ("pixels_shape", pa.list_(pa.int32())),
        ("chunks_json", pa.string()),
        ("noun_chunks", ENTRY_TYPE),
        ("ref_exps", ENTRY_TYPE),
        ("num_chunks_found", pa.int32()),
        ("num_boxes_raw", pa.int32()),
        ("counters_json", pa.string()),
        ("t_read", pa.float64()),
        ("t_text", pa.float64()),
        ("t_decode", pa.float64()),
        ("t_grounding", pa.float64()),
    ]
)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def add_counters(row: dict[str, Any], counts: dict[str, int] | Counter[str]) -> None:
    if not counts:
        return
    merged = Counter(json.loads(row.get("counters_json") or "{}"))
    merged.update({k: v for k, v in counts.items() if v})
    row["counters_json"] = json.dumps(dict(sorted(merged.items())))


def drop_row(row: dict[str, Any], reason: str, detail: str = "") -> None:
    row["status"], row["drop_reason"] = STATUS_DROPPED, reason
    if detail:
        row["detail"] = detail[:500]
    row["image"] = row["pixels"] = row["pixels_shape"] = None


def _share_time(rows: list[dict[str, Any]], column: str, seconds: float) -> None:
    if rows:
        per = seconds / len(rows)
        for row in rows:
            row[column] = (row.get(column) or 0.0) + per


# ---------------------------------------------------------------------------------------------------------------
# Read (Ray tasks)
# ---------------------------------------------------------------------------------------------------------------


def sample_row(inp: InputFile, position: int, sample) -> dict[str, Any]:
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
        add_counters(row, sample.counters)
    if sample.drop_reason is not None:
        drop_row(row, sample.drop_reason, sample.detail)
    return row


def read_file_rows(inp: InputFile, cfg: GritConfig, skip: int = 0) -> Iterator[list[dict[str, Any]]]:
    """Rows of one input file in batches of ``input.resources.batch_size``, then its end-of-file marker row.

    The first ``skip`` samples (in complete shards) are counted for positions but not emitted.
    """
    batch: list[dict[str, Any]] = []
    batch_size = max(1, cfg.input.resources.batch_size)
    position = 0
    samples = iter_samples(inp, cfg.input, cfg.image.max_bytes, skip=skip)
    while True:
        t0 = time.perf_counter()
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
            row = sample_row(inp, position, sample)
            row["t_read"] = time.perf_counter() - t0
            batch.append(row)
            position += 1
            break
        elapsed = time.perf_counter() - t0
        if sample.drop_reason != "skipped":
            row = sample_row(inp, position, sample)
            row["t_read"] = elapsed
            batch.append(row)
        position += 1
        if len(batch) >= batch_size:
            yield batch
            batch = []
    batch.append({"kind": "eof", "file_index": inp.index, "position": position, "status": "eof", "key": ""})
    yield batch


def read_stage(units: pa.Table, cfg: GritConfig) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: each unit row (``index``, ``path``, ``format``, ``skip``) is one file."""
    for unit in units.to_pylist():
        inp = InputFile(index=unit["index"], path=unit["path"], format=unit["format"])
        for rows in read_file_rows(inp, cfg, skip=unit["skip"]):
            yield to_table(rows)


# ---------------------------------------------------------------------------------------------------------------
# Text (actor pool, spaCy loaded once per actor)
# ---------------------------------------------------------------------------------------------------------------


class TextActor:
    """Caption rules, noun chunks, filters and expressions for every pending row."""

    def __init__(self, cfg: GritConfig):
        self.stage = TextStage(cfg.text).setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        live = [r for r in rows if r["kind"] == "sample" and r["status"] == STATUS_PENDING]
        if not live:
            return table
        t0 = time.perf_counter()
        results = self.stage([r["raw_caption"] for r in live])
        for row, res in zip(live, results):
            row["caption"] = res.caption or None
            counts = Counter({"chunks_found": res.num_chunks_found, "chunks_kept": len(res.chunks)})
            for d in res.dropped_chunks:
                counts[f"chunks_filtered_{d.reason}"] += 1
            if res.drop_reason in ("missing_caption", "empty_caption", "caption_too_long"):
                drop_row(row, res.drop_reason)
                continue
            row["num_chunks_found"] = res.num_chunks_found
            add_counters(row, counts)
            row["chunks_json"] = json.dumps([[c.start, c.end, c.text, c.expr_start, c.expr_end] for c in res.chunks])
            if res.drop_reason is not None:
                # Provisional (see the module docstring): the image stage still checks the image first.
                row["status"], row["drop_reason"] = STATUS_DROPPED, res.drop_reason
        _share_time(live, "t_text", time.perf_counter() - t0)
        return to_table(rows)


# ---------------------------------------------------------------------------------------------------------------
# Image (actor pool): checks, decode, re-encode where needed, detector preprocessing
# ---------------------------------------------------------------------------------------------------------------


class ImageActor:
    """Image rules for pending rows (and rows provisionally dropped for ``no_noun_chunks``); detector pixels."""

    def __init__(self, cfg: GritConfig):
        self.cfg = cfg
        self.needs_pixels = cfg.detector.kind != "annotations"
        self.prepare = None
        if self.needs_pixels:
            from grit_pipeline.grounding.preprocess import prepare_image

            self.prepare = prepare_image
        self.detector_size = (cfg.detector.image_short_side, cfg.detector.image_long_side_max)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        for row in rows:
            provisional = row["status"] == STATUS_DROPPED and row["drop_reason"] == "no_noun_chunks"
            if row["kind"] != "sample" or not (row["status"] == STATUS_PENDING or provisional):
                continue
            t0 = time.perf_counter()
            self._one(row, provisional)
            row["t_decode"] = time.perf_counter() - t0
        return to_table(rows)

    def _one(self, row: dict[str, Any], provisional: bool) -> None:
        if row["image"] is None:
            drop_row(row, row.get("image_problem") or "missing_image", row.get("detail") or "")
            return
        want_rgb = self.needs_pixels and not provisional
        result = process_image(row["image"], self.cfg.image, self.detector_size, want_rgb=want_rgb)
        if result.drop_reason is not None:
            drop_row(row, result.drop_reason, result.detail)
            return
        row["width"], row["height"] = result.width, result.height
        if provisional:
            row["image"] = None  # the caption decided: dropped, and dropped rows carry no image
            return
        row["image"], row["image_ext"], counts = stored_image(result, self.cfg.output.image_format)
        add_counters(row, counts)
        if want_rgb:
            pixels = np.ascontiguousarray(self.prepare(result.rgb, self.cfg.detector), dtype=np.uint8)
            row["pixels"], row["pixels_shape"] = pixels.tobytes(), list(pixels.shape)


# ---------------------------------------------------------------------------------------------------------------
# Grounding (actor pool, GPU where there is one)
# ---------------------------------------------------------------------------------------------------------------


def default_detector_factory(cfg: GritConfig):
    from grit_pipeline.grounding import make_detector

    return make_detector(cfg.detector)


class GroundingActor:
    """Detector boxes for every pending row, turned into the record's entries; the last stage before the writer.

    ``detector.fault_after_batches`` (tests only) makes the actor's first incarnation die on the batch after that
    many: Ray restarts the actor and retries the batch, and the job must still complete with every sample.
    """

    def __init__(
        self,
        cfg: GritConfig,
        detector_factory: Callable[[GritConfig], Any] | None = None,
        env: dict[str, str] | None = None,
    ):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bar per actor in the log
        os.environ.update(env or {})  # what the preflight decided (HF_HUB_OFFLINE when the hub is unreachable)
        self.cfg = cfg
        self.detector = (detector_factory or default_detector_factory)(cfg)
        self.detector.setup()
        self.batches = 0
        # A replacement for a crashed actor says so once, in the counters of the first sample it handles (the
        # retried batch): the shard stats then show that a restart happened and the job went on.
        self.restart_to_report = self._reconstructed()

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

    def __call__(self, table: pa.Table) -> pa.Table:
        self.batches += 1
        self._maybe_fault()
        rows = table.to_pylist()
        if self.restart_to_report:
            first = next((r for r in rows if r["kind"] == "sample"), None)
            if first is not None:
                add_counters(first, {"grounding_actor_restarts": 1})
                self.restart_to_report = False
                if not any(r["kind"] == "sample" and r["status"] == STATUS_PENDING for r in rows):
                    return to_table(rows)
        live = [r for r in rows if r["kind"] == "sample" and r["status"] == STATUS_PENDING]
        if not live:
            return table
        t0 = time.perf_counter()
        from grit_pipeline.grounding.detector import GroundingInput

        inputs, prepared = [], []
        for row in live:
            chunks = [Chunk(s, e, t, es, ee) for s, e, t, es, ee in json.loads(row["chunks_json"])]
            phrases, of_chunk = unique_phrases(chunks)
            annotations = None
            if row.get("annotations_json") is not None:
                annotations, counts = map_annotations(
                    row["raw_caption"], row["caption"], chunks, of_chunk, json.loads(row["annotations_json"])
                )
                add_counters(row, counts)
            image = None
            if row.get("pixels") is not None:
                image = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["pixels_shape"])
            inputs.append(GroundingInput(image=image, phrases=phrases, annotations=annotations))
            prepared.append((chunks, of_chunk))
        results = []
        step = max(1, self.cfg.detector.batch_size)
        on_gpu = str(getattr(self.detector, "device", "cpu")).startswith("cuda")
        if self.cfg.detector.deterministic_cpu and not on_gpu:
            step = 1
        for i in range(0, len(inputs), step):
            results.extend(self.detector(inputs[i : i + step]))
        for row, (chunks, of_chunk), result in zip(live, prepared, results):
            noun_chunks, ref_exps, counts = build_entries(chunks, of_chunk, result)
            counts["chunks_kept"] -= counts["chunks_filtered_phrase_too_long"]
            counts["annotations_invalid"] += getattr(result, "invalid_annotations", 0)
            add_counters(row, counts)
            row["num_boxes_raw"] = result.num_boxes_raw
            row["pixels"] = row["pixels_shape"] = None
            if not noun_chunks:
                drop_row(row, "no_grounded_phrase")
                continue
            row["status"], row["noun_chunks"], row["ref_exps"] = STATUS_KEPT, noun_chunks, ref_exps
        _share_time(live, "t_grounding", time.perf_counter() - t0)
        return to_table(rows)
