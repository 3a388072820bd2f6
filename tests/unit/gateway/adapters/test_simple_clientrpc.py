"""The effects of client-side RPC (:class:`gateway.adapters.simple_clientrpc.ClientRpc`) over
the in-memory log: subscribe, append the request (with what goes before it), wait for its
answer or the timeout; the refusals (no slot, no subscription, the append refused)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from eventstore.errors import UnavailableError
from eventstore.memory import InMemoryEventStore, InMemoryNotifier
from gateway.adapters.simple_clientrpc import ClientRpc
from gateway.simple import Append, Reply
from gateway.simpleclientrpc import CallServer
from proto import binding, subjects
from proto.events import AnyEvent, Event, RpcAnswered, RpcRequested, TelemetryReported

CALL = CallServer("alice", "dev-1", "getTime", {"tz": "UTC"}, 50)


class Writer:
    """Appends as the server does (2.01 once written), or answers ``refuse``."""

    def __init__(self, store: InMemoryEventStore, refuse: str | None = None) -> None:
        self.store, self.refuse = store, refuse

    async def __call__(self, append: Append) -> Reply:
        if self.refuse is not None:
            return Reply(self.refuse)
        await self.store.append([binding.to_nats(e) for e in append.events])
        return Reply("2.01")


def rpc(store: InMemoryEventStore, *, refuse: str | None = None, **kw: Any) -> ClientRpc:
    ids = iter(f"rid-{i}" for i in range(1, 100))
    return ClientRpc(
        store,
        Writer(store, refuse),
        source="/gateway/gw",
        new_id=lambda: next(ids),
        **kw,
    )


async def provisioned(store: InMemoryEventStore) -> InMemoryEventStore:
    await store.provision()
    return store


async def events(store: InMemoryEventStore, kind: str) -> list[AnyEvent]:
    flt = subjects.event_filter("alice", "dev-1", kind)
    return [binding.from_stored(m) async for m in store.read(flt)]


async def requested(store: InMemoryEventStore) -> AnyEvent:
    async with asyncio.timeout(5):
        while not (found := await events(store, "rpc-requested")):
            await asyncio.sleep(0.01)
    return found[0]


async def test_the_answer_to_the_request_is_the_reply() -> None:
    store = await provisioned(InMemoryEventStore())
    c = rpc(store, timeout=10.0)
    before: AnyEvent = Event(
        owner="alice", device_id="dev-1", data=TelemetryReported(values={"a": 1}), source="/g"
    )
    written: list[bool] = []
    task = asyncio.create_task(c.call(CALL, (before,), written.append))
    req = await requested(store)
    assert isinstance(req.data, RpcRequested) and req.data.request_id == "rid-1"
    assert req.data.timeout_ms == 10_000 and written == [True]
    assert len(await events(store, "telemetry-reported")) == 1  # appended with the request
    assert c.waiting == 1
    for rid, result in (("rid-other", "no"), ("rid-1", {"time": 5})):
        answer: AnyEvent = Event(
            owner="alice",
            device_id="dev-1",
            data=RpcAnswered(request_id=rid, result=result),
            source="/api",
        )
        await store.append([binding.to_nats(answer)])
    got = await asyncio.wait_for(task, 5)
    assert got == Reply("2.05", b'{"time":5}', 50)
    assert (c.waiting, c.answered, c.timed_out) == (0, 1, 0)


async def test_no_answer_in_time_is_504() -> None:
    store = await provisioned(InMemoryEventStore())
    c = rpc(store, timeout=0.2)
    assert await asyncio.wait_for(c.call(CALL), 5) == Reply("5.04")
    assert (c.waiting, c.timed_out) == (0, 1)


async def test_a_refused_append_is_the_reply_and_nothing_waits() -> None:
    store = await provisioned(InMemoryEventStore())
    c = rpc(store, refuse="5.03", timeout=10.0)
    written: list[bool] = []
    assert await asyncio.wait_for(c.call(CALL, (), written.append), 5) == Reply("5.03")
    assert written == [False] and c.waiting == 0


async def test_past_max_waits_is_503() -> None:
    store = await provisioned(InMemoryEventStore())
    c = rpc(store, timeout=10.0, max_waits=1)
    first = asyncio.create_task(c.call(CALL))
    await requested(store)
    written: list[bool] = []
    assert await c.call(CALL, (), written.append) == Reply("5.03")
    assert written == [False] and len(await events(store, "rpc-requested")) == 1
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert c.waiting == 0  # a cancelled wait gives its slot back


class NoSubscriptions(InMemoryEventStore):
    async def notifier(self, filters: Sequence[str]) -> InMemoryNotifier:
        raise UnavailableError("no NATS")


async def test_no_subscription_is_503_and_nothing_is_requested() -> None:
    store = await provisioned(NoSubscriptions())
    c = rpc(store, timeout=10.0)
    assert await c.call(CALL) == Reply("5.03")
    assert await events(store, "rpc-requested") == []


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        rpc(InMemoryEventStore(), timeout=0.0)
