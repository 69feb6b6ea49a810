"""Acceptance: ``grit stats`` figures equal counts recomputed here from the shards themselves.

The expected values are computed with plain Python from what a reader of the format sees: the ``<key>.json``
records and image members of each tar (tarfile module), the parquet rows (kept and dropped) and the
``_stats.json`` counters; the report's code paths (Arrow batches, vectorised spans) are not used.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from stats_corpus_factory import (
    HOSTILE_CAPTIONS,
    make_corpus,
    read_tar_records,
    spec_from_phrases,
    write_grit20m_parquet,
)

from grit_core.record import GritRecord, containment_filter, retained_spans
from grit_pipeline.cli import main as grit_main

PUNCT = "\"'()[]{}.,;:!?`*_-"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "corpus"
    hostile = (
        spec_from_phrases(HOSTILE_CAPTIONS[0], [("a dog", "a dog"), ("the mat", 'a "cat" on the mat')]),
        spec_from_phrases(HOSTILE_CAPTIONS[1], [("a cat", "a cat"), ("a 'red' table", "a 'red' table")]),
    )
    make_corpus(root, shards=3, inputs_per_shard=40, seed=3, extra_captions=hostile, incomplete=True)
    return root


@pytest.fixture(scope="module")
def report(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report")
    assert grit_main(["stats", str(corpus), "--out", str(out), "--samples", "5", "--seed", "7"]) == 0
    return json.loads((out / "stats.json").read_text(encoding="utf-8"))


def complete_shards(root: Path) -> list[str]:
    return sorted(p.name[: -len("_stats.json")] for p in root.glob("*_stats.json"))


def expected_from_shards(root: Path) -> dict:
    """Every figure the test checks, from the tars' records, the parquet rows and the counters."""
    records, formats = [], Counter()
    rows, counters, seconds, starts, ends = [], Counter(), Counter(), [], []
    for name in complete_shards(root):
        recs, images = read_tar_records(root / f"{name}.tar")
        records += recs
        formats.update(Path(f"x.{ext}").suffix[1:] for ext in _image_exts(root / f"{name}.tar"))
        assert set(images) == {r["key"] for r in recs}
        rows += pq.read_table(root / f"{name}.parquet").to_pylist()
        stats = json.loads((root / f"{name}_stats.json").read_text())
        counters.update(stats["counts"])
        seconds.update(stats["seconds"])
        starts.append(stats["started_at"])
        ends.append(stats["finished_at"])
    per_image = {k: Counter() for k in ("grounded_chunks", "boxes", "expressions", "expressions_retained")}
    words_all, words_ret, areas, aspects, scores = [], [], [], [], []
    top_exp, roots = Counter(), Counter()
    totals = Counter()
    for r in records:
        cap, chunks, refs = r["caption"], r["noun_chunks"], r["ref_exps"]
        chunk_spans = {(int(e[0]), int(e[1])) for e in chunks}
        ref_spans = {(int(e[0]), int(e[1])) for e in refs}
        kept_spans = retained_spans(refs)
        totals.update(
            boxes=len(chunks),
            grounded=len(chunk_spans),
            refs=len(refs),
            refs_retained=len(containment_filter(refs)),
            exps=len(ref_spans),
            exps_retained=len(kept_spans),
        )
        for key, n in (
            ("grounded_chunks", len(chunk_spans)),
            ("boxes", len(chunks)),
            ("expressions", len(ref_spans)),
            ("expressions_retained", len(kept_spans)),
        ):
            per_image[key][min(n, 16)] += 1
        for s, e in ref_spans:
            words_all.append(len(cap[s:e].split()))
        for s, e in kept_spans:
            words_ret.append(len(cap[s:e].split()))
            top_exp[cap[s:e].lower()] += 1
        for s, e in chunk_spans:
            roots[cap[s:e].split()[-1].lower().strip(PUNCT)] += 1
        for _, _, x1, y1, x2, y2, score in chunks:
            areas.append((x2 - x1) * (y2 - y1))
            aspects.append(((x2 - x1) * r["width"]) / ((y2 - y1) * r["height"]))
            scores.append(score)
    status = Counter(row["status"] for row in rows)
    drops = Counter(row["drop_reason"] for row in rows if row["status"] == "dropped")
    return {
        "records": records,
        "rows": rows,
        "formats": formats,
        "status": status,
        "drops": drops,
        "counters": counters,
        "seconds": seconds,
        "starts": starts,
        "ends": ends,
        "per_image": per_image,
        "words_all": words_all,
        "words_ret": words_ret,
        "areas": areas,
        "aspects": aspects,
        "scores": scores,
        "top_exp": top_exp,
        "roots": roots,
        "totals": totals,
        "found": [row["num_chunks_found"] for row in rows if row["num_chunks_found"] is not None],
    }


