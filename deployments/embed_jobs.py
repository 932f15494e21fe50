"""Batches of embedding jobs, wherever the model runs: in an Embedder replica, or in the ingress
itself (`placement: ingress`). No Ray here.

Each job is checked and tokenized on its own (a bad job gets its own error and stays out of the
forward pass, so it never fails the jobs batched with it); the rest go through one forward; the
vectors are split back per job.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import numpy as np

from app.config import ModelConfig
from app.core import metrics
from app.core.deadline import exceeded, expired
from app.core.errors import InputTooLong, InvalidInput, RayInferError, ReplicaLost
from deployments.types import EmbedJob, EmbedResult, ModelInfo
from models.embedding import EmbeddingModel

Result = EmbedResult | RayInferError
# Token ids → float32 vectors, in order; ReplicaLost if a pipeline stage died under them.
Forward = Callable[[list[list[int]]], Awaitable[np.ndarray]]


class EmbedBatches:
    def __init__(self, cfg: ModelConfig, model: EmbeddingModel, root: str, forward: Forward):
        self.cfg, self.model, self.forward = cfg, model, forward
        self.info = ModelInfo(
            name=cfg.name,
            task=cfg.task,
            root=root,
            dim=model.dim,
            max_input_tokens=model.max_tokens,
            vocab_size=model.vocab_size,
        )
        # jobs: every job received; expired: those dropped unrun (deadline passed); forwarded: inputs the model
        # ran; mixed_batches: batches in which a job was refused (a client error) and others were computed.
        self.stats = {
            "batches": 0,
            "jobs": 0,
            "max_jobs_per_batch": 0,
            "max_batches_in_flight": 0,
            "mixed_batches": 0,
            "expired": 0,
            "forwarded": 0,
        }
        self._in_flight = 0
        self._metrics = metrics.model()
        self._tags = metrics.phase_tags(cfg.name, ("queue", "tokenize", "inference"))

    async def run_calls(self, calls: list[tuple[float, list[EmbedJob]]]) -> list[list[Result]]:
        """One batch of calls, each (arrival time, its jobs): each call's results, in order."""
        start = time.perf_counter()
        for arrived, _ in calls:
            self.observe_queue(start - arrived)
        results = await self.run([job for _, jobs in calls for job in jobs])
        out, offset = [], 0
        for _, jobs in calls:
            out.append(results[offset : offset + len(jobs)])
            offset += len(jobs)
        return out

    def observe_queue(self, seconds: float) -> None:
        """A call's wait before the model took it up (the phase="queue" histogram)."""
        self._metrics.phase.observe(seconds, self._tags["queue"])

    async def run(self, jobs: list[EmbedJob]) -> list[Result]:
        """The jobs' results in order: vectors, or the client error a job deserves (returned, not raised)."""
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        self.stats["max_jobs_per_batch"] = max(self.stats["max_jobs_per_batch"], len(jobs))
        start = time.perf_counter()
        prepared = [self._expired(job) or self.prepare(job) for job in jobs]
        flat = [ids for p in prepared if not isinstance(p, RayInferError) for ids in p]
        tokenized = time.perf_counter()
        self._metrics.phase.observe(tokenized - start, self._tags["tokenize"])
        if not flat:
            return [p for p in prepared if isinstance(p, RayInferError)]
        try:
            vectors = await self._counted(flat)
        except ReplicaLost as lost:  # a pipeline stage died under the batch: the good jobs may run again
            return [p if isinstance(p, RayInferError) else lost for p in prepared]
        self._record(flat, tokenized)
        # Here some jobs were computed: any refused one shared their batch.
        self.stats["mixed_batches"] += any(isinstance(p, RayInferError) for p in prepared)
        results: list[Result] = []
        offset = 0
        for p in prepared:
            if isinstance(p, RayInferError):
                results.append(p)
                continue
            results.append(EmbedResult(vectors=vectors[offset : offset + len(p)], prompt_tokens=sum(map(len, p))))
            offset += len(p)
        return results

    async def _counted(self, flat: list[list[int]]) -> np.ndarray:
        self._in_flight += 1
        self.stats["forwarded"] += len(flat)
        self.stats["max_batches_in_flight"] = max(self.stats["max_batches_in_flight"], self._in_flight)
        try:
            return await self.forward(flat)
        finally:
            self._in_flight -= 1

    def _record(self, flat: list[list[int]], tokenized: float) -> None:
        m, model_tag = self._metrics, self._tags["model"]
        m.phase.observe(time.perf_counter() - tokenized, self._tags["inference"])
        m.batch_size.observe(len(flat), model_tag)
        m.input_tokens.inc(sum(map(len, flat)), model_tag)

    def _expired(self, job: EmbedJob) -> RayInferError | None:
        """DeadlineExceeded (counted) if the job's deadline passed while it waited for this batch."""
        if not expired(job.deadline):
            return None
        self.stats["expired"] += 1
        return exceeded("embed_batch", self.cfg.name)

    def prepare(self, job: EmbedJob) -> list[list[int]] | RayInferError:
        """The job's token ids within the model's limit, or why not."""
        if job.token_ids is not None:
            ids_list = job.token_ids
            bad = next((t for ids in ids_list for t in ids if not 0 <= t < self.info.vocab_size), None)
            if bad is not None:
                return InvalidInput(f"token id {bad} is outside the vocabulary [0, {self.info.vocab_size})", "input")
        else:
            ids_list = self.model.tokenize(job.texts or [])
        limit = self.model.max_tokens
        if self.cfg.truncate:
            return [self.model.truncate(ids) for ids in ids_list]
        for i, ids in enumerate(ids_list):
            if len(ids) > limit:
                return InputTooLong(
                    f"input[{i}] has {len(ids)} tokens; model {self.cfg.name!r} accepts at most {limit} "
                    "(shorten it, or serve the model with `truncate: true`)",
                    "input",
                )
        return ids_list

    async def probe(self) -> None:
        """A real forward of one short text gives one finite vector of the model's width, or RuntimeError."""
        vectors = await self.forward(self.model.tokenize(["ok"]))
        if vectors.shape != (1, self.info.dim) or not np.isfinite(vectors).all():
            raise RuntimeError(f"health probe forward gave an unusable vector of shape {vectors.shape}")
