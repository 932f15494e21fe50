"""A causal LM, or one pipeline stage of one, with its sequences' KV caches.

Prefill runs one sequence on its own prompt and keeps its cache apart. Decoding sequences share
one batch cache, left-padded to a common width, with the padding masked and every row given
its own position ids, so a sequence's output never depends on what else is in the batch. The
batch cache is rebuilt only when the batch changes (a sequence joins or leaves); between changes
each step just appends to it.

The runner does not know whether it holds the whole model or layers [a, b) of it: the first
stage takes token ids, the others hidden states; the last returns the logits of the last
position, the others the hidden states of every position (see models/stages.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Cache = list[tuple[torch.Tensor, torch.Tensor]]


class KVRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, first: bool = True, last: bool = True):
        self.model = model
        self.device = device
        self.first = first
        self.last = last
        self._own: dict[str, Cache] = {}  # sequences not yet in the batch cache
        self._batch_ids: list[str] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)

    def _call(self, x: torch.Tensor, **kwargs):
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        return self.model(**inputs, use_cache=True, **kwargs)

    def _result(self, out) -> torch.Tensor:
        return out.logits[:, -1] if self.last else out.last_hidden_state

    @torch.inference_mode()
    def prefill(self, seq_id: str, x: torch.Tensor) -> torch.Tensor:
        """One sequence's prompt: token ids [1, T] or hidden states [1, T, H]."""
        out = self._call(x.to(self.device))
        self._own[seq_id] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return self._result(out)

    @torch.inference_mode()
    def decode(self, seq_ids: list[str], x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """One token per sequence: x is [B, 1] ids or [B, 1, H] hidden states; lengths are the
        tokens each sequence has in the cache (its next position)."""
        if seq_ids != self._batch_ids:
            self._rebuild(seq_ids, lengths)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(seq_ids), 1))], dim=1)
        out = self._call(
            x.to(self.device),
            attention_mask=self._mask,
            position_ids=torch.tensor([[n] for n in lengths], device=self.device),
            past_key_values=self._cache,
        )
        self._cache = out.past_key_values
        return self._result(out)

    def drop(self, seq_ids: list[str]) -> None:
        """Forget finished or abandoned sequences (their rows leave the batch cache at its next rebuild)."""
        for seq_id in seq_ids:
            self._own.pop(seq_id, None)
        if self._batch_ids and set(self._batch_ids) <= set(seq_ids):  # the whole batch left: free its cache
            self._batch_ids, self._cache = [], None
            self._mask = torch.zeros((0, 0), dtype=torch.long)

    def reset(self) -> None:
        """Forget every sequence."""
        self._own.clear()
        self.drop(list(self._batch_ids))

    def _rebuild(self, seq_ids: list[str], lengths: list[int]) -> None:
        """A new batch cache: rows kept from the old one, new sequences' own caches."""
        length_of = dict(zip(seq_ids, lengths))
        if self._cache is not None:
            width = self._mask.shape[1]
            for row, seq_id in enumerate(self._batch_ids):
                if seq_id in length_of and seq_id not in self._own:
                    n = length_of[seq_id]
                    self._own[seq_id] = [
                        (lay.keys[row : row + 1, :, width - n :], lay.values[row : row + 1, :, width - n :])
                        for lay in self._cache.layers
                    ]
        width = max(lengths)
        caches = [self._own.pop(seq_id) for seq_id in seq_ids]
        layers = []
        for layer in range(len(caches[0])):
            ks = [F.pad(c[layer][0], (0, 0, width - n, 0)) for c, n in zip(caches, lengths)]
            vs = [F.pad(c[layer][1], (0, 0, width - n, 0)) for c, n in zip(caches, lengths)]
            layers.append((torch.cat(ks), torch.cat(vs)))
        self._mask = torch.zeros((len(seq_ids), width), dtype=torch.long, device=self.device)
        for row, n in enumerate(lengths):
            self._mask[row, width - n :] = 1
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._batch_ids = list(seq_ids)
