"""Writes small corpora in the format of docs/format.md, for the stats report's tests and nothing else.

A corpus here is what ``grit build`` leaves behind: per shard a WebDataset tar (``<key>.<ext>`` image bytes,
``<key>.txt`` caption, ``<key>.json`` record), a parquet index with one ``index_schema`` row per input sample
(kept or dropped, with its reason), and ``<shard>_stats.json`` counters written last, plus ``manifest.json``.
Captions are assembled from phrases so every noun chunk and referring expression has a known span; images are
real (small) JPEG, PNG and WebP files. The counters are derived from the generated samples the way the format
defines them, so a reader that disagrees with them has a bug.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from grit_core.record import (
    RECORD_FIELDS,
    STATUS_DROPPED,
    STATUS_KEPT,
    GritRecord,
    containment_filter,
    index_rows_to_table,
    sort_entries,
)

DETS = ("a", "the", "one", "this")
ADJS = ("red", "small", "wooden", "old", "bright", "crème", "shiny", "🐶-shaped", "tall", "")
NOUNS = ("dog", "car", "table", "café", "field", "flowers", "bicycle", "woman", "piñata", "tree", "window", "cup")
PREPS = ("in", "on", "next to", "with", "under")
JOINS = (" and ", ", ", " near ", " while ")
# Reasons a sample is dropped in these corpora; each gets the index fields the stage that dropped it had reached.
TEST_DROP_REASONS = ("empty_caption", "bad_image", "image_too_small", "no_noun_chunks", "no_grounded_phrase")

HOSTILE_CAPTIONS = (
    '<script>window.__grit_pwned = 1</script> a dog & a "cat" on the mat',
    "a cat <img src=x onerror=\"window.__grit_pwned_img = 1\"> under a 'red' table",
)


@dataclass
class CaptionSpec:
    """A caption and, per noun chunk, ``(chunk_start, chunk_end, expr_start, expr_end)``."""

    caption: str
    chunks: list[tuple[int, int, int, int]]


def spec_from_phrases(caption: str, phrases: list[tuple[str, str]]) -> CaptionSpec:
    """Spans found by text: each ``(chunk, expression)`` pair, the expression containing the chunk."""
    out = []
    for chunk, expr in phrases:
        es = caption.index(expr)
        cs = caption.index(chunk, es)
        out.append((cs, cs + len(chunk), es, es + len(expr)))
    return CaptionSpec(caption, out)


def random_caption(rng: np.random.Generator) -> CaptionSpec:
    """Clauses ``NP1 [PREP NP2]`` joined by connectives; NP1's expression spans the clause (unless it has a
    conjunct-free short form), NP2's expression is itself, so the containment filter has work to do."""
    parts: list[str] = []
    chunks: list[tuple[int, int, int, int]] = []
    length = 0

    def noun_phrase() -> str:
        adj = ADJS[rng.integers(len(ADJS))]
        words = [DETS[rng.integers(len(DETS))], *([adj] if adj else []), NOUNS[rng.integers(len(NOUNS))]]
        return " ".join(words)

    for i in range(int(rng.integers(1, 4))):
        if i:
            join = JOINS[rng.integers(len(JOINS))]
            parts.append(join)
            length += len(join)
        np1 = noun_phrase()
        clause_start = length
        if rng.random() < 0.6:
            prep = PREPS[rng.integers(len(PREPS))]
            np2 = noun_phrase()
            clause = f"{np1} {prep} {np2}"
            np2_start = clause_start + len(np1) + len(prep) + 2
            chunks.append((clause_start, clause_start + len(np1), clause_start, clause_start + len(clause)))
            chunks.append((np2_start, np2_start + len(np2), np2_start, np2_start + len(np2)))
        else:
            clause = np1
            chunks.append((clause_start, clause_start + len(np1), clause_start, clause_start + len(np1)))
        parts.append(clause)
        length += len(clause)
    caption = "".join(parts)
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:] + "."
    return CaptionSpec(caption, chunks)


def random_image_bytes(rng: np.random.Generator, width: int, height: int, ext: str) -> bytes:
    pixels = rng.integers(0, 255, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], quality=70)
    return buf.getvalue()


