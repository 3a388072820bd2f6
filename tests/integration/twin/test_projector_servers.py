"""The projector end to end on real servers: events appended to JetStream (through the event
store adapter), folded into twins in MongoDB (FerretDB, or ``$TWINHUB_TEST_MONGO_URL``).

Each test has its own stream on its own subject root (other suites may hold a stream on
``twinhub.ev.>``), and its own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.layout import StreamLayout
from proto import binding, subjects
from proto import events as ev
from proto.events import AnyEvent, EventData
from proto.message import NatsMessage
from twin.adapters.mongo import MongoTwinStore
from twin.fold import fold_all
from twin.model import Twin
from twin.rebuild import rebuild_beside
from twin.service import ProjectorConfig, ProjectorHooks, TwinProjector, rebuild
from twinhub_cli.devservices import MongoServer, NatsServer

pytestmark = pytest.mark.servers

T0 = datetime(2026, 3, 1, tzinfo=UTC)
WAIT = 30.0
Doc = dict[str, Any]


class SimulatedCrash(Exception):
    pass


class Log:
    """A JetStream event store on a private stream and subject root."""

    def __init__(self, store: JetStreamEventStore, root: str) -> None:
        self.store = store
        self.root = root
        self.everything = f"{root}.>"

    async def append(self, events: Sequence[AnyEvent]) -> list[AnyEvent]:
        """Append the events (in order, one device at a time); returns them as logged."""
        out: list[AnyEvent] = []
        for e in events:
            msg = binding.to_nats(e)
            moved = NatsMessage(
                subject=self.root + msg.subject.removeprefix(subjects.PREFIX),
                msg_id=msg.msg_id,
                data=msg.data,
                headers=msg.headers,
            )
            result = await self.store.append([moved])
            out.append(e.at(result.last_position))
        return out

    def config(self, **kw: Any) -> ProjectorConfig:
        return ProjectorConfig(filter_subject=self.everything, **kw)


@pytest.fixture
async def log(nats_admin: NatsEndpoint) -> AsyncIterator[Log]:
    hexid = uuid.uuid4().hex[:12]
    root = f"tw{hexid}.ev"
    layout = StreamLayout(name=f"TWIN_{hexid}", subjects=(f"{root}.>",))
    async with JetStreamEventStore.from_url(nats_admin, layout) as js:
        await js.provision()
        try:
            yield Log(js, root)
        finally:
            await js.connection.request(f"$JS.API.STREAM.DELETE.{layout.name}", b"", timeout=5)


@pytest.fixture
async def store(mongo_db: AsyncDatabase[Doc]) -> MongoTwinStore:
    store = MongoTwinStore(mongo_db)
    await store.ensure_indexes()
    return store


def device_life(device: str, updates: int, seed: int) -> list[AnyEvent]:
    """Sign-up, sign-in, links, then ``updates`` resource changes, reconnects on the way."""
    rnd = random.Random(seed)
    t = T0

    def e(data: EventData, correlation_id: str | None = None) -> AnyEvent:
        nonlocal t
        t += timedelta(milliseconds=rnd.randint(1, 5000))
        return ev.Event(
            owner="alice",
            device_id=device,
            data=data,
            source="/gw/1",
            time=t,
            correlation_id=correlation_id,
        )

    conn = f"{device}-c0"
    out = [
        e(ev.DeviceRegistered()),
        e(ev.DeviceOnline(gateway="gw-1", connection_id=conn, remote_address="127.0.0.1:1")),
        e(
            ev.ResourceLinksPublished(
                links=(
                    ev.ResourceLink(href="/light.1", rt=("oic.r.switch.binary",)),
                    ev.ResourceLink(href="/oic/d", rt=("oic.wk.d",)),
                )
            )
        ),
        e(ev.TwinSyncStateChanged(state="in_sync", connection_id=conn)),
    ]
    for i in range(updates):
        roll = rnd.random()
        if roll < 0.05:
            old, conn = conn, f"{device}-c{i + 1}"
            out.append(e(ev.DeviceOnline(gateway="gw-2", connection_id=conn, remote_address="x")))
            out.append(e(ev.DeviceOffline(gateway="gw-1", connection_id=old)))  # late, ignored
        else:
            href = "/light.1" if roll < 0.6 else "/oic/d"
            content = {"value": i, "a.b": {"$k": i}} if i % 7 == 0 else {"value": i}
            out.append(e(ev.ResourceChanged(href=href, content=content, content_format=10000)))
        if i % 5 == 1:  # a command, which ends two updates later (the last may stay open)
            pending = ev.CommandPending(
                href="/light.1",
                op="update",
                content={"value": i},
                expires_at=T0 + timedelta(days=9),
            )
            out.append(e(pending, f"{device}-cmd-{i}"))
        elif i % 5 == 3:
            done = ev.CommandSucceeded(href="/light.1", status="2.04")
            out.append(e(done, f"{device}-cmd-{i - 2}"))
    last = ev.CommandPending(
        href="/oic/d", op="retrieve", content=None, expires_at=T0 + timedelta(days=9)
    )
    out.append(e(last, f"{device}-open"))
    return out


def interleave(lives: Sequence[Sequence[AnyEvent]], seed: int) -> list[AnyEvent]:
    """One log of many devices: each device's order kept, devices mixed at random."""
    rnd = random.Random(seed)
    queues = [list(reversed(life)) for life in lives]
    out: list[AnyEvent] = []
    while any(queues):
        q = rnd.choice([q for q in queues if q])
        out.append(q.pop())
    return out


def expected(logged: Sequence[AnyEvent]) -> dict[str, Twin]:
    out: dict[str, Twin] = {}
    for device in sorted({e.device_id for e in logged}):
        twin = fold_all(None, [e for e in logged if e.device_id == device])
        assert twin is not None
        out[device] = twin
    return out


async def all_twins(store: MongoTwinStore) -> dict[str, Twin]:
    return {t.device_id: t for t in await store.find(include_deleted=True, limit=10_000)}


def last_position(logged: Sequence[AnyEvent]) -> int:
    assert logged[-1].position is not None
    return logged[-1].position


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {WAIT}s")
        await asyncio.sleep(0.02)


async def test_live_projection_holds_exactly_the_last_values(
    log: Log, store: MongoTwinStore
) -> None:
    lives = [device_life(f"dev-{i}", 40, seed=i) for i in range(8)]
    async with TwinProjector(store, log.store, log.config(batch_size=50)) as projector:
        logged = await log.append(interleave(lives, seed=1))
        await projector.wait_for_position(last_position(logged), WAIT)
        stats = projector.stats
    twins = await all_twins(store)
    assert twins == expected(logged)
    for life in lives:
        device = life[0].device_id
        last = [e.data for e in life if isinstance(e.data, ev.ResourceChanged)]
        for href in ("/light.1", "/oic/d"):
            res = twins[device].resource(href)
            assert res is not None
            assert res.content == [d.content for d in last if d.href == href][-1]
    assert stats.events_applied == len(logged)
    assert stats.duplicates_skipped == 0
    assert sum(t.version for t in twins.values()) == len(logged)
    assert [t.device_id for t in await store.find(online=True, resource_type="oic.wk.d")] == sorted(
        twins
    )


async def test_crash_after_write_before_ack_then_restarts(log: Log, store: MongoTwinStore) -> None:
    """A crash between the write and the ack, then a clean stop and a start mid-stream: every
    event is in the twins once (version == number of the device's events)."""
    lives = [device_life(f"dev-{i}", 30, seed=10 + i) for i in range(5)]
    events = interleave(lives, seed=2)
    config = log.config(batch_size=16, ack_wait=1.0, fetch_timeout=0.2)
    crashed: list[Sequence[int]] = []

    async def crash_on_third(positions: Sequence[int]) -> None:
        crashed.append(positions)
        if len(crashed) == 3:
            raise SimulatedCrash

    first = TwinProjector(
        store, log.store, config, hooks=ProjectorHooks(after_write=crash_on_third)
    )
    async with first:
        warm = await log.append(events[:1])  # once this is in, the rest goes to the consumer
        await first.wait_for_position(last_position(warm), WAIT)
        logged = warm + await log.append(events[1:60])
        with pytest.raises(SimulatedCrash):
            await first.join()
    unacked = crashed[-1]
    assert len(unacked) > 0
    written = await all_twins(store)
    assert max(t.position for t in written.values()) >= max(unacked)  # written, never acked

    logged += await log.append(events[60:100])
    async with TwinProjector(store, log.store, config) as second:
        await second.wait_for_position(last_position(logged), WAIT)
        # the unacknowledged batch comes back after ack_wait and is recognised
        await eventually(
            lambda: second.stats.duplicates_skipped >= len(unacked), "redelivery of the batch"
        )
    # a clean stop between batches, more events while nobody projects, then a restart
    logged += await log.append(events[100:])
    async with TwinProjector(store, log.store, config) as third:
        await third.wait_for_position(last_position(logged), WAIT)

    twins = await all_twins(store)
    assert twins == expected(logged)
    for device, twin in twins.items():
        assert twin.version == sum(1 for e in logged if e.device_id == device)


async def test_cancelled_at_random_points_while_events_stream_in(
    log: Log, store: MongoTwinStore
) -> None:
    """Stop and start the projector again and again while a writer appends: cancellation lands
    anywhere (fetching, writing, acknowledging). Nothing is lost, nothing counted twice."""
    lives = [device_life(f"dev-{i}", 25, seed=20 + i) for i in range(6)]
    events = interleave(lives, seed=3)
    config = log.config(batch_size=8, ack_wait=1.0, fetch_timeout=0.1)
    logged: list[AnyEvent] = []
    done = asyncio.Event()

    async def writer() -> None:
        for i in range(0, len(events), 5):
            logged.extend(await log.append(events[i : i + 5]))
            await asyncio.sleep(0)  # let the projector interleave
        done.set()

    rnd = random.Random(4)
    starts = 0
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer(), name="writer")
        while not done.is_set() or starts < 6:
            starts += 1
            async with TwinProjector(store, log.store, config) as projector:
                target = projector.position + rnd.randint(1, 20)
                with contextlib.suppress(TimeoutError):  # the writer may be done: stop anyway
                    await projector.wait_for_position(target, 2.0)
    async with TwinProjector(store, log.store, config) as projector:
        await projector.wait_for_position(last_position(logged), WAIT)
    twins = await all_twins(store)
    assert twins == expected(logged)
    assert sum(t.version for t in twins.values()) == len(logged)


async def test_rebuild_yields_the_live_documents(
    log: Log, store: MongoTwinStore, mongo_db: AsyncDatabase[Doc]
) -> None:
    lives = [device_life(f"dev-{i}", 20, seed=30 + i) for i in range(4)]
    async with TwinProjector(
        store, log.store, log.config(batch_size=10, emit_derived_events=False)
    ) as projector:
        logged = await log.append(interleave(lives, seed=5))
        logged += await log.append(
            [ev.Event(owner="alice", device_id="dev-0", data=ev.DeviceUnregistered(), source="/s")]
        )
        await projector.wait_for_position(last_position(logged), WAIT)
    live = await mongo_db.twins.find().sort("_id").to_list()

    commands = await mongo_db.twins_commands.find().sort("_id").to_list()
    ended = await mongo_db.twins_ended.find().sort("_id").to_list()
    assert commands and ended  # open and ended commands to rebuild

    for i, max_twins in enumerate((50_000, 2)):  # each twin written once; or several flushes
        elsewhere = MongoTwinStore(mongo_db, f"rebuilt{i}")
        count = await rebuild(
            elsewhere,
            log.store,
            filter_subject=log.everything,
            batch_size=7,
            max_twins=max_twins,
        )
        assert count == len(logged)
        assert await mongo_db[f"rebuilt{i}"].find().sort("_id").to_list() == live
        assert await mongo_db[f"rebuilt{i}_commands"].find().sort("_id").to_list() == commands
        assert await mongo_db[f"rebuilt{i}_ended"].find().sort("_id").to_list() == ended

    count = await rebuild(store, log.store, filter_subject=log.everything, batch_size=500)
    assert count == len(logged)
    assert await mongo_db.twins.find().sort("_id").to_list() == live
    assert await store.checkpoint("twin-projector") == last_position(logged)
    assert await store.max_position() == last_position(logged)


