"""The cluster harness of the tests and benchmarks: start and stop the Ray clusters and Serve
instances they talk to (`serve run`, `ray start --head`, `serve deploy`), each on free ports."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from app.environment import SERVE_ENV
from tests.helpers import ROOT, free_port

BIN = Path(sys.executable).parent

# Ports HAProxy and Serve's fallback proxy otherwise take at fixed numbers (9101, 8404, 8500, 9500),
# machine-wide: a test or bench cluster takes free ones, so it can run beside another Serve instance.
FIXED_PORT_VARS = (
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


# A test cluster shares 2 cores with others: HAProxy's default 30 s to start was seen to run out
# under load (the HAProxyManager is then killed and Serve never starts).
SLOW_MACHINE_ENV = {"RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S": "120"}


# Where a started server runs. Each session is its own Linux autogroup (sched_autogroup_enabled=1 here),
# and the kernel shares the CPUs between autogroups, whatever the nice of the tasks inside. Tests give
# every server a session of its own (kill_session finds what it leaves). A benchmark cannot: a load
# generator in one autogroup and a Ray cluster (~25 processes) in another waited 20.4 s of 30 s for a
# CPU while needing 0.7 s (its /proc schedstat; against vLLM's server, in a session of its own too:
# 0.4 s), and read every stream's chunks seconds after the replica sent them. So a benchmark
# (benchmarks.same_nice sets SAME_SESSION) starts everything in the benchmark's own session: servers,
# peers and load generator then share the CPUs task by task, at one nice. RUN_MARK finds what it left.
SAME_SESSION = "RAYINFER_BENCH_SAME_SESSION"
RUN_MARK = "RAYINFER_RUN_MARK"  # in a started command's environment: every process it starts inherits it


_MARKS: dict[int, bytes] = {}  # launched pid -> its RUN_MARK, as it reads in /proc/PID/environ


def launch(args: list[str], env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start a server or cluster command in a process group of its own: in a session of its own too,
    unless SAME_SESSION is set (a benchmark). `kill_run` finds whatever it started."""
    own_session = not os.environ.get(SAME_SESSION)
    mark = secrets.token_hex(8)
    proc = subprocess.Popen(
        args,
        env={**(os.environ if env is None else env), RUN_MARK: mark},
        start_new_session=own_session,
        process_group=None if own_session else 0,
        **popen,
    )
    _MARKS[proc.pid] = f"{RUN_MARK}={mark}".encode()
    return proc


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL to whatever `launch` started for `proc` and is left: its group, its session if it had
    one, and every process carrying its RUN_MARK (Ray's workers and Serve's HAProxy leave the group)."""
    kill_session(proc.pid, _MARKS.pop(proc.pid, None))


def end(proc: subprocess.Popen) -> None:
    """Stop what `launch` started as Ctrl-C would (`stop`), then kill whatever of it is left (`kill_run`)."""
    stop(proc)
    kill_run(proc)


def serve_env() -> dict[str, str]:
    """The serving environment (app/environment.py), with free ports for what would otherwise bind fixed ones."""
    return {**SERVE_ENV, **SLOW_MACHINE_ENV, **{name: str(free_port()) for name in FIXED_PORT_VARS}}


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 240) -> None:
    """Until GET `url` answers 200; a RuntimeError with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text()[-4000:] if log_path.exists() else ""
            raise RuntimeError(f"{proc.args[0]} did not become ready (exit {proc.poll()}):\n{tail}")
        time.sleep(0.5)  # polling a readiness endpoint


