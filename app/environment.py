"""The serving environment: what every Ray node running rayinfer needs in its environment before
`ray start` / `serve run` (Serve reads these when its proxies and replicas start).

    env $(python -m app.environment) serve run serve_config.yaml        # what `make serve` does
    env $(python -m app.environment) ray start --head                  # each node of a cluster
"""

from __future__ import annotations

from app.core.metrics import RAY_SERVE_LATENCY_BUCKETS_MS

SERVE_ENV: dict[str, str] = {
    # HAProxy forwards HTTP and gRPC straight to the ingress replicas instead of Serve's Python
    # proxy (measured faster: BENCHMARKS.md).
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Ray's own request-latency histograms with buckets dense enough for a p99 (app/core/metrics.py).
    "RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS": RAY_SERVE_LATENCY_BUCKETS_MS,
}


def shell_assignments(env: dict[str, str] | None = None) -> str:
    """`NAME=value ...` for `env $(python -m app.environment) <command>`."""
    return " ".join(f"{k}={v}" for k, v in (SERVE_ENV if env is None else env).items())


if __name__ == "__main__":
    print(shell_assignments())
