"""The twin store's command and desired-state additions, on the in-memory adapter and on
MongoDB (FerretDB): round trip of awkward content, ``due`` (the sweeper's query) and
``find(has_pending=...)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from proto import events as ev
from proto.events import AnyEvent, EventData
from twin.adapters.mongo import MongoTwinStore
from twin.fold import fold_all
from twin.memory import InMemoryTwinStore
from twin.model import SENT_GRACE, Twin
from twin.ports import TwinStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def e(data: EventData, pos: int, device: str, cid: str | None = None) -> AnyEvent:
    return ev.Event(
        owner="alice",
        device_id=device,
        data=data,
        source="/t",
        time=T0 + timedelta(seconds=pos),
        correlation_id=cid,
        position=pos,
    )


def twin_with(device: str, *deadlines: int, sent: bool = False) -> Twin:
    events = [e(ev.DeviceRegistered(), 1, device)]
    for i, s in enumerate(deadlines):
        data = ev.CommandPending(
            href="/x.y",
            op="update",
            content={"a.b": {"$c": 2**70}},  # not storable as BSON: kept as JSON text
            expires_at=T0 + timedelta(seconds=s),
        )
        events.append(e(data, 10 + i, device, f"c{i}"))
        if sent:
            sent_ev = ev.CommandSent(href="/x.y", gateway="g", connection_id="k")
            events.append(e(sent_ev, 50 + i, device, f"c{i}"))
    events.append(e(ev.DesiredSet(href="/x.y", content={"k.1": True}, version=1), 90, device))
    twin = fold_all(None, events)
    assert twin is not None
    return twin


@pytest.fixture(params=["memory", "mongo"])
async def store(
    request: pytest.FixtureRequest, mongo_db: AsyncDatabase[Any]
) -> AsyncIterator[TwinStore]:
    if request.param == "memory":
        yield InMemoryTwinStore()
        return
    s = MongoTwinStore(mongo_db)
    await s.ensure_indexes()
    yield s


async def test_round_trip_of_commands_and_desired(store: TwinStore) -> None:
    t = twin_with("d1", 100, 200, sent=True)
    await store.write_many([t])
    assert await store.get("d1") == t
    stored = await store.get("d1")
    assert stored is not None
    assert stored.pending[0].content == {"a.b": {"$c": 2**70}}
    assert stored.delta() == {"/x.y": {"k.1": True}}


async def test_due_and_has_pending(store: TwinStore) -> None:
    await store.write_many(
        [
            twin_with("early", 100),
            twin_with("late", 300),
            twin_with("none"),
            twin_with("sent", 200, sent=True),
        ]
    )
    assert [t.device_id for t in await store.due(T0 + timedelta(seconds=99))] == []
    assert [t.device_id for t in await store.due(T0 + timedelta(seconds=150))] == ["early"]
    assert [t.device_id for t in await store.due(T0 + timedelta(seconds=210))] == ["early"]
    later = T0 + timedelta(seconds=200) + SENT_GRACE  # a sent command gets the grace
    assert [t.device_id for t in await store.due(later)] == ["early", "sent"]  # by deadline
    assert [t.device_id for t in await store.due(later, limit=1)] == ["early"]
    with_pending = await store.find(owner="alice", has_pending=True)
    assert [t.device_id for t in with_pending] == ["early", "late", "sent"]
    assert [t.device_id for t in await store.find(has_pending=False)] == ["none"]
