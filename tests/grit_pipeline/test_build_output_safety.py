"""Output safety: foreign folders refused and left alone, the lease (one build at a time, taken over from a dead
holder), a build that did not start leaves nothing, and SIGTERM ends a build cleanly with its documented code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grit_pipeline.output_lock import LOCK_NAME, LeaseLost, OutputLease, OutputLocked
from grit_pipeline.output_store import OutputStore
from tests.grit_pipeline.conftest import REFERENCE_SHARDS, build_args, read_output, run_cli, subprocess_env

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------------------------


def test_lease_is_exclusive_while_its_holder_lives_and_given_back(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    first = OutputLease(store, ttl_s=30)
    first.acquire()
    try:
        with pytest.raises(OutputLocked, match=f"pid {os.getpid()}"):
            OutputLease(store, ttl_s=30).acquire()
    finally:
        first.release()
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    with OutputLease(store, ttl_s=30) as again:
        assert again.took_over is None


def _write_lease(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lease = {"holder": {"host": "elsewhere", "pid": 1}, "token": "x" * 32, "heartbeat": time.time(), "ttl_s": 30}
    lease.update(fields)
    path.write_text(json.dumps(lease))


def test_lease_of_a_gone_holder_is_taken_over(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    lock = tmp_path / "out" / LOCK_NAME
    _write_lease(lock)  # another host, fresh heartbeat: alive
    with pytest.raises(OutputLocked, match="host elsewhere"):
        OutputLease(store).acquire()
    _write_lease(lock, heartbeat=time.time() - 120)  # no heartbeat for longer than its ttl: gone
    with OutputLease(store) as lease:
        assert lease.took_over["holder"]["host"] == "elsewhere"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lease(lock, holder={"host": socket.gethostname(), "pid": dead.pid})  # this host, process ended
    with OutputLease(store) as lease:
        assert lease.took_over["holder"]["pid"] == dead.pid


def test_a_lease_taken_over_from_a_stalled_holder_is_noticed(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    lease = OutputLease(store, ttl_s=1)
    lease.acquire()
    try:
        _write_lease(tmp_path / "out" / LOCK_NAME, token="y" * 32)  # another build took it over
        deadline = time.monotonic() + 5
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost):
            lease.check()
    finally:
        lease.release()
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["token"] == "y" * 32  # not ours to delete


# ---------------------------------------------------------------------------------------------------------------
# Builds
# ---------------------------------------------------------------------------------------------------------------


def test_a_folder_with_other_files_is_refused_and_untouched(reference_input, build_overrides, tmp_path):
    out = tmp_path / "theirs"
    (out / ".tmp").mkdir(parents=True)
    (out / ".tmp" / "notes.txt").write_text("mine")
    (out / "20240101.parquet").write_bytes(b"PAR1 not ours")
    (out / "00003.parquet").write_bytes(b"PAR1 not ours either")
    before = tree(out)
    code, text = run_cli(build_args(reference_input, out, build_overrides))
    assert code == 2 and "not empty" in text and "no grit manifest.json" in text, text
    assert tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == [".tmp", "00003.parquet", "20240101.parquet"]


def test_user_files_in_a_grit_output_survive_a_resumed_build(
    reference_build, reference_input, build_overrides, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(reference_build, out)
    for name in ("00008-00002_stats.json", "00003-00001_stats.json"):  # two shards lost, one mid-corpus
        (out / name).unlink()
    (out / ".tmp").mkdir()
    (out / ".tmp" / "notes.txt").write_text("mine")
    (out / "00003.parquet").write_bytes(b"mine too")
    (out / "README").write_text("my corpus")
    code, text = run_cli(build_args(reference_input, out, build_overrides))
    assert code == 0, text
    assert f"{REFERENCE_SHARDS - 2} shard(s) already complete" in text
    assert (out / ".tmp" / "notes.txt").read_text() == "mine" and (out / "00003.parquet").read_bytes() == b"mine too"
    assert (out / "README").read_text() == "my corpus"
    a, b = read_output(reference_build), read_output(out)
    assert a["records"] == b["records"] and a["rows"] == b["rows"]


def test_a_build_that_does_not_start_leaves_the_output_as_it_found_it(
    reference_build, reference_input, build_overrides, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "no-such-model"
    code, text = run_cli(build_args(reference_input, empty, build_overrides, [f"detector.model={missing}"]))
    assert code == 2 and str(missing) in text
    assert empty.is_dir() and not any(empty.iterdir())
    # A grit output and a refused re-run (other result settings): not one byte changes, the manifest included.
    out = tmp_path / "out"
    shutil.copytree(reference_build, out)
    before = tree(out)
    code, text = run_cli(build_args(reference_input, out, build_overrides, ["detector.nms_iou=0.3"]))
    assert code == 2, text
    assert tree(out) == before


def test_on_the_embedded_ray_a_build_refused_while_its_stages_start_leaves_the_output_as_it_found_it(
    reference_build, reference_input, build_overrides, tmp_path
):
    """Without a cluster the stages' actors load the models themselves and the output is opened once they have
    reported them: a refusal (other settings, a missing detector or spaCy pipeline, found by the actors) still
    leaves every byte as it was."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # grit build starts its own local Ray

    def build(out: Path, extra: list[str]) -> tuple[int, str]:
        args = build_args(reference_input, out, build_overrides, extra)
        proc = subprocess.run(
            [sys.executable, "-m", "grit_pipeline", "build", *args],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr

    out = tmp_path / "out"
    shutil.copytree(reference_build, out)
    before = tree(out)
    code, text = build(out, ["detector.nms_iou=0.3"])
    assert code == 2 and "built with other settings" in text and "detector.nms_iou" in text, text
    assert tree(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "no-such-model"
    code, text = build(empty, [f"detector.model={missing}"])
    assert code == 2 and str(missing) in text, text
    assert empty.is_dir() and not any(empty.iterdir())
    code, text = build(empty, ["text.spacy_model=xx_no_such_pipeline"])
    assert code == 2 and "xx_no_such_pipeline" in text, text
    assert empty.is_dir() and not any(empty.iterdir())


def _start_slow_build(ray_address: str, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grit_pipeline", "build", *args],
        env=subprocess_env(ray_address),
        cwd=REPO,
        stdout=open(log, "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_second_build_is_refused_while_the_first_runs_and_sigterm_ends_it_cleanly(
    ray_session, reference_input, reference_build, build_overrides, tmp_path
):
    out = tmp_path / "out"
    slow = [f"{stage}.resources.batch_size=1" for stage in ("text", "image", "detector", "input")]
    args = build_args(reference_input, out, build_overrides, [*slow, "input.resources.actors=1"])
    log = tmp_path / "first.log"
    first = _start_slow_build(ray_session, args, log)
    try:
        deadline = time.monotonic() + 240
        # Started: the preflight passed and the opening wrote the manifest (this build joins a cluster); the
        # pools start next.
        while not (out / "manifest.json").exists():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the build did not start in time"
            time.sleep(0.05)
        code, text = run_cli(args)
        assert code == 2 and "being written by another build" in text and f"pid {first.pid}" in text, text
        first.send_signal(signal.SIGTERM)
        rc = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    output = log.read_text()
    assert rc == 143, output  # 128 + SIGTERM, as documented (build.py, docs/pipeline.md)
    assert "stopped by SIGTERM" in output and "run the same command again" in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert not (out / LOCK_NAME).exists() and not (out / ".grit-tmp").exists()
    done = sorted(out.glob("*_stats.json"))
    assert len(done) < REFERENCE_SHARDS, "SIGTERM did not land part-way"
    for stats in done:  # whatever was marked complete is whole
        name = stats.name[: -len("_stats.json")]
        assert (out / f"{name}.tar").stat().st_size > 0 and (out / f"{name}.parquet").exists()
    code, text = run_cli(build_args(reference_input, out, build_overrides))
    assert code == 0, text
    a, b = read_output(reference_build), read_output(out)
    assert a["shards"] == b["shards"] and a["records"] == b["records"] and a["rows"] == b["rows"]
