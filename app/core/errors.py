"""One error hierarchy and one table mapping each kind to HTTP status, gRPC code and OpenAI type.

Client mistakes are `ClientError` (4xx); everything else is `ServerError` (5xx). Any other
exception reaching a route is a bug: it is logged with its traceback and answered as a
generic 500 that leaks nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


class RayInferError(Exception):
    """Base of every error rayinfer answers deliberately.

    `param` names the request field at fault (OpenAI's `param`), when there is one.
    Picklable: replicas raise these and the ingress maps them.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


class ClientError(RayInferError):
    """The request is wrong; retrying it unchanged will fail again."""


class InvalidInput(ClientError):
    """A field has a wrong type, value or shape."""


class InputTooLong(InvalidInput):
    """An input has more tokens than the model accepts."""


class Unauthorized(ClientError):
    """No valid API key: the `Authorization: Bearer <key>` header is missing or wrong."""


class ModelNotFound(ClientError):
    """The request names a model this service does not serve."""


class PayloadTooLarge(ClientError):
    """The body or the number of items in it is over a configured limit."""


class ServerError(RayInferError):
    """The service could not answer; the request may succeed later."""


class ModelNotReady(ServerError):
    """The model has no replica able to answer yet."""


class ReplicaLost(ModelNotReady):
    """The replica (or a pipeline stage) died under the request; running it again is safe."""


class IngressLost(ServerError):
    """The ingress replica holding the request died (or closed its connection) before answering. The
    app never raises it: HAProxy answers it (502, app/haproxy.py); the request may have run."""


class Overloaded(ServerError):
    """Queues are full; the client should retry after `retry_after_s`."""

    def __init__(self, message: str, param: str | None = None, retry_after_s: int = 1):
        super().__init__(message, param)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServerError):
    """The request ran past its deadline; its work was cancelled."""


@dataclass(frozen=True)
class ErrorKind:
    http_status: int
    grpc_code: str  # name of a grpc.StatusCode member
    openai_type: str
    code: str
    description: str  # when it happens: the OpenAPI document's text for the status


# The one table. Looked up along the exception's MRO, so a subclass without its own row
# inherits its parent's.
_CLIENT, _SERVER = "invalid_request_error", "server_error"
ERROR_TABLE: dict[type[RayInferError], ErrorKind] = {
    InvalidInput: ErrorKind(
        400, "INVALID_ARGUMENT", _CLIENT, "invalid_value", "Invalid input; the error names the field"
    ),
    InputTooLong: ErrorKind(
        400, "INVALID_ARGUMENT", _CLIENT, "context_length_exceeded", "An input over the model's token limit"
    ),
    Unauthorized: ErrorKind(401, "UNAUTHENTICATED", _CLIENT, "invalid_api_key", "Missing or wrong API key"),
    ModelNotFound: ErrorKind(404, "NOT_FOUND", _CLIENT, "model_not_found", "Unknown model"),
    PayloadTooLarge: ErrorKind(
        413, "INVALID_ARGUMENT", _CLIENT, "payload_too_large", "Body or item count over a configured limit"
    ),
    ClientError: ErrorKind(400, "INVALID_ARGUMENT", _CLIENT, "invalid_request", "Invalid request"),
    ModelNotReady: ErrorKind(503, "UNAVAILABLE", _SERVER, "model_not_ready", "No model replica can answer yet"),
    Overloaded: ErrorKind(503, "UNAVAILABLE", _SERVER, "overloaded", "Overloaded; retry after `Retry-After` seconds"),
    IngressLost: ErrorKind(
        502, "UNAVAILABLE", _SERVER, "ingress_lost", "The ingress replica died under the request (HAProxy's answer)"
    ),
    DeadlineExceeded: ErrorKind(
        504, "DEADLINE_EXCEEDED", _SERVER, "timeout", "Deadline exceeded; the work was cancelled"
    ),
    ServerError: ErrorKind(500, "INTERNAL", _SERVER, "internal_error", "Internal error (nothing leaked)"),
    RayInferError: ErrorKind(500, "INTERNAL", _SERVER, "internal_error", "Internal error (nothing leaked)"),
}

INTERNAL = ERROR_TABLE[ServerError]


def kind_of(exc: RayInferError) -> ErrorKind:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return INTERNAL


def statuses() -> dict[int, str]:
    """Every HTTP status the table answers with, and what each means (rows of one status joined)."""
    out: dict[int, list[str]] = {}
    for kind in ERROR_TABLE.values():
        if kind.description not in out.setdefault(kind.http_status, []):
            out[kind.http_status].append(kind.description)
    return {status: "; ".join(texts) for status, texts in sorted(out.items())}
