"""Writes monitoring/grafana/rayinfer.json, the importable Grafana dashboard.

    python -m monitoring.build_dashboards        # after changing a panel; commit the JSON

It carries what Ray's own Serve dashboards lack (per route and model latency, phases, batch
sizes, tokens, time to first token) and borrows only replicas and node utilisation from Ray's
metrics, so the two sit side by side without duplicating each other. A unit test checks the
committed JSON is this script's output; the Prometheus test runs every expression in it.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "grafana" / "rayinfer.json"
ROUTES = ["/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v2/models/{name}/infer", "grpc ModelInfer"]
SEL = 'application=~"$application"'
MSEL = f'{SEL}, model=~"$model"'
RATE = "[$__rate_interval]"


def q(quantile: float, metric: str, by: str, selector: str = MSEL) -> str:
    return f"histogram_quantile({quantile}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}{RATE})))"


def quantiles(metric: str, by: str, selector: str = MSEL, qs=(0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    legend = " ".join("{{" + b.strip() + "}}" for b in by.split(","))
    return [(q(x, metric, by, selector), f"p{round(x * 100)} {legend}") for x in qs]


def panels() -> list[dict]:
    lat = "ray_rayinfer_request_latency_seconds"
    out: list[tuple[str, str, list[tuple[str, str]], dict]] = []
    for route in ROUTES:
        sel = f'{MSEL}, route="{route}", status_class="2xx"'
        out.append((f"Latency {route} (p50 / p95 / p99)", "s", quantiles(lat, "model", sel), {}))
    out += [
        (
            "Request rate by route, model and status",
            "reqps",
            [
                (
                    f"sum by (route, model, status_class) (rate({lat}_count{{{MSEL}}}{RATE}))",
                    "{{route}} {{model}} {{status_class}}",
                )
            ],
            {},
        ),
        (
            "Errors by kind",
            "reqps",
            [(f"sum by (route, kind) (rate(ray_rayinfer_errors_total{{{SEL}}}{RATE}))", "{{route}} {{kind}}")],
            {},
        ),
        (
            "Shed requests (503, queue full)",
            "reqps",
            [
                (
                    f"sum by (route, model) (rate(ray_rayinfer_shed_requests_total{{{SEL}}}{RATE})) or vector(0)",
                    "{{route}} {{model}}",
                )
            ],
            {"description": "0 when nothing has ever been shed."},
        ),
        (
            "In-flight requests at the ingress",
            "short",
            [(f"sum by (deployment) (ray_rayinfer_inflight_requests{{{SEL}}})", "{{deployment}}")],
            {},
        ),
        ("Batch size (p50 / p99)", "short", quantiles("ray_rayinfer_batch_size", "model", qs=(0.5, 0.99)), {}),
        (
            "Queue wait at the model replica (embed: arrival to batch)",
            "s",
            quantiles("ray_rayinfer_phase_seconds", "model", f'{MSEL}, phase="queue"', qs=(0.5, 0.99)),
            {},
        ),
        (
            "Phase latency p99",
            "s",
            [(q(0.99, "ray_rayinfer_phase_seconds", "model, phase"), "{{model}} {{phase}}")],
            {},
        ),
        (
            "Time to first token (p50 / p99)",
            "s",
            quantiles("ray_rayinfer_time_to_first_token_seconds", "model", qs=(0.5, 0.99)),
            {},
        ),
        (
            "Inter-token latency: time between decode steps (p50 / p99)",
            "s",
            quantiles("ray_rayinfer_inter_token_latency_seconds", "model", qs=(0.5, 0.99)),
            {},
        ),
        (
            "Tokens per second",
            "short",
            [
                (f"sum by (model) (rate(ray_rayinfer_input_tokens_total{{{MSEL}}}{RATE}))", "in {{model}}"),
                (f"sum by (model) (rate(ray_rayinfer_output_tokens_total{{{MSEL}}}{RATE}))", "out {{model}}"),
            ],
            {},
        ),
        (
            "Healthy replicas per deployment",
            "short",
            [
                (
                    f'sum by (deployment) (ray_serve_deployment_replica_healthy{{{SEL}, deployment=~"$deployment"}})',
                    "{{deployment}}",
                )
            ],
            {},
        ),
        ("Node CPU utilisation", "percent", [("avg by (instance) (ray_node_cpu_utilization)", "{{instance}}")], {}),
        (
            "GPU utilisation",
            "percent",
            [("avg by (instance, GpuIndex) (ray_node_gpus_utilization)", "{{instance}} GPU {{GpuIndex}}")],
            {"description": "GPU nodes only: no data on a CPU-only cluster."},
        ),
        (
            "GPU memory used",
            "decmbytes",
            [("sum by (instance, GpuIndex) (ray_node_gram_used)", "{{instance}} GPU {{GpuIndex}}")],
            {"description": "GPU nodes only: no data on a CPU-only cluster."},
        ),
    ]
    result = []
    for i, (title, unit, targets, extra) in enumerate(out):
        result.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(65 + j),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    }
                    for j, (expr, legend) in enumerate(targets)
                ],
                **extra,
            }
        )
    return result


def variable(name: str, query: str, label: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard() -> dict:
    return {
        "title": "rayinfer",
        "uid": "rayinfer-overview",
        "description": "rayinfer per route and model: latency percentiles, errors, batching, phases, tokens. "
        "Ray's own Serve dashboards cover per-deployment request metrics.",
        "tags": ["rayinfer", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable(
                    "application", "label_values(ray_serve_deployment_replica_healthy, application)", "Application"
                ),
                variable(
                    "deployment",
                    'label_values(ray_serve_deployment_replica_healthy{application=~"$application"}, deployment)',
                    "Deployment",
                ),
                variable("model", "label_values(ray_rayinfer_request_latency_seconds_count, model)", "Model"),
            ]
        },
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(OUT)
