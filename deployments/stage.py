"""A pipeline stage: one deployment holds layers [start, end) of a model.

Of a causal LM, with its sequences' KV caches: the Generator's engine drives the stages in order
each step. Of an encoder (task embed): the Embedder sends each batch's token ids and mask through
the stages; the last pools. Either way a stage's output travels to the next as a
DeploymentResponse argument, so hidden states go replica to replica through Ray's object store,
never back through the driver. Only the last stage's logits or vectors come back.
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
from models.stages import stage_runner

logger = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8, health_check_period_s=10)
class Stage:
    def __init__(self, cfg: ModelConfig, index: int, start: int, end: int):
        torch.set_num_threads(replica_threads(cfg))
        device = replica_device(cfg)
        path = resolve_source(cfg.source)
        if cfg.task == "embed":
            self.encoder = load_encoder_stage(path, start, end, device)
        else:
            self.runner = stage_runner(path, start, end, device, cfg.dtype)
        self.layers = (start, end)
        self._lock = threading.Lock()  # Serve may run two calls at once (a fire-and-forget drop, a decode)
        logger.info("Stage %d of %s: layers [%d, %d) on %s", index, cfg.name, start, end, device)

    # Plain methods: Serve runs them on a thread, one at a time per replica, in arrival order.
    def prefill(self, seq_id: str, x: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self.runner.prefill(seq_id, x).cpu()

    def decode(self, seq_ids: list[str], x: torch.Tensor, lengths: list[int], group: int = 0) -> torch.Tensor:
        with self._lock:
            return self.runner.decode(seq_ids, x, lengths, group).cpu()

    def encode(self, x: Hidden) -> Hidden | torch.Tensor:
        """Encoder stage: token states and mask in; the next stage's, or the last stage's vectors, out."""
        with self._lock:
            out = self.encoder(x)
            return out if isinstance(out, torch.Tensor) else Hidden(out.states.cpu(), out.mask)

    def drop(self, seq_ids: list[str]) -> None:
        with self._lock:
            self.runner.drop(seq_ids)

    def reset(self) -> None:
        with self._lock:
            self.runner.reset()

    def info(self) -> dict:
        """Its layer range, and the Ray node it runs on."""
        return {"layers": self.layers, "node_id": ray.get_runtime_context().get_node_id()}


class RemoteRunner:
    """A Stage deployment seen by the engine as a KVRunner. prefill/decode return the stage's
    DeploymentResponse unresolved, so the next stage receives it directly."""

    def __init__(self, handle):
        self.handle = handle

    def prefill(self, seq_id, x):
        return self.handle.prefill.remote(seq_id, x)

    def decode(self, seq_ids, x, lengths, group=0):
        return self.handle.decode.remote(seq_ids, x, lengths, group)

    def drop(self, seq_ids):
        self.handle.drop.remote(seq_ids)

    def reset(self):
        try:
            self.handle.reset.remote().result(timeout_s=30)
        except Exception:  # a dead stage has no caches to forget
            logger.warning("could not reset a pipeline stage", exc_info=True)
