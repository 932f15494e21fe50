"""ASGI middleware in front of every HTTP route, outermost first: metrics (times everything,
413s and 401s included) → API key → in-flight bound → body limit → (binary tensor framing of OIP's
infer route, app/oip/rest/binary.py) → route.

The guards answer from the one error table through `ErrorBodies`, so a 401 or 503 under /v2 has
the Open Inference Protocol's body and under /v1 OpenAI's. Health endpoints and the OpenAPI
document stay open.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from app.core import deadline, metrics
from app.core.errors import Overloaded, PayloadTooLarge, Unauthorized
from app.core.guard import InflightGate, key_matches
from app.http.errors import ErrorBodies, app_path

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

# Inference and model routes; /healthz, /readyz, /v2, /v2/health/*, /openapi.json and /docs are open.
GUARDED_PREFIXES = ("/v1/", "/v2/models")


def guarded(scope: MutableMapping[str, Any]) -> bool:
    return scope["type"] == "http" and app_path(scope).startswith(GUARDED_PREFIXES)


class MetricsMiddleware:
    """Latency by route template, model and status class; errors by kind; in-flight requests.

    Routes and exception handlers fill in the request's `metrics.RequestLabels` (model, error
    kind) through a context variable; this reads them when the response has been sent.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        labels = metrics.RequestLabels(start=time.perf_counter())
        token = metrics.CURRENT.set(labels)
        status = 500  # unless a response starts: an exception escaping the app is a 500

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = metrics.ingress()
        m.started()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The route template, never the raw path: /v2/models/{name}, not one series per name.
            m.finished(getattr(scope.get("route"), "path", "unmatched"), labels, status)
            metrics.CURRENT.reset(token)


class DeadlineMiddleware:
    """The request's deadline from `x-request-timeout-seconds`, for the jobs it makes (app/core/deadline.py)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = deadline.CURRENT.set(
            deadline.from_header(dict(scope.get("headers") or []).get(deadline.TIMEOUT_HEADER))
        )
        try:
            return await self.app(scope, receive, send)
        finally:
            deadline.CURRENT.reset(token)


class AuthMiddleware:
    """401 (`WWW-Authenticate: Bearer`) on guarded routes without `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, keys: tuple[bytes, ...], bodies: ErrorBodies):
        self.app, self.keys, self.bodies = app, keys, bodies

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.keys and guarded(scope):
            authorization = dict(scope.get("headers") or []).get(b"authorization")
            if not key_matches(authorization, self.keys):
                refused = Unauthorized("Incorrect or missing API key: send `Authorization: Bearer <key>`.")
                return await self.bodies.response(refused, app_path(scope))(scope, receive, send)
        return await self.app(scope, receive, send)


class InflightLimitMiddleware:
    """The HTTP side of the replica's InflightGate, on guarded routes: 503 + Retry-After at once when full."""

    def __init__(self, app: ASGIApp, gate: InflightGate, bodies: ErrorBodies):
        self.app, self.gate, self.bodies = app, gate, bodies

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if not guarded(scope):
            return await self.app(scope, receive, send)
        try:
            self.gate.__enter__()
        except Overloaded as exc:  # only the gate's own refusal: the app's errors are not answered here
            return await self.bodies.response(exc, app_path(scope))(scope, receive, send)
        try:
            return await self.app(scope, receive, send)
        finally:
            self.gate.__exit__()


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes with 413, before parsing them (by Content-Length when
    given, else while reading)."""

    def __init__(self, app: ASGIApp, limit: int, bodies: ErrorBodies):
        self.app, self.limit, self.bodies = app, limit, bodies

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self.bodies.response(_too_large(limit), app_path(scope))(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
            return message

        return await self.app(scope, counted, send)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is over the limit of {limit} bytes (max_request_bytes)")
