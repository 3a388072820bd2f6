"""EventSubscription over the in-memory log: cancelled or timed out at any point, it hands out
every event once, in order (the JetStream run of the same plans is in
tests/integration/twinhub_client/test_subscription_gaps.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings

from eventstore.memory import InMemoryEventStore
from eventstore.ports import Delivery
from proto import binding, subjects
from proto import events as ev
from tests.gapcheck import Plan, plans, run_plan
from twinhub_client.subscription import EventSubscription


@pytest.fixture
async def store() -> AsyncIterator[InMemoryEventStore]:
    async with InMemoryEventStore() as s:
        await s.provision()
        yield s


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=plans())
async def test_random_cancellations_and_timeouts_lose_and_repeat_nothing(
    store: InMemoryEventStore, plan: Plan
) -> None:
    await run_plan(store, plan)


async def _append(store: InMemoryEventStore, owner: str, n: int) -> list[int]:
    msgs = [
        binding.to_nats(
            ev.Event(
                owner=owner,
                device_id="d1",
                data=ev.ResourceChanged(href="/n", content={"n": i}),
                source="/test",
            )
        )
        for i in range(n)
    ]
    return list((await store.append(msgs)).positions)


async def test_an_ack_cut_short_is_made_again_before_the_next_event(
    store: InMemoryEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation while the previous event's ack is under way: the ack is made again by
    the next call, and the next event is the one after it."""
    positions = await _append(store, "o1", 2)
    sub = EventSubscription(store, (subjects.event_filter(owner="o1"),), from_position=0)
    acks: list[int] = []
    stall = asyncio.Event()
    ack = Delivery.ack

    async def slow_ack(d: Delivery) -> None:
        acks.append(d.position)
        if len(acks) == 1:
            await stall.wait()  # the first ack hangs until cancelled
        await ack(d)

    monkeypatch.setattr(Delivery, "ack", slow_ack)
    async with sub:
        first = await sub.next(1)
        assert first is not None and first.position == positions[0]
        reader = asyncio.create_task(sub.next(1), name="reader")
        while not acks:
            await asyncio.sleep(0)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        second = await sub.next(1)
        assert second is not None and second.position == positions[1]
        assert acks == [positions[0], positions[0]]


class _HeldDeletes(InMemoryEventStore):
    """Deleting a consumer waits until :attr:`go` is set (a log slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.go = asyncio.Event()

    async def delete_consumer(self, name: str) -> bool:
        self.asked.set()
        await self.go.wait()
        return await super().delete_consumer(name)


async def test_an_open_cut_short_starts_again_where_it_first_meant_to() -> None:
    """ "From now" is from the first attempt: an event appended while the first open was under
    way, cut short, is handed out once it succeeds."""
    async with _HeldDeletes() as store:
        await store.provision()
        await _append(store, "o1", 1)
        sub = EventSubscription(store, (subjects.event_filter(owner="o1"),))
        opening = asyncio.create_task(sub.open(), name="open")
        async with asyncio.timeout(5):
            await store.asked.wait()
        (later,) = await _append(store, "o1", 1)
        opening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await opening
        store.go.set()
        async with sub:
            e = await sub.next(1)
            assert e is not None and e.position == later
