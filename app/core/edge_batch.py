"""Batching at the edge: the ingress gathers concurrent requests for one model and crosses
the DeploymentHandle hop once per batch, not once per request.

A hop costs several ms of CPU on a small machine, more than the model's own cost per text
in a batch, so this is where per-request overhead is cut (measured in BENCHMARKS.md).

A job whose deadline passed while it waited (`expired` gives its answer) is answered here and
never sent.

Adaptive, with no timer: when fewer than `max_inflight` batches are out, whatever is
queued goes at once (no added latency at low load); while they are out, requests
accumulate and leave together as soon as one returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class EdgeBatcher(Generic[J, R]):
    def __init__(
        self,
        send: Callable[[list[J]], Awaitable[Sequence[R]]],
        size_of: Callable[[J], int],
        max_items: int,
        max_inflight: int = 2,
        expired: Callable[[J], R | None] | None = None,
    ):
        self._send = send
        self._expired = expired  # a job's answer when it must not be sent (its deadline passed), else None
        self._size_of = size_of
        self._max_items = max_items
        self.max_inflight = max_inflight
        self._queue: list[tuple[J, asyncio.Future]] = []
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()  # the batches out, referenced until done

    async def submit(self, job: J) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self._queue and self._inflight < self.max_inflight:
            batch: list[tuple[J, asyncio.Future]] = []
            items = 0
            while self._queue:
                # Drop requests whose client went away before their batch left.
                if self._queue[0][1].done():
                    self._queue.pop(0)
                    continue
                dropped = self._expired(self._queue[0][0]) if self._expired is not None else None
                if dropped is not None:  # its deadline passed while it waited: answered, never sent
                    self._queue.pop(0)[1].set_result(dropped)
                    continue
                size = self._size_of(self._queue[0][0])
                if batch and items + size > self._max_items:
                    break
                batch.append(self._queue.pop(0))
                items += size
            if not batch:
                return
            self._inflight += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[J, asyncio.Future]]) -> None:
        try:
            results = await self._send([job for job, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} got {len(results)} results")
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except BaseException as exc:  # every waiter learns of the failure; none hangs
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._inflight -= 1
            self._pump()
