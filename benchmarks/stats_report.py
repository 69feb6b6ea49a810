"""``grit stats`` at scale: time and peak memory of the figures over a 1,000,000-record parquet index.

The corpus is generated with numpy/pyarrow in the format of docs/format.md (100 shards of 10,000 input rows,
kept and dropped, with consistent ``_stats.json`` counters, no images) and cached in the temp folder. Each
measurement runs in a fresh subprocess so its peak RSS (``wait4``) is its own. The gallery's cost, which does
not grow with the corpus, is timed apart on a shard tar of real JPEG images. Target: figures in < 60 s on 2 cores.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

RECORDS = 1_000_000
SHARDS = 100
TARGET_S = 60.0
CACHE_VERSION = 2
DROP_MIX = {
    "no_grounded_phrase": 0.6,
    "no_noun_chunks": 0.2,
    "bad_image": 0.1,
    "image_too_small": 0.07,
    "empty_caption": 0.03,
}

DETS = ("a", "the", "two", "an old", "this")
ADJS = ("", "", "red", "small", "wooden", "white", "young", "large", "blue", "smiling", "vintage", "crème", "green")
NOUNS = (
    "man", "woman", "dog", "cat", "car", "table", "tree", "building", "shirt", "street", "field", "flowers",
    "bicycle", "cup", "window", "beach", "mountain", "child", "logo", "sign", "plate", "café", "sofa", "boat",
)  # fmt: skip
PREPS = ("in", "on", "with", "next to", "under", "near", "of")
VERBS = (" and ", ", ", " walking past ", " sitting on ", " in front of ")


def _templates(rng, n: int) -> list[tuple[str, list[tuple[int, int, int, int, int]]]]:
    """Captions with noun chunk and expression spans, each chunk with a number of boxes (0 = not grounded)."""
    out = []
    for _ in range(n):
        parts, entries, length = [], [], 0
        for i in range(int(rng.integers(1, 4))):
            if i:
                join = VERBS[rng.integers(len(VERBS))]
                parts.append(join)
                length += len(join)
            np1 = " ".join(
                w for w in (DETS[rng.integers(5)], ADJS[rng.integers(len(ADJS))], NOUNS[rng.integers(24)]) if w
            )
            start = length
            if rng.random() < 0.5:
                prep, np2 = PREPS[rng.integers(len(PREPS))], f"the {NOUNS[rng.integers(24)]}"
                clause = f"{np1} {prep} {np2}"
                s2 = start + len(np1) + len(prep) + 2
                entries.append((start, start + len(np1), start, start + len(clause), int(rng.integers(0, 3))))
                entries.append((s2, s2 + len(np2), s2, s2 + len(np2), int(rng.integers(0, 2))))
            else:
                clause = np1
                entries.append((start, start + len(np1), start, start + len(np1), int(rng.integers(0, 3))))
            parts.append(clause)
            length += len(clause)
        out.append(("".join(parts), entries))
    return out


def generate(root: Path, records: int = RECORDS, shards: int = SHARDS, seed: int = 0) -> Path:
    """Write the benchmark corpus once; later calls reuse it."""
    done = root / ".complete"
    if done.exists():
        return root
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from grit_core.record import DROP_REASONS, index_schema, retained_spans

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = [t for t in _templates(rng, 100_000) if any(e[4] for e in t[1])]
    captions = pa.array([t[0] for t in templates], pa.string())
    # Per template: its entries flattened (one per box), and the counters they add.
    ent_rows, ent_off, grounded, retained_n = [], [0], [], []
    for _caption, entries in templates:
        rows = [(cs, ce, es, ee) for cs, ce, es, ee, nb in entries for _ in range(nb)]
        keep = retained_spans([(r[2], r[3]) for r in rows])
        ent_rows += rows
        ent_off.append(len(ent_rows))
        grounded.append(len({(r[0], r[1]) for r in rows}))
        retained_n.append(sum((r[2], r[3]) in keep for r in rows))
    ent_rows, ent_off = np.array(ent_rows, dtype=np.float64), np.array(ent_off)
    n_ent, grounded, retained_n = np.diff(ent_off), np.array(grounded), np.array(retained_n)
    schema = index_schema()
    per_shard = records // shards
    start = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)
    reasons = list(DROP_MIX)
    for s in range(shards):
        n = per_shard
        # Popular templates recur (short phrases dominate real corpora): half Zipf, half uniform.
        zipf = np.minimum(rng.zipf(1.4, n) - 1, len(templates) - 1)
        tpl = np.where(rng.random(n) < 0.5, zipf, rng.integers(0, len(templates), n))
        kept = rng.random(n) < 0.62
        reason = np.array(reasons)[rng.choice(len(reasons), n, p=list(DROP_MIX.values()))]
        kt = tpl[kept]
        counts = n_ent[kt]
        rec_off = np.concatenate(([0], np.cumsum(counts)))
        src = np.repeat(ent_off[kt], counts) + (np.arange(rec_off[-1]) - np.repeat(rec_off[:-1], counts))
        spans = ent_rows[src]
        m = len(src)
        x1, y1 = rng.uniform(0, 0.6, m), rng.uniform(0, 0.6, m)
        x2, y2 = x1 + rng.uniform(0.05, 0.4, m), y1 + rng.uniform(0.05, 0.4, m)
        score = rng.uniform(0.35, 1.0, m)
        boxes = np.stack([x1, y1, x2, y2, score], axis=1)
        chunk_vals = np.concatenate([spans[:, :2], boxes], axis=1).ravel()
        ref_vals = np.concatenate([spans[:, 2:], boxes], axis=1).ravel()
        inner_off = pa.array(np.arange(0, 7 * m + 1, 7, dtype=np.int32))
        full_off = np.zeros(n + 1, dtype=np.int32)
        full_off[1:] = np.cumsum(np.where(kept, n_ent[tpl], 0))
        valid = pa.array(kept)
        mask = pc.invert(valid)

        def nested(values, full_off=full_off, inner_off=inner_off, mask=mask):
            inner = pa.ListArray.from_arrays(inner_off, pa.array(values))
            return pa.ListArray.from_arrays(pa.array(full_off), inner, mask=mask)

        status = np.where(kept, "kept", "dropped")
        drop = np.where(kept, None, reason)
        caption = captions.take(pa.array(tpl))
        caption = pc.if_else(pa.array(drop == "empty_caption"), pa.scalar(None, pa.string()), caption)
        reached_text = kept | np.isin(reason, ["no_grounded_phrase", "no_noun_chunks"])
        reached_ground = kept | (reason == "no_grounded_phrase")
        chunks_found = np.where(reached_text, grounded[tpl] + rng.integers(0, 3, n), 0)
        boxes_raw = np.where(reached_ground, np.where(kept, n_ent[tpl] + rng.integers(0, 4, n), 0), 0)
        w, h = rng.integers(200, 1600, n).astype(np.int32), rng.integers(200, 1600, n).astype(np.int32)
        has_size = kept | reached_text
        columns = {
            "key": pa.array([f"{s:05d}{i:06d}" for i in range(n)]),
            "clip_similarity_vitb32": pa.array(rng.uniform(0.25, 0.4, n)),
            "clip_similarity_vitl14": pa.array(rng.uniform(0.2, 0.35, n)),
            "id": pa.array(np.arange(s * n, (s + 1) * n)),
            "url": pa.nulls(n, pa.string()),
            "caption": caption,
            "width": pa.array(w, mask=~has_size),
            "height": pa.array(h, mask=~has_size),
            "noun_chunks": nested(chunk_vals),
            "ref_exps": nested(ref_vals),
            "status": pa.array(status),
            "drop_reason": pa.array(drop, pa.string()),
            "detail": pa.array(np.where(kept, None, "synthetic drop"), pa.string()),  # what the writer records
            "source": pa.array([f"input/{s:05d}.tar"] * n),
            "image_ext": pa.array(
                np.where(kept, np.array(["jpg", "png", "webp"])[rng.choice(3, n, p=[0.9, 0.07, 0.03])], None)
            ),
            "num_chunks_found": pa.array(chunks_found.astype(np.int32), mask=~reached_text),
            "num_boxes_raw": pa.array(boxes_raw.astype(np.int32), mask=~reached_ground),
        }
        table = pa.Table.from_pydict(columns, schema=schema)
        name = f"{s:05d}"
        pq.write_table(table, root / f"{name}.parquet")
        counts_d: dict[str, Any] = {"input": n, "kept": int(kept.sum()), "dropped": int((~kept).sum())}
        for r in DROP_REASONS:
            k = int(((~kept) & (reason == r)).sum())
            if k:
                counts_d[f"dropped_{r}"] = k
        counts_d.update(
            chunks_found=int(chunks_found.sum()),
            chunks_grounded=int(grounded[kt].sum()),
            boxes_raw=int(boxes_raw.sum()),
            boxes=int(m),
            ref_exps=int(m),
            ref_exps_retained=int(retained_n[kt].sum()),
        )
        t0 = start + dt.timedelta(seconds=36 * s)
        stats = {
            "shard": name,
            "format_version": 1,
            "counts": counts_d,
            "seconds": {"read": 2.0, "decode": 40.0, "text": 9.5, "grounding": 1400.0, "write": 3.0},
            "started_at": t0.isoformat(),
            "finished_at": (t0 + dt.timedelta(seconds=720)).isoformat(),
        }
        (root / f"{name}_stats.json").write_text(json.dumps(stats), encoding="utf-8")
    manifest = {"format_version": 1, "created_at": start.isoformat(), "detector": {"kind": "synthetic"}}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    done.write_text("ok")
    return root


def _measure(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh Python; its wall time, peak RSS and the JSON it prints last."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code + _PRINT_PEAK], stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {out[-2000:]}")
    lines = out.strip().splitlines()
    # The child's own high-water mark (VmHWM). wait4's ru_maxrss is not enough: Linux carries the parent's peak
    # into a forked child's maxrss across exec, so a large benchmark process would inflate every child.
    peak_kib = int(lines[-1]) if lines and lines[-1].isdigit() else usage.ru_maxrss
    return {
        "process_wall_s": round(wall, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        **json.loads(lines[-2] if lines[-1].isdigit() else lines[-1]),
    }


_PRINT_PEAK = """
for _line in open("/proc/self/status"):
    if _line.startswith("VmHWM:"):
        print(int(_line.split()[1]))
