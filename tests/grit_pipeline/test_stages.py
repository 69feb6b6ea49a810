"""The stage contract: the adapter's pending filter, drops, counting and timing; the plan built from the one list."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

import grit_pipeline.stages as stages
from grit_pipeline.config import GritConfig, load_config
from grit_pipeline.grounding.detector import Detection, GroundingResult
from grit_pipeline.pipeline import BuildRefused, build_dataset, capacity_problem, stage_demand, validate_settings
from grit_pipeline.readers import resolve_inputs
from grit_pipeline.stages import (
    STAGE_NAMES,
    STAGES,
    BuildContext,
    DecodeStage,
    GroundingStage,
    to_table,
)
from grit_pipeline.stages.ray_adapter import StageRunner
from tests.grit_pipeline.stage_example import MarkStage


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _row(i: int, **fields) -> dict:
    return {"kind": "sample", "file_index": 0, "position": i, "key": f"k{i}", "status": "pending", **fields}


def test_the_stage_list_is_the_plan_order():
    assert STAGE_NAMES == ("read", "text", "decode", "grounding")
    assert stages.TIME_COLUMNS == {
        "read": "t_read",
        "text": "t_text",
        "decode": "t_decode",
        "grounding": "t_grounding",
    }
    for stage in STAGES:  # every default is complete: nothing is left for the config to fill
        assert None not in vars(stage.resources).values()


def test_decode_rechecks_rows_without_chunks_and_image_rules_come_first():
    cfg = GritConfig()
    cfg.detector.kind = "annotations"  # no detector input needed: checks and decode only
    rows = [
        _row(0, image=_jpeg(64, 48)),  # pending, good
        _row(1, image=b"not an image"),  # pending, undecodable
        _row(2, image=_jpeg(64, 48), status="dropped", drop_reason="no_noun_chunks"),  # caption decided
        _row(3, image=b"junk", status="dropped", drop_reason="no_noun_chunks"),  # the image rule comes first
        _row(4, image=_jpeg(64, 48), status="dropped", drop_reason="bad_input"),  # not reconsidered: untouched
    ]
    out = StageRunner(DecodeStage, cfg)(to_table(rows)).to_pylist()
    assert [(r["status"], r["drop_reason"]) for r in out] == [
        ("pending", None),
        ("dropped", "bad_image"),
        ("dropped", "no_noun_chunks"),
        ("dropped", "bad_image"),
        ("dropped", "bad_input"),
    ]
    assert (out[0]["width"], out[0]["height"], out[2]["width"]) == (64, 48, 64)
    assert out[0]["image"] and out[2]["image"] is None and out[3]["image"] is None  # dropped rows carry no image
    assert out[4]["image"] is not None and out[4]["t_decode"] is None  # never seen by the stage
    assert all(out[i]["t_decode"] > 0 for i in range(4))


class _ScriptedDetector:
    """A detector whose answer per image is fixed by the test: an error for one, one box for the other."""

    model_id = "scripted"

    def __init__(self, cfg):
        pass

    def setup(self):
        pass

    def __call__(self, batch):
        out = []
        for item in batch:
            if item.phrases == ["a dog"]:
                out.append(GroundingResult(error="RuntimeError: CUDA error: an illegal memory access"))
            else:
                out.append(GroundingResult(detections=[Detection(0, (0.1, 0.1, 0.5, 0.5), 0.9)], num_boxes_raw=1))
        return out


def test_a_detector_error_is_its_own_drop_reason_with_its_type_counted():
    cfg = GritConfig()
    chunks = {"a dog": [[0, 5, "a dog", 0, 5]], "a cat": [[0, 5, "a cat", 0, 5]]}
    rows = [_row(i, caption=c, raw_caption=c, chunks_json=json.dumps(chunks[c])) for i, c in enumerate(chunks)]
    context = BuildContext(detector_factory=_ScriptedDetector)
    out = StageRunner(GroundingStage, cfg, context, final=True)(to_table(rows)).to_pylist()
    errored, kept = out
    assert (errored["status"], errored["drop_reason"]) == ("dropped", "detector_error")
    assert errored["detail"].startswith("RuntimeError: CUDA error")
    assert json.loads(errored["counters_json"]) == {"detector_errors_RuntimeError": 1}
    assert kept["status"] == "kept" and kept["noun_chunks"] == [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]]
    assert json.loads(kept["counters_json"]) == {"boxes_raw": 1, "chunks_grounded": 1}


def test_a_new_stage_is_one_list_entry(ray_session, spacy_model_name, tmp_path, monkeypatch):
    from tests.grit_pipeline.conftest import make_reference_input

    plan = (stages.ReadStage, stages.CaptionStage, MarkStage)
    monkeypatch.setattr(stages, "STAGES", plan)
    monkeypatch.setattr(stages, "STAGE_NAMES", tuple(s.name for s in plan))
    cfg = load_config(GritConfig, None, [f"text.spacy_model={spacy_model_name}", "ray.stages.mark.batch_size=2"])
    validate_settings(cfg)  # ray.stages.mark is a known stage now
    assert [d.stage for d in stage_demand(cfg)] == ["read", "text", "mark", "write"]  # the sink last
    problem = capacity_problem(stage_demand(cfg), {"CPU": 1.5}, {"CPU": 1.5})
    assert "mark (1 actor x 0.25 CPU)" in problem and "0.5 CPU missing" in problem

    files = resolve_inputs(make_reference_input(tmp_path / "in"))
    units = [{"index": f.index, "path": f.path, "format": f.format, "skip": 0} for f in files]
    rows = [r for b in build_dataset(cfg, units).iter_batches(batch_format="pyarrow") for r in b.to_pylist()]
    samples = [r for r in rows if r["kind"] == "sample"]
    assert len(samples) == 29 and sum(r["kind"] == "eof" for r in rows) == len(files)
    marked = [r for r in samples if r["drop_reason"] == "mentions_dog"]
    kept = [r for r in samples if r["status"] == "kept"]
    assert marked and kept  # the corpus has captions of both kinds
    for r in kept:
        assert r["words"] == len(r["caption"].split()) and r["t_mark"] > 0
        assert json.loads(r["counters_json"])["mark_words"] == r["words"]
    assert all("dog" in r["caption"].lower() and r["image"] is None for r in marked)


def test_the_plan_counts_each_chunk_once(ray_session, build_overrides, tmp_path):
    """Chunk counters over a whole build: found = kept + filtered by the text rules, each row counted once."""
    from tests.grit_pipeline.conftest import make_reference_input

    cfg = load_config(GritConfig, None, build_overrides)
    files = resolve_inputs(make_reference_input(tmp_path / "in"))
    units = [{"index": f.index, "path": f.path, "format": f.format, "skip": 0} for f in files]
    rows = [
        r for b in build_dataset(cfg, units, num_gpus=0).iter_batches(batch_format="pyarrow") for r in b.to_pylist()
    ]
    total = {}
    for r in rows:
        for k, v in json.loads(r["counters_json"] or "{}").items():
            total[k] = total.get(k, 0) + v
        if r["kind"] == "sample" and r["num_chunks_found"] is not None:
            assert json.loads(r["counters_json"])["chunks_found"] == r["num_chunks_found"]
    text_filtered = total.get("chunks_filtered_abstract_noun", 0) + total.get("chunks_filtered_pronoun", 0)
    assert total["chunks_found"] == total["chunks_kept"] + text_filtered > 0
    assert total["chunks_grounded"] <= total["chunks_kept"]


def test_stage_settings_are_checked_against_the_list():
    cfg = load_config(GritConfig, None, ["ray.stages.grounding.actors=0", "ray.stages.texts.actors=2"])
    with pytest.raises(BuildRefused) as err:
        validate_settings(cfg)
    assert "ray.stages.texts: no such stage (stages: read, text, decode, grounding)" in str(err.value)
    assert "ray.stages.grounding: actors and batch_size must be >= 1" in str(err.value)


def _writer_job(spec_file: str) -> None:
    """One job of the test below, as a driver of its own joined to the test's Ray (``RAY_ADDRESS``): its actors go
    when it exits, also those of a pool a failure stopped while they were starting. Prints the writer's rows, or the
    job's error, as one line of JSON."""
    import time
    from pathlib import Path

    import ray

    from grit_pipeline.output_store import OutputStore
    from grit_pipeline.plan import attach_writer
    from grit_pipeline.writer import run_dir

    spec = json.loads(Path(spec_file).read_text())
    ray.init(logging_level="WARNING", log_to_driver=False)
    cfg = load_config(GritConfig, None, spec["overrides"])
    store = OutputStore(spec["out"])

    @ray.remote(num_cpus=0)
    def opening(seconds: float, fail: bool, run: str) -> None:
        time.sleep(seconds)
        if fail:
            raise ValueError("the output holds shards built with other settings")
        store.make_dir(run_dir(run))  # as the real opening does: the workers never create the run's folder

    ds = build_dataset(cfg, spec["units"], num_gpus=0)
    # As on the embedded local Ray: the pools start asynchronously, so the stages start working at once.
    ray.data.DataContext.get_current().wait_for_min_actors_s = -1
    start = opening.remote(spec["seconds"], spec["fail"], spec["run"])
    ds = attach_writer(ds, store, spec["run"], cfg, frozenset(), start_after=start)
    try:
        result = {"rows": [r for b in ds.iter_batches(batch_format="pyarrow") for r in b.to_pylist()]}
    except Exception as exc:  # noqa: BLE001 - what the job raised, whatever Ray wraps it in
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(result), flush=True)


