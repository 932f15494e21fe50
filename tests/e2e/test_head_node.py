"""The head node's GCS killed (SIGKILL) and restarted under steady traffic, with Ray's GCS fault
tolerance: its state in an external Redis (Debian's `redis-server`; `.ci/run` installs it). Serve's
data path (HAProxy → ingress replicas → model replicas) does not go through the GCS: no request
fails while it is down, and after its restart the cluster reconciles and `serve status` is right.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray._common.test_utils import wait_for_condition

from tests.e2e.test_operations import APP, Cluster, Load
from tests.harness import BIN, kill_session, ray_head, serve_config_on, session_processes, wait_for_http
from tests.helpers import ROOT, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ops,
    pytest.mark.timeout(1500),
]


@contextlib.contextmanager
def redis_server(log_dir: Path) -> Iterator[str]:
    """A throwaway Redis on a free loopback port (no persistence: it outlives only the GCS)."""
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with (log_dir / "redis.log").open("w") as log:
        proc = subprocess.Popen(args, cwd=log_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_condition(lambda: _pong(port), timeout=60, retry_interval_ms=200)
        yield f"127.0.0.1:{port}"
    finally:
        kill_session(proc.pid)


def _pong(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


def gcs_process(session: int) -> int:
    """The pid of the cluster's gcs_server."""
    pids = session_processes(session, "gcs_server")
    if not pids:
        raise LookupError("no gcs_server in the cluster's session")
    return pids[0]


def serve_status(cluster: Cluster) -> str:
    return subprocess.run(
        [str(BIN / "serve"), "status", "-a", cluster.head.dashboard],
        cwd=ROOT,
        env={**os.environ, **cluster.head.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def test_a_gcs_killed_and_restarted_under_load_fails_no_request(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gcs")  # short: Ray's socket paths under it must fit in 107 bytes
    config = serve_config_on(free_port())  # the shipped config
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    with redis_server(tmp_path) as redis, ray_head(tmp_path, num_cpus=8, redis=redis) as head:
        cluster = Cluster(head, tmp_path)
        cluster.deploy(config)
        wait_for_condition(lambda: _healthy(cluster), timeout=900, retry_interval_ms=500)
        restarted: subprocess.Popen | None = None
        try:
            with Load(url, embed=2, complete=1, stream=1) as load:
                load.wait_for(20)
                pid = gcs_process(head.session)
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                environ = dict(pair.split(b"=", 1) for pair in pairs if b"=" in pair)
                cwd = os.readlink(f"/proc/{pid}/cwd")
                os.kill(pid, signal.SIGKILL)
                wait_for_condition(lambda: not Path(f"/proc/{pid}").exists(), timeout=30)
                killed_at = len(load.outcomes)
                load.wait_for(30)  # served while the GCS is down
                served_without_gcs = len(load.outcomes) - killed_at
                with (tmp_path / "gcs_restarted.log").open("w") as log:
                    restarted = subprocess.Popen(argv, env=environ, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
                wait_for_http(f"{head.dashboard}/api/gcs_healthz", timeout_s=300)
                wait_for_condition(lambda: _healthy(cluster), timeout=600, retry_interval_ms=1000)
                load.wait_for(20)  # and after it is back
            status = serve_status(cluster)
            ready = httpx.get(f"{url}/readyz", timeout=30).status_code
        finally:
            if restarted is not None:
                restarted.kill()
    failures = load.failures()
    print(
        f"GCS kill under load: {len(load.outcomes)} requests, {served_without_gcs} finished while the GCS was down, "
        f"{len(failures)} failed"
    )
    assert not failures, [f"{o.kind}: {o.detail}" for o in failures[:10]]
    assert f"{APP}:" in status and "RUNNING" in status and "UNHEALTHY" not in status, status
    assert ready == 200


def _healthy(cluster: Cluster) -> bool:
    app = cluster.app()
    deployments = app.get("deployments", {})
    return (
        app.get("status") == "RUNNING"
        and bool(deployments)
        and all(d["status"] == "HEALTHY" for d in deployments.values())
    )
