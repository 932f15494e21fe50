"""Sampling on the served path against an independent reference: the next-token distribution of
transformers' own forward of the same checkpoint (softmax of logits / temperature, cut to the top_p
nucleus), compared with the empirical distribution of several hundred served draws (/v1/completions,
max_tokens 1, n 16, fixed seeds: the draws, and so the test, are reproducible). A server that ignored
temperature or top_p draws from a visibly different distribution and fails.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import numpy as np
import pytest

from models.loader import resolve_source
from tests.vllm_reference import served_model

pytestmark = pytest.mark.timeout(900)
LM = "SmolLM2-135M-Instruct"
# Next words (transformers, float32): T=1: " the" .22, " that" .19, " it" .11, then a long tail (48%);
# T=0.5: .50, .35, .12, tail 3%.
PROMPT = "The best thing about summer is"
REQUESTS, N = 25, 16  # 400 draws per setting


@pytest.fixture(scope="module")
def logits() -> tuple[np.ndarray, list[str]]:
    """The checkpoint's next-token logits for PROMPT (float64), and each token id's text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = resolve_source(served_model(LM).source)
    tokenizer = AutoTokenizer.from_pretrained(root)
    model = AutoModelForCausalLM.from_pretrained(root, torch_dtype=torch.float32)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = model(ids).logits[0, -1].double().numpy()
    return out, [tokenizer.decode([i]) for i in range(len(out))]


def reference(logits: tuple[np.ndarray, list[str]], temperature: float, top_p: float) -> dict[str, float]:
    """Probability of each next text: softmax(logits / T), cut to the smallest set of tokens whose mass
    reaches top_p, renormalised; tokens with the same text are merged (the client sees text)."""
    values, texts = logits
    p = np.exp((values - values.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    out: Counter[str] = Counter()
    for i in keep:
        out[texts[i]] += p[i] / p[keep].sum()
    return dict(out)


@pytest.fixture(scope="module")
def drawn(serve_url: str):
    """(temperature, top_p) → REQUESTS x N one-token samples, drawn once per setting. Request i uses
    seed 16 i (choice j: seed 16 i + j): no two draws share a seed, and every setting uses the same seeds,
    so a setting's draws are exactly what a server that ignored the difference would have sent."""
    cache: dict[tuple[float, float], Counter[str]] = {}

    async def one(client: httpx.AsyncClient, i: int, temperature: float, top_p: float) -> list[str]:
        body = {"model": LM, "prompt": PROMPT, "max_tokens": 1, "n": N, "seed": N * i}
        r = await client.post("/v1/completions", json={**body, "temperature": temperature, "top_p": top_p})
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    async def go(temperature: float, top_p: float) -> list[list[str]]:
        async with httpx.AsyncClient(base_url=serve_url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i, temperature, top_p) for i in range(REQUESTS)))

    def get(temperature: float, top_p: float) -> Counter[str]:
        if (temperature, top_p) not in cache:
            texts = asyncio.run(go(temperature, top_p))
            cache[temperature, top_p] = Counter(text for t in texts for text in t)
            print(f"T={temperature} top_p={top_p}: {cache[temperature, top_p].most_common(6)}")
        return cache[temperature, top_p]

    return get


def mismatches(seen: Counter[str], want: dict[str, float]) -> list[tuple]:
    """The texts with probability >= 0.05 drawn further than 4 standard errors (plus 0.02: the server's kernels
    against transformers' logits) from their probability."""
    total = sum(seen.values())
    checked = {text: p for text, p in want.items() if p >= 0.05}
    assert len(checked) >= 2
    out = []
    for text, p in checked.items():
        if abs(seen[text] / total - p) > 4 * (p * (1 - p) / total) ** 0.5 + 0.02:
            out.append((text, seen[text] / total, p))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draws_follow_the_softmax_at_the_temperature_asked(drawn, logits, temperature):
    want = reference(logits, temperature, 1.0)
    assert not mismatches(drawn(temperature, 1.0), want), drawn(temperature, 1.0).most_common(6)
    # The check tells the temperatures apart: the other one's draws (same seeds) fail it.
    assert mismatches(drawn(1.5 - temperature, 1.0), want)


def test_top_p_draws_only_from_the_nucleus_renormalised(drawn, logits):
    # At T=1, " the" + " that" hold 0.41 and with " it" 0.52: top_p 0.45 keeps those three (the cut is
    # far from both masses, so numerical differences cannot move it) and leaves 48% of the mass out.
    want = reference(logits, 1.0, 0.45)
    assert set(want) == {" the", " that", " it"}
    seen = drawn(1.0, 0.45)
    assert set(seen) <= set(want), seen.most_common(8)
    assert not mismatches(seen, want), seen.most_common(6)
    # What a server ignoring top_p sends for the same seeds: draws outside the nucleus (~190 of 400).
    assert set(drawn(1.0, 1.0)) - set(want)
