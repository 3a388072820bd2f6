"""Closing client subscriptions is prompt and bounded, on the real NATS server.

Many subscriptions receive a steady stream of events and are closed mid-stream: by cancelling
the task that iterates (what ``bench/command_bench.py`` does), by a timeout around the
iteration (what ``TwinhubClient.wait_outcome`` does), and while NATS is down. Each must end in
well under a second: a cancellation or timeout that arrives while events are being delivered
must not be lost, and cleanup (ack, unsubscribe, deleting the temporary consumer) must not wait
on a slow or dead server. Temporary consumers do not outlive their subscription; a durable one
keeps its consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from eventstore.adapters.jetstream import JetStreamEventStore
from proto import api, binding
from proto import events as ev
from proto.events import EventData
from tests.conftest import Bus
from twin.adapters.nats_api import NatsApiServer
from twin.api import ApiConfig, TwinApi
from twin.memory import InMemoryTwinStore
from twinhub_cli.devservices import NatsServer
from twinhub_client import OutcomeTimeoutError, TwinhubClient
from twinhub_client.subscription import EventSubscription

pytestmark = pytest.mark.servers

CLOSE_BOUND = 1.5  # a close takes milliseconds; the rest is slack for a shared 2-core machine
# What a close may spend waiting on a server that does not answer.
CLOSE_TIMEOUT: float = inspect.signature(EventSubscription).parameters["close_timeout"].default
SUBSCRIPTIONS = 24
ROUNDS = 4


def _new_owner() -> str:
    return "o" + uuid.uuid4().hex[:10]


@contextlib.asynccontextmanager
async def _steady_stream(
    store: JetStreamEventStore, owner: str, device: str, data: Any
) -> AsyncIterator[None]:
    """Appends a few events every few milliseconds until the block ends."""

    async def run() -> None:
        while True:
            batch = [
                binding.to_nats(
                    ev.Event(
                        owner=owner,
                        device_id=device,
                        data=data(),
                        source="/test/stream",
                        correlation_id=str(uuid.uuid4()),
                    )
                )
                for _ in range(4)
            ]
            await store.append(batch)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(run(), name="steady-stream")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _reap(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel until they are done (a task that lost a cancellation gets another)."""
    for t in tasks:
        while not t.done():
            t.cancel()
            await asyncio.wait([t], timeout=0.5)


def _client(bus: Bus, owner: str) -> TwinhubClient:
    """An application of ``owner``, admitted by the session's auth callout."""
    return TwinhubClient(bus.url, bus.token(owner))


async def _consumer_info(nc: NatsClient, name: str) -> dict[str, Any] | None:
    msg = await nc.request(f"$JS.API.CONSUMER.INFO.TWINHUB_EVENTS.{name}", b"", timeout=5)
    resp: dict[str, Any] = json.loads(msg.data)
    return None if "error" in resp else resp


@pytest.fixture
async def store(bus: Bus) -> AsyncIterator[JetStreamEventStore]:
    """The log (admin: the test appends as a gateway would), and the command API on its
    production subjects (the client asks it who it is: ``session``)."""
    async with (
        JetStreamEventStore.from_url(bus.admin) as s,
        JetStreamEventStore.from_url(bus.endpoint("twin")) as twin,
    ):
        await twin.provision()
        twin_api = TwinApi(
            twin, InMemoryTwinStore(), bus.validator(), ApiConfig(consumer_secret=os.urandom(32))
        )
        async with NatsApiServer(twin.connection, twin_api):
            yield s


async def _cancel_mid_stream(c: TwinhubClient, owner: str, start: int, names: list[str]) -> float:
    """One round: subscriptions receiving the stream, all cancelled at once; the slowest end."""
    received = [0] * SUBSCRIPTIONS
    ended: dict[int, float] = {}

    async def consume(i: int) -> None:
        sub = c.subscribe(owner, from_position=start, batch=16)
        names.append(sub.name)
        async with sub:
            async for _ in sub:
                received[i] += 1

    tasks = [asyncio.create_task(consume(i), name=f"sub-{i}") for i in range(SUBSCRIPTIONS)]
    try:
        async with asyncio.timeout(30):
            while min(received) < 20:
                await asyncio.sleep(0.01)
        t0 = time.monotonic()
        for i, t in enumerate(tasks):
            t.add_done_callback(lambda _, i=i: ended.setdefault(i, time.monotonic()))
            t.cancel()
        await asyncio.wait(tasks, timeout=CLOSE_BOUND * 4)
        late = [tasks[i].get_name() for i in range(SUBSCRIPTIONS) if i not in ended]
        assert not late, f"still running {CLOSE_BOUND * 4}s after cancel: {late}"
        assert all(t.cancelled() for t in tasks)
        return max(ended.values()) - t0
    finally:
        await _reap(tasks)


