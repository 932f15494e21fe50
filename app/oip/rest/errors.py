"""The Open Inference Protocol's REST error body, in a module of its own: light enough (no pydantic)
for rayinfer-haproxy (app/haproxy.py), which HAProxy's every start and reload waits for, to answer
overload with it."""

from __future__ import annotations

from app.core.errors import ErrorKind


def error_body(message: str, kind: ErrorKind, param: str | None = None) -> dict:
    """OIP's error body: `{"error": "<message>"}` (the status carries the kind)."""
    return {"error": message}
