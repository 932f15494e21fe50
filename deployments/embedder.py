"""The Embedder deployment: one replica holds one embedding model and batches requests.

Serve's `@serve.batch` gathers concurrent calls (each call: one request's job, or the ingress's
edge batch of several); `concurrent_batches` of them compute at once, each on its share of the
replica's threads, so no core idles while the next batch tokenizes (deployments/embed_jobs.py
holds the batch logic, shared with a model placed in the ingress).

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
from app.core.errors import RayInferError, ReplicaLost
from deployments.embed_jobs import EmbedBatches
from deployments.replica import replica_device, replica_threads
from deployments.types import EmbedJob, EmbedResult, ModelInfo
from models.embedding import EmbeddingModel
from models.loader import resolve_source

logger = logging.getLogger("ray.serve")


def load_model(cfg: ModelConfig, threads: int, device: str = "cpu", weights: bool = True) -> EmbeddingModel:
    """The model as the config asks (runtime, threads per batch, token limit); torch's intra-op
    threads are process-wide, so they are set here (the torch runtime's forward, every runtime's pooling)."""
    per_batch = max(1, threads // cfg.batches_in_flight)
    torch.set_num_threads(per_batch)
    return EmbeddingModel(
        resolve_source(cfg.source),
        device=device,
        max_input_tokens=cfg.max_input_tokens,
        weights=weights,
        runtime=cfg.runtime,
        threads=per_batch,
        dtype="float32" if cfg.dtype == "auto" else cfg.dtype,
        autocast=cfg.autocast,
    )


def numerics(model: EmbeddingModel) -> str:
    """How the loaded model computes, for logs and reports: `onnx`, `torch` or `torch, bfloat16 matmuls`."""
    return f"{model.runtime}, {model.autocast} matmuls" if model.autocast else model.runtime


# max_ongoing_requests comes from the model config (app/main.py: enough for a full batch and the next).
@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class Embedder:
    """Embeds texts or token ids with dynamic batching across concurrent requests."""

    def __init__(self, cfg: ModelConfig, stages: list | None = None):
        """stages: the handles of the model's Stage deployments, in order, when it is split."""
        self.cfg = cfg
        self.stages = stages or []
        self.model = load_model(cfg, replica_threads(cfg), replica_device(cfg), weights=not stages)
        self.batches = EmbedBatches(cfg, self.model, str(self.model.path), self._forward)
        self.info: ModelInfo = self.batches.info
        # Decorated here, not on the class, so the config sets every parameter, including how many
        # batches may be in flight (concurrent_batches; one per micro-batch for a pipeline).
        self._batch = serve.batch(
            max_batch_size=cfg.max_batch_size,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            max_concurrent_batches=cfg.batches_in_flight,
        )(self.batches.run_calls)
        logger.info(
            "Embedder %s loaded from %s on %s (%s)", cfg.name, self.model.path, self.model.device, numerics(self.model)
        )

    async def metadata(self) -> ModelInfo:
        return self.info

    async def check_health(self) -> None:
        """Serve's health check: a real forward pass of one short text gives a finite vector."""
        if not self.stages:  # a pipeline's driver holds no weights; its stages are checked by Serve
            await self.batches.probe()

    async def batch_stats(self) -> dict[str, int]:
        """Batches run, jobs seen, the largest batch, the most batches in the model (or its stages) at once:
        lets tests prove batching happened."""
        return dict(self.batches.stats)

    async def embed(self, job: EmbedJob) -> EmbedResult | RayInferError:
        """The job's vectors, or the client error it deserves.

        Errors are returned, not raised: a client's mistake is not a replica failure, and
        raising would log a server traceback for every bad request.
        """
        return (await self._batch((time.perf_counter(), [job])))[0]

    async def embed_many(self, jobs: list[EmbedJob]) -> list[EmbedResult | RayInferError]:
        """Several requests' jobs in one call: what the ingress's edge batcher sends."""
        return await self._batch((time.perf_counter(), jobs))

    async def _forward(self, flat: list[list[int]]) -> np.ndarray:
        if not self.stages:
            return await asyncio.to_thread(self.model.embed_ids, flat, self.cfg.max_batch_size)
        try:
            return await self._through_stages(flat)
        except RayError as exc:  # a stage replica died or failed: retriable, as for a generation
            logger.warning("embedding through the pipeline stages failed", exc_info=True)
            raise ReplicaLost("a pipeline stage failed; retry") from exc

    async def _through_stages(self, flat: list[list[int]]) -> np.ndarray:
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
