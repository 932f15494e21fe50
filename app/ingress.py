"""The ingress: FastAPI routes (OpenAI's /v1, the Open Inference Protocol's /v2) and the gRPC
methods of `inference.GRPCInferenceService` (app/oip_grpc.py), all over the protocol-independent
registry. Never touches torch.

One deployment serves both protocols: Serve sends HTTP to the FastAPI app and a gRPC call to the
method named like its RPC (tested in tests/integration/test_oip.py).

No `from __future__ import annotations` here: Serve rewrites the route methods' signatures,
and FastAPI must see real classes to know a parameter is a JSON body.
"""

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app import oip
from app.completion_schemas import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from app.completions import complete, first_item, sse_events
from app.config import AppConfig
from app.http_errors import ERROR_RESPONSES, BodyLimitMiddleware, install_error_handlers
from app.http_guard import AuthMiddleware, InflightGate, InflightLimitMiddleware, load_api_keys
from app.http_metrics import MetricsMiddleware
from app.oip_grpc import GRPCInferenceServicer
from app.oip_rest import (
    OIP_ERROR_RESPONSES,
    InferRequestBody,
    InferResponseBody,
    ModelMetadataBody,
    ServerMetadataBody,
    metadata_body,
    request_from_body,
    response_body,
)
from app.openai_api import create_embeddings, list_models
from app.registry import ModelRegistry
from app.schemas import EmbeddingRequest, EmbeddingResponse, ModelList

api = FastAPI(
    title="rayinfer",
    version="0.1.0",
    description="Model serving on Ray Serve: OpenAI-compatible (/v1) and Open Inference Protocol v2 (/v2).",
)
api.state.max_request_bytes = AppConfig.model_fields["max_request_bytes"].default
api.state.inflight = InflightGate(AppConfig.model_fields["max_inflight_requests"].default, 1)
api.state.api_keys = ()
# Outermost last: metrics → API key → in-flight bound → body limit → route.
api.add_middleware(BodyLimitMiddleware, limit_of=lambda: api.state.max_request_bytes)
api.add_middleware(InflightLimitMiddleware, gate_of=lambda: api.state.inflight)
api.add_middleware(AuthMiddleware, keys_of=lambda: api.state.api_keys)
api.add_middleware(MetricsMiddleware)  # added last: outermost, so it also times 413s and 400s
install_error_handlers(api)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Ingress(GRPCInferenceServicer):
    def __init__(self, config: AppConfig, handles: dict[str, DeploymentHandle]):
        self.registry = ModelRegistry(config, handles)
        api.state.max_request_bytes = config.max_request_bytes
        # One bound for HTTP and gRPC inference alike (the gRPC servicer enters it too).
        api.state.inflight = self.inflight = InflightGate(config.max_inflight_requests, config.overload_retry_after_s)
        api.state.api_keys = self.api_keys = load_api_keys(config)

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

    # Open Inference Protocol v2 (KServe / Triton), REST. The same core serves gRPC (app/oip_grpc.py).

    @api.get("/v2", response_model=ServerMetadataBody)
    async def v2_server_metadata(self) -> dict:
        """OIP server metadata: name, version, supported extensions."""
        meta = oip.server_metadata()
        return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

    @api.get("/v2/health/live")
    async def v2_live(self) -> dict:
        """OIP liveness: 200 while the server answers."""
        return {"live": True}

    @api.get("/v2/health/ready", responses={503: {"description": "Some model cannot answer yet"}})
    async def v2_ready(self) -> JSONResponse:
        """OIP readiness: 200 when every model is ready, else 503."""
        ready = await oip.server_ready(self.registry)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @api.get("/v2/models/{name}", response_model=ModelMetadataBody, responses=OIP_ERROR_RESPONSES)
    async def v2_model_metadata(self, name: str) -> dict:
        """A model's inputs and outputs (names, datatypes, shapes; -1 is any size)."""
        return metadata_body(await oip.metadata(self.registry, name))

    @api.get("/v2/models/{name}/ready", responses=OIP_ERROR_RESPONSES)
    async def v2_model_ready(self, name: str) -> JSONResponse:
        """200 when the model is ready, 503 when not, 404 when not served."""
        ready = await oip.model_ready(self.registry, name)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @api.post("/v2/models/{name}/infer", response_model=InferResponseBody, responses=OIP_ERROR_RESPONSES)
    async def v2_infer(self, name: str, body: InferRequestBody) -> JSONResponse:
        """Run a model on JSON tensors (OIP's inference request and response)."""
        resp = await oip.infer(self.registry, request_from_body(name, body))
        return JSONResponse(response_body(resp))
