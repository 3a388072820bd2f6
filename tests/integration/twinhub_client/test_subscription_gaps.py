"""Gap-free subscriptions on the real NATS server: a cancellation or a timeout at any await
loses no event (issue 11, item 2).

The defect: a timeout of ``EventSubscription.next`` (or any cancellation) that struck while a
JetStream fetch had taken deliveries from its inbox and waited for more threw them away;
later events moved the position past them, and when JetStream redelivered them (after
``ack_wait``) they were skipped as already seen. The deterministic tests below make that
moment certain: the connection hands deliveries to the inbox at once but holds back the end
of the pull request (the status that comes in a later packet), and the reader is cut short
right after a delivery reached the inbox. The property test plays random plans
(``tests/gapcheck.py``) against JetStream, as the unit test does against the in-memory log.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, cast

import pytest
from hypothesis import HealthCheck, given, settings
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from eventstore.adapters.jetstream import JetStreamEventStore
from proto import binding, subjects
from proto import events as ev
from tests.conftest import Bus
from tests.gapcheck import Plan, plans, run_plan
from twinhub_client.subscription import EventSubscription

pytestmark = pytest.mark.servers


@pytest.fixture
async def store(bus: Bus) -> AsyncIterator[JetStreamEventStore]:
    async with JetStreamEventStore.from_url(bus.admin) as s:
        await s.provision()
        yield s


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=plans(max_appends=15))
async def test_random_cancellations_and_timeouts_lose_and_repeat_nothing(
    store: JetStreamEventStore, plan: Plan
) -> None:
    await run_plan(store, plan)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=plans(max_appends=15))
async def test_the_same_with_pull_requests_ending_in_a_later_packet(
    nats_client: NatsClient, plan: Plan
) -> None:
    """Each status that ends a pull request comes a few milliseconds after the deliveries
    (as over a real network): the moment a cut-short fetch used to lose them, made common."""
    tap = _LateStatuses(nats_client, delay=0.003)
    tap.release.set()
    async with JetStreamEventStore(cast(NatsClient, tap)) as store:
        await run_plan(store, plan)


class _LateStatuses:
    """A NATS connection (the real one underneath) that hands every delivery to its
    subscriber at once but holds back the statuses that end pull requests (404, 408) until
    :attr:`release` is set (and then ``delay`` seconds more), and sets :attr:`delivered` once
    a delivery was handed over and what it woke has run."""

    def __init__(self, nc: NatsClient, delay: float = 0.0) -> None:
        self._nc = nc
        self._delay = delay
        self.delivered = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def subscribe(
        self, subject: str, queue: str = "", cb: Callable[[Msg], Awaitable[None]] | None = None
    ) -> Any:
        assert cb is not None
        handler = cb

        async def tapped(msg: Msg) -> None:
            status = (msg.headers or {}).get("Status")
            if status in ("404", "408") and not msg.data:
                await self.release.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)  # the network's, not a synchronisation
            await handler(msg)
            if msg.reply and msg.reply.startswith("$JS.ACK."):
                # Set after the callbacks already due: the reader's fetch, woken by this
                # delivery, has run by the time anyone sees it set.
                asyncio.get_running_loop().call_soon(self.delivered.set)

        return await self._nc.subscribe(subject, queue, cb=tapped)


def _changed(owner: str, n: int) -> Any:
    return binding.to_nats(
        ev.Event(
            owner=owner,
            device_id="d1",
            data=ev.ResourceChanged(href="/n", content={"n": n}),
            source="/test/gaps",
        )
    )


@pytest.fixture
async def late(nats_client: NatsClient) -> AsyncIterator[tuple[_LateStatuses, JetStreamEventStore]]:
    tap = _LateStatuses(nats_client)
    async with JetStreamEventStore(cast(NatsClient, tap)) as s:
        await s.provision()
        try:
            yield tap, s
        finally:
            tap.release.set()


async def _cut_short_after_first_delivery(
    tap: _LateStatuses,
    reader: Callable[[], Awaitable[object]],
    append: Callable[[], Awaitable[object]],
    how: Literal["cancel", "timeout"],
) -> None:
    """Start ``reader``, ``append``, and once a delivery reached the inbox (the reading fetch,
    woken first, has seen it) cancel the reader or let a timeout around it expire."""
    loop = asyncio.get_running_loop()
    scopes: list[asyncio.Timeout] = []

    async def read() -> object:
        async with asyncio.timeout(None) as scope:
            scopes.append(scope)
            return await reader()

    tap.delivered.clear()
    task = asyncio.create_task(read(), name="reader")
    await append()
    async with asyncio.timeout(10):
        await tap.delivered.wait()
    assert not task.done()
    if how == "cancel":
        task.cancel()
    else:
        scopes[0].reschedule(loop.time())
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await task
    assert task.cancelled() or isinstance(task.exception(), TimeoutError)


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_a_fetch_cut_short_after_a_delivery_arrived_keeps_it(
    late: tuple[_LateStatuses, JetStreamEventStore], how: Literal["cancel", "timeout"]
) -> None:
    tap, store = late
    owner = "o" + uuid.uuid4().hex[:12]
    name = "c" + uuid.uuid4().hex[:12]
    c = await store.consumer(name, [subjects.event_filter(owner=owner)], ack_wait=300)
    positions: list[int] = []

    async def append() -> None:
        positions.extend((await store.append([_changed(owner, 1)])).positions)

    try:
        await _cut_short_after_first_delivery(tap, lambda: c.fetch(10, timeout=30), append, how)
        tap.release.set()
        again = await c.fetch(10, timeout=2)  # now, not after ack_wait (300 s)
        assert [d.position for d in again] == positions
        await c.ack_many(again)
    finally:
        await c.close()
        await store.delete_consumer(name)


@pytest.mark.parametrize("how", ["cancel", "timeout"])
@pytest.mark.parametrize("call", ["next", "anext"])
async def test_a_subscription_cut_short_after_a_delivery_arrived_hands_it_out_next(
    late: tuple[_LateStatuses, JetStreamEventStore],
    how: Literal["cancel", "timeout"],
    call: Literal["next", "anext"],
) -> None:
    """What ``twinhub watch`` (``next(0.5)`` in a loop) and ``wait_outcome`` (``asyncio.timeout``
    around ``async for``) do: the event that was on its way comes with the next call."""
    tap, store = late
    owner = "o" + uuid.uuid4().hex[:12]
    start = await store.last_position()
    sub = EventSubscription(store, (subjects.event_filter(owner=owner),), from_position=start)
    positions: list[int] = []

    async def append() -> None:
        positions.extend((await store.append([_changed(owner, len(positions))])).positions)

    async with sub:
        reader = (lambda: sub.next(30)) if call == "next" else (lambda: anext(sub))
        await _cut_short_after_first_delivery(tap, reader, append, how)
        tap.release.set()
        await append()
        got = [await sub.next(2), await sub.next(2)]
        assert [e.position if e else None for e in got] == positions
        assert await sub.next(0.2) is None
