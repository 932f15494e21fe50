"""Deadlines travel with the job and expired work never reaches the model: counted by the model's
work (texts forwarded, batches sent), never by timing. No Ray cluster."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from app.config import ModelConfig
from app.core import deadline
from app.core.edge_batch import EdgeBatcher
from app.core.errors import ERROR_TABLE, DeadlineExceeded
from app.http.middleware import DeadlineMiddleware
from app.oip.grpc.servicer import call_deadline
from deployments.embed_jobs import EmbedBatches
from deployments.types import EmbedJob, EmbedResult, GenerateJob
from models.params import SamplingParams

PAST, FUTURE = time.time() - 1, time.time() + 3600


class CountingModel:
    """Tokenizes one id per character; the forward records every token-id sequence it is given."""

    dim, max_tokens, vocab_size = 4, 64, 1000

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[ord(c) % self.vocab_size for c in t] for t in texts]

    def truncate(self, ids: list[int]) -> list[int]:
        return ids[: self.max_tokens]


def batches() -> tuple[EmbedBatches, list[list[int]]]:
    forwarded: list[list[int]] = []

    async def forward(flat: list[list[int]]) -> np.ndarray:
        forwarded.extend(flat)
        return np.ones((len(flat), CountingModel.dim), dtype=np.float32)

    cfg = ModelConfig(name="m", source="x", task="embed")
    return EmbedBatches(cfg, CountingModel(), "/x", forward), forwarded  # type: ignore[arg-type]


def test_an_expired_job_in_a_batch_is_answered_504_and_never_forwarded():
    embed, forwarded = batches()
    jobs = [EmbedJob(texts=["live"], deadline=FUTURE), EmbedJob(texts=["dead"], deadline=PAST), EmbedJob(texts=["n"])]
    results = asyncio.run(embed.run(jobs))
    assert forwarded == CountingModel().tokenize(["live", "n"])  # the model ran the two live jobs only
    assert isinstance(results[0], EmbedResult) and isinstance(results[2], EmbedResult)
    assert isinstance(results[1], DeadlineExceeded) and ERROR_TABLE[DeadlineExceeded].http_status == 504
    assert embed.stats["expired"] == 1 and embed.stats["forwarded"] == 2


def test_a_batch_of_only_expired_jobs_runs_no_forward():
    embed, forwarded = batches()
    results = asyncio.run(embed.run([EmbedJob(texts=["a", "b"], deadline=PAST)]))
    assert forwarded == [] and isinstance(results[0], DeadlineExceeded)


def test_the_edge_batcher_answers_expired_jobs_and_never_sends_them():
    sent: list[list[str]] = []

    async def send(jobs: list[tuple[str, float]]) -> list[str]:
        sent.append([name for name, _ in jobs])
        return [f"ok:{name}" for name, _ in jobs]

    def drop(job: tuple[str, float]) -> str | None:
        return "expired" if deadline.expired(job[1]) else None

    async def scenario():
        batcher = EdgeBatcher(send, size_of=lambda j: 1, max_items=10, max_inflight=1, expired=drop)
        return await asyncio.gather(*(batcher.submit(j) for j in [("a", FUTURE), ("b", PAST), ("c", FUTURE)]))

    assert asyncio.run(scenario()) == ["ok:a", "expired", "ok:c"]
    assert [name for batch in sent for name in batch] == ["a", "c"]


def test_jobs_take_the_requests_deadline_unless_they_have_one():
    token = deadline.CURRENT.set(FUTURE)
    try:
        assert deadline.with_deadline(EmbedJob(texts=["x"])).deadline == FUTURE
        assert deadline.with_deadline(EmbedJob(texts=["x"], deadline=PAST)).deadline == PAST
        assert deadline.with_deadline(GenerateJob(params=SamplingParams(), prompts=["x"])).deadline == FUTURE
    finally:
        deadline.CURRENT.reset(token)
    assert deadline.with_deadline(EmbedJob(texts=["x"])).deadline is None


@pytest.mark.parametrize(("value", "expected"), [(b"2.5", 2.5), (b"0", None), (b"-1", None), (b"soon", None)])
def test_the_timeout_header_gives_a_deadline(value, expected):
    got = deadline.from_header(value)
    assert (got is None) if expected is None else (abs(got - time.time() - expected) < 1)


def test_the_http_middleware_sets_the_deadline_for_the_route():
    seen = []

    async def route(scope, receive, send):
        seen.append(deadline.CURRENT.get())

    scope = {"type": "http", "headers": [(b"x-request-timeout-seconds", b"30")]}
    asyncio.run(DeadlineMiddleware(route)(scope, None, None))
    asyncio.run(DeadlineMiddleware(route)({"type": "http", "headers": []}, None, None))
    assert seen[0] is not None and 29 < seen[0] - time.time() <= 30 and seen[1] is None


def test_grpc_metadata_gives_the_deadline():
    class Context:
        def invocation_metadata(self):
            return (("x-request-timeout-seconds", "10"),)

    assert 9 < call_deadline(Context()) - time.time() <= 10
    assert call_deadline(None) is None
