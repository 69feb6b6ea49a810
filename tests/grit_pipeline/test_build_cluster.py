"""``ray job submit`` of a build to a Ray head this test starts on loopback, and always stops.

The head runs in its own process session (``ray start --block``); teardown ends exactly that session's processes, by
their ids. (``ray stop`` would end every Ray process of this user on the machine, other clusters included.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.grit_pipeline.conftest import build_args, read_output

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _session_processes(pgid: int) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def stop_session(head: subprocess.Popen) -> None:
    """End the processes of the head's session (its own process group), by pid: TERM, then KILL what is left."""
    import psutil

    pgid = head.pid  # start_new_session=True: the head leads its own group
    procs = _session_processes(pgid)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive + _session_processes(pgid):
        with contextlib.suppress(psutil.Error):
            proc.kill()
    head.wait(timeout=30)


@pytest.mark.skipif(not RAY.exists(), reason="the ray command line is not installed beside this Python")
def test_ray_job_submit_to_a_local_head(tiny_detector, build_overrides, tmp_path):
    from tests.grit_pipeline.conftest import make_reference_input

    inputs = make_reference_input(tmp_path / "in")
    out = tmp_path / "out"
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A loopback-only test cluster: no token, so the test depends on no credential file of this machine.
    env["RAY_AUTH_MODE"] = "disabled"
    head_cmd = [
        str(RAY), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats",
    ]  # fmt: skip
    # Its own temporary folder: `ray start` announces the cluster in <temp-dir>/ray_current_cluster, where a bare
    # ray.init() elsewhere on the machine would find it (and, once it is stopped, hang on it). Short, for Ray's
    # socket paths.
    ray_tmp = Path(tempfile.mkdtemp(prefix="grt", dir="/tmp"))
    head_cmd.append(f"--temp-dir={ray_tmp}")
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(head_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while True:  # the job API answers once the dashboard is up
            probe = subprocess.run([str(RAY), "job", "list", "--address", address], env=env, capture_output=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        entry = [sys.executable, "-m", "grit_pipeline", "build", *build_args(inputs, out, build_overrides)]
        job = subprocess.run(
            [str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entry],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        output = job.stdout + job.stderr
        assert job.returncode == 0, output
        assert "succeeded" in output.lower() and "grit build: complete" in output
    finally:
        stop_session(head)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    got = read_output(out)
    assert got["manifest"]["status"] == "complete"
    assert len(got["rows"]) == 29 and len(got["records"]) == 28