def ground(spec: CaptionSpec, rng: np.random.Generator, p_grounded: float = 0.75) -> GritRecord | None:
    """Boxes for some chunks (1 to 3 each); None when no chunk got one."""
    chunks, refs = [], []
    for cs, ce, es, ee in spec.chunks:
        if rng.random() > p_grounded:
            continue
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = rng.uniform(0, 0.7, size=2)
            x2, y2 = x1 + rng.uniform(0.02, 0.3), y1 + rng.uniform(0.02, 0.3)
            score = float(np.round(rng.uniform(0.35, 1.0), 4))
            box = [float(np.round(v, 4)) for v in (x1, y1, x2, y2)]
            chunks.append([cs, ce, *box, score])
            refs.append([es, ee, *box, score])
    if not chunks:
        return None
    chunks, refs = sort_entries(chunks, refs)
    return GritRecord(key="", caption=spec.caption, width=0, height=0, noun_chunks=chunks, ref_exps=refs)


@dataclass
class ShardPlan:
    name: str
    inputs: int


@dataclass
class CorpusFacts:
    root: Path
    shards: list[str]
    records: list[GritRecord] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(root: Path, name: str, samples: list[dict[str, Any]], started: dt.datetime) -> list[GritRecord]:
    """Write one complete shard: tar and parquet under temporary names, renamed, then the counters last."""
    counts: dict[str, int] = {"input": len(samples), "kept": 0, "dropped": 0}
    for key in ("chunks_found", "chunks_kept", "chunks_grounded", "boxes_raw", "boxes", "ref_exps"):
        counts[key] = 0
    counts.update({"chunks_filtered_abstract_noun": 0, "chunks_filtered_pronoun": 0})
    counts.update({"chunks_filtered_phrase_too_long": 0, "ref_exps_retained": 0})
    counts.update({"images_exif_reencoded": 0, "images_converted_png": 0})
    rows, kept = [], []
    tmp_tar = root / f"{name}.tar.tmp"
    with tarfile.open(tmp_tar, "w") as tar:
        for s in samples:
            row = {"key": s["key"], "source": f"input-{name}.tar:{s['key']}"}
            row.update(num_chunks_found=s.get("num_chunks_found"), num_boxes_raw=s.get("num_boxes_raw"))
            counts["chunks_found"] += s.get("num_chunks_found") or 0
            counts["chunks_kept"] += s.get("chunks_kept") or 0
            counts["boxes_raw"] += s.get("num_boxes_raw") or 0
            for reason, n in s.get("filtered", {}).items():
                counts[f"chunks_filtered_{reason}"] += n
            record: GritRecord | None = s.get("record")
            if record is None:
                row.update(status=STATUS_DROPPED, drop_reason=s["drop_reason"], caption=s.get("caption"))
                row.update(width=s.get("width"), height=s.get("height"))
                counts["dropped"] += 1
                counts[f"dropped_{s['drop_reason']}"] = counts.get(f"dropped_{s['drop_reason']}", 0) + 1
            else:
                d = record.to_dict()
                row.update(d, status=STATUS_KEPT, drop_reason=None, image_ext=s["ext"])
                counts["kept"] += 1
                counts["chunks_grounded"] += len({(e[0], e[1]) for e in record.noun_chunks})
                counts["boxes"] += len(record.noun_chunks)
                counts["ref_exps"] += len(record.ref_exps)
                counts["ref_exps_retained"] += len(containment_filter(record.ref_exps))
                _add_member(tar, f"{record.key}.{s['ext']}", s["image"])
                _add_member(tar, f"{record.key}.txt", record.caption.encode("utf-8"))
                _add_member(tar, f"{record.key}.json", record.to_json().encode("utf-8"))
                kept.append(record)
            rows.append(row)
    tmp_tar.rename(root / f"{name}.tar")
    table = index_rows_to_table(rows)
    pq.write_table(table, root / f"{name}.parquet.tmp")
    (root / f"{name}.parquet.tmp").rename(root / f"{name}.parquet")
    seconds = {"read": 0.01 * len(samples), "decode": 0.02 * len(samples), "text": 0.03 * len(samples)}
    seconds.update(grounding=0.5 * len(samples), write=0.005 * len(samples))
    stats = {
        "shard": name,
        "format_version": 1,
        "counts": counts,
        "seconds": seconds,
        "started_at": started.isoformat(),
        "finished_at": (started + dt.timedelta(seconds=0.3 * len(samples))).isoformat(),
    }
    (root / f"{name}_stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return kept


def random_sample(rng: np.random.Generator, key: str, spec: CaptionSpec | None = None) -> dict[str, Any]:
    """One input sample: kept with a record and image, or dropped with a reason and the fields it reached."""
    spec = spec or random_caption(rng)
    sample: dict[str, Any] = {"key": key}
    if rng.random() < 0.3:
        reason = TEST_DROP_REASONS[rng.integers(len(TEST_DROP_REASONS))]
        sample["drop_reason"] = reason
        if reason != "empty_caption":
            sample["caption"] = spec.caption
        if reason in ("no_noun_chunks", "no_grounded_phrase"):
            sample.update(width=int(rng.integers(40, 200)), height=int(rng.integers(40, 200)))
            found = int(rng.integers(0, 3)) if reason == "no_noun_chunks" else len(spec.chunks)
            sample.update(num_chunks_found=found, filtered={"pronoun": found} if reason == "no_noun_chunks" else {})
            sample["chunks_kept"] = 0 if reason == "no_noun_chunks" else len(spec.chunks)
            if reason == "no_grounded_phrase":
                sample["num_boxes_raw"] = 0
        return sample
    record = ground(spec, rng)
    if record is None:
        sample.update(drop_reason="no_grounded_phrase", caption=spec.caption, num_boxes_raw=0, width=64, height=64)
        sample.update(num_chunks_found=len(spec.chunks), chunks_kept=len(spec.chunks))
        return sample
    ext = ("jpg", "jpg", "png", "webp")[rng.integers(4)]
    width, height = int(rng.integers(48, 320)), int(rng.integers(48, 320))
    record.key, record.width, record.height = key, width, height
    abstract = int(rng.integers(0, 2))
    sample.update(record=record, ext=ext, image=random_image_bytes(rng, width, height, ext))
    sample.update(num_chunks_found=len(spec.chunks) + abstract, chunks_kept=len(spec.chunks))
    sample.update(filtered={"abstract_noun": abstract})
    sample["num_boxes_raw"] = len(record.noun_chunks) + int(rng.integers(0, 3))
    return sample


def make_corpus(
    root: Path,
    shards: int = 2,
    inputs_per_shard: int = 40,
    seed: int = 0,
    extra_captions: tuple[CaptionSpec, ...] = (),
    incomplete: bool = False,
) -> CorpusFacts:
    """A corpus in ``root``; ``extra_captions`` become kept records of the first shard (grounded chunk by chunk),
    ``incomplete`` adds a shard whose tar and parquet exist but whose counters were never written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)
    facts = CorpusFacts(root=root, shards=[])
    for i in range(shards):
        name = f"{i:05d}"
        samples = [random_sample(rng, f"s{i:02d}_{j:05d}") for j in range(inputs_per_shard)]
        if i == 0:
            for j, spec in enumerate(extra_captions):
                sample = random_sample(rng, f"x{j:03d}", spec)
                while "record" not in sample:
                    sample = random_sample(rng, f"x{j:03d}", spec)
                samples.insert(j, sample)
        facts.records += write_shard(root, name, samples, started + dt.timedelta(minutes=i))
        facts.shards.append(name)
    if incomplete:
        name = f"{shards:05d}"
        write_shard(root, name, [random_sample(rng, f"inc_{j}") for j in range(5)], started)
        (root / f"{name}_stats.json").unlink()
        facts.incomplete.append(name)
    manifest = {
        "format_version": 1,
        "created_at": started.isoformat(),
        "updated_at": (started + dt.timedelta(minutes=shards)).isoformat(),
        "config": {"detector": {"box_threshold": 0.35}},
        "result_config_hash": "0" * 64,
        "versions": {"grit_pipeline": "0.1.0"},
        "spacy_model": {"name": "en_core_web_sm", "version": "3.8.0"},
        "detector": {"kind": "grounding_dino", "model": "IDEA-Research/grounding-dino-tiny", "random_weights": False},
        "inputs": ["input-*.tar"],
        "id_type": "int64",
        "warnings": [],
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    (root / "config.yaml").write_text("detector:\n  box_threshold: 0.35\n", encoding="utf-8")
    return facts


def write_grit20m_parquet(path: Path, records: list[GritRecord]) -> None:
    """Records as a GRIT-20M release file: the record fields only, no status columns, no images."""
    rows = [r.to_dict() for r in records]
    schema = pa.schema([f for f in index_rows_to_table([]).schema if f.name in RECORD_FIELDS])
    table = pa.Table.from_pydict({f.name: [row.get(f.name) for row in rows] for f in schema}, schema=schema)
    pq.write_table(table, path)


def read_tar_records(path: Path) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The ``<key>.json`` records of a shard tar and its image members, read with the tarfile module."""
    records, images = [], {}
    with tarfile.open(path) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if ext == "json":
                records.append(json.loads(data))
            elif ext in ("jpg", "png", "webp"):
                images[key] = data
    return records, images
