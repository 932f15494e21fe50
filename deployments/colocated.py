"""An embedding model inside the ingress replica (`placement: ingress`): the Embedder's batch logic
without the DeploymentHandle hop. For small CPU models, where the hop costs more than the model's
own work per text (BENCHMARKS.md).

The ingress's edge batcher does the batching (adaptive, no timer); at most `concurrent_batches`
forwards compute at once, each in a thread of its own (deployments/compute_threads.py) on its share
of the replica's threads, while the next batch gathers on the event loop. Scaling the Ingress
deployment's replicas scales the model.
"""

from __future__ import annotations

import logging

import numpy as np

from app.config import ModelConfig
from app.core.errors import RayInferError
from deployments.compute_threads import ComputeThreads
from deployments.embed_jobs import EmbedBatches
from deployments.embedder import load_model, numerics
from deployments.replica import replica_threads
from deployments.types import EmbedJob, EmbedResult, ModelInfo

logger = logging.getLogger("ray.serve")


class LocalEmbedder:
    """What the registry needs of an embedding model (app/core/registry.EmbedBackend), in process."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.model = load_model(cfg, replica_threads(cfg))
        self.batches = EmbedBatches(cfg, self.model, str(self.model.path), self._forward)
        # One thread per compute slot: a thread that finishes a batch takes the next one at once.
        self._compute = ComputeThreads(cfg.concurrent_batches, f"embed-{cfg.name}")
        logger.info("%s loaded in the ingress from %s (%s)", cfg.name, self.model.path, numerics(self.model))

    async def _forward(self, flat: list[list[int]]) -> np.ndarray:
        vectors, waited = await self._compute.run(self.model.embed_ids, flat, self.cfg.max_batch_size)
        self.batches.observe_queue(waited)  # in the ingress, a batch's wait for one of the model's slots
        return vectors

    async def embed(self, job: EmbedJob) -> EmbedResult | RayInferError:
        return (await self.batches.run([job]))[0]

    async def embed_many(self, jobs: list[EmbedJob]) -> list[EmbedResult | RayInferError]:
        return await self.batches.run(jobs)

    async def metadata(self) -> ModelInfo:
        return self.batches.info

    async def check_health(self) -> None:
        """A real forward of one short text, as the Embedder's health check does."""
        await self.batches.probe()
