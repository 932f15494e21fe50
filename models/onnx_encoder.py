"""The whole encoder on ONNX Runtime: the same weights and fp32 numerics as transformers' forward
(cosine 0.9999999 on this project's test texts), at less CPU per text than torch's eager kernels
(BENCHMARKS.md). Exported once from the checkpoint with torch's own exporter and cached.

A drop-in for `EncoderStage` over the whole model: token ids and mask in, pooled vectors out.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from models.embedding import Hidden, LastHiddenState, PoolingSpec, pool, save_atomic, weights_key

CACHE = Path(__file__).resolve().parents[1] / "artifacts" / "onnx"


def exported(checkpoint: Path, cache: Path = CACHE) -> Path:
    """The checkpoint's encoder as an ONNX file, exported on first use: cached by the weights'
    identity, written whole or not at all."""
    target = cache / weights_key(checkpoint) / "encoder.onnx"
    if target.exists():
        return target
    from transformers import AutoModel  # only to export, once per checkpoint

    model = LastHiddenState(AutoModel.from_pretrained(checkpoint).eval())
    ids = torch.ones((2, 8), dtype=torch.long)
    axes = {0: "batch", 1: "tokens"}
    export = functools.partial(
        torch.onnx.export,
        model,
        (ids, torch.ones_like(ids)),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        opset_version=17,
        dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic axes as above
    )
    return save_atomic(target, lambda path: export(str(path)))


class OnnxEncoder:
    """Called like an `EncoderStage` holding the whole model (first and last): Hidden ids in,
    pooled float32 vectors [B, H] out. Thread-safe: several batches may run at once, each on
    `threads` of its own (ONNX Runtime releases the GIL while it computes)."""

    first = last = True

    def __init__(self, checkpoint: Path, spec: PoolingSpec, threads: int = 1):
        import onnxruntime as ort  # only replicas that run this runtime load it

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads sleep instead of spinning: the cores are shared (OMP_WAIT_POLICY's twin).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(exported(checkpoint)), options, providers=["CPUExecutionProvider"])
        self.spec = spec

    def __call__(self, x: Hidden) -> torch.Tensor:
        ids, mask = x.states.numpy(), x.mask.numpy()
        (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return pool(torch.from_numpy(np.asarray(hidden, dtype=np.float32)), x.mask, self.spec)
