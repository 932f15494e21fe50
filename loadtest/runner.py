"""Open-loop (Poisson arrivals) and closed-loop (fixed concurrency) load generation.

The HTTP client is aiohttp: ~90 µs of CPU per request at 32 connections on this project's 2-core machine,
against httpx's ~2.6 ms (encode/httpx#3215), which capped the generator near 380 requests/s on a whole
core of the server's machine and counted its own queueing as the server's latency."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from loadtest.scenarios import Outcome


@dataclass
class Sample:
    t: float  # intended send time, seconds since the run started
    latency_s: float  # from the intended send time: a late send counts against the server
    outcome: Outcome
    warmup: bool


async def _one(client, scenario, i: int, intended: float, t0: float, warmup: bool, out: list[Sample]):
    try:
        outcome = await scenario.send(client, i)
    except TimeoutError:  # aiohttp's timeouts are TimeoutErrors (some are ClientErrors too)
        outcome = Outcome(status="timeout")
    except aiohttp.ClientError as exc:
        outcome = Outcome(status=type(exc).__name__)
    out.append(Sample(t=intended - t0, latency_s=time.perf_counter() - intended, outcome=outcome, warmup=warmup))


def _client(url: str, timeout_s: float) -> aiohttp.ClientSession:
    """No connection limit (an open loop never waits for a free connection); `timeout_s` bounds the
    connect and each read, not a whole response: a long stream is not cut while its tokens keep coming."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    return aiohttp.ClientSession(url, timeout=timeout, connector=aiohttp.TCPConnector(limit=0))


async def open_loop(
    url,
    scenario,
    rate: float,
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
    seed: int = 0,
    on_done: Callable[[], None] | None = None,
) -> list[Sample]:
    """Poisson arrivals at `rate`/s; sends are never delayed by slow responses."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    tasks: set[asyncio.Task] = set()
    async with _client(url, timeout_s) as client:
        t0 = time.perf_counter()
        intended, i = t0, 0
        while True:
            intended += rng.expovariate(rate)
            if intended - t0 > warmup_s + duration_s:
                break
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(client, scenario, i, intended, t0, intended - t0 < warmup_s, samples))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if on_done:
                task.add_done_callback(lambda _: on_done())
            i += 1
        if tasks:
            await asyncio.wait(tasks)
    return samples


async def closed_loop(
    url,
    scenario,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    timeout_s: float,
    on_done: Callable[[], None] | None = None,
) -> list[Sample]:
    """`concurrency` workers, each sending its next request when the last one is answered."""
    samples: list[Sample] = []
    counter = iter(range(10**12))
    async with _client(url, timeout_s) as client:
        t0 = time.perf_counter()
        end = t0 + warmup_s + duration_s

        async def worker():
            while (now := time.perf_counter()) < end:
                await _one(client, scenario, next(counter), now, t0, now - t0 < warmup_s, samples)
                if on_done:
                    on_done()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples
