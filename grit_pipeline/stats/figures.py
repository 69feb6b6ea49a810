"""Every figure of the report, from one streaming pass over the parquet index plus the ``_stats.json`` counters.

The index is read batch by batch, only the columns the figures need; each batch is reduced with Arrow and
numpy (see :mod:`grit_pipeline.stats.entries`) into fixed-size accumulators, so memory does not grow with the
corpus. Images are not touched here: the pass only picks the gallery's records (a seeded uniform sample).

Definitions the report uses (docs/stats.md explains them for readers):
- a *grounded chunk* is a distinct ``noun_chunks`` span of a record (it may carry several boxes);
- a *box* is a ``noun_chunks`` entry (one per chunk and box), i.e. boxes kept after NMS;
- an *expression* is a distinct ``ref_exps`` span; it is *retained* when the containment filter (GRIT_SPEC 3.6)
  keeps it, which is what a trainer sees.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grit_core.record import CHUNK_DROP_REASONS, DROP_REASONS, STATUS_DROPPED, STATUS_KEPT
from grit_pipeline.stats.accumulators import BottomKSample, CountHistogram, Histogram, TopCounter
from grit_pipeline.stats.corpus import (
    IMG2DATASET_DROP_REASONS,
    IMG2DATASET_SUCCESS,
    Corpus,
    CorpusError,
    parse_time,
    shard_counters,
    shard_seconds,
)
from grit_pipeline.stats.entries import CaptionBytes, flatten_entries, group_spans, head_words, lower, word_counts

FIGURES_VERSION = 1

# Kosmos-2 paper (arXiv 2306.14824), Table 1: the published GRIT figures the report compares against.
GRIT_REFERENCE = {
    "source": "Kosmos-2 paper (arXiv 2306.14824), Table 1",
    "images": 90_614_680,
    "text_spans": 114_978_233,
    "boxes": 137_349_210,
    "spans_per_image": 1.27,
    "boxes_per_image": 1.52,
    "expression_words": 4.7,
}

INDEX_COLUMNS = (
    "key",
    "caption",
    "width",
    "height",
    "noun_chunks",
    "ref_exps",
    "status",
    "drop_reason",
    "image_ext",
    "num_chunks_found",
    "num_boxes_raw",
)
REQUIRED_COLUMNS = ("caption", "width", "height", "noun_chunks", "ref_exps")
GALLERY_COLUMNS = ("key", "caption", "width", "height", "noun_chunks", "ref_exps", "image_ext")


@dataclass
class FigureOptions:
    samples: int = 24  # records picked for the gallery
    seed: int = 0
    batch_size: int = 65_536  # rows per Arrow batch: large enough to amortise per-batch overhead
    top_k: int = 30  # rows shown in each top list
    counter_capacity: int = 50_000  # distinct strings a top counter holds (exact below this)


class FigureAccumulator:
    """Folds index batches into the report's figures; all state is fixed-size except the top counters' cap."""

    def __init__(self, opts: FigureOptions):
        self.opts = opts
        self.rows = 0
        self.status: Counter[str] = Counter()
        self.unknown_status: Counter[str] = Counter()  # rows whose status is neither kept nor dropped
        self.drop_reasons: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.per_input = {"chunks_found": CountHistogram(16, "chunks"), "boxes_raw": CountHistogram(32, "boxes")}
        self.per_image = {
            "grounded_chunks": CountHistogram(16, "chunks"),
            "boxes": CountHistogram(16, "boxes"),
            "expressions": CountHistogram(16, "expressions"),
            "expressions_retained": CountHistogram(16, "expressions"),
        }
        self.box_area = Histogram(np.linspace(0.0, 1.0, 21), "fraction of the image")
        self.box_aspect = Histogram(2.0 ** np.linspace(-4.0, 4.0, 33), "width / height (pixels)", log=True)
        self.box_score = Histogram(np.linspace(0.0, 1.0, 21), "score")
        self.words_all = CountHistogram(32, "words")
        self.words_retained = CountHistogram(32, "words")
        self.width = Histogram(np.arange(0, 2048 + 1, 64), "px")
        self.height = Histogram(np.arange(0, 2048 + 1, 64), "px")
        self.roots = TopCounter(opts.counter_capacity)
        self.expressions = TopCounter(opts.counter_capacity)
        self.sample = BottomKSample(opts.samples, opts.seed)

    def add_batch(self, batch: pa.RecordBatch, shard: str, layout: str = "grit") -> None:
        """Fold one index batch in. ``layout`` (:func:`index_layout`) says what the ``status`` column means."""
        names = set(batch.schema.names)
        n = batch.num_rows
        self.rows += n
        if layout == "records":  # GRIT-20M-style: every row is a record
            self.status[STATUS_KEPT] += n
            kept = batch
        else:
            status = batch.column("status")
            if layout == "img2dataset":
                # A download's row: "success" is a record with its image, any other status is the failure.
                kept_mask = pc.fill_null(pc.equal(status, IMG2DATASET_SUCCESS), False)
                dropped_mask = pc.and_(pc.invert(kept_mask), pc.is_valid(status))
                reasons = pc.filter(status, dropped_mask)
            else:
                kept_mask = pc.fill_null(pc.equal(status, STATUS_KEPT), False)
                dropped_mask = pc.fill_null(pc.equal(status, STATUS_DROPPED), False)
                reasons = pc.filter(batch.column("drop_reason"), dropped_mask) if "drop_reason" in names else None
            n_kept = pc.sum(kept_mask).as_py() or 0
            n_dropped = pc.sum(dropped_mask).as_py() or 0
            self.status[STATUS_KEPT] += n_kept
            self.status[STATUS_DROPPED] += n_dropped
            if reasons is not None:
                self.drop_reasons.update(_value_counts(reasons, "(none)"))
            if n_kept + n_dropped < n:
                other = pc.invert(pc.or_(kept_mask, dropped_mask))
                self.unknown_status.update(_value_counts(pc.filter(status, other), "(null)"))
            kept = batch.filter(kept_mask)
        for name, hist in self.per_input.items():
            column = f"num_{name}"
            if column in names:
                hist.add(batch.column(column).drop_null().to_numpy(zero_copy_only=False))
        if kept.num_rows:
            self._add_kept(kept, shard)

    def _add_kept(self, kept: pa.RecordBatch, shard: str) -> None:
        nk = kept.num_rows
        width = kept.column("width").fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        height = kept.column("height").fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        self.width.add(width)
        self.height.add(height)
        if "image_ext" in kept.schema.names:
            self.formats.update(_value_counts(kept.column("image_ext"), "(none)"))
        captions = CaptionBytes.from_column(kept.column("caption"))

        chunks = flatten_entries(kept.column("noun_chunks"), captions.length)
        self.totals["malformed_entries"] += chunks.malformed
        self.totals["boxes"] += chunks.rec.size
        self.per_image["boxes"].add(np.bincount(chunks.rec, minlength=nk))
        self.box_score.add(chunks.score)
        bw = chunks.box[:, 2] - chunks.box[:, 0]
        bh = chunks.box[:, 3] - chunks.box[:, 1]
        self.box_area.add(bw * bh)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = (bw * width[chunks.rec]) / (bh * height[chunks.rec])
        self.box_aspect.add(np.where(np.isfinite(aspect) & (aspect > 0), aspect, np.nan))
        chunk_spans = group_spans(chunks)
        self.totals["grounded_chunks"] += chunk_spans.rec.size
        self.per_image["grounded_chunks"].add(np.bincount(chunk_spans.rec, minlength=nk))
        self.roots.add(head_words(captions.slice(chunk_spans.rec, chunk_spans.start, chunk_spans.end)))

        refs = flatten_entries(kept.column("ref_exps"), captions.length)
        self.totals["malformed_entries"] += refs.malformed
        spans = group_spans(refs)
        self.totals["ref_entries"] += refs.rec.size
        self.totals["ref_entries_retained"] += int(spans.retained[spans.inverse].sum())
        self.totals["expressions"] += spans.rec.size
        self.totals["expressions_retained"] += int(spans.retained.sum())
        self.per_image["expressions"].add(np.bincount(spans.rec, minlength=nk))
        self.per_image["expressions_retained"].add(np.bincount(spans.rec[spans.retained], minlength=nk))
        texts = captions.slice(spans.rec, spans.start, spans.end)
        words = word_counts(texts)
        self.words_all.add(words)
        self.words_retained.add(words[spans.retained])
        self.expressions.add(lower(texts.filter(pa.array(spans.retained))))

        idx, priority = self.sample.offer(nk)
        if idx.size:
            columns = [c for c in GALLERY_COLUMNS if c in kept.schema.names]
            rows = kept.select(columns).take(pa.array(idx)).to_pylist()
            for row in rows:
                row["shard"] = shard
            self.sample.add(priority, rows)


def _value_counts(column: pa.Array | pa.ChunkedArray, null_label: str) -> dict[str, int]:
    if len(column) == 0:
        return {}
    vc = pc.value_counts(column)
    return {
        (null_label if v is None else str(v)): c
        for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())
    }


def _sum_counters(dicts: list[Any]) -> dict[str, float]:
    total: dict[str, float] = {}
    for d in dicts:
        if not isinstance(d, dict):
            continue
        for k, v in d.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def index_layout(schema_names: set[str]) -> str:
    """What a parquet file's rows are: ``records`` (no ``status``: every row a GRIT-20M-style record),
    ``img2dataset`` (img2dataset's ``status`` and ``error_message``, no ``drop_reason``) or ``grit`` (our index)."""
    if "status" not in schema_names:
        return "records"
    if "error_message" in schema_names and "drop_reason" not in schema_names:
        return "img2dataset"
    return "grit"


def compute_figures(corpus: Corpus, opts: FigureOptions | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One pass over the corpus: ``(figures, gallery rows)``. Figures are plain JSON-ready data.

    Raises :class:`CorpusError` when index files exist but none of them could be read as GRIT records: a report
    of zero records would be a wrong figure, not a finding.
    """
    opts = opts or FigureOptions()
    acc = FigureAccumulator(opts)
    warnings = list(corpus.problems)
    files = corpus.index_files()
    used = 0
    layouts: Counter[str] = Counter()
    for shard, path in files:
        try:
            pf = pq.ParquetFile(path)
            present = set(pf.schema_arrow.names)
            missing = [c for c in REQUIRED_COLUMNS if c not in present]
            if missing:
                warnings.append(f"{path.name}: no column {missing[0]!r}; file left out of the figures")
                continue
            layout = index_layout(present)
            columns = [c for c in INDEX_COLUMNS if c in present]
            for batch in pf.iter_batches(batch_size=opts.batch_size, columns=columns):
                acc.add_batch(batch, shard, layout)
            used += 1
            layouts[layout] += 1
        except (OSError, pa.ArrowException) as exc:
            warnings.append(f"{path.name}: unreadable parquet ({exc}); file left out of the figures")
    if files and not used:
        hint = (
            " (an img2dataset download of GRIT-20M keeps them with --save_additional_columns "
            '\'["id","noun_chunks","ref_exps","clip_similarity_vitb32","clip_similarity_vitl14"]\')'
            if corpus.mode == "img2dataset"
            else ""
        )
        raise CorpusError(
            f"none of the {len(files)} parquet file(s) under {corpus.root} could be read as GRIT records: "
            f"{warnings[-1]}; the records need the columns {', '.join(REQUIRED_COLUMNS)}{hint}"
        )
    if corpus.mode == "img2dataset" and layouts.get("img2dataset", 0) < used:
        warnings.append("some parquet files of this img2dataset download have no img2dataset status column")
    counters = _sum_counters([shard_counters(s, corpus.mode) for s in corpus.shards])
    figures = _assemble(corpus, acc, counters, warnings)
    return figures, acc.sample.sample()


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _assemble(corpus: Corpus, acc: FigureAccumulator, counters: dict[str, float], warnings: list[str]) -> dict:
    t = acc.totals
    kept = acc.status.get(STATUS_KEPT, 0)
    reasons = _drop_reasons(corpus)
    known = [r for r in reasons if acc.drop_reasons.get(r)]
    unknown = sorted(r for r in acc.drop_reasons if r not in reasons)
    if unknown:
        warnings.append(f"drop reasons not in the format: {', '.join(unknown)}")
    if acc.unknown_status:
        values = ", ".join(f"{v!r} ({n})" for v, n in acc.unknown_status.most_common())
        warnings.append(
            f"{sum(acc.unknown_status.values())} index rows have a status that is neither kept nor dropped: "
            f"{values}; they count as input pairs only"
        )
    if t["malformed_entries"]:
        warnings.append(f"{t['malformed_entries']} noun_chunks/ref_exps entries break the format and were skipped")
    has_counters = corpus.mode != "parquet" and bool(counters)
    boxes_raw_index = acc.per_input["boxes_raw"].total if acc.per_input["boxes_raw"].n else None
    chunks_found_index = acc.per_input["chunks_found"].total if acc.per_input["chunks_found"].n else None
    figures: dict[str, Any] = {
        "format_version": FIGURES_VERSION,
        "source": _source(corpus),
        "samples": {
            "input": acc.rows,
            "kept": kept,
            "dropped": acc.status.get(STATUS_DROPPED, 0),
            "drop_reasons": {r: acc.drop_reasons[r] for r in known + unknown},
        },
        "chunks": {
            "found": counters.get("chunks_found", chunks_found_index),
            "kept": counters.get("chunks_kept"),
            "filtered": {r: counters.get(f"chunks_filtered_{r}", 0) for r in CHUNK_DROP_REASONS}
            if has_counters and corpus.mode == "shards"
            else {},
            "grounded": t["grounded_chunks"],
        },
        "boxes": {"before_nms": counters.get("boxes_raw", boxes_raw_index), "after_nms": t["boxes"]},
        "expressions": {
            "entries": t["ref_entries"],
            "entries_retained": t["ref_entries_retained"],
            "distinct": t["expressions"],
            "retained": t["expressions_retained"],
        },
        "per_input": {k: h.to_dict() for k, h in acc.per_input.items() if h.n},
        "per_image": {k: h.to_dict() for k, h in acc.per_image.items()},
        "box_area": acc.box_area.to_dict(),
        "box_aspect_ratio": acc.box_aspect.to_dict(),
        "box_score": acc.box_score.to_dict(),
        "expression_words": {"all": acc.words_all.to_dict(), "retained": acc.words_retained.to_dict()},
        "top_chunk_roots": acc.roots.to_dict(acc.opts.top_k),
        "top_expressions": acc.expressions.to_dict(acc.opts.top_k),
        "images": {"width": acc.width.to_dict(), "height": acc.height.to_dict(), "formats": dict(acc.formats)},
        "timing": _timing(corpus, acc.rows, kept),
        "reference": {"published": GRIT_REFERENCE, "corpus": _reference_side(acc, kept)},
        "counters": counters,
        "checks": _checks(acc, counters, boxes_raw_index, chunks_found_index, reasons) if has_counters else [],
        "warnings": warnings,
    }
    for check in figures["checks"]:
        if not check["ok"]:
            warnings.append(
                f"{check['name']}: the index gives {check['index']}, _stats.json gives {check['counters']}"
            )
    return figures


def _drop_reasons(corpus: Corpus) -> tuple[str, ...]:
    """The drop reasons a corpus of this layout can hold; any other is reported as not in the format."""
    if corpus.mode == "img2dataset":
        return IMG2DATASET_DROP_REASONS
    if corpus.mode == "parquet":
        return (*DROP_REASONS, *IMG2DATASET_DROP_REASONS)
    return DROP_REASONS


def _source(corpus: Corpus) -> dict[str, Any]:
    manifest = corpus.manifest or {}
    out: dict[str, Any] = {
        "path": str(corpus.root),
        "mode": corpus.mode,
        "shards": len(corpus.shards),
        "index_files": len(corpus.index_files()),
        "incomplete_shards": corpus.incomplete,
        "has_images": corpus.mode != "parquet" and any(s.tar is not None for s in corpus.shards),
    }
    for name in ("created_at", "updated_at", "result_config_hash", "detector", "spacy_model", "versions"):
        if name in manifest:
            out[name] = manifest[name]
    if manifest.get("warnings"):
        out["manifest_warnings"] = [str(w) for w in manifest["warnings"]]
    return out


def _reference_side(acc: FigureAccumulator, kept: int) -> dict[str, Any]:
    """The corpus's figures in the paper's terms: spans are retained expressions (what a model trains on), boxes
    are the boxes those expressions carry. The unfiltered counts ride along for comparison."""
    t = acc.totals
    return {
        "images": kept,
        "text_spans": t["expressions_retained"],
        "boxes": t["ref_entries_retained"],
        "spans_per_image": _ratio(t["expressions_retained"], kept),
        "boxes_per_image": _ratio(t["ref_entries_retained"], kept),
        "expression_words": acc.words_retained.to_dict()["mean"],
        "grounded_chunks_per_image": _ratio(t["grounded_chunks"], kept),
        "all_boxes_per_image": _ratio(t["boxes"], kept),
    }


def _timing(corpus: Corpus, inputs: int, kept: int) -> dict[str, Any]:
    seconds = _sum_counters([shard_seconds(s, corpus.mode) for s in corpus.shards])
    starts = [parse_time(s.stats.get("started_at")) for s in corpus.shards]
    ends = [parse_time(s.stats.get("finished_at")) for s in corpus.shards]
    starts = [x for x in starts if x]
    ends = [x for x in ends if x]
    manifest = corpus.manifest or {}
    start = min(starts) if starts else parse_time(manifest.get("created_at"))
    end = max(ends) if ends else parse_time(manifest.get("updated_at"))
    wall = (end - start).total_seconds() if start and end and end > start else None
    return {
        "seconds": seconds,
        "ms_per_input": {k: 1000 * v / inputs for k, v in seconds.items()} if inputs else {},
        "started_at": start.isoformat() if start else None,
        "finished_at": end.isoformat() if end else None,
        "wall_s": wall,
        "inputs_per_s": _ratio(inputs, wall) if inputs else None,
        "kept_per_s": _ratio(kept, wall) if kept else None,
    }


def _checks(
    acc: FigureAccumulator,
    counters: dict[str, float],
    boxes_raw: int | None,
    chunks_found: int | None,
    reasons: tuple[str, ...] = DROP_REASONS,
):
    """The index and the counters are written by different code paths; where they should agree, say so."""
    t = acc.totals
    pairs = [
        ("input", acc.rows),
        ("kept", acc.status.get(STATUS_KEPT, 0)),
        ("dropped", acc.status.get(STATUS_DROPPED, 0)),
        *((f"dropped_{r}", acc.drop_reasons.get(r, 0)) for r in reasons),
        ("chunks_grounded", t["grounded_chunks"]),
        ("boxes", t["boxes"]),
        ("ref_exps", t["ref_entries"]),
        ("ref_exps_retained", t["ref_entries_retained"]),
        ("boxes_raw", boxes_raw),
        ("chunks_found", chunks_found),
    ]
    out = []
    for name, index_value in pairs:
        # Counters carry one dropped_<reason> per reason seen: an absent one is zero.
        counted = counters.get(name, 0 if name.startswith("dropped_") and "dropped" in counters else None)
        if counted is None or index_value is None or (name.startswith("dropped_") and not counted and not index_value):
            continue
        out.append({"name": name, "index": index_value, "counters": counted, "ok": index_value == counted})
    return out
