"""A pipeline stage of an encoder (task embed): one deployment holds layers [start, end) of the model.

The Embedder sends each batch's token ids and mask through the stages; the last pools. A stage's
output travels to the next as a DeploymentResponse argument, so hidden states go replica to replica
through Ray's object store, never back through the driver. Only the last stage's vectors come back.
(A causal LM is split by vLLM's own pipeline parallelism, in the Generator.)
"""

from __future__ import annotations

import logging
import threading

import ray
import torch
from ray import serve

from app.config import ModelConfig
from deployments.replica import replica_device, replica_threads
from models.embedding import Hidden
from models.encoder_stages import load_encoder_stage
from models.loader import resolve_source

logger = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8, health_check_period_s=10)
class Stage:
    def __init__(self, cfg: ModelConfig, index: int, start: int, end: int):
        torch.set_num_threads(replica_threads(cfg))
        device = replica_device(cfg)
        path = resolve_source(cfg.source)
        self.encoder = load_encoder_stage(path, start, end, device)
        self.layers = (start, end)
        self._lock = threading.Lock()  # Serve may run two calls at once on its threads
        logger.info("Stage %d of %s: layers [%d, %d) on %s", index, cfg.name, start, end, device)

    # A plain method: Serve runs it on a thread.
    def encode(self, x: Hidden) -> Hidden | torch.Tensor:
        """Encoder stage: token states and mask in; the next stage's, or the last stage's vectors, out."""
        with self._lock:
            out = self.encoder(x)
            return out if isinstance(out, torch.Tensor) else Hidden(out.states.cpu(), out.mask)

    def info(self) -> dict:
        """Its layer range, and the Ray node it runs on."""
        return {"layers": self.layers, "node_id": ray.get_runtime_context().get_node_id()}
