"""``grit build`` end to end on generated input with the tiny Grounding DINO and the small English spaCy model."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pytest

from grit_core.record import DROP_REASONS, GritRecord, validate_record
from tests.grit_pipeline.conftest import (
    REFERENCE_SAMPLES,
    REFERENCE_SHARDS,
    build_args,
    read_output,
    run_cli,
    stats_checks,
)


def test_end_to_end_records_and_readback(reference_build, reference_input, tmp_path):
    out = reference_build
    got = read_output(out)
    # Shards are named by input file and block: 8 tars of 3 samples (2 blocks each), a table of 5 (3 blocks).
    expected = [f"{f:05d}-{b:05d}" for f in range(8) for b in range(2)] + [f"00008-{b:05d}" for b in range(3)]
    assert got["shards"] == expected and len(expected) == REFERENCE_SHARDS
    rows = got["rows"]
    assert len(rows) == REFERENCE_SAMPLES  # one index row per input sample, kept or dropped
    dropped = {k: r["drop_reason"] for k, r in rows.items() if r["status"] == "dropped"}
    assert set(dropped.values()) <= set(DROP_REASONS)
    assert list(dropped.values()) == ["empty_caption"]
    # Every record in the tars is valid, sorted, and the same as its index row.
    assert len(got["records"]) == REFERENCE_SAMPLES - 1
    for key, rec in got["records"].items():
        validate_record(rec, check_order=True)
        assert GritRecord.from_dict(rows[key]).to_dict() == rec
        assert rec["noun_chunks"], key
    first = got["records"]["000001000"]
    assert first["url"] == "https://example.com/000001000.jpg" and first["id"] == 1000
    assert first["clip_similarity_vitb32"] == pytest.approx(0.25)
    assert (first["width"], first["height"]) == (96, 64)
    jsonl_keys = [k for k in rows if k.startswith("row_")]
    assert len(jsonl_keys) == 5 and all("." not in k and "/" not in k for k in jsonl_keys)

    manifest = got["manifest"]
    assert manifest["status"] == "complete" and manifest["shards"] == REFERENCE_SHARDS
    assert manifest["detector"]["kind"] == "grounding_dino" and manifest["detector"]["random_weights"] is False
    assert manifest["spacy_model"]["version"] and manifest["id_type"] == "int64"
    assert manifest["totals"]["input"] == REFERENCE_SAMPLES and manifest["totals"]["kept"] == REFERENCE_SAMPLES - 1
    assert (out / "config.yaml").exists() and not (out / ".grit-tmp").exists()
    assert not (out / ".grit-lock.json").exists()  # the lease is given back
    stats = [json.loads((out / f"{s}_stats.json").read_text()) for s in got["shards"]]
    assert sum(s["counts"]["boxes"] for s in stats) == sum(len(r["noun_chunks"]) for r in got["records"].values())
    assert all(s["seconds"]["grounding"] > 0 and s["seconds"]["write"] > 0 for s in stats)
    # The index and the counters are written by different code; the stats report checks they agree.
    checks = stats_checks(out, tmp_path / "report")
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]


def test_shards_read_back_with_webdataset_ray_datasets_and_pyarrow(reference_build, ray_session, tmp_path):
    """The default output (``output.image_format: jpg``) reads with the idioms users write, taken as they are."""
    import datasets
    import ray
    import webdataset as wds

    out = reference_build
    tars = sorted(str(p) for p in out.glob("*.tar"))
    # The reference input holds PNGs (its JSONL rows): they were re-encoded, and counted.
    got = read_output(out)
    png_inputs = [k for k in got["records"] if k.startswith("row_")]
    assert png_inputs and got["manifest"]["totals"]["images_converted_jpeg"] == len(png_inputs)
    assert {r["image_ext"] for r in got["rows"].values() if r["status"] == "kept"} == {"jpg"}

    # 1. webdataset: .decode("pil").to_tuple("jpg", "json") raises on any sample without a .jpg.
    n = 0
    for image, rec in wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg", "json"):
        validate_record(rec, check_order=True)
        assert image.size == (rec["width"], rec["height"])
        n += 1
    assert n == REFERENCE_SAMPLES - 1
    # 2. ray.data.read_webdataset with its default decoding (numpy arrays).
    rows = ray.data.read_webdataset(tars).take_all()
    assert len(rows) == REFERENCE_SAMPLES - 1
    for row in rows:
        assert row["jpg"].shape == (row["json"]["height"], row["json"]["width"], 3)
    # 3. Hugging Face datasets' webdataset builder, which gives jpg=None for a sample stored under another name.
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == REFERENCE_SAMPLES - 1
    for row in ds:
        assert row["jpg"] is not None and row["jpg"].size == (row["json"]["width"], row["json"]["height"])
    table = pads.dataset(sorted(str(p) for p in out.glob("*.parquet")), format="parquet").to_table()
    assert table.num_rows == REFERENCE_SAMPLES
    assert table.filter(pads.field("status") == "kept").num_rows == REFERENCE_SAMPLES - 1


def test_two_builds_give_identical_records_and_parquet_rows(
    reference_build, reference_input, build_overrides, tmp_path
):
    code, text = run_cli(build_args(reference_input, tmp_path / "again", build_overrides))
    assert code == 0, text
    a, b = read_output(reference_build), read_output(tmp_path / "again")
    assert a["records"] == b["records"]
    assert a["rows"] == b["rows"]
    for shard in a["shards"]:  # same members in the same order, same bytes
        assert (reference_build / f"{shard}.tar").read_bytes() == (tmp_path / "again" / f"{shard}.tar").read_bytes()


def test_rerun_of_a_complete_build_processes_nothing(reference_build, reference_input, build_overrides):
    before = {p.name: p.stat().st_mtime_ns for p in reference_build.glob("0*")}
    code, text = run_cli(build_args(reference_input, reference_build, build_overrides))
    assert code == 0, text
    assert f"0 to read, {REFERENCE_SHARDS} shard(s) already complete" in text
    assert {p.name: p.stat().st_mtime_ns for p in reference_build.glob("0*")} == before
    assert "input samples" in text and "kept" in text  # the summary table covers the whole corpus


def test_result_changing_settings_are_refused_unless_told(reference_build, reference_input, build_overrides):
    code, text = run_cli(build_args(reference_input, reference_build, build_overrides, ["detector.nms_iou=0.3"]))
    assert code == 2 and "detector.nms_iou: 0.5 -> 0.3" in text and "--overwrite-config" in text
    code, text = run_cli(build_args(reference_input[:1], reference_build, build_overrides))
    assert code == 2 and "new output folder" in text
    # One image extension per corpus: a resume never mixes .jpg with the inputs' own formats.
    other_format = ["output.image_format=original"]
    code, text = run_cli(build_args(reference_input, reference_build, build_overrides, other_format))
    assert code == 2 and "output.image_format: 'jpg' -> 'original'" in text and "new output folder" in text
    # Speed-only settings are fine.
    speed_only = ["text.resources.batch_size=7"]
    code, text = run_cli(build_args(reference_input, reference_build, build_overrides, speed_only))
    assert code == 0, text
