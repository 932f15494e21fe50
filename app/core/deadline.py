"""Request deadlines that travel with the work: set once where a request enters (the HTTP
middleware from `x-request-timeout-seconds`, the gRPC servicer from the call's deadline), carried
on the job records that cross handles (deployments/types.py `deadline`), and checked wherever work
waits before the model runs it (the edge batcher, EmbedBatches, the Generator before its first
token). Expired work is dropped, answered DeadlineExceeded (504 / DEADLINE_EXCEEDED) and counted in
`rayinfer_expired_requests_total` by stage.

Deadlines are wall-clock seconds (time.time()): the job may cross to another process.
"""

from __future__ import annotations

import dataclasses
import time
from contextvars import ContextVar
from typing import TypeVar

from app.core import metrics
from app.core.errors import DeadlineExceeded

TIMEOUT_HEADER = b"x-request-timeout-seconds"  # Serve's own header (ray.serve._private.constants)

# How long a stopping Ingress or Generator replica (a rolling update, a scale-down) finishes the
# requests it holds before Serve kills it: their `graceful_shutdown_timeout_s`. Serve's 20 s (30 s for
# an ingress behind HAProxy) cut completions that ran longer while a new vLLM engine started beside
# the old one (CI: 107 s and 124 s). An idle replica stops at once; a longer generation than this is
# cut: raise it per deployment in serve_config.yaml.
REPLICA_DRAIN_S = 300.0

# The current request's deadline, set by the entry point, read by the registry when it builds a job.
CURRENT: ContextVar[float | None] = ContextVar("rayinfer_deadline", default=None)

J = TypeVar("J")


def from_timeout(seconds: float | None) -> float | None:
    """The wall-clock deadline `seconds` from now; None for no (or a meaningless) timeout."""
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        return None
    return time.time() + seconds


def from_header(value: bytes | None) -> float | None:
    """The deadline an `x-request-timeout-seconds` header value gives; None when absent or not a number."""
    try:
        return from_timeout(float(value)) if value else None
    except ValueError:
        return None


def with_deadline(job: J) -> J:
    """The job with the current request's deadline, unless it has one already (or there is none)."""
    deadline = CURRENT.get()
    if deadline is None or getattr(job, "deadline", None) is not None:
        return job
    return dataclasses.replace(job, deadline=deadline)  # type: ignore[type-var]


def expired(deadline: float | None, now: float | None = None) -> bool:
    return deadline is not None and (time.time() if now is None else now) >= deadline


def exceeded(stage: str, model: str) -> DeadlineExceeded:
    """The error for work dropped at `stage` because its deadline passed, counted in the metric."""
    metrics.expired().inc(1, {"stage": stage, "model": model})
    return DeadlineExceeded(f"the request's deadline passed while it waited ({stage}); the model did not run it")
