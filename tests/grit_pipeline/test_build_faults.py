"""Builds that fail part-way: a killed driver, a crashed grounding actor, a full disk, a missing model.

Each ends with the records of the uninterrupted reference build, none twice, and nothing marked complete that is not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grit_pipeline.output_store import OutputStore
from grit_pipeline.writer import scan_complete
from tests.grit_pipeline.conftest import (
    REFERENCE_SHARDS,
    build_args,
    read_output,
    run_cli,
    subprocess_env,
)

REPO = Path(__file__).resolve().parents[2]


def assert_same_corpus(out: Path, reference: Path) -> None:
    a, b = read_output(reference), read_output(out)  # read_output fails on a key written twice
    assert b["shards"] == a["shards"]
    assert b["records"] == a["records"]
    assert b["rows"] == a["rows"]


def complete_shards(out: Path) -> list[str]:
    return sorted(p.name[: -len("_stats.json")] for p in out.glob("*_stats.json"))


def test_sigkill_of_the_driver_then_rerun_gives_the_uninterrupted_records(
    ray_session, reference_input, reference_build, build_overrides, tmp_path
):
    out = tmp_path / "out"
    # One file and one sample at a time (speed-only settings: the records are the same): shards then complete one
    # by one over several seconds, so the kill lands part-way even on a fast machine.
    slow = [f"{stage}.resources.batch_size=1" for stage in ("text", "image", "detector", "input")]
    args = build_args(reference_input, out, build_overrides, [*slow, "input.resources.actors=1"])
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "grit_pipeline", "build", *args],
        env=subprocess_env(ray_session),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(out.glob("*_stats.json")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no shard completed in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    done = complete_shards(out)
    assert 0 < len(done) < REFERENCE_SHARDS, "the driver was not killed part-way"
    assert len(scan_complete(OutputStore(str(out)), 2)) == len(done)  # any complete shard counts, in any order
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"  # never marked complete

    code, text = run_cli(args)
    assert code == 0, text
    assert f"{len(done)} shard(s) already complete" in text
    assert_same_corpus(out, reference_build)


def test_a_crashed_grounding_actor_is_replaced_and_the_job_completes(
    ray_session, reference_input, reference_build, build_overrides, tmp_path
):
    out = tmp_path / "out"
    extra = ["detector.fault_after_batches=2", "detector.resources.batch_size=2"]
    code, text = run_cli(build_args(reference_input, out, build_overrides, extra))
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["grounding_actor_restarts"] == 1  # the fault happened, once, and was survived
    assert_same_corpus(out, reference_build)  # every sample, same records (batching does not change results)


def _namespace_tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _namespace_tmpfs_available(), reason="needs unshare and user namespaces for a small tmpfs")
def test_disk_full_leaves_no_shard_marked_complete_and_a_rerun_completes(
    ray_session, reference_input, reference_build, build_overrides, tmp_path
):
    """The output is a 256 KiB tmpfs in a private mount namespace: it fills up part-way through the build. The workers
    write the shards, so the build starts its own local Ray inside that namespace (no RAY_ADDRESS)."""
    mount = tmp_path / "small"
    mount.mkdir()
    copy = tmp_path / "copy"
    copy.mkdir()
    args = build_args(reference_input, mount, build_overrides)
    cmd = " ".join(
        [
            'mount -t tmpfs -o size=256k tmpfs "$1" || exit 90;',
            f"{sys.executable} -m grit_pipeline build {' '.join(_quote(a) for a in args)};",
            'rc=$?; cp -a "$1"/. "$2"/; exit $rc',
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd, "sh", str(mount), str(copy)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "No space left on device" in output and "run the same command again to resume" in output, output
    done = complete_shards(copy)
    assert 0 < len(done) < REFERENCE_SHARDS
    for name in done:  # every shard marked complete is whole
        assert (copy / f"{name}.tar").stat().st_size > 0 and (copy / f"{name}.parquet").exists()
    assert len(scan_complete(OutputStore(str(copy)), 2)) == len(done)
    assert json.loads((copy / "manifest.json").read_text())["status"] in ("running", "incomplete")

    # The cause removed (room to write): the same command continues where it stopped.
    code, text = run_cli(build_args(reference_input, copy, build_overrides))
    assert code == 0, text
    assert f"{len(done)} shard(s) already complete" in text
    assert_same_corpus(copy, reference_build)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_fails_cleanly_then_completes(
    ray_session, reference_input, reference_build, build_overrides, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, text = run_cli(build_args(reference_input, out, build_overrides))
    finally:
        out.chmod(0o755)
    assert code == 1 and "Permission denied" in text, text
    assert not complete_shards(out)
    code, text = run_cli(build_args(reference_input, out, build_overrides))
    assert code == 0, text
    assert_same_corpus(out, reference_build)


def test_missing_detector_weights_stop_the_build_at_once(ray_session, reference_input, build_overrides, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    code, text = run_cli(build_args(reference_input, out, build_overrides, [f"detector.model={missing}"]))
    assert code == 2
    assert str(missing) in text and "detector.model" in text  # names the model and how to point at a folder
    assert not out.exists() or not any(out.iterdir())  # stopped before writing anything
