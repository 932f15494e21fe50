"""Generation results, protocol-neutral: folding a stream's chunks per choice, and running a job
to its end. The OpenAI routes and the Open Inference Protocol both build on these."""

from __future__ import annotations

from collections.abc import Callable

from app.core.errors import RayInferError
from app.core.registry import ModelRegistry
from deployments.types import GenerateChunk, GenerateJob, TokenLogprob


def fold(chunks: list[GenerateChunk]) -> dict[int, tuple[str, str | None, list[TokenLogprob] | None]]:
    """One (new text, finish reason, new tokens' logprobs or None) per choice, in order of first
    appearance: the replica may have coalesced several engine steps of one choice into one item."""
    merged: dict[int, tuple[str, str | None, list[TokenLogprob] | None]] = {}
    for chunk in chunks:
        text, _, logprobs = merged.get(chunk.index, ("", None, None))
        if chunk.logprobs is not None:
            logprobs = [*(logprobs or []), *chunk.logprobs]
        merged[chunk.index] = (text + chunk.text, chunk.finish_reason, logprobs)
    return merged


async def collect(
    registry: ModelRegistry, model: str, job: GenerateJob, on_chunk: Callable[[GenerateChunk], None] | None = None
) -> tuple[list[str], list[str | None]]:
    """Run a job to its end: each choice's whole text and finish reason, in choice order. Nothing
    is sent before the end, so a generation whose replica dies midway is re-run whole."""

    async def run() -> list[GenerateChunk]:
        chunks: list[GenerateChunk] = []
        async for item in registry.generate(model, job):
            if isinstance(item, RayInferError):
                raise item
            chunks.extend(item)
        return chunks

    texts: dict[int, list[str]] = {i: [] for i in range(len(job))}
    finish: dict[int, str | None] = {}
    for chunk in await registry.retrying(model, run):
        texts[chunk.index].append(chunk.text)
        if on_chunk is not None:
            on_chunk(chunk)
        if chunk.finish_reason is not None:
            finish[chunk.index] = chunk.finish_reason
    return ["".join(texts[i]) for i in range(len(job))], [finish.get(i) for i in range(len(job))]
