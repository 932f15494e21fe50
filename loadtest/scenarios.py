"""What one request of each scenario sends, and how its answer is read."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

WORDS = [
    "serving",
    "model",
    "online",
    "batch",
    "replica",
    "latency",
    "queue",
    "token",
    "request",
    "vector",
    "cluster",
    "node",
    "throughput",
    "capacity",
    "deploy",
    "scale",
    "proxy",
    "ingress",
    "handle",
    "stream",
    "cache",
    "memory",
]


@dataclass
class Outcome:
    status: str  # "200", "503", … or an exception name
    tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tpot_s: float | None = None  # time per output token after the first: (last text - first text) / (tokens - 1)


def sentence(i: int, words: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words)) + f" #{i}"


class Embeddings:
    name = "embeddings"

    def __init__(self, model: str, texts_per_request: int):
        self.model = model
        self.n = texts_per_request

    def items(self) -> int:
        return self.n

    async def send(self, client: aiohttp.ClientSession, i: int) -> Outcome:
        texts = [sentence(i * self.n + k) for k in range(self.n)]
        body = {"model": self.model, "input": texts[0] if self.n == 1 else texts}
        async with client.post("/v1/embeddings", json=body) as r:
            await r.read()
            return Outcome(status=str(r.status))


class OipEmbeddings(Embeddings):
    """The same texts as JSON tensors on the Open Inference Protocol's `/v2/models/{name}/infer`."""

    name = "oip-embeddings"

    async def send(self, client: aiohttp.ClientSession, i: int) -> Outcome:
        texts = [sentence(i * self.n + k) for k in range(self.n)]
        body = {"inputs": [{"name": "text", "shape": [self.n], "datatype": "BYTES", "data": texts}]}
        async with client.post(f"/v2/models/{self.model}/infer", json=body) as r:
            await r.read()
            return Outcome(status=str(r.status))


class Completions:
    """Streamed OpenAI completions: measures time to first token and inter-token latency."""

    name = "completions"

    def __init__(self, model: str, max_tokens: int, ignore_eos: bool = False):
        self.model = model
        self.max_tokens = max_tokens
        self.extra = {"ignore_eos": True} if ignore_eos else {}  # vLLM's parameter: every request makes max_tokens

    def items(self) -> int:
        return 1

    async def send(self, client: aiohttp.ClientSession, i: int) -> Outcome:
        body = {
            "model": self.model,
            "prompt": sentence(i),
            "max_tokens": self.max_tokens,
            "stream": True,
            "temperature": 0,
            "stream_options": {"include_usage": True},
            **self.extra,
        }
        start = time.perf_counter()
        out = Outcome(status="stream")
        first = last = None
        async with client.post("/v1/completions", json=body) as r:
            out.status = str(r.status)
            if r.status != 200:
                await r.read()
                return out
            async for raw in r.content:  # one line at a time, its "\n" included
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.status = "stream error"
                    return out
                if chunk.get("usage"):  # the last chunk: the server's own token count
                    out.tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                # A chunk may carry several tokens when the server coalesced decode steps; the
                # gap between chunks is what the client sees, so that is the inter-token latency.
                now = time.perf_counter()
                if last is None:
                    out.ttft_s, first = now - start, now
                else:
                    out.itl_s.append(now - last)
                last = now
        if first is not None and out.tokens > 1:
            out.tpot_s = (last - first) / (out.tokens - 1)
        return out


def make_scenario(name: str, model: str | None, texts_per_request: int, max_tokens: int):
    if name == "embeddings":
        return Embeddings(model or "all-MiniLM-L6-v2", texts_per_request)
    if name == "oip-embeddings":
        return OipEmbeddings(model or "all-MiniLM-L6-v2", texts_per_request)
    if name == "completions":
        return Completions(model or "SmolLM2-135M-Instruct", max_tokens)
    raise ValueError(f"unknown scenario {name!r}")
