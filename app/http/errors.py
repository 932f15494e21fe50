"""HTTP side of the one error table: exception handlers, the error body each protocol's clients
expect under its path prefix, and the OpenAPI `responses=` of every route.

Whoever answers an error (a route, an exception handler or a middleware) answers through
`ErrorBodies.response`, so a path's body format never depends on where the error was raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from app.core.errors import (
    INTERNAL,
    ErrorKind,
    InvalidInput,
    Overloaded,
    RayInferError,
    Unauthorized,
    kind_of,
    statuses,
)
from app.core.metrics import label_error
from app.core.registry import as_rayinfer_error

logger = logging.getLogger("ray.serve")

# (message, kind, param) → the JSON body a protocol's clients parse.
BodyFormat = Callable[[str, ErrorKind, "str | None"], dict]


def app_path(scope: MutableMapping[str, Any]) -> str:
    """The request's path inside the application (without Serve's route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def error_responses(body: type[BaseModel], only: tuple[int, ...] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a route: every status of the error table (or `only` those), each
    with the table's descriptions and the protocol's error body schema."""
    return {
        status: {"model": body, "description": text}
        for status, text in statuses().items()
        if only is None or status in only
    }


class ErrorBodies:
    """Which body each path prefix's clients expect: e.g. OpenAI's under /v1, OIP's under /v2."""

    def __init__(self, by_prefix: dict[str, BodyFormat], default: BodyFormat):
        self.by_prefix = by_prefix
        self.default = default

    def body(self, path: str, message: str, kind: ErrorKind, param: str | None = None) -> dict:
        for prefix, fmt in self.by_prefix.items():
            if path == prefix or path.startswith(prefix + "/"):
                return fmt(message, kind, param)
        return self.default(message, kind, param)

    def response(self, exc: RayInferError, path: str) -> JSONResponse:
        kind = kind_of(exc)
        label_error(kind.code)
        headers = {}
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        body = self.body(path, exc.message, kind, exc.param)
        return JSONResponse(body, status_code=kind.http_status, headers=headers or None)

    def internal(self, path: str) -> JSONResponse:
        label_error(INTERNAL.code)
        return JSONResponse(self.body(path, "internal server error", INTERNAL), status_code=INTERNAL.http_status)


def install_error_handlers(app: FastAPI, bodies: ErrorBodies) -> None:
    """Every exception a route raises is answered from the table; anything unknown is a logged 500.
    Validation errors are 400 (as OpenAI answers them), so FastAPI's default 422 leaves the OpenAPI
    document."""
    _drop_default_422(app)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        mapped = as_rayinfer_error(exc)
        if isinstance(mapped, RayInferError):
            return bodies.response(mapped, app_path(request.scope))
        return await on_bug(request, exc)

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return bodies.internal(app_path(request.scope))

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return bodies.response(validation_error(exc), app_path(request.scope))

    for exc_type in (RayInferError, RayTaskError, BackPressureError, RayActorError):
        app.add_exception_handler(exc_type, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_bug)


def validation_error(exc: RequestValidationError) -> InvalidInput:
    """FastAPI's first validation error as InvalidInput naming the field (`messages.0.role`)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        return InvalidInput(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    if not loc:
        return InvalidInput(f"request body must be a JSON object: {err['msg']}")
    param = ".".join(loc)
    return InvalidInput(f"{param}: {err['msg'].removeprefix('Value error, ')}", param)


def _drop_default_422(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
