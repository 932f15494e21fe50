"""Where to cut a model into pipeline stages, from its config alone (meta device: no weights).

A stage holds a contiguous range of the model's layers; stage 0 also holds the embeddings, the
last stage the final norm and the head (a head tied to the embeddings is copied there). The
default boundaries minimise the largest stage's parameter bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LAYER_LISTS = ("model.layers", "transformer.h", "encoder.layer", "model.decoder.layers", "gpt_neox.layers")
FIRST_STAGE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, int]  # [start, end)
    param_bytes: int
    kv_bytes_per_token: int  # KV cache of this stage's layers, per token of one sequence (0: an encoder keeps none)


@dataclass(frozen=True)
class Plan:
    model_type: str
    num_layers: int
    total_param_bytes: int
    stages: list[Stage]

    @property
    def max_stage_bytes(self) -> int:
        return max(s.param_bytes for s in self.stages)


def load_config(source: str | Path) -> PretrainedConfig:
    """A transformers config from a checkpoint directory, a config.json file, or a loader source."""
    path = Path(source)
    if path.is_file():
        return AutoConfig.for_model(**json.loads(path.read_text()))
    from models.loader import resolve_source

    return AutoConfig.from_pretrained(resolve_source(str(source)))


def is_causal(config: PretrainedConfig) -> bool:
    """A causal LM (a generation model, with a KV cache), not an encoder."""
    return any(a.endswith("ForCausalLM") or "LMHead" in a for a in (config.architectures or []))


def layer_bytes(config: PretrainedConfig, dtype: str) -> tuple[int, list[int], int]:
    """(first-stage extras, per-layer, last-stage extras) parameter bytes."""
    with torch.device("meta"):
        model = (AutoModelForCausalLM if is_causal(config) else AutoModel).from_config(config)
    prefix, layers = _layer_list(model)
    size = DTYPE_BYTES[dtype]
    per_layer = [sum(p.numel() for p in layer.parameters()) * size for layer in layers]
    first = last = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix + "."):
            continue
        if id(p) in seen:  # a tied head: the last stage needs its own copy
            last += p.numel() * size
            continue
        seen.add(id(p))
        if any(m in name for m in FIRST_STAGE_MARKERS):
            first += p.numel() * size
        else:
            last += p.numel() * size
    return first, per_layer, last


def _layer_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for path in LAYER_LISTS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return path, obj
    raise ValueError(f"cannot find the layer list of {type(model).__name__} (looked for {', '.join(LAYER_LISTS)})")


def kv_bytes_per_token_per_layer(config: PretrainedConfig, dtype: str) -> int:
    heads = getattr(config, "num_attention_heads", 0) or 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]


def balanced_boundaries(first: int, per_layer: list[int], last: int, stages: int) -> list[int]:
    """Cut points b_1 < … < b_{n-1} minimising the largest stage (linear partition, exact DP)."""
    n = len(per_layer)
    if not 1 <= stages <= n:
        raise ValueError(f"stages must be between 1 and the number of layers ({n}); got {stages}")
    prefix = [0]
    for b in per_layer:
        prefix.append(prefix[-1] + b)

    def cost(i: int, j: int, k: int) -> int:  # layers [i, j) as stage k
        return prefix[j] - prefix[i] + (first if k == 0 else 0) + (last if k == stages - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[k][j]: first j layers in k stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j, k - 1))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [], n
    for k in range(stages, 1, -1):
        j = cut[k][j]
        bounds.append(j)
    return sorted(bounds)


def plan(
    config: PretrainedConfig,
    stages: int,
    dtype: str = "bfloat16",
    boundaries: list[int] | None = None,
    sizes: tuple[int, list[int], int] | None = None,
) -> Plan:
    first, per_layer, last = sizes or layer_bytes(config, dtype)
    n = len(per_layer)
    cuts = boundaries if boundaries is not None else balanced_boundaries(first, per_layer, last, stages)
    edges = [0, *cuts, n]
    if sorted(set(edges)) != edges or len(edges) != stages + 1:
        raise ValueError(f"boundaries must be {stages - 1} increasing layer indices within (0, {n}); got {cuts}")
    kv = kv_bytes_per_token_per_layer(config, dtype) if is_causal(config) else 0
    result = []
    for k in range(stages):
        a, b = edges[k], edges[k + 1]
        size = sum(per_layer[a:b]) + (first if k == 0 else 0) + (last if k == stages - 1 else 0)
        result.append(Stage(k, (a, b), size, kv * (b - a)))
    return Plan(config.model_type, n, first + sum(per_layer) + last, result)


def gpus_needed(config: PretrainedConfig, gpu_bytes: int, dtype: str = "bfloat16", reserve: float = 0.2) -> Plan:
    """The fewest stages whose largest fits in (1 - reserve) of one GPU; reserve is for KV cache and activations."""
    sizes = layer_bytes(config, dtype)
    budget = gpu_bytes * (1 - reserve)
    for stages in range(1, len(sizes[1]) + 1):
        p = plan(config, stages, dtype, sizes=sizes)
        if p.max_stage_bytes <= budget:
            return p
    raise ValueError(f"even one layer per GPU does not fit in {budget / 2**30:.1f} GiB")
