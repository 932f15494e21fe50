"""Guards every protocol shares: the API-key check and the bound on requests in flight.

HTTP middleware (app/http/middleware.py) and the gRPC servicer (app/oip/grpc/servicer.py) apply
them alike, so a key or a slot means the same thing whichever wire a request arrives on.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from app.config import AppConfig
from app.core.errors import Overloaded


def load_api_keys(config: AppConfig, environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    """Accepted keys from `config.api_keys_env` and `config.api_keys_file`; empty means no auth."""
    environ = dict(os.environ) if environ is None else environ
    keys = [k.strip() for k in environ.get(config.api_keys_env, "").split(",")]
    if config.api_keys_file:
        lines = Path(config.api_keys_file).read_text().splitlines()
        keys += [line.strip() for line in lines if not line.strip().startswith("#")]
    return tuple(dict.fromkeys(k.encode() for k in keys if k))


def key_matches(authorization: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """`authorization` is `Bearer <a configured key>`. Constant time in the key's content: every
    configured key is compared, none short-circuits."""
    if not authorization or authorization[:7].lower() != b"bearer ":
        return False
    given = authorization[7:].strip()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


class InflightGate:
    """The inference requests one ingress replica is handling, HTTP and gRPC together, and their
    bound: past it, Overloaded (503 + Retry-After; gRPC UNAVAILABLE) at once, never a queue that
    turns into timeouts."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.count = limit, retry_after_s, 0

    def __enter__(self) -> None:
        if self.count >= self.limit:
            raise Overloaded(
                f"the server has {self.limit} requests in flight (max_inflight_requests); retry shortly",
                retry_after_s=self.retry_after_s,
            )
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