def test_the_write_tasks_wait_for_start_after_and_fail_when_it_failed(ray_session, build_overrides, tmp_path):
    """``attach_writer``'s ``start_after`` (the opening of the output): no fragment is written before that task has
    returned, and none at all where it failed, while the stages before the writer read and work meanwhile (the
    embedded local Ray starts the actor pools beside the preflight and the opening)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.grit_pipeline.conftest import make_reference_input, subprocess_env

    files = resolve_inputs(make_reference_input(tmp_path / "in"))
    units = [{"index": f.index, "path": f.path, "format": f.format, "skip": 0} for f in files]
    out = tmp_path / "out"
    out.mkdir()
    root = Path(__file__).resolve().parents[2]

    def job(seconds: float, fail: bool, run: str) -> dict:
        spec = tmp_path / f"{run}.json"
        spec.write_text(json.dumps({"overrides": build_overrides, "units": units, "out": str(out), "run": run,
                                    "seconds": seconds, "fail": fail}))  # fmt: skip
        code = f"from tests.grit_pipeline.test_stages import _writer_job; _writer_job({str(spec)!r})"
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=subprocess_env(ray_session), capture_output=True, text=True,
            timeout=240,
        )  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT ") :])

    # A write before the opening returned would fail on the missing run folder, with another error.
    failed = job(0.0, True, "a" * 32)
    assert "not started" in failed.get("error", "").lower(), failed
    assert os.listdir(out) == []  # nothing written where the opening failed

    done = job(3.0, False, "b" * 32)
    assert "rows" in done, done
    fragments = [r for r in done["rows"] if r["kind"] == "fragment"]
    assert sum(r["samples"] for r in fragments) == 29 and not any(r["bad_input"] for r in fragments)
    assert all(os.path.isfile(out / r["path"]) for r in fragments)