def _image_exts(tar_path: Path) -> list[str]:
    import tarfile

    with tarfile.open(tar_path) as tar:
        return [m.name.split(".", 1)[1] for m in tar if m.name.split(".", 1)[1] in ("jpg", "png", "webp")]


def _top(counter: Counter, k: int) -> list[list]:
    return [[s, n] for s, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def test_counts_funnel_and_totals_match_shards(report, corpus):
    exp = expected_from_shards(corpus)
    s = report["samples"]
    assert s["input"] == len(exp["rows"]) == exp["counters"]["input"]
    assert s["kept"] == exp["status"]["kept"] == len(exp["records"])
    assert s["dropped"] == exp["status"]["dropped"]
    assert s["drop_reasons"] == dict(exp["drops"]) and len(exp["drops"]) >= 3
    t = exp["totals"]
    assert report["chunks"]["grounded"] == t["grounded"]
    assert report["chunks"]["found"] == exp["counters"]["chunks_found"] == sum(exp["found"])
    assert report["chunks"]["kept"] == exp["counters"]["chunks_kept"]
    filtered = {r: exp["counters"][f"chunks_filtered_{r}"] for r in ("abstract_noun", "pronoun", "phrase_too_long")}
    assert report["chunks"]["filtered"] == filtered and filtered["abstract_noun"] > 0
    assert report["boxes"] == {"before_nms": exp["counters"]["boxes_raw"], "after_nms": t["boxes"]}
    assert report["expressions"] == {
        "entries": t["refs"],
        "entries_retained": t["refs_retained"],
        "distinct": t["exps"],
        "retained": t["exps_retained"],
    }
    assert t["exps_retained"] < t["exps"]  # the containment filter had work to do
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) >= 10
    assert report["source"]["incomplete_shards"] == ["00003"]  # its tar holds records the figures must not count
    assert report["images"]["formats"] == dict(exp["formats"])


def test_distributions_match_shards(report, corpus):
    exp = expected_from_shards(corpus)
    for key, counter in exp["per_image"].items():
        got = report["per_image"][key]
        assert got["counts"] == [counter.get(i, 0) for i in range(17)], key
    ret, all_ = report["expression_words"]["retained"], report["expression_words"]["all"]
    assert ret["counts"] == np.bincount(np.minimum(exp["words_ret"], 32), minlength=33).tolist()
    assert all_["counts"] == np.bincount(np.minimum(exp["words_all"], 32), minlength=33).tolist()
    assert ret["mean"] == pytest.approx(np.mean(exp["words_ret"]))
    for key, values in (
        ("box_area", exp["areas"]),
        ("box_aspect_ratio", exp["aspects"]),
        ("box_score", exp["scores"]),
    ):
        hist = report[key]
        edges = np.array(hist["edges"])
        values = np.array(values)
        assert hist["counts"] == np.histogram(values, bins=edges)[0].tolist(), key
        assert hist["underflow"] == int((values < edges[0]).sum()) and hist["overflow"] == int(
            (values > edges[-1]).sum()
        )
        assert hist["n"] == len(values) and hist["mean"] == pytest.approx(values.mean())
    widths = [r["width"] for r in exp["records"]]
    assert (
        report["images"]["width"]["counts"]
        == np.histogram(widths, bins=report["images"]["width"]["edges"])[0].tolist()
    )
    found = report["per_input"]["chunks_found"]
    assert found["counts"] == np.bincount(np.minimum(exp["found"], 16), minlength=17).tolist()


def test_top_lists_and_reference_figures(report, corpus):
    exp = expected_from_shards(corpus)
    assert report["top_expressions"]["top"] == _top(exp["top_exp"], 30) and report["top_expressions"]["exact"]
    assert report["top_chunk_roots"]["top"] == _top(exp["roots"], 30)
    ours, kept, t = report["reference"]["corpus"], report["samples"]["kept"], exp["totals"]
    assert ours["spans_per_image"] == pytest.approx(t["exps_retained"] / kept)
    assert ours["boxes_per_image"] == pytest.approx(t["refs_retained"] / kept)
    assert ours["expression_words"] == pytest.approx(np.mean(exp["words_ret"]))
    assert report["reference"]["published"]["spans_per_image"] == 1.27
    assert report["reference"]["published"]["boxes_per_image"] == 1.52
    assert report["reference"]["published"]["expression_words"] == 4.7


