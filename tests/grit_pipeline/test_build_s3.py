"""``grit build --output s3://...`` against a real S3 API on loopback (moto_server, started and stopped here).

Each build runs as ``grit build`` in a subprocess with its own local Ray, whose workers get the endpoint and dummy
keys from the environment, as they would on a cluster. What the build wrote is read back through s3fs with
webdataset and pyarrow, and compared with the local reference build.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.grit_pipeline.conftest import REFERENCE_SAMPLES, REFERENCE_SHARDS, build_args, read_output
from tests.grit_pipeline.s3_server import MOTO, S3Server, download, env_with

REPO = Path(__file__).resolve().parents[2]
BUCKET = "grit-test"

pytestmark = pytest.mark.skipif(not MOTO.exists(), reason="moto_server (moto[server]) is not installed")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def _build(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grit_pipeline", "build", *args],
        env=env, cwd=log.parent, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the build and every process it started (its local Ray), by pid."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


def test_lease_uses_conditional_create_on_s3(s3, monkeypatch):
    from grit_pipeline.output_lock import OutputLease, OutputLocked
    from grit_pipeline.output_store import OutputStore

    for k, v in env_with(s3.endpoint, ()).items():
        monkeypatch.setenv(k, v)
    store = OutputStore(f"s3://{BUCKET}/lease-test")
    assert store.create_exclusive("x", b"1") and not store.create_exclusive("x", b"2")
    assert store.read_bytes("x") == b"1"
    with OutputLease(store, ttl_s=30), pytest.raises(OutputLocked):
        OutputLease(store, ttl_s=30).acquire()
    assert not store.exists(".grit-lock.json")


def test_build_to_s3_killed_part_way_and_resumed_gives_the_uninterrupted_records(
    s3, reference_build, reference_input, build_overrides, tmp_path
):
    fs = s3.filesystem()
    url = f"s3://{BUCKET}/runs/killed"
    env = env_with(s3.endpoint)
    slow = [f"{stage}.resources.batch_size=1" for stage in ("text", "image", "detector", "input")]
    args = build_args(reference_input, url, build_overrides, [*slow, "input.resources.actors=1"])  # type: ignore[arg-type]
    log = tmp_path / "killed.log"
    proc = _build(args, env, log)
    try:
        deadline = time.monotonic() + 300
        while not fs.glob(f"{BUCKET}/runs/killed/*_stats.json", refresh=True):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no shard completed in time"
            time.sleep(0.1)
    finally:
        _kill_tree(proc)
    done = fs.glob(f"{BUCKET}/runs/killed/*_stats.json", refresh=True)
    assert 0 < len(done) < REFERENCE_SHARDS, "the build was not killed part-way"
    assert not (tmp_path / "s3:").exists()  # never a local folder named after the URL

    rerun = _build(build_args(reference_input, url, build_overrides), env, tmp_path / "rerun.log")  # type: ignore[arg-type]
    try:
        assert rerun.wait(timeout=400) == 0, (tmp_path / "rerun.log").read_text()
    finally:
        if rerun.poll() is None:
            _kill_tree(rerun)
    text = (tmp_path / "rerun.log").read_text()
    assert "took over the lease" in text  # the killed build's lease: this host, its process gone
    local = download(fs, url, tmp_path / "copy")
    a, b = read_output(reference_build), read_output(local)
    assert a["shards"] == b["shards"] and a["records"] == b["records"] and a["rows"] == b["rows"]
    for shard in a["shards"]:  # the same bytes as the local build
        assert (reference_build / f"{shard}.tar").read_bytes() == (local / f"{shard}.tar").read_bytes()
    assert b["manifest"]["status"] == "complete" and not fs.glob(f"{BUCKET}/runs/killed/.grit-*")

    # Read back in place, through s3fs, as users would.
    import pyarrow.dataset as pads
    import webdataset as wds

    wds_gopen = sys.modules["webdataset.gopen"]
    wds_gopen.gopen_schemes["s3"] = lambda u, mode="rb", bufsize=8192, **kw: fs.open(u, mode)
    tars = sorted(f"s3://{p}" for p in fs.glob(f"{BUCKET}/runs/killed/*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == REFERENCE_SAMPLES - 1
    assert all(s["__key__"] == s["json"]["key"] for s in samples)
    parquet = sorted(fs.glob(f"{BUCKET}/runs/killed/*.parquet"))
    table = pads.dataset(parquet, filesystem=fs, format="parquet").to_table()
    assert table.num_rows == REFERENCE_SAMPLES
    stats = json.load(io.BytesIO(fs.cat_file(f"{BUCKET}/runs/killed/{a['shards'][0]}_stats.json")))
    assert stats["input"]["block"] == 0 and os.path.basename(stats["input"]["file"]) == "00000.tar"
