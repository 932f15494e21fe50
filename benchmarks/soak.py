"""`make soak`: the shipped config under mixed traffic for 10 minutes at ~70% of its measured capacity.

Embeddings (4 texts), whole chat completions and streamed completions, interleaved 2:1:1, Poisson
arrivals (open loop: a slow server cannot hide its queueing). It holds when:
- the p99 of every minute is within 1.5x of the first minute's,
- every process of the cluster keeps its resident memory within 10% of what it had after warm-up,
- no request fails (every answer a 200; a stream ends with its last chunk).
Capacity is measured first, with a closed loop of the same mix. Every process at nice 15 (benchmarks/__init__.py).
Not part of `make test`: ~13 minutes.
Writes artifacts/bench/soak.md; exits 1 if the soak did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from pathlib import Path

import aiohttp
import psutil

from benchmarks import same_nice
from loadtest.runner import Sample, closed_loop, open_loop
from loadtest.scenarios import Completions, Embeddings, Outcome, sentence
from tests.harness import ROOT, free_port, serve_config_on, serve_run_process

LM, EMBED = "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"


class Mixed:
    """Two embedding requests, one whole chat, one streamed completion, in turn."""

    name = "mixed"

    def __init__(self) -> None:
        self.embed, self.stream = Embeddings(EMBED, 4), Completions(LM, max_tokens=32)

    def items(self) -> int:
        return 1

    async def send(self, client: aiohttp.ClientSession, i: int) -> Outcome:
        kind = i % 4
        if kind < 2:
            return await self.embed.send(client, i)
        if kind == 3:
            out = await self.stream.send(client, i)
            return out if out.tokens > 0 or out.status != "200" else Outcome(status="stream without tokens")
        body = {"model": LM, "messages": [{"role": "user", "content": sentence(i)}], "max_tokens": 16}
        async with client.post("/v1/chat/completions", json=body) as r:
            answer = await r.json() if r.status == 200 else await r.read()
        ok = r.status == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
        return Outcome(status=str(r.status) if ok or r.status != 200 else "bad chat")


def rss_by_process(pid: int) -> dict[str, int]:
    """Resident bytes of every process under `pid` (the `serve run` and its cluster), by name and pid."""
    out = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            out[f"{p.name()}[{p.pid}]"] = p.memory_info().rss
        except psutil.Error:
            continue
    return out


async def sample_memory(pid: int, every_s: float, stop: asyncio.Event, out: list[tuple[float, dict[str, int]]]) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        out.append((time.perf_counter() - t0, rss_by_process(pid)))
        with contextlib.suppress(asyncio.TimeoutError):  # the sampling interval, or the end of the soak
            await asyncio.wait_for(stop.wait(), every_s)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else (values[0] if values else float("nan"))


def judge(samples: list[Sample], memory: list[tuple[float, dict[str, int]]], warmup_s: float) -> tuple[bool, list[str]]:
    """The report's lines, and whether the soak held."""
    lines, held = [], True
    errors = [s for s in samples if s.outcome.status != "200"]
    lines.append(f"requests: {len(samples)}, failed: {len(errors)} {sorted({s.outcome.status for s in errors})}")
    held &= not errors
    timed = [s for s in samples if not s.warmup]
    minutes = sorted({int((s.t - warmup_s) // 60) for s in timed})
    per_minute = {m: p99([s.latency_s for s in timed if int((s.t - warmup_s) // 60) == m]) for m in minutes}
    first = per_minute.get(0, float("nan"))
    lines.append("| minute | requests | p99 ms | vs first |\n|---|---|---|---|")
    for m, value in per_minute.items():
        count = sum(1 for s in timed if int((s.t - warmup_s) // 60) == m)
        lines.append(f"| {m + 1} | {count} | {value * 1000:.0f} | {value / first:.2f} |")
        held &= value <= 1.5 * first
    after = [rss for t, rss in memory if t >= warmup_s]
    if after:
        lines.append("| process | RSS after warm-up MiB | max MiB | growth |\n|---|---|---|---|")
        for name, base in sorted(after[0].items()):
            peak = max(rss.get(name, 0) for rss in after)
            growth = peak / base - 1 if base else 0.0
            held &= growth <= 0.10
            lines.append(f"| {name} | {base / 2**20:.0f} | {peak / 2**20:.0f} | {growth:+.1%} |")
    return held, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds measured after warm-up")
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--rate", type=float, help="requests/s (skips the capacity measurement)")
    parser.add_argument("--out", default="artifacts/bench/soak.md")
    args = parser.parse_args()
    log_dir = ROOT / "artifacts" / "soak"
    log_dir.mkdir(parents=True, exist_ok=True)
    same_nice()  # the load generator no higher than the cluster's workers (benchmarks/__init__.py)
    with serve_run_process(serve_config_on(free_port()), log_dir=log_dir, ready_timeout_s=1200) as (url, proc):
        rate = args.rate
        if rate is None:  # capacity: what a closed loop of 16 clients completes per second
            measured = asyncio.run(closed_loop(url, Mixed(), 16, 60.0, 10.0, 120.0))
            done = [s for s in measured if not s.warmup and s.outcome.status == "200"]
            rate = args.load * len(done) / 60.0
            print(f"capacity {len(done) / 60.0:.1f} req/s; soak at {rate:.1f} req/s")

        async def soak() -> tuple[list[Sample], list[tuple[float, dict[str, int]]]]:
            memory: list[tuple[float, dict[str, int]]] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(proc.pid, 10.0, stop, memory))
            samples = await open_loop(url, Mixed(), rate, args.duration, args.warmup, 120.0)
            stop.set()
            await sampler
            return samples, memory

        samples, memory = asyncio.run(soak())
    held, lines = judge(samples, memory, args.warmup)
    load = " ".join(f"{x:.2f}" for x in psutil.getloadavg())
    text = "\n".join([f"# Soak: {rate:.1f} req/s for {args.duration:.0f} s (load average {load})", *lines])
    text += f"\n\n**{'held' if held else 'did NOT hold'}**\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0 if held else 1


if __name__ == "__main__":
    raise SystemExit(main())
