"""Load one pipeline stage of a sentence encoder (BERT family): layers [start, end) of a checkpoint.

A stage runs the checkpoint's own architecture with `num_hidden_layers = end - start`:
- the first stage keeps the embeddings and takes token ids;
- later stages take hidden states (their embeddings module passes them through);
- the last stage pools (the checkpoint's sentence-transformers pooling) and normalises, and
  returns float32 vectors; the others return the hidden states of every token.
The attention mask travels with the hidden states (`Hidden`, models/embedding.py), so every stage
masks the padding exactly as the whole model does. Only the stage's tensors are read.
Supported: encoders whose layers live in `encoder.layer` under an `embeddings` module (BERT,
RoBERTa, XLM-R, MiniLM).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from models.embedding import EncoderStage, Hidden, read_pooling_spec
from models.stages import build_on_meta, materialise, read_range, stage_config


class _PassThrough(torch.nn.Module):
    """A later stage's embeddings: the previous stage's hidden states come in as `inputs_embeds`."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        assert inputs_embeds is not None
        return inputs_embeds


def _encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(model, "embeddings"):
        raise ValueError(
            f"{type(model).__name__}: encoder pipeline stages need a BERT-like model "
            "(an `embeddings` module and layers in `encoder.layer`)"
        )
    return layers


def load_encoder_stage(path: Path, start: int, end: int, device: str = "cpu") -> EncoderStage:
    """Layers [start, end) of the encoder checkpoint at `path`, with its embeddings if start is 0 and
    its pooling if end is the last layer."""
    path = Path(path)
    config, first, last = stage_config(path, start, end)
    model = build_on_meta(AutoModel, config)
    _encoder_layers(model)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # type: ignore[assignment]  # sentence-transformers pools the token states itself
    if not first:
        model.embeddings = _PassThrough()
    state = read_range(
        path,
        "encoder.layer",
        start,
        end,
        lambda name: first and name.startswith("embeddings."),
        strip=f"{model.base_model_prefix}.",
    )
    missing, unexpected = materialise(model, state)
    if missing or unexpected:
        raise ValueError(f"stage [{start}, {end}) of {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dev = torch.device(device)
    return EncoderStage(torch.nn.Module.to(model, dev).eval(), read_pooling_spec(path), dev, first, last)


def run_rows(stage: EncoderStage, rows: list[np.ndarray], chunk_size: int, pad_id: int = 0) -> list[np.ndarray]:
    """`stage` over rows of different lengths, each on its own: token ids [T] into a first stage, hidden
    states [T, H] into a later one. Rows go in chunks sorted by length, padded to the chunk's longest
    (padding masked, so a row's result does not depend on its chunk mates). Per row, in input order:
    the hidden states [T, H] of its tokens, or from a last stage its pooled vector [H] (float32)."""
    out: dict[int, np.ndarray] = {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), chunk_size):
        idx = order[start : start + chunk_size]
        lengths = [len(rows[i]) for i in idx]
        width = max(lengths)
        if stage.first:
            states = torch.full((len(idx), width), pad_id, dtype=torch.long)
        else:
            states = torch.zeros((len(idx), width, rows[idx[0]].shape[-1]), dtype=torch.float32)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, (i, n) in enumerate(zip(idx, lengths)):
            states[row, :n] = torch.as_tensor(rows[i])
            mask[row, :n] = 1
        result = stage(Hidden(states, mask))
        if isinstance(result, torch.Tensor):  # the last stage's pooled vectors
            vectors = result.numpy()
            for row, i in enumerate(idx):
                out[i] = vectors[row]
        else:
            hidden = result.states.float().cpu().numpy()
            for row, (i, n) in enumerate(zip(idx, lengths)):
                out[i] = hidden[row, :n]
    return [out[i] for i in range(len(rows))]
