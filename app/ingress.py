"""The ingress deployment: one FastAPI app per replica (OpenAI's /v1, the Open Inference
Protocol's /v2, health) and the gRPC methods of `inference.GRPCInferenceService`, all over the
protocol-neutral core (app/core/). Never touches torch.

One deployment serves both wires: Serve sends HTTP to the app `__serve_build_asgi_app__` builds
for this replica, and a gRPC call to the method named like its RPC (app/oip/grpc/servicer.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig, ModelConfig
from app.core.deadline import REPLICA_DRAIN_S
from app.core.guard import InflightGate, load_api_keys
from app.core.registry import ModelRegistry
from app.http import health
from app.http.errors import ErrorBodies, install_error_handlers
from app.http.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    DeadlineMiddleware,
    InflightLimitMiddleware,
    MetricsMiddleware,
)
from app.oip.grpc.servicer import GRPCInferenceServicer
from app.oip.rest import routes as oip_routes
from app.oip.rest.binary import BinaryTensorMiddleware
from app.openai import routes as openai_routes

if TYPE_CHECKING:
    from deployments.colocated import LocalEmbedder

TITLE = "rayinfer"
DESCRIPTION = "Model serving on Ray Serve: OpenAI-compatible (/v1) and Open Inference Protocol v2 (/v2)."


def error_bodies() -> ErrorBodies:
    """Each prefix's error body: OpenAI's under /v1 (and anywhere else), OIP's under /v2."""
    return ErrorBodies(
        {openai_routes.PREFIX: openai_routes.ERROR_BODY, oip_routes.PREFIX: oip_routes.ERROR_BODY},
        default=openai_routes.ERROR_BODY,
    )


def make_api(
    config: AppConfig, registry: ModelRegistry, inflight: InflightGate, api_keys: tuple[bytes, ...]
) -> FastAPI:
    """The HTTP app of one ingress replica, over its registry, in-flight gate and API keys."""
    api = FastAPI(title=TITLE, version="0.1.0", description=DESCRIPTION)
    api.state.registry = registry
    bodies = error_bodies()
    for router in (openai_routes.router, oip_routes.router, health.router):
        api.include_router(router)
    # Added innermost first: metrics → deadline → API key → in-flight bound → body limit → binary tensors → route.
    api.add_middleware(BinaryTensorMiddleware, bodies=bodies)
    api.add_middleware(BodyLimitMiddleware, limit=config.max_request_bytes, bodies=bodies)
    api.add_middleware(InflightLimitMiddleware, gate=inflight, bodies=bodies)
    api.add_middleware(AuthMiddleware, keys=api_keys, bodies=bodies)
    api.add_middleware(DeadlineMiddleware)
    api.add_middleware(MetricsMiddleware)  # outermost: it also times the guards' 401s, 413s and 503s
    install_error_handlers(api, bodies)
    return api


def _local_embedder(cfg: ModelConfig) -> LocalEmbedder:
    from deployments.colocated import LocalEmbedder  # torch and the model: only where one is placed here

    return LocalEmbedder(cfg)


@serve.deployment(
    ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512, graceful_shutdown_timeout_s=REPLICA_DRAIN_S
)
@serve.ingress()
class Ingress(GRPCInferenceServicer):
    def __init__(self, config: AppConfig, handles: dict[str, DeploymentHandle]):
        self.config = config
        self.local = {m.name: _local_embedder(m) for m in config.models if m.placement == "ingress"}
        self.registry = ModelRegistry(config, handles, dict(self.local))
        # One bound for HTTP and gRPC inference alike (the gRPC servicer enters it too).
        self.inflight = InflightGate(config.max_inflight_requests, config.overload_retry_after_s)
        self.api_keys = load_api_keys(config)

    async def model_stats(self, name: str) -> dict[str, int]:
        """Batch counters of a model this replica holds (`placement: ingress`): batches, jobs, the
        largest batch, the most batches computing at once, and the batches in which a refused job sat
        beside computed ones."""
        return dict(self.local[name].batches.stats)

    async def check_health(self) -> None:
        """Serve's health check: the models this replica holds (`placement: ingress`) compute."""
        for model in self.local.values():
            await model.check_health()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this once, after __init__: this replica's own app."""
        return make_api(self.config, self.registry, self.inflight, self.api_keys)
