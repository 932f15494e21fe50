"""Every rayinfer metric, in one place.

Recorded with Ray Serve's metrics API inside the replicas, so Ray's per-node metrics agent
exports them from every node (Prometheus finds the agents through Ray's service-discovery
file; see monitoring/prometheus.yml). Ray adds `deployment`, `replica` and `application`
tags, and exports every name with its own `ray_` prefix: `rayinfer_request_latency_seconds`
is scraped as `ray_rayinfer_request_latency_seconds`.

Labels stay low-cardinality: route templates (never raw paths), model names, status classes,
error kinds, phases.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from dataclasses import dataclass
from typing import Any

from ray.serve import metrics

# Dense between 1 ms and 30 s, so a p99 interpolates within ~25-50% of its value.
LATENCY_BUCKETS_S = [
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
]
BATCH_BUCKETS: list[float] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512]
INFLIGHT_REPORT_S = 0.5  # how often the in-flight gauge is set (IngressMetrics._report_inflight)

# Ray's own request-latency histograms (ray_serve_*) use these when the cluster is started with
# RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS set to it (Makefile, loadtest/servers.py); its default
# jumps from 500 ms to 1 s to 2 s to 5 s, too coarse for a p99.
RAY_SERVE_LATENCY_BUCKETS_MS = ",".join(f"{b * 1000:g}" for b in LATENCY_BUCKETS_S)


def tag_keys(*names: str) -> Any:
    """Ray's metrics annotate `tag_keys` as a one-element tuple; any number of names works."""
    return names


@dataclass
class RequestLabels:
    """Filled in as a request is handled; read by the middleware when it ends."""

    start: float
    model: str = "none"
    error: str | None = None


CURRENT: contextvars.ContextVar[RequestLabels | None] = contextvars.ContextVar("rayinfer_request", default=None)


def label_model(name: object) -> None:
    """Name the current request's model (only if it is served: no label from client input)."""
    labels = CURRENT.get()
    if labels is not None and isinstance(name, str):
        labels.model = name


def phase_tags(model_name: str, phases: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Tag dicts made once per replica: {"model": {...}, phase: {...}} (no dict building per observation)."""
    return {"model": {"model": model_name}, **{p: {"model": model_name, "phase": p} for p in phases}}


def label_error(kind: str) -> None:
    """The current request failed with this kind (the error table's `code`)."""
    labels = CURRENT.get()
    if labels is not None:
        labels.error = kind


@functools.cache
def ingress() -> IngressMetrics:
    return IngressMetrics()


@functools.cache
def model() -> ModelMetrics:
    return ModelMetrics()


@functools.cache
def expired() -> Any:
    """Work dropped before the model ran it because its deadline had passed (app/core/deadline.py)."""
    return metrics.Counter(
        "rayinfer_expired_requests_total",
        description="Requests (or jobs) dropped before the model ran them because their deadline had passed, "
        "by where: edge_batch, embed_batch (waiting for a forward), generate_queue (before the first token), "
        "generate_running (aborted while generating).",
        tag_keys=tag_keys("stage", "model"),
    )


class IngressMetrics:
    def __init__(self):
        self.latency = metrics.Histogram(
            "rayinfer_request_latency_seconds",
            description="End-to-end latency at the ingress, to the last byte (streams: to [DONE]).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tag_keys("route", "model", "status_class"),
        )
        self.errors = metrics.Counter(
            "rayinfer_errors_total",
            description="Error responses by kind (the error table's code).",
            tag_keys=tag_keys("route", "model", "kind"),
        )
        self.shed = metrics.Counter(
            "rayinfer_shed_requests_total",
            description="Requests refused with 503 because a queue was full.",
            tag_keys=tag_keys("route", "model"),
        )
        self.inflight = metrics.Gauge(
            "rayinfer_inflight_requests", description="HTTP requests being handled by this ingress replica."
        )
        self.ttft = metrics.Histogram(
            "rayinfer_time_to_first_token_seconds",
            description="Streamed generation: request start to first text.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tag_keys("model"),
        )
        self._inflight = 0
        self._reporter: asyncio.Task | None = None

    def started(self) -> None:
        self._inflight += 1
        loop = asyncio.get_running_loop()
        if self._reporter is None or self._reporter.done() or self._reporter.get_loop() is not loop:
            self._reporter = loop.create_task(self._report_inflight())

    def finished(self, route: str, labels: RequestLabels, status: int) -> None:
        self._inflight -= 1
        tags = {"route": route, "model": labels.model}
        self.latency.observe(time.perf_counter() - labels.start, {**tags, "status_class": f"{status // 100}xx"})
        if status >= 400:
            kind = labels.error or f"http_{status}"
            self.errors.inc(1, {**tags, "kind": kind})
            if kind == "overloaded":
                self.shed.inc(1, tags)

    async def _report_inflight(self) -> None:
        """The in-flight gauge, set every INFLIGHT_REPORT_S (as Serve reports its own ongoing requests):
        a Ray metric record per request start and end cost the ingress measurable CPU under load
        (BENCHMARKS.md), and Ray exports a gauge's last value only every few seconds anyway."""
        reported = None
        while True:
            if self._inflight != reported:
                reported = self._inflight
                self.inflight.set(reported)
            await asyncio.sleep(INFLIGHT_REPORT_S)


class ModelMetrics:
    """Recorded by the model deployments (Embedder, Generator)."""

    def __init__(self):
        self.phase = metrics.Histogram(
            "rayinfer_phase_seconds",
            description="Time per phase. embed: queue (arrival at the replica to its batch; in the ingress, a batch's "
            "wait for a compute slot), tokenize, "
            "inference (forward). generate: first_token (vLLM's time to first token: arrival in the engine "
            "to the first generated token, queueing and prefill included).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tag_keys("model", "phase"),
        )
        self.batch_size = metrics.Histogram(
            "rayinfer_batch_size",
            description="Inputs per forward pass (embed: texts; generate: sequences running in vLLM's engine at "
            "a step that generated tokens).",
            boundaries=BATCH_BUCKETS,
            tag_keys=tag_keys("model"),
        )
        self.input_tokens = metrics.Counter(
            "rayinfer_input_tokens_total",
            description="Tokens in (embedded texts, prompts).",
            tag_keys=tag_keys("model"),
        )
        self.output_tokens = metrics.Counter(
            "rayinfer_output_tokens_total",
            description="Tokens generated.",
            tag_keys=tag_keys("model"),
        )
        self.itl = metrics.Histogram(
            "rayinfer_inter_token_latency_seconds",
            description="Time between a sequence's consecutive tokens, as vLLM's engine measures them.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tag_keys("model"),
        )
