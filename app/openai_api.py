"""OpenAI-compatible embeddings: turn a validated request into a response body."""

from __future__ import annotations

import base64
import time

import numpy as np

from app.errors import InvalidInput, PayloadTooLarge, RayInferError
from app.registry import ModelRegistry
from app.schemas import EmbeddingRequest, ModelCard, ModelList
from deployments.types import EmbedJob, EmbedResult

STARTED = int(time.time())


def to_job(req: EmbeddingRequest, max_items: int) -> EmbedJob:
    items = req.input
    if isinstance(items, str) or (items and isinstance(items[0], int)):
        items = [items]
    if len(items) > max_items:
        raise PayloadTooLarge(f"input has {len(items)} items; at most {max_items} per request", "input")
    if isinstance(items[0], str):
        return EmbedJob(texts=list(items))
    return EmbedJob(token_ids=[list(ids) for ids in items])


async def create_embeddings(registry: ModelRegistry, req: EmbeddingRequest) -> dict:
    cfg = registry.model(req.model, task="embed")
    job = to_job(req, cfg.max_inputs_per_request)
    if req.dimensions is not None:
        dim = (await registry.info(req.model)).dim
        if req.dimensions != dim:
            raise InvalidInput(f"dimensions must be {dim} for model {req.model!r} (it cannot be shortened)", "dimensions")
    result: EmbedResult | RayInferError = await registry.embed(req.model, job)
    if isinstance(result, RayInferError):
        raise result
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(vec, req.encoding_format)}
            for i, vec in enumerate(result.vectors)
        ],
        "model": req.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


def _encode(vec: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # What the official client decodes: little-endian float32 bytes.
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


async def list_models(registry: ModelRegistry) -> ModelList:
    cards = []
    for name in registry.names:
        info = await registry.info(name, timeout_s=registry.config.ready_timeout_s)
        cards.append(ModelCard(id=name, created=STARTED, root=info.root, task=info.task))
    return ModelList(data=cards)
