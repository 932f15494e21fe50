"""Pipeline-stage building blocks: read layers [start, end) of a checkpoint, nothing else, into a model
of the checkpoint's own architecture cut to those layers (`num_hidden_layers = end - start`).

Only the stage's tensors are read from the safetensors files (sharded checkpoints included), into a
model built on the meta device: loading needs the stage's memory once, not a random copy beside it.
Used by the encoder stages (models/encoder_stages.py); a causal LM is split by vLLM itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from models.hf_compat import mark_loaded


def _shards(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118  (safe_open is not iterable)


def read_range(
    path: Path, layers: str, start: int, end: int, keep: Callable[[str], bool], strip: str = ""
) -> dict[str, torch.Tensor]:
    """Tensors of layers [start, end) of the checkpoint (`<layers>.<i>.…`, renumbered from 0) and the
    other tensors `keep` accepts; only those are read. `strip` is a prefix some checkpoints put
    before every name (`bert.`), removed first."""
    pattern = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.*)$")
    shards = _shards(path)
    wanted: dict[str, str] = {}  # checkpoint name -> stage name
    for name in shards:
        bare = name.removeprefix(strip) if strip else name
        m = pattern.match(bare)
        if m:
            if start <= int(m.group(1)) < end:
                wanted[name] = f"{layers}.{int(m.group(1)) - start}.{m.group(2)}"
        elif keep(bare):
            wanted[name] = bare
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(shards[name], []).append(name)
    state = {}
    for file, names in by_file.items():
        with safe_open(file, "pt") as f:
            for name in names:
                state[wanted[name]] = f.get_tensor(name)
    return state


def stage_config(path: Path, start: int, end: int) -> tuple[PretrainedConfig, bool, bool]:
    """The checkpoint's config cut to layers [start, end), and whether the stage is the first and the last."""
    config = AutoConfig.from_pretrained(path)
    total = config.num_hidden_layers
    if not 0 <= start < end <= total:
        raise ValueError(f"layer range [{start}, {end}) is not within the model's {total} layers")
    config.num_hidden_layers = end - start
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[start:end]
    return config, start == 0, end == total


def build_on_meta(auto_class: Any, config: PretrainedConfig) -> PreTrainedModel:
    """The model's modules on the meta device: they take no memory until `materialise` gives them the stage's
    tensors, so a stage never holds a randomly initialised copy of itself beside the checkpoint's."""
    with torch.device("meta"):
        return auto_class.from_config(config)


def materialise(
    model: PreTrainedModel, state: dict[str, torch.Tensor], tie: bool = False
) -> tuple[list[str], list[str]]:
    """Put the checkpoint's tensors in place of a meta model's, then compute the buffers no checkpoint holds
    (rotary inv_freq, position ids) with the model's own initialisation, as transformers' loading does.
    Returns the parameters still missing and the unexpected checkpoint names."""
    result = model.load_state_dict(state, strict=False, assign=True)
    if tie:
        model.tie_weights()  # the head shares the embeddings: no tensor of its own in the checkpoint
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            mark_loaded(tensor)  # transformers' init functions leave these alone
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    buffers = dict(model.named_buffers())
    for name, buffer in buffers.items():
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = torch.empty_like(buffer, device="cpu")
    if not missing:
        model.initialize_weights()  # fills only what is not marked: the buffers just made
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    unexpected = [k for k in result.unexpected_keys if k not in buffers]  # e.g. an old checkpoint's position_ids
    return missing or left, unexpected
