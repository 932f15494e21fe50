"""deployments/compute_threads.py: the model's compute slots as threads taking batches from one queue."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.compute_threads import ComputeThreads


def test_a_thread_that_finishes_a_batch_starts_the_next_without_the_event_loop():
    slots = ComputeThreads(1, "test")
    gate, second_started = threading.Event(), threading.Event()
    order: list[str] = []

    def work(name: str) -> str:
        order.append(name)
        if name == "first":
            gate.wait(timeout=30)
        if name == "second":
            second_started.set()
        return name.upper()

    async def main() -> tuple[list, bool]:
        calls = [asyncio.create_task(slots.run(work, name)) for name in ("first", "second", "third")]
        await asyncio.sleep(0)  # let the three tasks queue their batches
        gate.set()
        # The event loop is blocked here: the second batch can only start if no loop turn is needed.
        started = second_started.wait(timeout=30)
        return await asyncio.gather(*calls), started

    results, started = asyncio.run(main())
    assert started
    assert [r for r, _ in results] == ["FIRST", "SECOND", "THIRD"] and order == ["first", "second", "third"]
    assert results[2][1] >= results[1][1] >= 0  # each reports how long it waited for the thread
    slots.close()


def test_an_exception_reaches_its_caller_and_the_thread_goes_on():
    slots = ComputeThreads(1, "test")

    def work(x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x * 2

    async def main() -> list:
        return await asyncio.gather(slots.run(work, -1), slots.run(work, 21), return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and str(bad) == "negative: -1"
    assert good[0] == 42
    slots.close()


def test_a_call_cancelled_while_it_waits_is_not_computed():
    slots = ComputeThreads(1, "test")
    gate = threading.Event()
    ran: list[str] = []

    def work(name: str) -> str:
        ran.append(name)
        gate.wait(timeout=30)
        return name

    async def main() -> str:
        first = asyncio.create_task(slots.run(work, "first"))
        waiting = asyncio.create_task(slots.run(work, "cancelled"))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        last = await slots.run(work, "last")  # queued behind the cancelled one: the thread skipped it
        assert (await first)[0] == "first"
        return last[0]

    assert asyncio.run(main()) == "last"
    assert ran == ["first", "last"]
    slots.close()