def test_timing_from_counters(report, corpus):
    exp = expected_from_shards(corpus)
    timing = report["timing"]
    assert timing["seconds"] == pytest.approx(dict(exp["seconds"]))
    assert timing["started_at"] == min(exp["starts"]) and timing["finished_at"] == max(exp["ends"])
    assert timing["inputs_per_s"] == pytest.approx(report["samples"]["input"] / timing["wall_s"])


def test_gallery_is_seeded_and_drawn_from_kept_records(report, corpus, tmp_path):
    keys = {r["key"] for r in expected_from_shards(corpus)["records"]}
    gallery = report["gallery"]
    assert len(gallery) == 5 and all(g["key"] in keys and g["has_image"] for g in gallery)
    again = tmp_path / "again"
    assert grit_main(["stats", str(corpus), "--out", str(again), "--samples", "5", "--seed", "7"]) == 0
    other = tmp_path / "other"
    assert grit_main(["stats", str(corpus), "--out", str(other), "--samples", "5", "--seed", "8"]) == 0
    picked = [g["key"] for g in gallery]
    assert [g["key"] for g in json.loads((again / "stats.json").read_text())["gallery"]] == picked
    assert [g["key"] for g in json.loads((other / "stats.json").read_text())["gallery"]] != picked


def test_small_batches_give_the_same_figures(report, corpus, tmp_path):
    """Streaming in batches of 7 rows must not change any figure (only the gallery pick may differ)."""
    assert grit_main(["stats", str(corpus), "--out", str(tmp_path), "--samples", "0", "--batch-size", "7"]) == 0
    small = json.loads((tmp_path / "stats.json").read_text())
    for key in (
        "samples",
        "chunks",
        "boxes",
        "expressions",
        "per_image",
        "box_area",
        "box_aspect_ratio",
        "expression_words",
        "top_expressions",
        "top_chunk_roots",
        "images",
        "reference",
        "checks",
    ):
        assert small[key] == report[key], key


def test_grit20m_parquet_without_images_or_status(corpus, tmp_path):
    exp = expected_from_shards(corpus)
    records = [GritRecord.from_dict(r) for r in exp["records"]]
    folder = tmp_path / "grit20m"
    folder.mkdir()
    write_grit20m_parquet(folder / "part-00000.parquet", records[:20])
    write_grit20m_parquet(folder / "part-00001.parquet", records[20:])
    assert "status" not in pq.read_schema(folder / "part-00000.parquet").names
    assert grit_main(["stats", str(folder), "--samples", "4"]) == 0
    got = json.loads((folder / "report" / "stats.json").read_text())
    assert got["source"]["mode"] == "parquet" and got["gallery"] == []
    assert got["samples"] == {"input": len(records), "kept": len(records), "dropped": 0, "drop_reasons": {}}
    t = exp["totals"]
    assert got["expressions"]["retained"] == t["exps_retained"] and got["boxes"]["after_nms"] == t["boxes"]
    assert got["boxes"]["before_nms"] is None and got["chunks"]["found"] is None and got["checks"] == []
    assert got["top_expressions"]["top"] == _top(exp["top_exp"], 30)
    html = (folder / "report" / "report.html").read_text()
    assert "No gallery: no images in this corpus" in html
    # A single file works too.
    assert grit_main(["stats", str(folder / "part-00001.parquet"), "--samples", "0"]) == 0
    single = json.loads((folder / "part-00001_report" / "stats.json").read_text())
    assert single["samples"]["kept"] == len(records) - 20


def test_disagreeing_counters_and_bad_files_are_reported(corpus, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(corpus, root, ignore=shutil.ignore_patterns("report*"))
    stats_path = root / "00001_stats.json"
    stats = json.loads(stats_path.read_text())
    stats["counts"]["boxes"] += 5
    stats_path.write_text(json.dumps(stats))
    (root / "00002.parquet").write_bytes(b"not a parquet file")
    assert grit_main(["stats", str(root), "--out", str(tmp_path / "r"), "--samples", "2"]) == 0
    got = json.loads((tmp_path / "r" / "stats.json").read_text())
    assert any("00002.parquet: unreadable parquet" in w for w in got["warnings"])
    assert any(w.startswith("boxes: the index gives") for w in got["warnings"])
    assert "Warnings" in (tmp_path / "r" / "report.html").read_text()


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    assert grit_main(["stats", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert grit_main(["stats", str(tmp_path)]) == 1
    assert "no shards" in capsys.readouterr().err
