"""In-memory store behaviour that depends on time, driven by a fake clock (no waiting)."""

from __future__ import annotations

import pytest

from eventstore.errors import ConcurrencyError, ConsumerGoneError, NotProvisionedError
from eventstore.layout import StreamLayout
from eventstore.memory import InMemoryEventStore
from proto.message import NatsMessage

S = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * S

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * S)


def msg(i: int, resource: str = "r1", device: str = "d1") -> NatsMessage:
    return NatsMessage(
        subject=f"twinhub.ev.o.{device}.resource-changed.{resource}", msg_id=f"m{i}", data=b"x"
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(clock: FakeClock) -> InMemoryEventStore:
    s = InMemoryEventStore(StreamLayout(duplicate_window=60.0), clock=clock)
    await s.provision()
    return s


async def test_time_ns_comes_from_the_clock(store: InMemoryEventStore, clock: FakeClock) -> None:
    await store.append([msg(1)])
    (stored,) = [m async for m in store.read()]
    assert stored.time_ns == clock.now


async def test_duplicates_are_recognised_only_within_the_window(
    store: InMemoryEventStore, clock: FakeClock
) -> None:
    first = await store.append([msg(1)])
    clock.advance(59.9)
    assert (await store.append([msg(1)])).duplicates == (True,)
    clock.advance(0.2)
    again = await store.append([msg(1)])
    assert again.duplicates == (False,)
    assert again.positions != first.positions


async def test_conditional_retry_outside_the_window_is_a_conflict(
    store: InMemoryEventStore, clock: FakeClock
) -> None:
    await store.append([msg(1)], expected_last=0)
    clock.advance(61)
    with pytest.raises(ConcurrencyError):
        await store.append([msg(1)], expected_last=0)


async def test_ack_wait_and_nak_delay_follow_the_clock(
    store: InMemoryEventStore, clock: FakeClock
) -> None:
    await store.append([msg(1), msg(2)])
    c = await store.consumer("c", ack_wait=30)
    first = await c.fetch(1, timeout=0)
    assert [d.position for d in first] == [1]
    clock.advance(29)
    assert [d.position for d in await c.fetch(5, timeout=0)] == [2]
    assert await c.fetch(5, timeout=0) == []
    clock.advance(2)  # position 1's ack_wait expired, position 2's not yet
    (again,) = await c.fetch(5, timeout=0)
    assert (again.position, again.num_delivered) == (1, 2)
    await again.nak(delay=10)
    clock.advance(9)
    assert await c.fetch(5, timeout=0) == []
    clock.advance(1)
    got = await c.fetch(5, timeout=0)
    assert [(d.position, d.num_delivered) for d in got] == [(1, 3)]
    await c.ack_many(got)


async def test_max_age_and_per_subject_limits_drop_oldest(clock: FakeClock) -> None:
    store = InMemoryEventStore(
        StreamLayout(duplicate_window=10, max_age=100, max_msgs_per_subject=3), clock=clock
    )
    await store.provision()
    await store.append([msg(i) for i in range(5)])
    assert [m.position async for m in store.read()] == [3, 4, 5]
    clock.advance(50)
    await store.append([msg(9, "r2")])
    clock.advance(51)
    assert [m.position async for m in store.read()] == [6]
    assert await store.last_position("twinhub.ev.*.d1.*.r1") == 0
    assert await store.last_position() == 6


async def test_redelivery_of_a_message_removed_by_a_limit_is_dropped(clock: FakeClock) -> None:
    store = InMemoryEventStore(StreamLayout(max_msgs_per_subject=1), clock=clock)
    await store.provision()
    await store.append([msg(1)])
    c = await store.consumer("c", ack_wait=1)
    assert len(await c.fetch(1, timeout=0)) == 1
    await store.append([msg(2)])  # replaces position 1 on the same subject
    clock.advance(2)
    assert [d.position for d in await c.fetch(5, timeout=0)] == [2]


async def test_consumer_deleted_under_a_handle(store: InMemoryEventStore) -> None:
    await store.append([msg(1)])
    c = await store.consumer("c")
    (d,) = await c.fetch(1, timeout=0)
    await store.delete_consumer("c")
    with pytest.raises(ConsumerGoneError):
        await c.fetch(1, timeout=0)
    with pytest.raises(ConsumerGoneError):
        await d.ack()


async def test_nothing_works_before_provision() -> None:
    store = InMemoryEventStore()
    with pytest.raises(NotProvisionedError):
        await store.append([msg(1)])
    with pytest.raises(NotProvisionedError):
        await store.consumer("c")
