from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from eventstore.errors import UnavailableError
from eventstore.memory import InMemoryEventStore
from eventstore.ports import AppendResult
from gateway.writer import DeviceWriter, WriterConfig
from proto import binding, events
from proto.message import NatsMessage


class Flaky:
    """Delegates to a real in-memory store; fails while ``down`` is set."""

    def __init__(self, inner: InMemoryEventStore) -> None:
        self.inner = inner
        self.down = False
        self.calls = 0

    async def append(self, messages: Sequence[NatsMessage], **kw: Any) -> AppendResult:
        self.calls += 1
        if self.down:
            raise UnavailableError("down")
        return await self.inner.append(messages, **kw)


def ev(i: int) -> events.AnyEvent:
    return events.Event(
        owner="o",
        device_id="d",
        source="/t",
        data=events.ResourceChanged(href="/r", content={"i": i}),
    )


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


@pytest.fixture
async def store() -> InMemoryEventStore:
    s = InMemoryEventStore()
    await s.provision()
    return s


async def _contents(store: InMemoryEventStore) -> list[int]:
    return [
        binding.from_stored(m).data.content["i"]  # type: ignore[union-attr]
        async for m in store.read()
    ]


async def test_events_are_written_in_order_and_batched(store: InMemoryEventStore) -> None:
    done: list[tuple[int, bool]] = []
    flaky = Flaky(store)
    w = DeviceWriter(
        flaky,
        lambda ref, ok, err, pos, conflict: done.append((ref, ok)),  # type: ignore[arg-type]
        WriterConfig(),
        "t",
    )
    for i in range(300):
        assert w.submit(i, (ev(i),), critical=False)
    await w.close()
    assert done == [(i, True) for i in range(300)]
    assert await _contents(store) == list(range(300))
    assert flaky.calls < 300, "queued events go out together"


async def test_unavailable_log_is_retried_without_loss_or_duplicates(
    store: InMemoryEventStore,
) -> None:
    flaky = Flaky(store)
    flaky.down = True
    done: list[int] = []
    w = DeviceWriter(
        flaky,
        lambda ref, ok, err, pos, conflict: done.append(ref),  # type: ignore[arg-type]
        WriterConfig(retry_initial=0.001, retry_max=0.01),
        "t",
    )
    for i in range(50):
        w.submit(i, (ev(i),), critical=False)
    await wait_for(lambda: flaky.calls >= 3)
    assert done == []
    flaky.down = False
    await wait_for(lambda: len(done) == 50)
    await w.close()
    assert await _contents(store) == list(range(50))


async def test_overflow_is_refused(store: InMemoryEventStore) -> None:
    flaky = Flaky(store)
    flaky.down = True
    w = DeviceWriter(
        flaky,
        lambda *a: None,
        WriterConfig(max_buffered=10, retry_initial=0.001, drain_timeout=0.05),
        "t",
    )
    assert all(w.submit(i, (ev(i),), critical=False) for i in range(10))
    assert not w.submit(10, (ev(10),), critical=False)
    assert w.buffered == 10
    await w.close()


async def test_critical_append_fails_after_its_timeout(store: InMemoryEventStore) -> None:
    flaky = Flaky(store)
    flaky.down = True
    results: list[tuple[int, bool]] = []
    w = DeviceWriter(
        flaky,
        lambda ref, ok, err, pos, conflict: results.append((ref, ok)),  # type: ignore[arg-type]
        WriterConfig(critical_timeout=0.02, retry_initial=0.005, retry_max=0.01),
        "t",
    )
    w.submit(1, (ev(1),), critical=True)
    w.submit(2, (ev(2),), critical=False)
    await wait_for(lambda: results == [(1, False)])
    flaky.down = False
    await wait_for(lambda: len(results) == 2)
    assert results[1] == (2, True)
    await w.close()
    assert await _contents(store) == [2]


async def test_a_conditional_append_goes_alone_and_reports_a_conflict(
    store: InMemoryEventStore,
) -> None:
    flaky = Flaky(store)
    flaky.down = True  # everything queues up first
    done: list[tuple[int, bool, bool]] = []
    w = DeviceWriter(
        flaky,
        lambda ref, ok, err, pos, conflict: done.append((ref, ok, conflict)),
        WriterConfig(retry_initial=0.001, retry_max=0.01),
        "t",
    )
    scope = "twinhub.ev.*.d.>"
    w.submit(1, (ev(1),), critical=False)
    w.submit(2, (ev(2),), critical=True, expected_last=1, scope=scope)  # holds after 1
    w.submit(3, (ev(3),), critical=True, expected_last=1, scope=scope)  # 2 moved it: conflict
    w.submit(4, (ev(4),), critical=False)
    await wait_for(lambda: flaky.calls >= 2)
    flaky.down = False
    await wait_for(lambda: len(done) == 4)
    await w.close()
    assert done == [(1, True, False), (2, True, False), (3, False, True), (4, True, False)]
    assert await _contents(store) == [1, 2, 4]
