"""Which devices a gateway instance holds, on MongoDB (FerretDB) and on the in-memory store:
:class:`twin.adapters.mongo_held.MongoHeldConnections` and :class:`twin.reaper.StoreConnections`
give the same answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from proto import events as ev
from proto.events import AnyEvent, EventData
from proto.leases import connection_id
from twin.adapters.mongo import MongoTwinStore
from twin.adapters.mongo_held import MongoHeldConnections
from twin.fold import fold_all
from twin.gateways import HeldConnection, HeldConnections
from twin.memory import InMemoryTwinStore
from twin.model import Twin
from twin.reaper import StoreConnections

T0 = datetime(2026, 3, 1, tzinfo=UTC)
A, B = "a1a1a1a1a1a1a1a1", "b2b2b2b2b2b2b2b2"


def twin(device: str, *steps: EventData, owner: str = "alice") -> Twin:
    events: list[AnyEvent] = [
        ev.Event(
            owner=owner,
            device_id=device,
            data=d,
            source="/t",
            time=T0 + timedelta(seconds=i),
            position=i,
        )
        for i, d in enumerate((ev.DeviceRegistered(), *steps), start=1)
    ]
    t = fold_all(None, events)
    assert t is not None
    return t


def on(gateway: str, cid: str) -> ev.DeviceOnline:
    return ev.DeviceOnline(gateway=gateway, connection_id=cid, remote_address="10.0.0.1:1")


def off(gateway: str, cid: str) -> ev.DeviceOffline:
    return ev.DeviceOffline(gateway=gateway, connection_id=cid)


TWINS = (
    twin("d1", on("gw", connection_id(A, "c1"))),
    twin("d2", on("gw", connection_id(A, "c2")), owner="bob"),
    twin("d3", on("gw", connection_id(B, "c3"))),  # the next run of the same gateway id
    twin("d4", on("gw", connection_id(A, "c4")), off("gw", connection_id(A, "c4"))),
    twin("d5", on("gw-2", connection_id(A, "c5"))),  # another gateway (ids are random anyway)
    twin("d6", on("gw", "c6")),  # a gateway from before leases
    twin("d7", on("gw", f"{A}x.c7")),  # a prefix of another instance id
    twin("d8"),  # never connected
)


async def collect(held: HeldConnections, gateway: str, instance: str) -> list[HeldConnection]:
    return sorted([h async for h in held.held_by(gateway, instance)], key=lambda h: h.device_id)


async def test_the_devices_online_on_an_instance_memory() -> None:
    store = InMemoryTwinStore()
    await store.write_many(TWINS)
    await check(StoreConnections(store, page=3))


async def test_the_devices_online_on_an_instance_mongo(
    mongo_db: AsyncDatabase[dict[str, Any]],
) -> None:
    store = MongoTwinStore(mongo_db)
    await store.ensure_indexes()
    held = MongoHeldConnections(mongo_db)
    await held.ensure_indexes()
    await held.ensure_indexes()  # idempotent
    await store.write_many(TWINS)
    await check(held)


async def check(held: HeldConnections) -> None:
    assert await collect(held, "gw", A) == [
        HeldConnection("d1", "alice", connection_id(A, "c1")),
        HeldConnection("d2", "bob", connection_id(A, "c2")),
    ]
    assert await collect(held, "gw", B) == [HeldConnection("d3", "alice", connection_id(B, "c3"))]
    assert await collect(held, "gw-2", A) == [HeldConnection("d5", "alice", connection_id(A, "c5"))]
    assert await collect(held, "gw", "c0c0c0c0c0c0c0c0") == []
    assert await collect(held, "gw-3", A) == []
