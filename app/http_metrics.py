"""HTTP side of the metrics: one ASGI middleware times every request to its last byte."""

from __future__ import annotations

import time

from app import metrics


class MetricsMiddleware:
    """Latency by route template, model and status class; errors by kind; in-flight requests.

    Routes and exception handlers fill in the request's `metrics.RequestLabels` (model, error
    kind) through a context variable; this reads them when the response has been sent.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        labels = metrics.RequestLabels(start=time.perf_counter())
        token = metrics.CURRENT.set(labels)
        status = 500  # unless a response starts: an exception escaping the app is a 500

        async def send_with_status(message):
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
