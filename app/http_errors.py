"""HTTP side of the error table: exception handlers and the body-size limit."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from app.errors import (
    INTERNAL,
    ErrorKind,
    InvalidInput,
    Overloaded,
    PayloadTooLarge,
    RayInferError,
    kind_of,
    openai_error_body,
)
from app.metrics import label_error
from app.registry import as_rayinfer_error
from app.schemas import ErrorResponse

logger = logging.getLogger("ray.serve")

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in [
        (400, "Invalid input; `error.param` names the field"),
        (404, "Unknown model"),
        (413, "Body or item count over a configured limit"),
        (503, "Overloaded (with Retry-After) or model not ready"),
        (504, "Deadline exceeded"),
    ]
}


def error_body(path: str, message: str, kind: ErrorKind, param: str | None = None) -> dict:
    """The body each protocol's clients expect: OIP's `{"error": "..."}` under /v2, OpenAI's elsewhere."""
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": message}
    return openai_error_body(message, kind, param)


def error_response(exc: RayInferError, path: str = "") -> JSONResponse:
    kind = kind_of(exc)
    label_error(kind.code)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    body = error_body(path, exc.message, kind, exc.param)
    return JSONResponse(body, status_code=kind.http_status, headers=headers)


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    mapped = as_rayinfer_error(exc)
    if isinstance(mapped, RayInferError):
        return error_response(mapped, request.url.path)
    return _internal(request, exc)


def _internal(request: Request, exc: BaseException) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    label_error(INTERNAL.code)
    return JSONResponse(error_body(request.url.path, "internal server error", INTERNAL), status_code=500)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        message, param = f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
    elif not loc:
        message, param = f"request body must be a JSON object: {err['msg']}", None
    else:
        param = ".".join(loc)
        message = f"{param}: {err['msg'].removeprefix('Value error, ')}"
    return error_response(InvalidInput(message, param), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in (RayInferError, RayTaskError, BackPressureError, RayActorError):
        app.add_exception_handler(exc_type, _on_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(Exception, _internal)


class BodyLimitMiddleware:
    """Refuses bodies over `app.state.max_request_bytes` with 413, before parsing them."""

    def __init__(self, app, limit_of):
        self.app = app
        self.limit_of = limit_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_of()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(_too_large(limit), scope.get("path", ""))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
            return message

        return await self.app(scope, counted, send)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is over the limit of {limit} bytes (max_request_bytes)")
