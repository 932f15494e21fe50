"""OpenAI's routes under /v1: parse, call the serving logic, return its schema."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from app.http.errors import error_responses
from app.http.responses import FastJSONResponse
from app.http.routing import Registry
from app.openai.completions import complete, first_item, sse_events
from app.openai.embeddings import create_embeddings
from app.openai.errors import error_body
from app.openai.models import list_models
from app.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
)

PREFIX = "/v1"
ERROR_BODY = error_body  # the body every error under PREFIX has, whoever answers it
router = APIRouter(prefix=PREFIX)
INFERENCE_ERRORS = error_responses(ErrorResponse)


@router.post("/embeddings", response_model=EmbeddingResponse, responses=INFERENCE_ERRORS)
async def embeddings(body: EmbeddingRequest, registry: Registry) -> JSONResponse:
    """Embed texts or token ids (OpenAI's `POST /v1/embeddings`)."""
    return FastJSONResponse(await create_embeddings(registry, body))


@router.post("/completions", response_model=CompletionResponse, responses=INFERENCE_ERRORS)
async def completions(body: CompletionRequest, registry: Registry) -> Response:
    """Complete prompts (OpenAI's `POST /v1/completions`); `stream: true` answers with server-sent events."""
    return await _generate(registry, body)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=INFERENCE_ERRORS)
async def chat_completions(body: ChatCompletionRequest, registry: Registry) -> Response:
    """Answer a conversation (OpenAI's `POST /v1/chat/completions`); 400 for a model without a chat template."""
    return await _generate(registry, body)


async def _generate(registry: Registry, body: CompletionRequest | ChatCompletionRequest) -> Response:
    if not body.stream:
        return JSONResponse(await complete(registry, body))
    job, first, stream = await first_item(registry, body)
    return EventSourceResponse(sse_events(body, job, first, stream), sep="\n")


@router.get("/models", response_model=ModelList, responses=error_responses(ErrorResponse, only=(401, 500, 503)))
async def models(registry: Registry) -> ModelList:
    """The served models, each with `root`: its resolved local checkpoint directory."""
    return await list_models(registry)
