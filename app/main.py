"""The application builder `serve run` / `serve deploy` import: `app.main:build_app`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.deployment import Deployment

from app.config import AppConfig, ModelConfig
from app.ingress import Ingress
from deployments.embedder import Embedder
from deployments.generator import Generator
from deployments.stage import Stage


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Validate `args` (see `app.config.AppConfig`) and bind the graph: Ingress → one deployment per model.

    Each deployment option has one default: the class's `@serve.deployment`, or, where it follows
    from the model's config, here (never both: tests/unit/test_deployment_options.py). The
    `deployments:` section of `serve_config.yaml` overrides either by deployment name.
    """
    config = AppConfig.model_validate(args or {})
    handles = {}
    for m in config.models:
        if m.placement == "ingress":  # the Ingress replicas load it themselves
            continue
        # Enough in flight per replica for a full batch to form, and the next to queue.
        options: dict[str, Any] = {"name": m.deployment_name, "max_ongoing_requests": max(64, 2 * m.max_batch_size)}
        if m.task == "embed":
            embedder = deployment(Embedder).options(**options)
            handles[m.name] = embedder.bind(m, *([stages(m)] if m.pipeline_stages > 1 else []))
        else:
            handles[m.name] = deployment(Generator).options(**options, **placement(m)).bind(m)
    return deployment(Ingress).bind(config, handles)


def deployment(cls: object) -> Deployment:
    """A `@serve.deployment` class as what it is at run time (type checkers see the class)."""
    assert isinstance(cls, Deployment), cls
    return cls


def placement(m: ModelConfig, replica_cpus: float = 1) -> dict[str, Any]:
    """A model split by vLLM (tensor x pipeline parallel > 1) gets a placement group per replica, as
    ray.serve.llm does it: one bundle per vLLM worker ({GPU: 1} on CUDA), the replica itself in the
    first; vLLM's Ray executor starts its workers on those bundles. An unsplit model needs none."""
    if m.parallel_workers == 1:
        return {}
    worker = {"GPU": 1.0} if m.device == "cuda" else {"CPU": 1.0}  # vLLM's Ray workers ask for num_cpus=0
    bundles = [dict(worker) for _ in range(m.parallel_workers)]
    bundles[0]["CPU"] = bundles[0].get("CPU", 0.0) + replica_cpus
    # The replica's own resources stay the class's (1 CPU, no GPU): it fits in the first bundle.
    return {"placement_group_bundles": bundles, "placement_group_strategy": "PACK"}


def stages(m: ModelConfig) -> list:
    """An encoder's Stage deployments, bound in order: Stage0-<name> (embeddings + first layers) … last
    (last layers + pooling)."""
    from models.pipeline_plan import load_config, plan

    config = load_config(m.source)
    try:
        # Encoders run in float32 (dtype is a generate setting).
        layout = plan(config, m.pipeline_stages, "float32", m.pipeline_boundaries)
    except ValueError as exc:
        field = "pipeline_boundaries" if m.pipeline_boundaries is not None else "pipeline_stages"
        raise ValueError(f"model {m.name!r}: {field}: {exc}") from exc
    return [deployment(Stage).options(name=m.stage_name(s.index)).bind(m, s.index, *s.layers) for s in layout.stages]
