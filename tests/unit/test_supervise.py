"""The supervisor's proofs and checks, with real processes and sockets and no Ray (seconds):
which processes belong to a run, what a start does about an earlier run's leftovers and about
ports held by others, which ports a run needs, and that the systemd unit is valid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from supervise import plans, procs, state
from tests.harness import ROOT, free_port

# A session leader that starts two children and waits: one child started with the run's id, one
# without it (as Ray's dashboard modules look once they have rewritten their title).
LEADER = textwrap.dedent(
    """
    import os, subprocess, sys
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    env = {k: v for k, v in os.environ.items() if k != "RAYINFER_RUN_ID"}
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
    print(marked.pid, unmarked.pid, flush=True)
    sys.stdin.read()
    """
)


def _session(run_id: str | None) -> tuple[subprocess.Popen, psutil.Process, psutil.Process]:
    env = {k: v for k, v in os.environ.items() if k != procs.RUN_ID_VAR}
    if run_id is not None:
        env[procs.RUN_ID_VAR] = run_id
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    marked, unmarked = (psutil.Process(int(pid)) for pid in leader.stdout.readline().split())
    return leader, marked, unmarked


def _record(pid: int, create_time: float, ports: dict[int, str], name: str = "serve-1") -> state.RunRecord:
    return state.RunRecord(name, "a" * 32, pid, create_time, pid, ["serve", "run"], ports, state.now())


def _listen(port: int) -> subprocess.Popen:
    code = (
        "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    return proc


def test_a_dead_runs_leftovers_are_proven_by_its_id_and_session_and_stopped(tmp_path):
    run_id = "a" * 32
    leader, marked, unmarked = _session(run_id)
    bystander, *others = _session(None)  # the same kind of processes, not the run's: left alone
    try:
        record = _record(leader.pid, psutil.Process(leader.pid).create_time(), {free_port(): "x"})
        state.save(tmp_path, record)
        leader.kill()  # the supervisor crashed; its children live on in its session
        leader.wait()
        found = {p.pid for p in procs.run_members(run_id, leader.pid)}
        assert found == {marked.pid, unmarked.pid}  # the unmarked one by its session, proven by the marked one
        messages: list[str] = []
        state.preflight(tmp_path, "serve-1", record.ports, messages.append)
        assert not marked.is_running() and not unmarked.is_running()
        assert all(p.is_running() for p in others)
        assert "ended without stopping its processes" in messages[0] and str(marked.pid) in messages[0]
        assert not list(tmp_path.glob("*.json"))  # the record is gone with its run
    finally:
        for proc in (leader, bystander):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_session_without_a_process_of_the_run_is_never_taken_for_it():
    run_id = "b" * 32
    leader, *_ = _session(None)
    try:
        assert procs.run_members(run_id, leader.pid) == []  # same session id, no proof
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_a_port_held_by_another_process_is_named_and_the_start_refused(tmp_path):
    port = free_port()
    holder = _listen(port)
    try:
        with pytest.raises(state.Refused) as refused:
            state.preflight(tmp_path, "serve-1", {port: "http_options.port in serve_config.yaml"}, print)
        message = str(refused.value)
        assert f"port {port} is held by pid {holder.pid} ({sys.executable} -c" in message
        assert "[http_options.port in serve_config.yaml]" in message
        assert f"`kill {holder.pid}`" in message and "Nothing was stopped" in message
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_a_running_run_of_this_checkout_is_not_started_twice(tmp_path):
    me = psutil.Process()
    port = free_port()
    state.save(tmp_path, _record(me.pid, me.create_time(), {port: "x"}, name="serve-other"))
    with pytest.raises(state.Refused, match=f"(?s)already running from this checkout.*kill -TERM {me.pid}"):
        state.preflight(tmp_path, "serve-1", {port: "x"}, print)
    state.preflight(tmp_path, "serve-1", {free_port(): "x"}, print)  # other ports: both may run


def test_a_recycled_pid_is_not_taken_for_a_live_supervisor(tmp_path):
    me = psutil.Process()
    state.save(tmp_path, _record(me.pid, me.create_time() - 100, {free_port(): "x"}))
    state.preflight(tmp_path, "serve-1", {free_port(): "x"}, print)  # dead run, nothing left: forgotten
    assert not list(tmp_path.glob("*.json"))


def test_ports_are_free_once_their_holder_is_gone():
    port = free_port()
    holder = _listen(port)
    assert [h.pid for h in procs.listeners([port])] == [holder.pid]
    holder.kill()
    holder.wait()
    started = time.monotonic()
    assert procs.wait_ports_free([port], timeout_s=5) == []
    assert time.monotonic() - started < 5


def test_a_local_run_needs_the_configs_ports_and_haproxys(monkeypatch):
    for var in plans.HAPROXY_PORTS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    plan = plans.serve_plan("serve_config.yaml", "c" * 32)
    assert plan.ports == {
        8000: "http_options.port in serve_config.yaml",
        9000: "grpc_options.port in serve_config.yaml",
        8404: "RAY_SERVE_HAPROXY_STATS_PORT in the environment",
        9101: "RAY_SERVE_HAPROXY_METRICS_PORT in the environment",
        8500: "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT in the environment",
        9500: "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT in the environment",
    }
    assert plan.env["RAY_ADDRESS"] == "local" and plan.env[procs.RUN_ID_VAR] == "c" * 32
    assert plan.ready_url == "http://127.0.0.1:8000/readyz"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_the_systemd_unit_is_valid(tmp_path):
    """`systemd-analyze verify` on the shipped unit, with its paths pointed at this checkout."""
    unit = (ROOT / "deploy/systemd/rayinfer.service").read_text()
    unit = unit.replace("/opt/rayinfer", str(ROOT)).replace("User=rayinfer", "User=root")
    path = Path(tmp_path) / "rayinfer.service"
    path.write_text(unit.replace("Group=rayinfer", "Group=root"))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "KillMode=mixed" in unit and "RestartPreventExitStatus=3" in unit and state.REFUSED == 3


def test_a_container_runs_kuberays_generated_ray_start_as_its_shell_would(monkeypatch, tmp_path):
    # KubeRay quotes JSON resources for a shell; `printf` in place of `ray` shows the arguments bash passes.
    generated = (
        """ray start --head  --dashboard-host=0.0.0.0 --num-cpus=0 --resources='{"a": 1}' --node-name=$HOSTNAME"""
    )
    monkeypatch.setenv("KUBERAY_GEN_RAY_START_CMD", generated)
    monkeypatch.setenv("HOSTNAME", "pod-1")
    plan = plans.node_plan("d" * 32, [])
    assert plan.command[:2] == ["bash", "-c"] and plan.command[2].endswith(
        " --block"
    )  # so the supervisor holds the node
    shown = plan.command[2].replace("exec ray ", "exec printf '%s\\n' ray ", 1)
    passed = subprocess.run(["bash", "-c", shown], capture_output=True, text=True, check=True).stdout.splitlines()
    assert passed == [
        "ray",
        "start",
        "--head",
        "--dashboard-host=0.0.0.0",
        "--num-cpus=0",
        '--resources={"a": 1}',
        "--node-name=pod-1",
        "--block",
    ]
    assert plan.env[procs.RUN_ID_VAR] == "d" * 32 and plan.env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    monkeypatch.setenv("KUBERAY_GEN_RAY_START_CMD", "ray start --address=head:6379 --block")
    assert plans.node_plan("d" * 32, []).command[2] == "exec ray start --address=head:6379 --block"
    assert plans.node_plan("d" * 32, ["ray", "start", "--address=head:6379"]).command[-1] == "--block"
