"""A causal LM, or one pipeline stage of one, with its sequences' KV caches.

Prefill runs one sequence on its own prompt and keeps its cache apart. Decoding sequences share
a batch cache per micro-batch group (one group unless the engine splits the batch), left-padded
to a common width, with the padding masked and every row given its own position ids, so a
sequence's output never depends on what else is in the batch. A group's cache is rebuilt only
when the group changes (a sequence joins or leaves); between changes each step just appends to it.

The runner does not know whether it holds the whole model or layers [a, b) of it: the first
stage takes token ids, the others hidden states; the last returns the logits of the last
position, the others the hidden states of every position (see models/stages.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from models.hf_compat import cache_from_layers

Cache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Batch:
    """One micro-batch group's decoding sequences: their shared cache and its attention mask."""

    ids: list[str]
    cache: DynamicCache
    mask: torch.Tensor


class KVRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, first: bool = True, last: bool = True):
        self.model = model
        self.device = device
        self.first = first
        self.last = last
        self._own: dict[str, Cache] = {}  # sequences not yet in a batch cache
        self._batches: dict[int, _Batch] = {}  # one per micro-batch group

    def _call(self, x: torch.Tensor, **kwargs: Any) -> Any:
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        return self.model(**inputs, use_cache=True, **kwargs)

    def _result(self, out: Any) -> torch.Tensor:
        return out.logits[:, -1] if self.last else out.last_hidden_state

    @torch.inference_mode()
    def prefill(self, seq_id: str, x: torch.Tensor) -> torch.Tensor:
        """One sequence's prompt: token ids [1, T] or hidden states [1, T, H]."""
        out = self._call(x.to(self.device))
        self._own[seq_id] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return self._result(out)

    @torch.inference_mode()
    def decode(self, seq_ids: list[str], x: torch.Tensor, lengths: list[int], group: int = 0) -> torch.Tensor:
        """One token per sequence of micro-batch `group`: x is [B, 1] ids or [B, 1, H] hidden states;
        lengths are the tokens each sequence has in the cache (its next position). Each group keeps
        its own batch cache, so groups taking turns never rebuild each other's."""
        batch = self._batches.get(group)
        if batch is None or seq_ids != batch.ids:
            batch = self._rebuild(group, seq_ids, lengths)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(seq_ids), 1))], dim=1)
        out = self._call(
            x.to(self.device),
            attention_mask=batch.mask,
            position_ids=torch.tensor([[n] for n in lengths], device=self.device),
            past_key_values=batch.cache,
        )
        batch.cache = out.past_key_values
        return self._result(out)

    def drop(self, seq_ids: list[str]) -> None:
        """Forget finished or abandoned sequences (their rows leave a batch cache at its next rebuild)."""
        for seq_id in seq_ids:
            self._own.pop(seq_id, None)
        gone = set(seq_ids)
        for group in [g for g, b in self._batches.items() if set(b.ids) <= gone]:  # a whole group left: free it
            del self._batches[group]

    def reset(self) -> None:
        """Forget every sequence."""
        self._own.clear()
        self._batches.clear()

    def _rebuild(self, group: int, seq_ids: list[str], lengths: list[int]) -> _Batch:
        """A new batch cache for the group: rows kept from its old one, new sequences' own caches."""
        length_of = dict(zip(seq_ids, lengths))
        old = self._batches.pop(group, None)
        if old is not None:
            width = old.mask.shape[1]
            for row, seq_id in enumerate(old.ids):
                if seq_id in length_of and seq_id not in self._own:
                    n = length_of[seq_id]
                    self._own[seq_id] = [
                        (lay.keys[row : row + 1, :, width - n :], lay.values[row : row + 1, :, width - n :])  # type: ignore[union-attr,index]
                        for lay in old.cache.layers
                    ]
        width = max(lengths)
        caches = [self._own.pop(seq_id) for seq_id in seq_ids]
        layers = []
        for layer in range(len(caches[0])):
            ks = [F.pad(c[layer][0], (0, 0, width - n, 0)) for c, n in zip(caches, lengths)]
            vs = [F.pad(c[layer][1], (0, 0, width - n, 0)) for c, n in zip(caches, lengths)]
            layers.append((torch.cat(ks), torch.cat(vs)))
        mask = torch.zeros((len(seq_ids), width), dtype=torch.long, device=self.device)
        for row, n in enumerate(lengths):
            mask[row, width - n :] = 1
        batch = _Batch(list(seq_ids), cache_from_layers(layers), mask)
        self._batches[group] = batch
        return batch
