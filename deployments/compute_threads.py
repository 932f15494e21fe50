"""A model's compute slots as threads of their own: `n` threads take batches from one queue, each
computing one at a time, and hand each result back to the event loop that queued it.

Why not `asyncio.to_thread` behind a semaphore (what the ingress did before): there, starting the
next batch once one finished took several turns of the event loop (the thread's result posted to
the loop, the coroutine resumed, the semaphore released, the waiter resumed, a new executor job
submitted), each behind whatever else the loop was doing (HTTP, tokenizing, encoding responses).
Here the thread that finished a batch takes the next queued one at once; the loop only learns of
the results. (32-text requests, the model in the ingress: BENCHMARKS.md, issue 15.)
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThreads:
    """`n` daemon threads running `fn(*args)` for each `run(fn, *args)`, in the order the calls came."""

    def __init__(self, n: int, name: str = "compute"):
        self._queue: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future, float, Callable, tuple] | None]
        self._queue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{k}", daemon=True) for k in range(n)]
        for t in self._threads:
            t.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """`fn(*args)` computed on one of the threads, and the seconds it waited for a free one."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[T, float]] = loop.create_future()
        self._queue.put((loop, future, time.perf_counter(), fn, args))
        return await future

    def close(self) -> None:
        """Stop the threads once they finish what is queued."""
        for _ in self._threads:
            self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, queued, fn, args = item
            if future.cancelled():  # its caller went away while it waited: nothing to compute for
                continue
            waited = time.perf_counter() - queued
            try:
                result = fn(*args)
            except BaseException as exc:  # the caller gets the exception; the thread takes the next batch
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, (result, waited), None)


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