async def test_rebuild_beside_the_live_projector_on_ferretdb(
    log: Log, store: MongoTwinStore, mongo_db: AsyncDatabase[Doc]
) -> None:
    """``twinhub twin rebuild`` while the twin service runs: generation 1 is built beside the
    live twins (readable throughout), activated, the projector moves to it and folds what came
    after the rebuild; generation 0's collections are dropped; the twins are what an offline
    rebuild of the whole log gives."""
    lives = [device_life(f"dev-{i}", 30, seed=60 + i) for i in range(4)]
    events = interleave(lives, seed=9)
    config = log.config(batch_size=10, emit_derived_events=False, generation_check_interval=0.05)
    async with TwinProjector(store, log.store, config) as projector:
        logged = await log.append(events[:60])
        await projector.wait_for_position(last_position(logged), WAIT)
        tool = MongoTwinStore(mongo_db)  # the CLI's own store
        await tool.resolve_generation()
        rebuilding = asyncio.create_task(
            rebuild_beside(
                tool, log.store, name="twin-projector", filter_subject=log.everything, grace=1.0
            )
        )
        readable = 0
        while not rebuilding.done():  # the live twins stay readable meanwhile
            readable += len(await store.find(limit=100))
            await asyncio.sleep(0)
        logged += await log.append(events[60:])
        generation, _ = await rebuilding
        assert generation == 1 and readable > 0
        await projector.wait_for_position(last_position(logged), WAIT)
        async with asyncio.timeout(WAIT):
            while store.generation != 1 or projector.position < last_position(logged):
                await asyncio.sleep(0.02)
    names = set(await mongo_db.list_collection_names())
    assert {"twins_g1", "twins_g1_checkpoints", "twins_catalog"} <= names
    assert not names & {"twins", "twins_checkpoints", "twins_commands", "twins_ended"}
    got = await mongo_db.twins_g1.find().sort("_id").to_list()
    offline = MongoTwinStore(mongo_db, "offline")
    await rebuild(offline, log.store, filter_subject=log.everything)
    assert got == await mongo_db.offline.find().sort("_id").to_list()
    assert await mongo_db.twins_g1_commands.find().sort("_id").to_list() == (
        await mongo_db.offline_commands.find().sort("_id").to_list()
    )
    reopened = MongoTwinStore(mongo_db)
    assert await reopened.resolve_generation() and reopened.generation == 1


async def test_survives_a_nats_restart(
    log: Log, store: MongoTwinStore, nats_server: NatsServer
) -> None:
    lives = [device_life(f"dev-{i}", 20, seed=40 + i) for i in range(3)]
    events = interleave(lives, seed=6)
    config = log.config(batch_size=10, fetch_timeout=0.2, retry_max=0.2)
    async with TwinProjector(store, log.store, config) as projector:
        logged = await log.append(events[:30])
        await projector.wait_for_position(last_position(logged), WAIT)
        await nats_server.stop()
        await eventually(lambda: projector.stats.log_failures > 0, "the projector noticing")
        await nats_server.start()
        logged += await log.append(events[30:])
        await projector.wait_for_position(last_position(logged), WAIT)
    assert await all_twins(store) == expected(logged)


async def test_survives_a_mongo_outage(log: Log, tmp_path: Path) -> None:
    """The store goes away mid-stream: batches are given back to the log and retried; once it
    is back, every event is in the twins exactly once."""
    lives = [device_life(f"dev-{i}", 20, seed=50 + i) for i in range(3)]
    events = interleave(lives, seed=7)
    config = log.config(batch_size=10, fetch_timeout=0.2, retry_max=0.2)
    async with MongoServer(tmp_path / "mongo") as mongo:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(
            mongo.url, serverSelectionTimeoutMS=500, tz_aware=True
        )
        try:
            store = MongoTwinStore(client.twinhub)
            await store.ensure_indexes()
            async with TwinProjector(store, log.store, config) as projector:
                logged = await log.append(events[:20])
                await projector.wait_for_position(last_position(logged), WAIT)
                await mongo.stop()
                logged += await log.append(events[20:40])
                await eventually(lambda: projector.stats.store_failures > 0, "a failed write")
                await mongo.start()
                logged += await log.append(events[40:])
                await projector.wait_for_position(last_position(logged), WAIT)
            twins = await all_twins(store)
        finally:
            await client.close()
    assert twins == expected(logged)
    assert sum(t.version for t in twins.values()) == len(logged)