async def test_cancelling_subscriptions_mid_stream_ends_them_promptly(
    store: JetStreamEventStore, bus: Bus, nats_client: NatsClient
) -> None:
    owner, device = _new_owner(), "dev-" + uuid.uuid4().hex[:8]
    start = await store.last_position()
    changed = lambda: ev.ResourceChanged(href="/n", content={"v": 1})  # noqa: E731
    names: list[str] = []
    async with _client(bus, owner) as c, _steady_stream(store, owner, device, changed):
        slowest = max([await _cancel_mid_stream(c, owner, start, names) for _ in range(ROUNDS)])
    assert slowest < CLOSE_BOUND, f"slowest close after cancel: {slowest:.2f}s"
    for name in names:  # temporary consumers are gone
        assert await _consumer_info(nats_client, name) is None, name


async def test_wait_outcome_times_out_promptly_while_other_outcomes_stream(
    store: JetStreamEventStore, bus: Bus
) -> None:
    owner, device = _new_owner(), "dev-" + uuid.uuid4().hex[:8]
    start = await store.last_position()
    other = lambda: ev.CommandSucceeded(href="/light", status="2.04")  # noqa: E731
    timeout = 0.5
    async with _client(bus, owner) as c, _steady_stream(store, owner, device, other):
        for _ in range(ROUNDS):
            accepted = [
                api.CommandAccepted(
                    correlation_id=str(uuid.uuid4()),
                    device_id=device,
                    href="/light",
                    position=start,
                    expires_at="2100-01-01T00:00:00Z",
                )
                for _ in range(SUBSCRIPTIONS)
            ]
            tasks = [
                asyncio.create_task(c.wait_outcome(a, timeout), name=f"wait-{i}")
                for i, a in enumerate(accepted)
            ]
            try:
                t0 = time.monotonic()
                done, pending = await asyncio.wait(tasks, timeout=timeout + CLOSE_BOUND * 4)
                assert not pending, f"{len(pending)} of {SUBSCRIPTIONS} never timed out"
                took = time.monotonic() - t0
                for t in done:
                    assert isinstance(t.exception(), OutcomeTimeoutError)
                assert took < timeout + CLOSE_BOUND, f"wait_outcome({timeout}) took {took:.2f}s"
            finally:
                await _reap(tasks)


async def _opened_with_one_event(sub: EventSubscription) -> EventSubscription:
    await sub.open()
    async with asyncio.timeout(10):
        await anext(sub)  # handed out, not yet acknowledged: close acknowledges it
    return sub


async def test_closing_while_nats_is_down_is_bounded_and_leaks_nothing(
    store: JetStreamEventStore, bus: Bus, nats_server: NatsServer, nats_client: NatsClient
) -> None:
    owner, device = _new_owner(), "dev-" + uuid.uuid4().hex[:8]
    start = await store.last_position()
    data: EventData = ev.ResourceChanged(href="/n", content={"v": 1})
    await store.append(
        [binding.to_nats(ev.Event(owner=owner, device_id=device, data=data, source="/t"))]
    )
    durable = f"keep-{owner}"
    tasks_before = len(asyncio.all_tasks())
    c = _client(bus, owner)
    await c.__aenter__()
    try:
        subs = [c.subscribe(owner, from_position=start) for _ in range(5)]
        subs.append(c.subscribe(owner, from_position=start, durable=durable))
        await asyncio.gather(*(_opened_with_one_event(s) for s in subs))
        temporary = [s.name for s in subs if not s.durable]
        (durable,) = [s.name for s in subs if s.durable]  # its consumer name (app_<hmac>)

        await nats_server.stop()
        try:
            t0 = time.monotonic()
            async with asyncio.timeout(60):
                await asyncio.gather(*(s.close() for s in subs))
            closed_in = time.monotonic() - t0
        finally:
            await nats_server.start()
        bound = CLOSE_TIMEOUT + CLOSE_BOUND
        assert closed_in < bound, f"closing with NATS down took {closed_in:.2f}s"
    finally:
        await c.aclose()
    assert len(asyncio.all_tasks()) <= tasks_before, "tasks left behind"

    info = await _consumer_info(nats_client, durable)  # the durable consumer stays, unexpiring
    assert info is not None
    assert not info["config"].get("inactive_threshold")
    for name in temporary:  # not deleted (NATS was down), but the server expires them
        info = await _consumer_info(nats_client, name)
        if info is not None:
            assert 0 < info["config"]["inactive_threshold"] <= 300 * 1_000_000_000
    await store.delete_consumer(durable)