def wait_for_http(url: str, timeout_s: float) -> None:
    """Until `url` answers 200 (a maximum: TimeoutError past it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.5)  # polling a server that is starting: no event to wait on
    raise TimeoutError(f"{url} not ready within {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def serve_run(config: dict, env: dict[str, str] | None = None, log_dir: Path | None = None) -> Iterator[str]:
    """`serve run` of `config` (a serve_config.yaml as a dict) on its own new Ray cluster; yields the URL."""
    with serve_run_process(config, env, log_dir) as (url, _):
        yield url


@contextlib.contextmanager
def serve_run_process(
    config: dict, env: dict[str, str] | None = None, log_dir: Path | None = None, ready_timeout_s: float = 900
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`serve_run`, yielding the URL and the `serve run` process. A vLLM engine starts in ~30 s on an
    idle 2-core machine, several minutes on a loaded one: hence the readiness timeout's default."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="rayinfer-"))
    config_path = log_dir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = log_dir / "serve.log"
    # RAY_ADDRESS=local: a new cluster, never someone else's running one.
    full_env = {**os.environ, "RAY_ADDRESS": "local", **serve_env(), **(env or {})}
    with log_path.open("w") as log:
        proc = launch(
            [str(BIN / "serve"), "run", str(config_path)], full_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    try:
        wait_ready(f"{url}/readyz", proc, log_path, ready_timeout_s)
        yield url, proc
    finally:
        # Then whatever of that cluster outlived `serve run`, and nothing else: `ray stop` would kill
        # every Ray cluster on the machine.
        end(proc)


def kill_session(sid: int, mark: bytes | None = None) -> None:
    """SIGKILL to every process left in the session a `start_new_session` child began: its process
    group, and what moved to groups of its own (Serve's HAProxy: left running after a SIGKILL of the
    group, it kept its ports and memory); with `mark` (`NAME=value`), also every process whose
    environment has it, in whatever session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            if os.getsid(pid) == sid or (mark and mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                os.kill(pid, signal.SIGKILL)


def session_processes(sid: int, program: str) -> list[int]:
    """The pids in session `sid` running `program` (its executable's base name): found by the session,
    never by name alone, since other clusters run on this machine."""
    pids = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if os.getsid(pid) == sid and Path(os.fsdecode(argv0)).name == program:
                pids.append(pid)
    return pids


def dashboard_of(proc: subprocess.Popen) -> str:
    """The URL of the Ray dashboard that `proc` (`serve run`) started: 8265 unless another cluster
    on the machine had it. Found by the process, never by port number or log text."""
    import psutil  # Ray's own dependency

    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not any("dashboard/dashboard.py" in part for part in child.cmdline()):
                continue
            ports = sorted({c.laddr.port for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN})
            for port in ports:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    auth = {"Authorization": f"Bearer {token}"}
                    if (
                        "ray_version"
                        in httpx.get(f"http://127.0.0.1:{port}/api/version", headers=auth, timeout=5).json()
                    ):
                        return f"http://127.0.0.1:{port}"
    raise RuntimeError(f"no Ray dashboard among the processes of {proc.args}")


@dataclasses.dataclass
class RayHead:
    dashboard: str  # what `serve deploy -a` and the REST/state APIs talk to
    env: dict[str, str]  # for CLI calls against it (its auth token)
    session: int = 0  # the session id of its processes

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}


# Every port `ray start --head` opens on a fixed default: a test cluster puts each on a free one.
RAY_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


@contextlib.contextmanager
def ray_head(log_dir: Path, num_cpus: int | None = None, redis: str | None = None) -> Iterator[RayHead]:
    """A long-lived cluster as operators run one: `ray start --head`, with Ray's token
    authentication on (its own token), every port it would take at a fixed number on a free one,
    its own temp dir, the dashboard on loopback. Stops only its own processes.

    With `redis` (host:port): GCS fault tolerance, the GCS's state in that Redis (RAY_REDIS_ADDRESS),
    and `ray start` without `--block` (which takes every process down when one dies, the GCS included)."""
    ports = {flag: free_port() for flag in RAY_PORT_FLAGS}
    args = [
        str(BIN / "ray"),
        "start",
        "--head",
        *(() if redis else ("--block",)),
        "--disable-usage-stats",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={log_dir / 'ray'}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # The Serve controller and proxies inherit the environment. On a busy small machine the
    # dashboard agent can take over Ray's default 30 s to start, and the raylet then aborts.
    env = {**os.environ, **serve_env(), **auth, "RAY_agent_register_timeout_ms": "120000"}
    if redis:  # the raylets and workers wait this long for a restarted GCS (Ray's default: 60 s)
        env.update({"RAY_REDIS_ADDRESS": redis, "RAY_gcs_rpc_server_reconnect_timeout_s": "600"})
    env.pop("RAY_ADDRESS", None)
    log_path = log_dir / "ray_start.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{ports['--dashboard-port']}", auth)
    try:
        if redis:  # `ray start` returns once the node is up; its processes stay in its session
            assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
            wait_for_http(f"{head.dashboard}/api/gcs_healthz", timeout_s=180)
        else:
            wait_ready(f"{head.dashboard}/api/gcs_healthz", proc, log_path, timeout_s=180)
        head.session = proc.pid
        yield head
    finally:
        stop(proc)  # `ray start --block` takes its processes down with it
        kill_session(proc.pid)


