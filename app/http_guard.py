"""HTTP guards in front of the inference routes: API keys, and a bounded number in flight.

Both answer from the one error table (`Unauthorized` 401, `Overloaded` 503 + Retry-After)
before the request reaches a route. Health endpoints and the OpenAPI document stay open.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Callable

from app.config import AppConfig
from app.errors import Overloaded, Unauthorized
from app.http_errors import error_response

# Inference and model routes; /healthz, /readyz, /v2/health/*, /openapi.json and /docs are open.
GUARDED_PREFIXES = ("/v1/", "/v2/models")


def guarded(scope) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return scope["type"] == "http" and path.startswith(GUARDED_PREFIXES)


def load_api_keys(config: AppConfig, environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """Accepted keys from `config.api_keys_env` and `config.api_keys_file`; empty means no auth."""
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in environ.get(config.api_keys_env, "").split(",")]
    if config.api_keys_file:
        lines = Path(config.api_keys_file).read_text().splitlines()
        keys += [line.strip() for line in lines if not line.strip().startswith("#")]
    return tuple(dict.fromkeys(k.encode() for k in keys if k))


def key_matches(authorization: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant time in the key's content: every configured key is compared, none short-circuits."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        return False
    given = authorization[7:].strip()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


class AuthMiddleware:
    """401 (OpenAI's error body, `WWW-Authenticate: Bearer`) on guarded routes without a valid key."""

    def __init__(self, app, keys_of: Callable[[], tuple[bytes, ...]]):
        self.app = app
        self.keys_of = keys_of

    async def __call__(self, scope, receive, send):
        keys = self.keys_of()
        if keys and guarded(scope):
            authorization = dict(scope.get("headers") or []).get(b"authorization")
            if not key_matches(authorization, keys):
                message = "Incorrect or missing API key: send `Authorization: Bearer <key>`."
                response = error_response(Unauthorized(message))
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class InflightGate:
    """The inference requests one ingress replica is handling, HTTP and gRPC together, and their
    bound: past it, Overloaded (503 + Retry-After; gRPC UNAVAILABLE) at once, never a queue that
    turns into timeouts."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.count = limit, retry_after_s, 0

    def __enter__(self) -> None:
        if self.count >= self.limit:
            raise Overloaded(f"the server has {self.limit} requests in flight (max_inflight_requests); retry shortly",
                             retry_after_s=self.retry_after_s)
        self.count += 1

    def __exit__(self, *exc) -> None:
        self.count -= 1


class InflightLimitMiddleware:
    """The HTTP side of the replica's InflightGate, on guarded routes."""

    def __init__(self, app, gate_of: Callable[[], InflightGate]):
        self.app = app
        self.gate_of = gate_of

    async def __call__(self, scope, receive, send):
        if not guarded(scope):
            return await self.app(scope, receive, send)
        gate = self.gate_of()
        try:
            gate.__enter__()
        except Overloaded as exc:  # only the gate's own refusal: the app's errors are not answered here
            return await error_response(exc)(scope, receive, send)
        try:
            return await self.app(scope, receive, send)
        finally:
            gate.__exit__()
