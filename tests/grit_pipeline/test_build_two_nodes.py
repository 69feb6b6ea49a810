"""A build on a two-node Ray cluster on this machine, writing to the loopback S3 server, with the writing forced onto
the second node (a custom resource only that node has): no step may assume the driver's disk.

Both nodes run in their own process groups and temporary folders (``ray start --block``), ended by pid at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.grit_pipeline.conftest import build_args, read_output
from tests.grit_pipeline.s3_server import MOTO, S3Server, download, env_with
from tests.grit_pipeline.test_build_cluster import RAY, free_ports, stop_session

REPO = Path(__file__).resolve().parents[2]
BUCKET = "grit-two-nodes"

pytestmark = pytest.mark.skipif(not (MOTO.exists() and RAY.exists()), reason="needs moto_server and the ray CLI")


def _node(args: list[str], env: dict, log: Path, temp: Path) -> subprocess.Popen:
    cmd = [str(RAY), "start", "--block", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    return subprocess.Popen(
        cmd + args,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # noqa: SIM115
    )


def test_two_node_build_writes_from_the_worker_node_to_s3(reference_build, reference_input, build_overrides, tmp_path):
    pytest.importorskip("s3fs")
    server = S3Server(tmp_path / "moto.log")
    nodes = []
    temps = [Path(tempfile.mkdtemp(prefix="grh", dir="/tmp")), Path(tempfile.mkdtemp(prefix="grw", dir="/tmp"))]
    try:
        server.create_bucket(BUCKET)
        env = env_with(server.endpoint)
        env["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster; test_build_cluster covers the job API
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        ports = free_ports(16)
        gcs = ports[0]
        head_ports = [
            f"--port={gcs}", f"--ray-client-server-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}", f"--metrics-export-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}", f"--node-manager-port={ports[6]}",
            f"--object-manager-port={ports[7]}", "--include-dashboard=false",
        ]  # fmt: skip
        nodes.append(
            _node(["--head", *head_ports, "--num-cpus=4", "--num-gpus=0"], env, tmp_path / "head.log", temps[0])
        )
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([str(RAY), "status", f"--address=127.0.0.1:{gcs}"], env=env, capture_output=True)
            if probe.returncode == 0:
                break
            assert nodes[0].poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, "the head did not come up"
            time.sleep(1)
        worker_ports = [
            f"--dashboard-agent-listen-port={ports[8]}", f"--dashboard-agent-grpc-port={ports[9]}",
            f"--metrics-export-port={ports[10]}", f"--runtime-env-agent-port={ports[11]}",
            f"--node-manager-port={ports[12]}", f"--object-manager-port={ports[13]}",
        ]  # fmt: skip
        worker_args = [f"--address=127.0.0.1:{gcs}", *worker_ports, "--num-cpus=1", "--num-gpus=0"]
        worker_args.append('--resources={"writer_node": 1}')
        nodes.append(_node(worker_args, env, tmp_path / "worker.log", temps[1]))
        while b"writer_node" not in probe.stdout:
            probe = subprocess.run([str(RAY), "status", f"--address=127.0.0.1:{gcs}"], env=env, capture_output=True)
            assert nodes[1].poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline + 60, "the worker node did not join"
            time.sleep(1)

        url = f"s3://{BUCKET}/corpus"
        extra = [f"ray.address=127.0.0.1:{gcs}", "output.ray_resources={writer_node: 0.01}"]
        args = build_args(reference_input, url, build_overrides, extra)  # type: ignore[arg-type]
        proc = subprocess.run(
            [sys.executable, "-m", "grit_pipeline", "build", *args],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=500,
        )  # fmt: skip
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert "grit build: complete" in output and not (tmp_path / "s3:").exists()
    finally:
        for node in reversed(nodes):
            stop_session(node)
        server_fs = server.filesystem()
        local = None
        try:
            if nodes:
                local = download(server_fs, f"s3://{BUCKET}/corpus", tmp_path / "copy")
        finally:
            server.stop()
            for temp in temps:
                subprocess.run(["rm", "-rf", str(temp)], check=False)
    a, b = read_output(reference_build), read_output(local)
    assert a["shards"] == b["shards"] and a["records"] == b["records"] and a["rows"] == b["rows"]
    assert b["manifest"]["status"] == "complete"
    assert os.path.basename(b["manifest"]["config"]["output"]["path"]) == "corpus"