def serve_deploy(config: dict, head: RayHead, path: Path) -> None:
    """`serve deploy` of `config` (a serve_config.yaml as a dict) to the cluster."""
    path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), "-a", head.dashboard],
        cwd=ROOT,
        check=True,
        env={**os.environ, **head.env},
        capture_output=True,
        # The dashboard applies the config with a blocking call to the controller: a run under load (an
        # update's new vLLM engine starting) saw the CLI take over 120 s.
        timeout=600,
    )


def serve_config_on(port: int, grpc_port: int | None = None) -> dict:
    """The shipped serve_config.yaml with only the HTTP and gRPC ports changed (gRPC: a free one by default)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    config["grpc_options"]["port"] = grpc_port or free_port()
    return config


def online_vectors(model: str, texts: list[str]) -> list[list[float]]:
    """`texts`' vectors from /v1/embeddings of a `serve run` of the shipped config holding only the
    embedding model `model` (its deployment, or the Ingress it runs inside), in slices of 2048."""
    config = serve_config_on(free_port())
    app = config["applications"][0]
    app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] == model]
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", f"Embedder-{model}")]
    vectors: list[list[float]] = []
    with serve_run(config) as url, httpx.Client(base_url=url, timeout=600) as client:
        for s in range(0, len(texts), 2048):
            body = client.post("/v1/embeddings", json={"model": model, "input": texts[s : s + 2048]})
            body.raise_for_status()
            vectors += [item["embedding"] for item in body.json()["data"]]
    return vectors


def with_pipelines(config: dict) -> dict:
    """`config` (a serve_config.yaml as a dict) with serve_config.pipeline.yaml's models and their
    deployments added to its application, behind its one ingress: how the integration tests serve both."""
    pipeline = yaml.safe_load((ROOT / "serve_config.pipeline.yaml").read_text())["applications"][0]
    app = config["applications"][0]
    app["args"]["models"] += pipeline["args"]["models"]
    app["deployments"] += [d for d in pipeline["deployments"] if d["name"] != "Ingress"]
    return config


def _processes() -> dict[int, int]:
    """pid → parent pid of every process that is not a zombie."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                table[int(stat.parent.name)] = int(fields[1])
    return table


def process_tree(root: int) -> set[int]:
    """`root` and its live descendants: for a driver that started its own Ray cluster, that cluster's
    GCS, raylet, agents and (children of the raylet) every worker."""
    table = _processes()
    if root not in table:
        return set()
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in table.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


# Ray's agents' process titles (ray._private.ray_constants.AGENT_PROCESS_LIST).
RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


@dataclasses.dataclass(frozen=True)
class ClusterSnapshot:
    """The processes of a driver's own cluster, taken while the driver lives."""

    pids: frozenset[int]
    raylets: frozenset[int]

    @classmethod
    def of(cls, driver: int) -> ClusterSnapshot:
        pids = process_tree(driver)
        return cls(frozenset(pids), frozenset(p for p in pids if b"/raylet/raylet" in _read(f"/proc/{p}/cmdline")))

    def leftovers(self) -> set[int]:
        """What still lives of it: its processes, their descendants, and any Ray worker of its raylets (a
        worker knows its raylet's pid from RAY_RAYLET_PID, even once its parent is gone)."""
        raylets = {f"RAY_RAYLET_PID={pid}".encode() for pid in self.raylets}
        seeds = {
            pid for pid in _processes() if pid in self.pids or raylets & set(_read(f"/proc/{pid}/environ").split(b"\0"))
        }
        alive: set[int] = set()
        for pid in seeds:
            alive |= process_tree(pid)
        return alive

    def leftovers_but_agents(self) -> set[int]:
        """leftovers() but Ray's dashboard and runtime-env agents. When their raylet dies unexpectedly
        (SIGKILLed with its driver: Ray's fate-sharing), each outlives it by 60 s: it reports the death to
        the (dead) GCS with a 60 s timeout (ray._private.utils.publish_error_to_driver: hard-coded).
        They run no task and write nothing; every other process is gone within seconds."""
        return {pid for pid in self.leftovers() if not _read(f"/proc/{pid}/cmdline").startswith(RAY_AGENTS)}


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""
