"""The Embedder deployment: one replica holds one embedding model and batches requests.

A model split into pipeline stages (`pipeline_stages > 1`) is held by its Stage deployments; the
Embedder keeps the tokenizer, batches as usual, and sends each batch's ids and mask through the
stages. Up to `pipeline_microbatches` batches are in flight at once, so while one is in a later
stage the next is already in the first: each stage batches on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.exceptions import RayError

from app.config import ModelConfig
from app.core import metrics
from app.core.errors import InputTooLong, InvalidInput, RayInferError, ReplicaLost
from deployments.replica import replica_device, replica_threads
from deployments.types import EmbedJob, EmbedResult, ModelInfo
from models.embedding import EmbeddingModel
from models.loader import resolve_source

logger = logging.getLogger("ray.serve")


# max_ongoing_requests comes from the model config (app/main.py: enough for a full batch and the next).
@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class Embedder:
    """Embeds texts or token ids with dynamic batching across concurrent requests."""

    def __init__(self, cfg: ModelConfig, stages: list | None = None):
        """stages: the handles of the model's Stage deployments, in order, when it is split."""
        torch.set_num_threads(replica_threads(cfg))
        self.cfg = cfg
        self.stages = stages or []
        root = resolve_source(cfg.source)
        self.model = EmbeddingModel(
            root, device=replica_device(cfg), max_input_tokens=cfg.max_input_tokens, weights=not stages
        )
        self.info = ModelInfo(
            name=cfg.name,
            task=cfg.task,
            root=str(root),
            dim=self.model.dim,
            max_input_tokens=self.model.max_tokens,
            vocab_size=self.model.vocab_size,
        )
        self._stats = {"batches": 0, "jobs": 0, "max_jobs_per_batch": 0, "max_batches_in_flight": 0}
        self._in_flight = 0
        self._metrics = metrics.model()
        self._tags = metrics.phase_tags(cfg.name, ("queue", "tokenize", "inference"))
        # Decorated here, not on the class, so the config sets every parameter, including how many
        # batches may be in flight (1 for a model held here; one per micro-batch for a pipeline).
        self._batch = serve.batch(
            max_batch_size=cfg.max_batch_size,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            max_concurrent_batches=cfg.microbatches,
        )(self._run_batch)
        logger.info(
            "Embedder %s loaded from %s on %s, %d threads", cfg.name, root, self.model.device, torch.get_num_threads()
        )

    async def metadata(self) -> ModelInfo:
        return self.info

    async def check_health(self) -> None:
        """Serve's health check: a real forward pass of one short text gives a finite vector."""
        if self.model.model is None:  # a pipeline's driver holds no weights; its stages are checked by Serve
            return
        vectors = await asyncio.to_thread(self.model.embed_ids, self.model.tokenize(["ok"]), 1)
        if vectors.shape != (1, self.info.dim) or not np.isfinite(vectors).all():
            raise RuntimeError(f"health probe forward gave an unusable vector of shape {vectors.shape}")

    async def batch_stats(self) -> dict[str, int]:
        """Batches run, jobs seen, the largest batch, the most batches in the model (or its stages) at once:
        lets tests prove batching happened."""
        return dict(self._stats)

    async def embed(self, job: EmbedJob) -> EmbedResult | RayInferError:
        """The job's vectors, or the client error it deserves.

        Errors are returned, not raised: a client's mistake is not a replica failure, and
        raising would log a server traceback for every bad request.
        """
        return (await self._batch((time.perf_counter(), [job])))[0]

    async def embed_many(self, jobs: list[EmbedJob]) -> list[EmbedResult | RayInferError]:
        """Several requests' jobs in one call: what the ingress's edge batcher sends."""
        return await self._batch((time.perf_counter(), jobs))

    async def _run_batch(self, groups: list[tuple[float, list[EmbedJob]]]) -> list[list[EmbedResult | RayInferError]]:
        """Each group: (arrival time, jobs) of one call."""
        start = time.perf_counter()
        for arrived, _ in groups:
            self._metrics.phase.observe(start - arrived, self._tags["queue"])
        calls = [jobs for _, jobs in groups]
        jobs = [job for call in calls for job in call]
        self._stats["batches"] += 1
        self._stats["jobs"] += len(jobs)
        self._stats["max_jobs_per_batch"] = max(self._stats["max_jobs_per_batch"], len(jobs))
        results = await self._run(jobs)
        out, offset = [], 0
        for group in calls:
            out.append(results[offset : offset + len(group)])
            offset += len(group)
        return out

    async def _run(self, jobs: list[EmbedJob]) -> list[EmbedResult | RayInferError]:
        # Tokenize and check every job first; a bad job gets its own error and is left
        # out of the forward pass, so it never fails the others batched with it.
        start = time.perf_counter()
        prepared: list[list[list[int]] | RayInferError] = [self._prepare(job) for job in jobs]
        flat = [ids for p in prepared if not isinstance(p, RayInferError) for ids in p]
        tokenized = time.perf_counter()
        try:
            vectors = await self._forward(flat) if flat else None
        except RayError:  # a stage replica died or failed: retriable, as for a generation
            logger.warning("embedding through the pipeline stages failed", exc_info=True)
            return [
                p if isinstance(p, RayInferError) else ReplicaLost("a pipeline stage failed; retry") for p in prepared
            ]
        m, model_tag = self._metrics, self._tags["model"]
        m.phase.observe(tokenized - start, self._tags["tokenize"])
        if flat:
            m.phase.observe(time.perf_counter() - tokenized, self._tags["inference"])
            m.batch_size.observe(len(flat), model_tag)
            m.input_tokens.inc(sum(map(len, flat)), model_tag)
        results: list[EmbedResult | RayInferError] = []
        offset = 0
        for p in prepared:
            if isinstance(p, RayInferError):
                results.append(p)
                continue
            assert vectors is not None  # some input was forwarded
            results.append(EmbedResult(vectors=vectors[offset : offset + len(p)], prompt_tokens=sum(map(len, p))))
            offset += len(p)
        return results

    async def _forward(self, flat: list[list[int]]) -> np.ndarray:
        self._in_flight += 1
        self._stats["max_batches_in_flight"] = max(self._stats["max_batches_in_flight"], self._in_flight)
        try:
            return await self._forward_chunks(flat)
        finally:
            self._in_flight -= 1

    async def _forward_chunks(self, flat: list[list[int]]) -> np.ndarray:
        if not self.stages:
            return await asyncio.to_thread(self.model.embed_ids, flat, self.cfg.max_batch_size)
        # Each chunk's ids and mask go to Stage0, whose DeploymentResponse goes unresolved to Stage1, …:
        # hidden states move stage to stage through the object store; only vectors come back. Nothing
        # here holds a lock across the chain, so the next batch can enter Stage0 meanwhile.
        chunks = list(self.model.padded(flat, self.cfg.max_batch_size))
        pending = []
        for _, hidden in chunks:
            x: Any = hidden
            for stage in self.stages:
                x = stage.encode.remote(x)  # a DeploymentResponse, passed on unresolved
            pending.append(x)
        out = np.empty((len(flat), self.model.dim), dtype=np.float32)
        for (idx, _), vectors in zip(chunks, await asyncio.gather(*pending)):
            out[idx] = vectors.numpy()
        return out

    def _prepare(self, job: EmbedJob) -> list[list[int]] | RayInferError:
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
