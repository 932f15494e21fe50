"""Sampling parameters: a plain record, importable without torch (the ingress builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: what the context leaves
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed, same prompt, same params: same sample
    stop: tuple[str, ...] = ()
