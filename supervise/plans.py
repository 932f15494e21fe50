"""What each kind of run starts, which ports it needs, when it is ready, and how it is asked to stop."""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

from supervise import log, procs

BIN = Path(sys.executable).parent

# Ports HAProxy and Serve's fallback proxy take when RAY_SERVE_ENABLE_HA_PROXY=1, and their defaults
# (ray/serve/_private/constants.py).
HAPROXY_PORTS = {
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500,
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500,
}
Stopper = Callable[[subprocess.Popen, float], None]  # (the main child, deadline on time.monotonic)
Preparer = Callable[[Callable[[], bool]], None]  # (is the run stopping?)


@dataclass
class Plan:
    name: str  # one run of this name at a time (the record's file name)
    command: list[str]
    env: dict[str, str]
    ports: dict[int, str]  # port -> the setting that moves it
    ready_url: str | None  # GET answers 200 once the run serves
    graceful: Stopper  # asks the main child to drain and exit
    prepare: Preparer | None = None  # runs once the main child is up (head: serve deploy)


def _serving_env(run_id: str) -> dict[str, str]:
    """The serving environment (app/environment.py) under the caller's own settings, and the run's id."""
    from app.environment import SERVE_ENV
    from supervise.procs import RUN_ID_VAR

    return {**SERVE_ENV, **os.environ, RUN_ID_VAR: run_id}


def _app_ports(config: dict, config_path: str, env: dict[str, str]) -> dict[int, str]:
    ports = {int(config.get("http_options", {}).get("port", 8000)): f"http_options.port in {config_path}"}
    grpc = config.get("grpc_options") or {}
    if grpc.get("grpc_servicer_functions"):
        ports[int(grpc.get("port", 9000))] = f"grpc_options.port in {config_path}"
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        for var, default in HAPROXY_PORTS.items():
            ports[int(env.get(var, default))] = f"{var} in the environment"
    return ports


def _readyz(config: dict) -> str:
    http = config.get("http_options", {})
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{int(http.get('port', 8000))}/readyz"


def _signal(sig: int) -> Stopper:
    def stop(child: subprocess.Popen, deadline: float) -> None:
        if child.poll() is None:
            child.send_signal(sig)

    return stop


def _drain_haproxy(run_id: str, deadline: float) -> None:
    """Let the run's HAProxy finish the requests it carries, for at most half the time left: SIGUSR1
    (HAProxy's soft stop) closes its listeners and it exits once its connections are done. Serve's
    shutdown kills HAProxy at once, which would cut every request in flight through it."""
    haproxies = []
    for proc in procs.run_members(run_id, os.getsid(0)):
        with contextlib.suppress(psutil.Error):
            if os.path.basename(proc.exe()) == "haproxy":
                proc.send_signal(signal.SIGUSR1)
                haproxies.append(proc)
    if haproxies:
        log(f"HAProxy (pid {' '.join(str(p.pid) for p in haproxies)}) finishing the requests it carries")
        _, alive = psutil.wait_procs(haproxies, timeout=max(0.0, (deadline - time.monotonic()) / 2))
        log("HAProxy done" if not alive else "HAProxy still has requests: Serve's shutdown ends them")


def _serve_graceful(run_id: str) -> Stopper:
    def stop(child: subprocess.Popen, deadline: float) -> None:
        _drain_haproxy(run_id, deadline)
        if child.poll() is None:
            child.send_signal(signal.SIGINT)

    return stop


def serve_plan(config_path: str, run_id: str) -> Plan:
    """`serve run CONFIG` on a new local Ray cluster (what `make serve` runs). Stopping: HAProxy
    finishes the requests it carries, then what Ctrl-C does to `serve run`: SIGINT, Serve stops
    every replica (serve.shutdown) and Ray its processes."""
    config = yaml.safe_load(Path(config_path).read_text())
    env = _serving_env(run_id)
    env["RAY_ADDRESS"] = "local"  # a new cluster, never one already running on the machine
    # Under HAProxy, Serve keeps a stopping ingress replica for at least this long (default 30 s) so
    # that external load balancers can deregister it. A local run has none (its HAProxy is Serve's
    # own, reconfigured by Serve), and with the default every graceful stop would run into the bound.
    env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    ports = _app_ports(config, config_path, env)
    command = [str(BIN / "serve"), "run", config_path]
    http_port = min(p for p, s in ports.items() if s.startswith("http_options"))
    return Plan(f"serve-{http_port}", command, env, ports, _readyz(config), _serve_graceful(run_id))


def _flag(args: list[str], flag: str, default: int) -> int:
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return int(arg.split("=", 1)[1])
        if arg == flag and i + 1 < len(args):
            return int(args[i + 1])
    return default


def head_plan(config_path: str, run_id: str, ray_args: list[str]) -> Plan:
    """`ray start --head --block`, then `serve deploy CONFIG` (the systemd unit's service). Stopping:
    HAProxy finishes its requests, `serve shutdown` stops every replica, then SIGTERM to `ray start`
    stops Ray."""
    config = yaml.safe_load(Path(config_path).read_text())
    env = _serving_env(run_id)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60's default for `ray start`; the CLI calls need it set
    gcs, dash = _flag(ray_args, "--port", 6379), _flag(ray_args, "--dashboard-port", 8265)
    ports = {gcs: "--port of ray start", dash: "--dashboard-port of ray start", **_app_ports(config, config_path, env)}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", *ray_args]
    if not any(a.startswith("--dashboard-host") for a in ray_args):
        command.append("--dashboard-host=127.0.0.1")
    dashboard = f"http://127.0.0.1:{dash}"
    serve_cli = [str(BIN / "serve")]

    def prepare(stopping: Callable[[], bool]) -> None:
        while not stopping():
            try:
                if httpx.get(f"{dashboard}/api/gcs_healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # polling the head's health endpoint while it starts
        if not stopping():
            subprocess.run([*serve_cli, "deploy", config_path, "-a", dashboard], env=env, check=True, timeout=300)

    def graceful(child: subprocess.Popen, deadline: float) -> None:
        _drain_haproxy(run_id, deadline)
        remaining = deadline - time.monotonic() - 2  # leave `ray start` a moment of its own
        if remaining > 0:
            # On failure the deadline still holds: whatever is left is killed then.
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([*serve_cli, "shutdown", "-y", "-a", dashboard], env=env, timeout=remaining)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    return Plan(f"head-{gcs}", command, env, ports, _readyz(config), graceful, prepare)


def node_plan(run_id: str, ray_args: list[str]) -> Plan:
    """A container's `ray start ... --block` (KubeRay's generated command from KUBERAY_GEN_RAY_START_CMD
    when the pod has ray.io/overwrite-container-cmd: "true"; else the arguments; else a head). Stopping:
    SIGTERM to `ray start`, which drains the node (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) and stops Ray."""
    generated = os.environ.get("KUBERAY_GEN_RAY_START_CMD", "").strip()
    if ray_args or not generated:
        command = list(ray_args) or ["ray", "start", "--head"]
        command += [] if "--block" in command else ["--block"]
    else:
        # KubeRay's command is shell text (quoted JSON resources, maybe $VARs): bash reads it as KubeRay's
        # own container command does, and execs it, so `ray start` is the supervisor's child.
        block = "" if "--block" in shlex.split(generated) else " --block"
        command = ["bash", "-c", f"exec {generated}{block}"]
    # What KubeRay's own container command does first (`ulimit -n 65536`).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    env = _serving_env(run_id)
    return Plan("node", command, env, {}, None, _signal(signal.SIGTERM))
