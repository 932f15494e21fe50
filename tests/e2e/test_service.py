"""`make serve` as a service, with real processes: whichever process of it gets SIGTERM (make, which
forwards it to its one child, the supervisor's foreground process; the supervisor; `serve run`), a double
Ctrl-C, SIGKILL of its whole process group, or a crash of its supervisor, nothing of the run is left
(every process recorded when it was ready is gone, none carries its run id, its ports are free), and
the next `make serve` on the same ports becomes ready. A start beside a foreign process holding a
port refuses, names it, and leaves it alone. The systemd unit's command and the container command
(KubeRay's) stop on SIGTERM the same way.

The tests run in file order on one set of ports: each test's start is the "next start" of the one
before it. The first runs the shipped config (ports moved): a streamed completion from vLLM's engine is
in flight at the signal, and its stop time is the shipped config's. The others run a small config (the
embedding model inside the ingress, one replica) to keep each start short: which process gets the
signal, not the models, decides what those stops must do.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ray._common.test_utils import wait_for_condition

from supervise import procs
from tests.e2e.make_serve import Run, Stream, answers_200, start, still_alive, wait_stopped
from tests.harness import RAY_PORT_FLAGS, ROOT, free_port, serve_config_on, serve_env

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(600)]

STOP_TIMEOUT_S = 30  # the default drain bound
# The documented bound on a stop: the drain bound, then killing what is left and checking the ports.
STOP_BOUND_S = STOP_TIMEOUT_S + 15
AT_ONCE_BOUND_S = 15  # a second signal, or SIGKILL of the group: no drain


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    """One config file, state dir and environment for every start of the module: the same ports each time."""
    tmp = tmp_path_factory.mktemp("service")
    shipped = serve_config_on(free_port())
    (tmp / "shipped.yaml").write_text(yaml.safe_dump(shipped))
    small = serve_config_on(shipped["http_options"]["port"], shipped["grpc_options"]["port"])
    app = small["applications"][0]
    app["args"]["models"] = [m for m in app["args"]["models"] if m.get("placement") == "ingress"]
    app["deployments"] = [d for d in app["deployments"] if d["name"] == "Ingress"]
    (tmp / "small.yaml").write_text(yaml.safe_dump(small))
    env = {**os.environ, **serve_env(), "RAYINFER_STATE_DIR": str(tmp / "run")}
    env.pop("RAYINFER_STOP_TIMEOUT_S", None)
    return {
        "config": str(tmp / "small.yaml"),
        "shipped": str(tmp / "shipped.yaml"),
        "generate": _generation_model(shipped),
        "env": env,
        "port": shipped["http_options"]["port"],
        "tmp": tmp,
        "started": [],
    }


def _generation_model(config: dict) -> str:
    return next(m["name"] for m in config["applications"][0]["args"]["models"] if m["task"] == "generate")


@pytest.fixture(autouse=True)
def no_run_outlives_its_test(setting):
    """Whatever a failed test left running is killed, so the next test starts on free ports."""
    yield
    for make in setting["started"]:
        if make.poll() is None:  # still running: its process group is certainly this test's
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    setting["started"].clear()
    for path in Path(setting["env"]["RAYINFER_STATE_DIR"]).glob("*.json"):
        record = yaml.safe_load(path.read_text())
        procs.kill_run(record["run_id"], record["pid"])


@pytest.mark.timeout(1200)
def test_make_has_one_child_the_supervisor_and_sigterm_to_make_drains(setting):
    # The shipped config: a vLLM engine starts in ~30 s idle, minutes on a loaded machine.
    run = start(setting, "sigterm-make", setting["shipped"], ready_s=900)
    # No recipe shell: make's only child is the supervisor's foreground process (`exec` in the recipe).
    assert run.front.cmdline()[1:4] == ["-m", "supervise", "serve"], run.front.cmdline()
    assert os.getsid(run.supervisor.pid) == run.supervisor.pid  # the run's own session
    # 60 tokens: several seconds of decoding on 2 cores (~11 tokens/s for one stream), within the part of
    # the drain HAProxy gets (half the bound: 15 s). 150 tokens ran past it on a slower run and were cut.
    stream = Stream(setting["port"], setting["generate"], max_tokens=60)
    stream.start()
    assert stream.first.wait(60)
    since = time.monotonic()
    run.make.send_signal(signal.SIGTERM)
    took = wait_stopped(run, STOP_BOUND_S, since)
    stream.join(60)
    # The request in flight at the signal was finished, not cut: a drain, not a kill.
    assert stream.outcome == 200 and stream.lines[-1][1] == "data: [DONE]", (stream.outcome, stream.lines[-3:])
    assert any(at > since for at, _ in stream.lines)
    assert "SIGTERM: draining" in run.text() and "HAProxy done" in run.text()
    assert run.make.returncode == -signal.SIGTERM  # make waited for its child, then ended by the signal
    print(f"SIGTERM to make (shipped config, {len(run.tree)} processes): stopped in {took:.1f} s")


def test_sigterm_to_the_session_supervisor(setting):
    run = start(setting, "sigterm-supervisor")
    since = time.monotonic()
    run.supervisor.send_signal(signal.SIGTERM)
    wait_stopped(run, STOP_BOUND_S, since)


def test_sigterm_to_serve_run_stops_the_whole_run(setting):
    run = start(setting, "sigterm-serve")
    since = time.monotonic()
    run.serve.send_signal(signal.SIGTERM)
    wait_stopped(run, STOP_BOUND_S, since)
    assert "without being asked to stop" in run.text()
    assert run.make.returncode != 0  # the service died: a supervisor above make would restart it


def test_double_ctrl_c_stops_at_once(setting):
    run = start(setting, "double-sigint")
    os.killpg(run.make.pid, signal.SIGINT)
    wait_for_condition(lambda: "SIGINT: draining" in run.text(), timeout=30)
    since = time.monotonic()
    os.killpg(run.make.pid, signal.SIGINT)
    wait_stopped(run, AT_ONCE_BOUND_S, since)
    assert "second stop request (SIGINT): stopping at once" in run.text()


def test_sigkill_of_the_whole_process_group(setting):
    run = start(setting, "sigkill-group")
    since = time.monotonic()
    os.killpg(run.make.pid, signal.SIGKILL)
    wait_stopped(run, AT_ONCE_BOUND_S, since)


def test_a_crashed_supervisor_leftovers_are_cleaned_by_the_next_start(setting):
    crashed = start(setting, "crash")
    crashed.supervisor.kill()  # SIGKILL: nothing of the run is stopped...
    wait_for_condition(lambda: crashed.make.poll() is not None, timeout=30)
    assert answers_200(f"http://127.0.0.1:{setting['port']}/readyz")  # ...and it still serves
    left = still_alive(crashed.tree)
    assert left
    run = start(setting, "after-crash")  # ready: the leftovers were stopped first
    assert "ended without stopping its processes; stopping them" in run.text()
    assert not still_alive(left)
    since = time.monotonic()
    os.killpg(run.make.pid, signal.SIGINT)  # one Ctrl-C
    wait_stopped(run, STOP_BOUND_S, since)


def test_a_port_held_by_another_process_refuses_the_start_and_leaves_it_alone(setting):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {setting['port']})); s.listen(); print('up', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "up\n"
        log = setting["tmp"] / "refused.log"
        with log.open("w") as out:
            code = subprocess.run(
                ["make", "--no-print-directory", "serve", f"CONFIG={setting['config']}"],
                cwd=ROOT,
                env=setting["env"],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            ).returncode
        text = log.read_text()
        assert code != 0
        assert f"port {setting['port']} is held by pid {holder.pid}" in text, text
        assert "http_options.port" in text and f"kill {holder.pid}" in text and "Nothing was stopped" in text
        assert holder.poll() is None  # not this project's: left alone
        with socket.create_connection(("127.0.0.1", setting["port"]), timeout=5):
            pass
    finally:
        holder.kill()
        holder.wait()


def _ray_start_args() -> tuple[str, list[str]]:
    """A Ray temp dir of its own (short enough for Ray's unix sockets, 107 bytes) and `ray start` flags
    putting every port Ray would otherwise take at a fixed number on a free one."""
    temp_dir = tempfile.mkdtemp(prefix="rayinfer-")
    return temp_dir, [f"{flag}={free_port()}" for flag in RAY_PORT_FLAGS] + [f"--temp-dir={temp_dir}"]


def test_the_systemd_units_command_deploys_and_stops_like_make_serve(setting, tmp_path):
    """`python -m supervise head` (deploy/systemd/rayinfer.service's ExecStart): `ray start --head`,
    `serve deploy`, ready; systemd's SIGTERM to it drains (`serve shutdown`), then nothing is left."""
    temp_dir, ray_args = _ray_start_args()
    unit = (ROOT / "deploy/systemd/rayinfer.service").read_text()
    # The unit's own environment, but for its paths (this checkout's state dir, the test's home).
    unit_env = dict(
        line.removeprefix("Environment=").split("=", 1) for line in unit.splitlines() if line.startswith("Environment=")
    )
    env = {
        **setting["env"],
        **{k: v for k, v in unit_env.items() if k not in ("HOME", "RAYINFER_STATE_DIR")},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # On a busy small machine the dashboard agent can take over Ray's default 30 s to start.
        "RAY_agent_register_timeout_ms": "120000",
    }
    log = tmp_path / "head.log"
    with log.open("w") as out:
        front = subprocess.Popen(
            [sys.executable, "-m", "supervise", "head", setting["config"], *ray_args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    setting["started"].append(front)
    deadline = time.monotonic() + 300
    while "rayinfer: ready after" not in log.read_text():
        assert front.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)  # polling the run's log
    [supervisor] = psutil.Process(front.pid).children()
    run_id = supervisor.environ()[procs.RUN_ID_VAR]
    tree = [psutil.Process(front.pid), supervisor, *procs.run_members(run_id, supervisor.pid)]
    record = yaml.safe_load(next(Path(setting["env"]["RAYINFER_STATE_DIR"]).glob("head-*.json")).read_text())
    run = Run(front, log, [int(p) for p in record["ports"]], run_id=run_id, tree=tree)
    run.supervisor = supervisor
    since = time.monotonic()
    front.send_signal(signal.SIGTERM)  # what `systemctl stop` does with KillMode=mixed
    wait_stopped(run, STOP_BOUND_S, since)
    assert front.returncode == 0, log.read_text()[-3000:]
    assert "SIGTERM: draining" in log.read_text()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_container_command_runs_kuberays_ray_start_and_stops_on_sigterm(setting, tmp_path):
    """`python -m supervise node`, every Ray container's command in deploy/kuberay/ and deploy/Dockerfile,
    with a `ray start` as KubeRay generates it in KUBERAY_GEN_RAY_START_CMD (shell text: quoted JSON
    resources): the node starts, and the pod's SIGTERM to it (PID 1's) stops it; nothing is left."""
    temp_dir, ray_args = _ray_start_args()
    gcs = int(ray_args[0].split("=")[1])
    generated = f"ray start --head --num-cpus=1 --resources='{{\"pod\": 1}}' {' '.join(ray_args)} --block"
    env = {
        **setting["env"],
        "KUBERAY_GEN_RAY_START_CMD": generated,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # `ray` as the image's PATH has it
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_agent_register_timeout_ms": "120000",
    }
    log = tmp_path / "node.log"
    with log.open("w") as out:
        front = subprocess.Popen(
            [sys.executable, "-m", "supervise", "node"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    setting["started"].append(front)
    deadline = time.monotonic() + 300
    while "Ray runtime started" not in log.read_text():
        assert front.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)  # polling the run's log
    [supervisor] = psutil.Process(front.pid).children()
    run_id = supervisor.environ()[procs.RUN_ID_VAR]
    members = procs.run_members(run_id, supervisor.pid)
    # bash exec'd KubeRay's command: `ray start` itself is the supervisor's child.
    [child] = supervisor.children()
    assert child.cmdline()[1].endswith("/ray") and child.cmdline()[2] == "start", child.cmdline()
    assert any("raylet" in " ".join(p.cmdline()) for p in members)
    tree = [psutil.Process(front.pid), supervisor, *members]
    run = Run(front, log, [gcs], run_id=run_id, tree=tree)
    run.supervisor = supervisor
    since = time.monotonic()
    front.send_signal(signal.SIGTERM)  # what the kubelet does to a container's PID 1
    wait_stopped(run, STOP_BOUND_S, since)
    assert front.returncode == 0, log.read_text()[-3000:]
    assert "SIGTERM: draining" in log.read_text()
    shutil.rmtree(temp_dir, ignore_errors=True)
