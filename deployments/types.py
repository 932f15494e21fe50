"""In-process records that cross DeploymentHandles (pickled by Ray; not wire schemas)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EmbedJob:
    """One request's inputs: texts, or token-id sequences (exactly one of the two)."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dim], in input order
    prompt_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    root: str  # the resolved local checkpoint directory
    dim: int
    max_input_tokens: int
    vocab_size: int
