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
    handles = {
        m.name: deployment(Embedder if m.task == "embed" else Generator)
        .options(
            name=m.deployment_name,
            # Enough in flight per replica for a full batch to form, and the next to queue.
            max_ongoing_requests=max(64, 2 * m.max_batch_size),
        )
        .bind(m, *([stages(m)] if m.pipeline_stages > 1 else []))
        for m in config.models
        if m.placement == "replica"  # `ingress`: the Ingress replicas load it themselves
    }
    return deployment(Ingress).bind(config, handles)


def deployment(cls: object) -> Deployment:
    """A `@serve.deployment` class as what it is at run time (type checkers see the class)."""
    assert isinstance(cls, Deployment), cls
    return cls


def stages(m: ModelConfig) -> list:
    """The model's Stage deployments, bound in order: Stage0-<name> (embeddings + first layers) … last
    (norm + head of a causal LM; pooling of an encoder)."""
    from models.pipeline_plan import load_config, plan

    config = load_config(m.source)
    try:
        layout = plan(config, m.pipeline_stages, m.dtype, m.pipeline_boundaries)
    except ValueError as exc:
        field = "pipeline_boundaries" if m.pipeline_boundaries is not None else "pipeline_stages"
        raise ValueError(f"model {m.name!r}: {field}: {exc}") from exc
    return [deployment(Stage).options(name=m.stage_name(s.index)).bind(m, s.index, *s.layers) for s in layout.stages]
