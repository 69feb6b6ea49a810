"""Fixtures for the ``grit build`` tests: one Ray session for all of them, a tiny Grounding DINO, a reference corpus.

The Ray session is started once (4 logical CPUs, enough for every stage's actor pool) and always shut down. Builds
in this process reuse it; builds in subprocesses join it through ``RAY_ADDRESS``, which also exercises the "join a
cluster" path, and costs no second Ray start.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import pytest

from tests.grit_pipeline import pipeline_corpus as corpus


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started = False
    if not ray.is_initialized():
        # address="local": a new instance, never a cluster that a `ray start` elsewhere on this machine announced.
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True
        )
        started = True
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory) -> Path:
    """A saved tiny Grounding DINO folder, loaded through the same from_pretrained path as a real checkpoint."""
    from grit_pipeline.grounding.tiny import save_tiny_grounding_dino

    return save_tiny_grounding_dino(tmp_path_factory.mktemp("tiny-gdino") / "model")


@pytest.fixture(scope="session")
def build_overrides(tiny_detector, spacy_model_name) -> list[str]:
    """``--set`` values every test build shares: the tiny detector on CPU, the small spaCy model, small batches."""
    return [
        f"text.spacy_model={spacy_model_name}",
        f"detector.model={tiny_detector}",
        "detector.device=cpu",
        "detector.box_threshold=0.0",  # random weights: keep every box, so every good sample is grounded
        "detector.batch_size=4",
        "detector.image_short_side=160",  # small detector input: the tiny model on CPU in milliseconds
        "detector.image_long_side_max=256",
        "detector.resources.batch_size=4",
        "detector.resources.num_gpus=0",
        "text.resources.batch_size=4",
        "image.resources.batch_size=4",
        "input.resources.batch_size=2",
        "input.resources.num_cpus=0.5",  # a --set inside a resources block starts from StageResources' defaults
        "output.samples_per_shard=2",
        "output.resources.batch_size=2",  # a fragment per two rows: shards complete one by one (tests interrupt)
        "output.resources.num_cpus=0.25",
        "output.progress_interval_s=0",
    ]


REFERENCE_SHARDS = 19
REFERENCE_SAMPLES = 29


def make_reference_input(root: Path) -> list[str]:
    """Eight small img2dataset tars (3 samples each) and a JSONL table with image paths (5 rows): 29 samples.

    Many small files make results stream in over several seconds (tests interrupt builds part-way); with
    ``output.samples_per_shard=2`` they make 19 shards (2 + 1 per tar, 2 + 2 + 1 for the table).
    """
    wds = root / "wds"
    wds.mkdir(parents=True)
    for i in range(8):
        corpus.write_tar(wds / f"{i:05d}.tar", corpus.good_samples(3, seed=1 + i))
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(5):
        (images / f"p{i}.png").write_bytes(corpus.png(300 + i, 80, 60))
        rows.append({"caption": corpus.CAPTIONS[i], "image": f"images/p{i}.png", "key": f"row.{i}/x", "id": 500 + i})
    rows[3]["caption"] = " \t "
    corpus.write_jsonl(root / "rows.jsonl", rows)
    return [str(wds), str(root / "rows.jsonl")]


def run_cli(args: list[str]) -> tuple[int, str]:
    """``grit build ...`` in this process (joining the session's Ray); returns the exit code and what it printed."""
    from grit_pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        code = main(["build", *args])
    return code, out.getvalue()


def build_args(inputs: list[str], output: Path, overrides: list[str], extra: list[str] = ()) -> list[str]:
    args = []
    for pattern in inputs:
        args += ["--input", pattern]
    args += ["--output", str(output)]
    for item in [*overrides, *extra]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def reference_input(tmp_path_factory) -> list[str]:
    return make_reference_input(tmp_path_factory.mktemp("reference-input"))


@pytest.fixture(scope="session")
def reference_build(ray_session, reference_input, build_overrides, tmp_path_factory) -> Path:
    """One uninterrupted build of the reference input: what interrupted, crashed and repeated builds must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code, text = run_cli(build_args(reference_input, out, build_overrides))
    assert code == 0, text
    return out


def read_output(out: Path) -> dict:
    """Everything a build wrote that must be reproducible: records by key, index rows by key, shard stats."""
    import pyarrow.parquet as pq

    from grit_core.record import record_from_json

    records, rows, shards = {}, {}, []
    import tarfile

    for stats_path in sorted(out.glob("*_stats.json")):
        name = stats_path.name[: -len("_stats.json")]
        shards.append(name)
        with tarfile.open(out / f"{name}.tar") as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    rec = record_from_json(tf.extractfile(member).read())
                    assert rec.key not in records, f"record {rec.key} written twice"
                    records[rec.key] = rec.to_dict()
        for row in pq.read_table(out / f"{name}.parquet").to_pylist():
            assert row["key"] not in rows, f"index row {row['key']} written twice"
            rows[row["key"]] = row
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    return {"records": records, "rows": rows, "shards": shards, "manifest": manifest}


def stats_checks(out: Path, report: Path) -> list[dict]:
    """``grit stats`` on a build: its comparisons of the index against the shards' counters (all must agree)."""
    from grit_pipeline.cli import main

    sink = io.StringIO()
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        assert main(["stats", str(out), "--out", str(report)]) == 0, sink.getvalue()
    data = json.loads((report / "stats.json").read_text())
    assert not data.get("warnings"), data.get("warnings")
    return data["checks"]


def subprocess_env(ray_address: str) -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_address
    return env
