"""The twin store's command and desired-state additions, on the in-memory adapter and on
MongoDB (FerretDB): round trip of awkward content, ``due`` (the sweeper's query) and
``find(has_pending=...)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from proto import events as ev
from proto.events import AnyEvent, EventData
from twin.adapters.mongo import MongoTwinStore
from twin.fold import fold_all, fold_batch
from twin.memory import InMemoryTwinStore
from twin.model import COMMAND_MEMORY, SENT_GRACE, EndedCommand, Twin
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


def cmd(pos: int, device: str, cid: str, expires: int = 500) -> AnyEvent:
    data = ev.CommandPending(
        href="/x.y", op="update", content={"n": pos}, expires_at=T0 + timedelta(seconds=expires)
    )
    return e(data, pos, device, cid)


def sent(pos: int, device: str, cid: str, attempt: int = 1) -> AnyEvent:
    data = ev.CommandSent(href="/x.y", gateway="g", connection_id="k", attempt=attempt)
    return e(data, pos, device, cid)


def done(pos: int, device: str, cid: str) -> AnyEvent:
    return e(ev.CommandSucceeded(href="/x.y", status="2.04"), pos, device, cid)


async def test_open_commands_follow_the_twin_with_or_without_previous(store: TwinStore) -> None:
    v1 = fold_all(
        None, [e(ev.DeviceRegistered(), 1, "d"), *(cmd(10 + i, "d", f"c{i}") for i in range(3))]
    )
    assert v1 is not None
    await store.write_many([v1], previous={"d": None})
    assert await store.get("d") == v1
    v2 = fold_all(v1, [done(20, "d", "c0"), sent(21, "d", "c1"), cmd(22, "d", "c3")])
    assert v2 is not None
    await store.write_many([v2], previous={"d": v1})  # only what changed
    assert await store.get("d") == v2
    assert [c.correlation_id for c in v2.pending] == ["c1", "c2", "c3"]
    v3 = fold_all(v2, [done(30, "d", "c1"), done(31, "d", "c3")])
    assert v3 is not None
    await store.write_many([v3])  # no previous: compared with what is stored
    got = await store.get("d")
    assert got == v3
    assert [c.correlation_id for c in got.pending] == ["c2"]
    assert (await store.get_many(["d"]))["d"] == v3
    assert [t.device_id for t in await store.find(has_pending=True)] == ["d"]


async def test_get_for_command_reads_at_most_that_command(store: TwinStore) -> None:
    t = fold_all(
        None, [e(ev.DeviceRegistered(), 1, "d"), *(cmd(10 + i, "d", f"c{i}") for i in range(50))]
    )
    assert t is not None
    await store.write_many([t])
    one = await store.get_for_command("d", "c7")
    assert one is not None
    assert [c.correlation_id for c in one.pending] == ["c7"]
    assert one.pending[0] == t.command("c7")
    assert one.owner == t.owner and one.position == t.position
    none = await store.get_for_command("d", "nope")
    assert none is not None and none.pending == ()
    assert await store.get_for_command("unknown", "c7") is None


async def test_mongo_keeps_each_open_command_in_its_own_document(
    mongo_db: AsyncDatabase[Any],
) -> None:
    store = MongoTwinStore(mongo_db, "split")
    await store.ensure_indexes()
    t = twin_with("d1", 100, 200)
    await store.write_many([t])
    raw = await mongo_db.split.find_one({"_id": "d1"})
    assert raw is not None
    assert "pending" not in raw and raw["pending_count"] == 2
    docs = await mongo_db.split_commands.find().sort("position").to_list()
    assert [(d["device_id"], d["correlation_id"], d["state"]) for d in docs] == [
        ("d1", "c0", "pending"),
        ("d1", "c1", "pending"),
    ]
    assert docs[0]["content"] is None and "content_json" in docs[0]  # not BSON-safe: as text
    await store.drop()
    assert await mongo_db.split_commands.count_documents({}) == 0


async def test_a_write_cut_short_after_the_commands_is_repaired_by_replay(
    mongo_db: AsyncDatabase[Any],
) -> None:
    """The store writes a twin's commands before the twin: a crash in between leaves commands
    ahead of their twin. The projector then replays the events after the twin's position onto
    what it reads; the open commands come out as if nothing had happened, with no stale one.
    (Only ``recent_outcomes`` may miss a command that ended in the cut-short write: its
    command document was gone when the replay ended it again. The log has the outcome.)"""
    store = MongoTwinStore(mongo_db, "torn")
    log = [e(ev.DeviceRegistered(), 1, "d"), cmd(10, "d", "a"), cmd(11, "d", "b")]
    v1 = fold_all(None, log)
    assert v1 is not None
    await store.write_many([v1], previous={"d": None})
    later = [sent(20, "d", "a"), done(21, "d", "b"), cmd(22, "d", "c"), sent(23, "d", "c")]
    v2 = fold_all(v1, later)
    assert v2 is not None
    await store._write_commands([v2], {"d": v1})  # the crash: commands written, twin not
    read = await store.get("d")
    assert read is not None and read.position == v1.position
    replayed = fold_all(read, later)  # what the projector does after a restart
    assert replayed is not None
    await store.write_many([replayed], previous={"d": read})
    repaired = await store.get("d")
    assert repaired is not None
    assert repaired.pending == v2.pending and repaired.position == v2.position
    assert replace(repaired, recent_outcomes=v2.recent_outcomes) == v2
    v3 = fold_all(v2, [done(30, "d", "a"), done(31, "d", "c")])
    assert v3 is not None
    await store.write_many([v3], previous={"d": v2})
    final = await store.get("d")
    assert final is not None and final.pending == ()
    assert await mongo_db.torn_commands.count_documents({}) == 0


def ended_in(before: Twin, *events: AnyEvent) -> tuple[Twin, dict[str, list[EndedCommand]]]:
    """What the projector writes: the folded twin and the commands the batch ended."""
    folded = fold_batch({before.device_id: before}, events)
    return folded.twins[before.device_id], folded.ended


async def test_ended_commands_are_remembered_until_forgotten(mongo_db: AsyncDatabase[Any]) -> None:
    for store in (
        InMemoryTwinStore(command_memory=timedelta(hours=2)),
        MongoTwinStore(mongo_db, "mem", command_memory=timedelta(hours=2)),
    ):
        await store.ensure_indexes()
        v1 = twin_with("d", 500, 600)  # c0, c1 open, awkward content
        await store.write_many([v1])
        assert await store.ended_command("d", "c0") is None
        # c1 ends; c2 opens and ends within the same batch (never stored open)
        v2, ended = ended_in(v1, done(100, "d", "c1"), cmd(101, "d", "c2"), done(102, "d", "c2"))
        assert [e.command.correlation_id for e in ended["d"]] == ["c1", "c2"]
        await store.write_many([v2], previous={"d": v1}, ended=ended)
        c1 = await store.ended_command("d", "c1")
        assert c1 is not None
        assert c1.command == v1.command("c1")
        assert c1.command.content == {"a.b": {"$c": 2**70}}  # stored as text, read back
        assert c1.outcome == v2.recent_outcomes[0] and c1.outcome.state == "succeeded"
        assert c1.forget_at == T0 + timedelta(seconds=100, hours=2)
        c2 = await store.ended_command("d", "c2")
        assert c2 is not None and c2.command.position == 101 and c2.outcome.position == 102
        assert await store.ended_command("other", "c1") is None
        # a stale write (a replay) writes nothing, its ended commands neither
        stale, again = ended_in(v1, done(100, "d", "c0"))
        assert (await store.write_many([stale], ended=again)).skipped == ("d",)
        assert await store.ended_command("d", "c0") is None
        # the id used again later (a new command): the newest one is remembered
        v3, ended = ended_in(v2, cmd(200, "d", "c1"), done(201, "d", "c1"))
        await store.write_many([v3], ended=ended)
        newest = await store.ended_command("d", "c1")
        assert newest is not None and newest.command.position == 200
        assert await store.forget_ended(T0 + timedelta(seconds=101, hours=2)) == 0
        assert await store.forget_ended(T0 + timedelta(seconds=102, hours=2)) == 1  # c2
        assert await store.ended_command("d", "c2") is None
        assert await store.ended_command("d", "c1") is not None
        await store.drop()
        assert await store.ended_command("d", "c1") is None


async def test_mongo_keeps_ended_commands_apart_indexed_by_forget_at(
    mongo_db: AsyncDatabase[Any],
) -> None:
    store = MongoTwinStore(mongo_db, "apart")
    await store.ensure_indexes()
    await store.ensure_indexes()
    v1 = twin_with("d1", 100)
    v2, ended = ended_in(v1, done(95, "d1", "c0"))
    await store.write_many([v1])
    await store.write_many([v2], ended=ended)
    (doc,) = await mongo_db.apart_ended.find().to_list()
    assert doc["_id"] == '["d1","c0"]' and doc["device_id"] == "d1"
    assert doc["forget_at"] == T0 + timedelta(seconds=95) + COMMAND_MEMORY
    assert await mongo_db.apart_commands.count_documents({}) == 0
    names = {i["name"] async for i in await mongo_db.apart_ended.list_indexes()}
    assert "forget_at" in names
