"""The serving environment: what every Ray node running rayinfer needs in its environment before
`ray start` / `serve run` (Serve reads these when its proxies and replicas start).

    env $(python -m app.environment) serve run serve_config.yaml        # what `make serve` does
    env $(python -m app.environment) ray start --head                  # each node of a cluster
"""

from __future__ import annotations

import sys
from pathlib import Path

from app.core.deadline import REPLICA_DRAIN_S
from app.core.metrics import RAY_SERVE_LATENCY_BUCKETS_MS

# `rayinfer-haproxy`, installed beside this Python by `pip install` (pyproject.toml's scripts).
HAPROXY_WRAPPER = Path(sys.executable).parent / "rayinfer-haproxy"

SERVE_ENV: dict[str, str] = {
    # HAProxy forwards HTTP and gRPC straight to the ingress replicas instead of Serve's Python
    # proxy (measured faster: BENCHMARKS.md).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Serve runs this as HAProxy: it bounds what HAProxy lets into each ingress replica and answers
    # the excess itself, 503 + Retry-After within a bounded queue time (app/haproxy.py; its bounds
    # come from RAYINFER_HAPROXY_MAXCONN, _QUEUE, _QUEUE_TIMEOUT_MS and _RETRY_AFTER_S when set).
    "RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_WRAPPER),
    # A reload (every replica change) leaves the old HAProxy finishing the requests it holds, for at
    # most this long (Ray's default 120 s): as long as a stopping replica drains (REPLICA_DRAIN_S), or a
    # long generation through a reloaded HAProxy is cut while its replica would have finished it.
    "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(int(REPLICA_DRAIN_S)),
    # Ray's own request-latency histograms with buckets dense enough for a p99 (app/core/metrics.py).
    "RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS": RAY_SERVE_LATENCY_BUCKETS_MS,
}


def shell_assignments(env: dict[str, str] | None = None) -> str:
    """`NAME=value ...` for `env $(python -m app.environment) <command>`."""
    return " ".join(f"{k}={v}" for k, v in (SERVE_ENV if env is None else env).items())


if __name__ == "__main__":
    print(shell_assignments())
