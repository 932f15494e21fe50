"""Sampling parameters: a plain, protocol-neutral record, importable without torch or vLLM (the ingress
builds it from OpenAI fields or OIP parameters; the Generator turns it into vLLM's SamplingParams)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: what the context leaves after the prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same prompt, same params: same sample
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # no end-of-sequence or stop string before this many tokens
    ignore_eos: bool = False  # keep generating past end-of-sequence, to max_tokens
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
