"""Batching at the edge: the ingress gathers concurrent requests for one model and crosses
the DeploymentHandle hop once per batch, not once per request.

A hop costs several ms of CPU on a small machine, more than the model's own cost per text
in a batch, so this is where per-request overhead is cut (measured in BENCHMARKS.md).

A job whose deadline passed while it waited (`expired` gives its answer) is answered here and
never sent.

Adaptive, with no timer: while fewer than `busy_after` batches are out (a replica is idle),
whatever is queued goes at once (no added latency at low load). Past that, a batch leaves
beside the running ones only once it holds `min_items` inputs, and never more than
`max_inflight` are out; meanwhile requests accumulate and leave together as soon as one
returns. On a busy CPU a batch of one or two beside a running batch costs nearly a full
batch's compute and a hop: holding them until they fill measured +19% requests/s at 32
concurrent single-text clients (BENCHMARKS.md).
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
        min_items: int = 1,
        busy_after: int = 1,
    ):
        self._send = send
        self._expired = expired  # a job's answer when it must not be sent (its deadline passed), else None
        self._size_of = size_of
        self._max_items = max_items
        self.max_inflight = max_inflight
        self.busy_after = busy_after  # batches out from which a new one must hold min_items to leave
        self._min_items = min_items
        self._queue: list[tuple[J, asyncio.Future]] = []
        self._queued_items = 0
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()  # the batches out, referenced until done

    async def submit(self, job: J) -> R:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        self._queued_items += self._size_of(job)
        self._pump()
        return await future

    def _pump(self) -> None:
        while self._queue and self._inflight < self.max_inflight:
            if self._inflight >= self.busy_after and self._queued_items < self._min_items:
                return  # every replica computes: wait for company, or for a batch to return
            batch: list[tuple[J, asyncio.Future]] = []
            items = 0
            while self._queue:
                # Drop requests whose client went away before their batch left.
                if self._queue[0][1].done():
                    self._pop()
                    continue
                dropped = self._expired(self._queue[0][0]) if self._expired is not None else None
                if dropped is not None:  # its deadline passed while it waited: answered, never sent
                    self._pop()[1].set_result(dropped)
                    continue
                size = self._size_of(self._queue[0][0])
                if batch and items + size > self._max_items:
                    break
                batch.append(self._pop())
                items += size
            if not batch:
                return
            self._inflight += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pop(self) -> tuple[J, asyncio.Future]:
        entry = self._queue.pop(0)
        self._queued_items -= self._size_of(entry[0])
        return entry

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
