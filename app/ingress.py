"""The HTTP ingress: FastAPI routes over the protocol-independent registry. Never touches torch.

No `from __future__ import annotations` here: Serve rewrites the route methods' signatures,
and FastAPI must see real classes to know a parameter is a JSON body.
"""

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.completion_schemas import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from app.completions import complete, first_item, sse_events
from app.config import AppConfig
from app.http_errors import ERROR_RESPONSES, BodyLimitMiddleware, install_error_handlers
from app.http_guard import AuthMiddleware, InflightLimitMiddleware, load_api_keys
from app.http_metrics import MetricsMiddleware
from app.openai_api import create_embeddings, list_models
from app.registry import ModelRegistry
from app.schemas import EmbeddingRequest, EmbeddingResponse, ModelList

api = FastAPI(title="rayinfer", version="0.1.0", description="OpenAI-compatible model serving on Ray Serve.")
api.state.max_request_bytes = AppConfig.model_fields["max_request_bytes"].default
api.state.inflight_limit = (AppConfig.model_fields["max_inflight_requests"].default, 1)
api.state.api_keys = ()
# Outermost last: metrics → API key → in-flight bound → body limit → route.
api.add_middleware(BodyLimitMiddleware, limit_of=lambda: api.state.max_request_bytes)
api.add_middleware(InflightLimitMiddleware, limit_of=lambda: api.state.inflight_limit)
api.add_middleware(AuthMiddleware, keys_of=lambda: api.state.api_keys)
api.add_middleware(MetricsMiddleware)  # added last: outermost, so it also times 413s and 400s
install_error_handlers(api)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Ingress:
    def __init__(self, config: AppConfig, handles: dict[str, DeploymentHandle]):
        self.registry = ModelRegistry(config, handles)
        api.state.max_request_bytes = config.max_request_bytes
        api.state.inflight_limit = (config.max_inflight_requests, config.overload_retry_after_s)
        api.state.api_keys = load_api_keys(config)

    @api.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def embeddings(self, body: EmbeddingRequest) -> JSONResponse:
        """Embed texts or token ids (OpenAI's `POST /v1/embeddings`)."""
        return JSONResponse(await create_embeddings(self.registry, body))

    @api.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(self, body: CompletionRequest):
        """Complete prompts (OpenAI's `POST /v1/completions`); `stream: true` answers with server-sent events."""
        return await self._generate(body)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest):
        """Answer a conversation (OpenAI's `POST /v1/chat/completions`); 400 for a model without a chat template."""
        return await self._generate(body)

    async def _generate(self, body):
        if not body.stream:
            return JSONResponse(await complete(self.registry, body))
        job, first, stream = await first_item(self.registry, body)
        return EventSourceResponse(sse_events(body, job, first, stream), sep="\n")

    @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models(self) -> ModelList:
        """The served models, each with `root`: its resolved local checkpoint directory."""
        return await list_models(self.registry)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Live: the ingress answers."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"description": "Some model cannot answer yet"}})
    async def readyz(self) -> JSONResponse:
        """Ready only when every model's replica answers."""
        failing = await self.registry.not_ready()
        if failing:
            return JSONResponse({"status": "not ready", "models": failing}, status_code=503)
        return JSONResponse({"status": "ready", "models": {n: "ready" for n in self.registry.names}})
