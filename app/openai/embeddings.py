"""OpenAI's `POST /v1/embeddings` over the registry: a validated request to a response body."""

from __future__ import annotations

import base64

import numpy as np

from app.core.errors import InvalidInput, RayInferError
from app.core.inputs import embed_job
from app.core.registry import ModelRegistry
from app.openai.protocol import EmbeddingRequest
from deployments.types import EmbedResult


async def create_embeddings(registry: ModelRegistry, req: EmbeddingRequest) -> dict:
    cfg = registry.model(req.model, task="embed")
    job = embed_job(req.input, cfg.max_inputs_per_request)
    if req.dimensions is not None:
        dim = (await registry.info(req.model)).dim
        if req.dimensions != dim:
            raise InvalidInput(
                f"dimensions must be {dim} for model {req.model!r} (it cannot be shortened)", "dimensions"
            )
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


def _encode(vec: np.ndarray, encoding_format: str) -> np.ndarray | str:
    if encoding_format == "base64":
        # What the official client decodes: little-endian float32 bytes.
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec  # float32: the response encoder writes it as a JSON array (app/http/responses.py)