"""


FIGURES_CODE = """
import json, time
from grit_pipeline.stats.corpus import open_corpus
from grit_pipeline.stats.figures import FigureOptions, compute_figures
t0 = time.perf_counter()
fig, rows = compute_figures(open_corpus({root!r}), FigureOptions(samples=24, batch_size={batch}))
print(json.dumps({{"seconds": round(time.perf_counter() - t0, 2), "records": fig["samples"]["input"],
    "kept": fig["samples"]["kept"], "boxes": fig["boxes"]["after_nms"],
    "checks_ok": all(c["ok"] for c in fig["checks"]), "gallery_rows": len(rows)}}))
"""

REPORT_CODE = """
import json
from grit_pipeline.stats.figures import FigureOptions
from grit_pipeline.stats.report import make_report
r = make_report({root!r}, {out!r}, FigureOptions(samples=24))
print(json.dumps({{k: round(v, 3) for k, v in r.seconds.items()}}))
"""


def _gallery_cost(tmp: Path, samples: int = 24) -> dict[str, Any]:
    """Thumbnails for ``samples`` records picked from a 1,000-member tar of 640x480 JPEGs."""
    import numpy as np
    from PIL import Image

    from grit_pipeline.stats.gallery import build_gallery

    tar_path = tmp / "gallery.tar"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((640, 480)).save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    with tarfile.open(tar_path, "w") as tar:
        for i in range(1000):
            info = tarfile.TarInfo(f"k{i:04d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    picks = sorted(rng.choice(1000, samples, replace=False))
    caption = "a dog in a field of flowers"
    entry = [0, 5, 0.1, 0.1, 0.6, 0.7, 0.9]
    rows = [
        {"key": f"k{i:04d}", "shard": "g", "caption": caption, "width": 640, "height": 480, "image_ext": "jpg",
         "noun_chunks": [entry], "ref_exps": [[0, 27, *entry[2:]]]}
        for i in picks
    ]  # fmt: skip
    t0 = time.perf_counter()
    items = build_gallery(rows, lambda shard: tar_path)
    seconds = time.perf_counter() - t0
    assert all(i.image_uri for i in items)
    return {"samples": samples, "tar_members": 1000, "seconds": round(seconds, 3)}


def run(device: str) -> dict[str, Any]:
    if device != "cpu":
        raise ValueError("the stats benchmark runs on cpu only")
    root = Path(tempfile.gettempdir()) / f"grit_stats_bench_v{CACHE_VERSION}_{RECORDS}"
    cached = (root / ".complete").exists()
    t0 = time.perf_counter()
    generate(root)
    gen_s = None if cached else round(time.perf_counter() - t0, 1)
    index_mib = sum(p.stat().st_size for p in root.glob("*.parquet")) / 2**20
    runs = [_measure(FIGURES_CODE.format(root=str(root), batch=65_536)) for _ in range(2)]
    best = min(runs, key=lambda r: r["seconds"])
    with tempfile.TemporaryDirectory() as tmp:
        report = _measure(REPORT_CODE.format(root=str(root), out=str(Path(tmp) / "report")))
        gallery = _gallery_cost(Path(tmp))
    return {
        "records": RECORDS,
        "shards": SHARDS,
        "index_mib": round(index_mib, 1),
        "corpus_cached": cached,
        "generate_s": gen_s,
        "figures": {
            "seconds": best["seconds"],
            "runs_s": [r["seconds"] for r in runs],
            "records_per_s": round(RECORDS / best["seconds"]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "kept": best["kept"],
            "boxes": best["boxes"],
            "counters_agree": best["checks_ok"],
        },
        "full_report": report,
        "gallery_24_thumbnails": gallery,
        "target_s": TARGET_S,
        "meets_target": best["seconds"] < TARGET_S,
    }
