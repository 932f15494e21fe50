"""The ingress's edge batcher, without Ray: ordering forced with events, never sleeps."""

from __future__ import annotations

import asyncio

import pytest

from app.core.edge_batch import EdgeBatcher


class GatedSender:
    """Records each batch and holds it until the test releases it."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.sent = asyncio.Condition()
        self.fail_next = False

    async def __call__(self, jobs: list[str]) -> list[str]:
        gate = asyncio.Event()
        async with self.sent:
            self.batches.append(list(jobs))
            self.gates.append(gate)
            self.sent.notify_all()
        await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("replica died")
        return [f"result:{j}" for j in jobs]

    async def wait_batches(self, n: int) -> None:
        async with self.sent:
            await self.sent.wait_for(lambda: len(self.batches) >= n)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_idle_batcher_sends_at_once_and_busy_one_accumulates():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=lambda j: 1, max_items=100, max_inflight=1)
        first = asyncio.ensure_future(batcher.submit("a"))
        await sender.wait_batches(1)
        assert sender.batches == [["a"]]  # no waiting for company when idle
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in "bcd"]
        await asyncio.sleep(0)  # let the three submits enqueue (a yield, not a timing wait)
        sender.gates[0].set()
        await sender.wait_batches(2)
        assert sender.batches[1] == ["b", "c", "d"]  # gathered while "a" was out
        sender.gates[1].set()
        assert await first == "result:a"
        assert [await r for r in rest] == ["result:b", "result:c", "result:d"]

    run(scenario())


def test_max_items_splits_batches():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=len, max_items=4, max_inflight=1)
        blocker = asyncio.ensure_future(batcher.submit("z"))
        await sender.wait_batches(1)
        jobs = [asyncio.ensure_future(batcher.submit(x)) for x in ("aa", "bb", "cc", "ddddd")]
        await asyncio.sleep(0)
        for n in (1, 2, 3):
            sender.gates[n - 1].set()
            await sender.wait_batches(n + 1)
        sender.gates[3].set()
        assert sender.batches[1:] == [["aa", "bb"], ["cc"], ["ddddd"]]  # an oversize job still goes, alone
        assert [await j for j in jobs] == ["result:aa", "result:bb", "result:cc", "result:ddddd"]
        await blocker

    run(scenario())


def test_failure_fails_only_its_batch():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=lambda j: 1, max_items=100, max_inflight=1)
        doomed = asyncio.ensure_future(batcher.submit("a"))
        await sender.wait_batches(1)
        later = asyncio.ensure_future(batcher.submit("b"))
        await asyncio.sleep(0)
        sender.fail_next = True
        sender.gates[0].set()
        with pytest.raises(RuntimeError, match="replica died"):
            await doomed
        await sender.wait_batches(2)
        sender.gates[1].set()
        assert await later == "result:b"

    run(scenario())


def test_cancelled_waiter_is_not_sent():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=lambda j: 1, max_items=100, max_inflight=1)
        first = asyncio.ensure_future(batcher.submit("a"))
        await sender.wait_batches(1)
        gone = asyncio.ensure_future(batcher.submit("gone"))
        kept = asyncio.ensure_future(batcher.submit("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        sender.gates[0].set()
        await sender.wait_batches(2)
        assert sender.batches[1] == ["kept"]
        sender.gates[1].set()
        assert (await first, await kept) == ("result:a", "result:kept")

    run(scenario())


def test_never_more_batches_out_than_max_inflight():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=lambda j: 1, max_items=100, max_inflight=2)
        jobs = [asyncio.ensure_future(batcher.submit("a")), asyncio.ensure_future(batcher.submit("b"))]
        await sender.wait_batches(2)  # two slots: each went at once, alone
        jobs += [asyncio.ensure_future(batcher.submit(x)) for x in "cd"]
        await asyncio.sleep(0)  # let them enqueue (a yield, not a timing wait)
        assert len(sender.batches) == 2, "a third batch went out while two were out"
        sender.gates[0].set()
        await sender.wait_batches(3)
        assert sender.batches == [["a"], ["b"], ["c", "d"]]
        for gate in sender.gates[1:]:
            gate.set()
        assert [await j for j in jobs] == ["result:a", "result:b", "result:c", "result:d"]

    run(scenario())


def test_beside_a_running_batch_a_small_one_waits_until_it_fills():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=len, max_items=100, max_inflight=3, min_items=4, busy_after=1)
        first = asyncio.ensure_future(batcher.submit("a"))
        await sender.wait_batches(1)  # nothing out: it leaves at once, alone
        held = [asyncio.ensure_future(batcher.submit(x)) for x in ("b", "cc")]
        await asyncio.sleep(0)  # let them enqueue (a yield, not a timing wait)
        assert len(sender.batches) == 1, "3 inputs left beside a running batch; 4 were required"
        held.append(asyncio.ensure_future(batcher.submit("d")))
        await sender.wait_batches(2)  # the fourth input fills it: it leaves while "a" still computes
        assert sender.batches == [["a"], ["b", "cc", "d"]]
        for gate in sender.gates:
            gate.set()
        assert [await j for j in [first, *held]] == ["result:a", "result:b", "result:cc", "result:d"]

    run(scenario())


def test_a_held_batch_leaves_when_the_running_one_returns():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=len, max_items=100, max_inflight=3, min_items=8, busy_after=1)
        first = asyncio.ensure_future(batcher.submit("a"))
        await sender.wait_batches(1)
        held = asyncio.ensure_future(batcher.submit("b"))
        await asyncio.sleep(0)
        assert len(sender.batches) == 1
        sender.gates[0].set()  # nothing computes now: "b" goes, however small
        await sender.wait_batches(2)
        assert sender.batches[1] == ["b"]
        sender.gates[1].set()
        assert (await first, await held) == ("result:a", "result:b")

    run(scenario())


def test_one_batch_per_replica_leaves_at_once_before_any_waits_to_fill():
    async def scenario():
        sender = GatedSender()
        batcher = EdgeBatcher(sender, size_of=len, max_items=100, max_inflight=5, min_items=8, busy_after=2)
        jobs = [asyncio.ensure_future(batcher.submit(x)) for x in "ab"]
        await sender.wait_batches(2)  # two replicas, two batches out at once, alone
        jobs.append(asyncio.ensure_future(batcher.submit("c")))
        await asyncio.sleep(0)
        assert sender.batches == [["a"], ["b"]]  # both replicas busy: "c" waits to fill
        for n in (0, 1):
            sender.gates[n].set()
        await sender.wait_batches(3)
        sender.gates[2].set()
        assert [await j for j in jobs] == ["result:a", "result:b", "result:c"]

    run(scenario())


def test_the_registry_keeps_one_batch_more_out_than_the_model_computes_at_once():
    """README Architecture: concurrent_batches × RUNNING replicas, plus one; in the ingress, concurrent_batches + 1."""
    from app.config import AppConfig, ModelConfig
    from app.core.registry import ModelRegistry

    class Handle:
        def options(self, **_):
            return self

        async def embed_many(self, jobs):
            raise AssertionError("not called")

    replica = ModelConfig(name="r", task="embed", source="unused", concurrent_batches=2)
    local = ModelConfig(name="l", task="embed", source="unused", concurrent_batches=3, placement="ingress")
    registry = ModelRegistry(AppConfig(models=[replica, local]), {"r": Handle()}, {"l": Handle()})
    assert registry._batchers["r"].max_inflight == 2 * 1 + 1
    assert registry._batchers["l"].max_inflight == 3 + 1
    registry.scale_batchers({replica.deployment_name: 3, local.deployment_name: 5})
    assert registry._batchers["r"].max_inflight == 2 * 3 + 1
    assert registry._batchers["l"].max_inflight == 3 + 1  # the ingress's own copy: replicas do not matter
    # Beside running batches, a batch leaves once it holds a quarter of max_batch_size (32) inputs; one
    # batch per RUNNING replica leaves at once.
    assert (registry._batchers["r"]._min_items, registry._batchers["r"].busy_after) == (8, 3)
    assert (registry._batchers["l"]._min_items, registry._batchers["l"].busy_after) == (8, 1)
