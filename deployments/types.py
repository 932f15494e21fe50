"""In-process records that cross DeploymentHandles (pickled by Ray; not wire schemas)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.params import SamplingParams


@dataclass(frozen=True)
class EmbedJob:
    """One request's inputs: texts, or token-id sequences (exactly one of the two)."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    deadline: float | None = None  # wall-clock seconds; past it, the job is dropped unrun (app/core/deadline.py)

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dim], in input order
    prompt_tokens: int


@dataclass(frozen=True)
class GenerateJob:
    """One request: several prompts (text or token ids), or one chat conversation, each sampled `n` times."""

    params: SamplingParams
    prompts: list[str | list[int]] | None = None
    messages: list[dict[str, str]] | None = None
    n: int = 1
    deadline: float | None = None  # wall-clock seconds; past it before the first token, aborted (app/core/deadline.py)

    def __len__(self) -> int:
        return (len(self.prompts) if self.prompts is not None else 1) * self.n


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely alternatives at its position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class GenerateChunk:
    """New text for choice `index`; `finish_reason` set on its last chunk."""

    index: int
    text: str
    finish_reason: str | None  # "stop" | "length" | None while running
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token, when the request asked for them


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    root: str  # the resolved local checkpoint directory
    dim: int | None  # embedding width; None for generation
    max_input_tokens: int  # embed: per input; generate: the context (prompt + completion)
    vocab_size: int
    has_chat_template: bool = False
