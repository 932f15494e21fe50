"""What a replica learns from Ray about itself: its CPUs (torch threads) and whether it has a GPU."""

from __future__ import annotations

import ray
import torch

from app.config import ModelConfig


def replica_threads(cfg: ModelConfig) -> int:
    """Torch threads: the config's `num_threads`, else the CPUs Ray gave this replica
    (Ray sets OMP_NUM_THREADS=1 otherwise)."""
    if cfg.num_threads is not None:
        return cfg.num_threads
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def replica_device(cfg: ModelConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
