"""``grit stats`` on an img2dataset download of GRIT-20M: the layout GRIT-20M's card recommends.

The folder is written here as img2dataset writes it (``--output_format webdataset`` with the GRIT columns saved by
``--save_additional_columns``): per shard a tar holding the successes (``<key>.jpg``, ``.txt``, ``.json``), a
parquet with one row per input URL and img2dataset's columns (``status`` ``success`` / ``failed_to_download`` /
``failed_to_resize``, ``error_message``, ``width``...), and ``<shard>_stats.json`` with img2dataset's keys. The
expected figures are counted here from the rows this test wrote.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grit_core.record import containment_filter
from grit_pipeline.cli import main as grit_main

STATUSES = (
    ["success", "failed_to_download", "success", "success", "failed_to_resize", "failed_to_download", "success"],
    ["failed_to_download", "success", "success", "failed_to_download", "success"],
)
PHRASES = ("a dog", "a red ball", "the park bench", "two cups")


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_download(root: Path, statuses=STATUSES, grit_columns: bool = True) -> dict:
    """An img2dataset output folder; returns the figures a correct report gives."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    expected = {"input": 0, "kept": 0, "reasons": {}, "boxes": 0, "retained": 0}
    for shard, shard_statuses in enumerate(statuses):
        name = f"{shard:05d}"
        rows = []
        with tarfile.open(root / f"{name}.tar", "w") as tar:
            for i, status in enumerate(shard_statuses):
                key = f"{shard:05d}{i:04d}"
                a, b = PHRASES[i % 4], PHRASES[(i + 1) % 4]
                caption = f"{a} next to {b}"
                start = len(a) + len(" next to ")
                chunks = [
                    [0.0, float(len(a)), 0.1, 0.1, 0.5, 0.6, 0.7],
                    [float(start), float(len(caption)), 0.4, 0.2, 0.9, 0.8, 0.5],
                ]
                # GRIT-20M's own expressions: the first chunk expands over the whole caption.
                refs = [[0.0, float(len(caption)), 0.1, 0.1, 0.5, 0.6, 0.7], chunks[1]]
                ok = status == "success"
                width, height = (int(rng.integers(64, 200)), int(rng.integers(64, 200))) if ok else (None, None)
                row = {
                    "key": key,
                    "url": f"https://example.com/{key}.jpg",
                    "caption": caption,
                    "status": status,
                    "error_message": None if ok else "HTTP Error 404: Not Found",
                    "width": width,
                    "height": height,
                    "original_width": width,
                    "original_height": height,
                    "exif": None,
                    "sha256": None,
                    "id": 1000 * shard + i,
                }
                if grit_columns:
                    row.update(noun_chunks=chunks, ref_exps=refs, clip_similarity_vitb32=0.31)
                rows.append(row)
                expected["input"] += 1
                if ok:
                    expected["kept"] += 1
                    expected["boxes"] += len(chunks)
                    expected["retained"] += len(containment_filter(refs))
                    _add(tar, f"{key}.jpg", _jpeg(rng, width, height))
                    _add(tar, f"{key}.txt", caption.encode())
                    meta = {k: v for k, v in row.items() if k not in ("noun_chunks", "ref_exps")}
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                else:
                    expected["reasons"][status] = expected["reasons"].get(status, 0) + 1
        pq.write_table(pa.Table.from_pylist(rows), root / f"{name}.parquet")
        successes = sum(s == "success" for s in shard_statuses)
        stats = {
            "count": len(shard_statuses),
            "successes": successes,
            "failed_to_download": shard_statuses.count("failed_to_download"),
            "failed_to_resize": shard_statuses.count("failed_to_resize"),
            "duration": 1.5,
            "status_dict": {"success": successes, "HTTP Error 404: Not Found": len(shard_statuses) - successes},
        }
        (root / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return expected


def test_img2dataset_download_is_counted_right(tmp_path, capsys):
    root = tmp_path / "grit-download"
    exp = write_img2dataset_download(root)
    assert (exp["input"], exp["kept"]) == (12, 7)
    assert grit_main(["stats", str(root), "--samples", "3"]) == 0
    out = capsys.readouterr()
    assert "12 input pairs, 7 kept (img2dataset download" in out.out
    got = json.loads((root / "report" / "stats.json").read_text())
    assert got["source"]["mode"] == "img2dataset"
    assert got["samples"] == {"input": 12, "kept": 7, "dropped": 5, "drop_reasons": exp["reasons"]}
    assert got["boxes"]["after_nms"] == exp["boxes"]
    assert got["expressions"]["entries_retained"] == exp["retained"]
    assert got["reference"]["corpus"]["images"] == 7
    # img2dataset's own counters agree with its parquet, and the report checks that they do.
    checks = {c["name"]: (c["index"], c["counters"], c["ok"]) for c in got["checks"]}
    assert checks["input"] == (12, 12, True) and checks["kept"] == (7, 7, True)
    assert checks["dropped_failed_to_download"] == (4, 4, True)
    assert got["warnings"] == [] and "warning" not in out.err
    assert got["timing"]["seconds"] == {"download": 3.0}
    # The gallery reads the download's images from its tars.
    assert len(got["gallery"]) == 3 and all(g["has_image"] for g in got["gallery"])


def test_img2dataset_counters_that_disagree_are_reported(tmp_path, capsys):
    root = tmp_path / "grit-download"
    write_img2dataset_download(root)
    stats = json.loads((root / "00001_stats.json").read_text())
    stats["successes"] += 1
    (root / "00001_stats.json").write_text(json.dumps(stats))
    assert grit_main(["stats", str(root), "--samples", "0"]) == 0
    assert "kept: the index gives 7, _stats.json gives 8" in capsys.readouterr().err


def test_a_single_img2dataset_parquet_file_is_counted_right(tmp_path):
    root = tmp_path / "grit-download"
    write_img2dataset_download(root)
    assert grit_main(["stats", str(root / "00000.parquet"), "--samples", "0"]) == 0
    got = json.loads((root / "00000_report" / "stats.json").read_text())
    assert got["samples"]["input"] == 7 and got["samples"]["kept"] == 4
    assert got["samples"]["drop_reasons"] == {"failed_to_download": 2, "failed_to_resize": 1}


def test_download_without_the_grit_columns_is_refused(tmp_path, capsys):
    root = tmp_path / "plain-download"
    write_img2dataset_download(root, grit_columns=False)
    assert grit_main(["stats", str(root)]) == 1
    err = capsys.readouterr().err
    assert "could be read as GRIT records" in err and "--save_additional_columns" in err


@pytest.mark.parametrize("kind", ["unknown", "mixed"])
def test_counters_of_an_unknown_or_mixed_layout_are_refused(tmp_path, capsys, kind):
    root = tmp_path / "folder"
    write_img2dataset_download(root)
    other = {"unknown": {"total": 7}, "mixed": {"counts": {"input": 7}, "seconds": {}}}[kind]
    (root / "00000_stats.json").write_text(json.dumps(other))
    assert grit_main(["stats", str(root)]) == 1
    err = capsys.readouterr().err
    assert ("neither a grit build's counters" if kind == "unknown" else "mixes a grit build's shards") in err


def test_grit_shards_with_statuses_of_another_tool_are_not_counted_silently(tmp_path, capsys):
    # An index that says it is ours (drop_reason column) but whose statuses are not kept/dropped.
    root = tmp_path / "odd"
    write_img2dataset_download(root, statuses=(["success", "failed_to_download"],))
    table = pq.read_table(root / "00000.parquet").drop_columns(["error_message"])
    table = table.append_column("drop_reason", pa.array([None, None], pa.string()))
    pq.write_table(table, root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"counts": {"input": 2, "kept": 1, "dropped": 1}}))
    assert grit_main(["stats", str(root), "--samples", "0"]) == 0
    err = capsys.readouterr().err
    assert "2 index rows have a status that is neither kept nor dropped" in err
