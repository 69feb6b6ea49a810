"""A plan a fixed-size Ray cluster cannot hold fails within a bounded time, naming the pools and what is missing.

A real 2-CPU head (``ray start --head --block`` in its own process session and temp folder, ended by pid, never by
``ray stop``); builds join it through ``RAY_ADDRESS`` in subprocesses, as ``ray job submit`` entrypoints do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.grit_pipeline.conftest import build_args, make_reference_input
from tests.grit_pipeline.test_build_cluster import RAY, free_ports, stop_session

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")

@ray.remote(num_cpus=1)
class Holder:
    def ping(self):
        return 1

h = Holder.remote()
ray.get(h.ping.remote())
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def two_cpu_head(tmp_path_factory):
    """A fixed cluster of one node with 2 CPUs and no GPU; yields (gcs address, environment for clients)."""
    if not RAY.exists():
        pytest.skip("the ray command line is not installed beside this Python")
    logs = tmp_path_factory.mktemp("head")
    ports = free_ports(9)
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = ports
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # loopback only: the test depends on no credential file of this machine
    env["PYTHONPATH"] = str(REPO)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="grs", dir="/tmp"))  # short: Ray's socket paths live under it
    cmd = [
        str(RAY), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={ray_tmp}",
    ]  # fmt: skip
    log = open(logs / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{gcs}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(RAY), "status", f"--address={address}"], env=env, capture_output=True).returncode:
            assert head.poll() is None, (logs / "head.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        stop_session(head)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _build(address: str, env: dict[str, str], args: list[str], timeout: float = 240) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "grit_pipeline", "build", *args],
        env={**env, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


@pytest.fixture(scope="module")
def small_input(tmp_path_factory) -> list[str]:
    return make_reference_input(tmp_path_factory.mktemp("sched-input"))


def test_default_plan_on_a_two_cpu_cluster_is_refused_at_once(two_cpu_head, small_input, build_overrides, tmp_path):
    address, env = two_cpu_head
    code, out, seconds = _build(address, env, build_args(small_input, tmp_path / "out", build_overrides))
    assert code == 2, out
    # The default plan reserves 3.75 CPUs: read 0.5, text, decode and grounding 1 each, the writing task 0.25.
    assert "cannot hold this plan" in out and "1.75 CPU missing" in out, out
    assert "decode (1 actor x 1 CPU)" in out and "grounding (1 actor x 1 CPU)" in out, out
    assert "ray.wait_for_resources_s" in out
    assert "Traceback" not in out and "Logged from file" not in out, out  # no warning fails its own formatting
    assert seconds < 120, f"took {seconds:.0f} s"


def test_waiting_for_an_autoscaler_is_bounded(two_cpu_head, small_input, build_overrides, tmp_path):
    address, env = two_cpu_head
    extra = ["ray.wait_for_resources_s=4"]
    code, out, seconds = _build(address, env, build_args(small_input, tmp_path / "out", build_overrides, extra))
    assert code == 2, out
    assert "waiting up to 4 s for it to grow" in out and "waited 4 s" in out, out


def test_actors_pending_on_a_busy_cluster_fail_within_the_timeout(
    two_cpu_head, small_input, build_overrides, tmp_path
):
    """The plan fits the cluster (2 CPUs) but another job holds one of them: the pools cannot all start."""
    address, env = two_cpu_head
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        half = [f"ray.stages.{s}.num_cpus=0.5" for s in ("read", "text", "decode", "grounding")]
        half.append("output.resources.num_cpus=0")  # the plan fits the 2 CPUs exactly
        extra = [*half, "ray.actor_start_timeout_s=10"]
        code, out, seconds = _build(address, env, build_args(small_input, tmp_path / "out", build_overrides, extra))
        assert code == 1, out
        # Said before the job starts: which pools will wait, for how long; then Ray's own timeout ends the job.
        assert "other work holds part of the Ray cluster" in out and "up to 10 s" in out, out
        assert "grounding (1 actor x 0.5 CPU)" in out, out
        assert "starting actors" in out and "enough resources" in out, out
        assert seconds < 150, f"took {seconds:.0f} s"
    finally:
        stop_session(holder)
        with contextlib.suppress(Exception):
            holder.stdout.close()
