"""The gateway reaper (twin.reaper) on the in-memory log, lease stream and twin store, with
the projector folding what it appends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from eventstore.errors import ConcurrencyError, UnavailableError
from eventstore.layout import StreamLayout
from eventstore.memory import InMemoryEventStore
from gateway.lease import LeaseConfig, LeaseHolder, LeaseWrite
from proto import binding
from proto import events as ev
from proto.events import AnyEvent
from proto.leases import (
    ALL_LEASES,
    GATEWAY_LOST,
    LeaseEntry,
    LeaseState,
    connection_id,
    decode_entry,
)
from proto.message import NatsMessage
from twin.gateways import Cause, Claim, claim_record
from twin.memory import InMemoryTwinStore
from twin.model import Twin
from twin.reaper import GatewayReaper, ReaperConfig, StoreConnections
from twin.service import ProjectorConfig, TwinProjector

WAIT = 10.0
LEASE = 3.0
LEASES = StreamLayout(name="LEASES", subjects=(ALL_LEASES,), max_msgs_per_subject=1)
PROJECTOR = ProjectorConfig(name="p", batch_size=50, fetch_timeout=0.05)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class World:
    events: InMemoryEventStore
    leases: InMemoryEventStore
    twins: InMemoryTwinStore
    projector: TwinProjector
    clock: Clock = field(default_factory=Clock)

    def reaper(self, **kw: object) -> GatewayReaper:
        config = ReaperConfig(projector="p", catch_up_timeout=WAIT, **kw)  # type: ignore[arg-type]
        return GatewayReaper(
            self.leases,
            self.events,
            self.twins,
            StoreConnections(self.twins, page=2),
            config,
            clock=self.clock,
        )

    async def write(self, write: LeaseWrite) -> int:
        msg = NatsMessage(write.subject, write.msg_id, write.record.encode())
        result = await self.leases.append(
            [msg], expected_last=write.expected_last, scope=write.scope
        )
        return result.last_position

    async def gateway(self, gateway: str, instance: str) -> LeaseHolder:
        h = LeaseHolder(gateway, instance, LeaseConfig(lease=LEASE))
        w = h.acquire(0)
        h.written(w, await self.write(w), 0)
        return h

    async def renew(self, h: LeaseHolder) -> None:
        # the gateway's own clock does not matter to the reaper: always due
        later = (h.wake_at() or 0) + 1
        w = h.next_write(later)
        assert w is not None
        h.written(w, await self.write(w), later)

    async def append(self, *events: AnyEvent) -> int:
        result = await self.events.append([binding.to_nats(e) for e in events])
        return result.last_position

    async def connect(self, device: str, gateway: str, cid: str, owner: str = "alice") -> None:
        def e(data: ev.EventData) -> AnyEvent:
            return ev.Event(owner=owner, device_id=device, data=data, source=f"/gateway/{gateway}")

        await self.append(
            e(ev.DeviceRegistered()),
            e(ev.DeviceOnline(gateway=gateway, connection_id=cid, remote_address="10.0.0.1:1")),
        )

    async def settled(self) -> None:
        await self.projector.wait_for_position(await self.events.last_position(), WAIT)

    async def twin(self, device: str) -> Twin:
        await self.settled()
        t = await self.twins.get(device)
        assert t is not None
        return t

    async def offlines(self, device: str) -> list[AnyEvent]:
        return [
            binding.from_stored(m)
            async for m in self.events.read(f"twinhub.ev.*.{device}.device-offline.>")
        ]

    async def lease_state(self, gateway: str, instance: str) -> LeaseState:
        entries = [
            decode_entry(m) async for m in self.leases.read(f"twinhub.lease.*.{gateway}.{instance}")
        ]
        return max(entries, key=lambda e: e.position).record.state


@pytest_asyncio.fixture
async def world() -> AsyncIterator[World]:
    events, leases = InMemoryEventStore(), InMemoryEventStore(LEASES)
    await events.provision()
    await leases.provision()
    twins = InMemoryTwinStore()
    async with TwinProjector(twins, events, PROJECTOR) as projector:
        yield World(events, leases, twins, projector)


async def reap_all(reaper: GatewayReaper) -> list[Claim]:
    claims = await reaper.poll()
    await asyncio.gather(*(reaper.reap(c) for c in claims))
    return claims


async def test_the_devices_of_a_lapsed_instance_go_offline(world: World) -> None:
    dead = await world.gateway("gw", "dead")
    alive = await world.gateway("gw-2", "alive")
    await world.connect("d1", "gw", connection_id("dead", "c1"))
    await world.connect("d2", "gw", connection_id("dead", "c2"))
    await world.connect("d3", "gw-2", connection_id("alive", "c3"))
    # d4 was on the dead instance and reconnected through gw-2 already
    await world.connect("d4", "gw", connection_id("dead", "c4"))
    await world.connect("d4", "gw-2", connection_id("alive", "c5"))
    await world.settled()
    reaper = world.reaper()
    assert await reaper.poll() == []
    assert reaper.stats.instances[LeaseState.HELD] == 2

    world.clock.t += LEASE - 0.1
    await world.renew(alive)
    assert await reaper.poll() == []
    world.clock.t += 0.1
    claims = await reap_all(reaper)
    assert claims == [Claim("gw", "dead", dead.position, Cause.LAPSED)]

    for device in ("d1", "d2"):
        t = await world.twin(device)
        assert not t.online, device
        (off,) = await world.offlines(device)
        assert isinstance(off.data, ev.DeviceOffline)
        assert off.data.reason == GATEWAY_LOST
        assert off.data.connection_id == connection_id("dead", device.replace("d", "c"))
    for device in ("d3", "d4"):
        assert (await world.twin(device)).online, device
        assert await world.offlines(device) == []
    assert (await world.twin("d4")).connection.gateway == "gw-2"
    assert await world.lease_state("gw", "dead") is LeaseState.REAPED
    assert await world.lease_state("gw-2", "alive") is LeaseState.HELD
    st = reaper.stats
    assert (st.lost_total, st.reaped_total, st.devices_offline_total) == (1, 1, 2)

    # the dead instance's gateway comes back (it was only cut off): its renewal is refused
    w = dead.next_write((dead.wake_at() or 0) + 1)
    assert w is not None
    with pytest.raises(ConcurrencyError):
        await world.write(w)

    # nothing more to do
    world.clock.t += 100
    await world.renew(alive)
    assert await reap_all(reaper) == []


async def test_two_reapers_one_claim_one_offline(world: World) -> None:
    await world.gateway("gw", "dead")
    await world.connect("d1", "gw", connection_id("dead", "c1"))
    await world.settled()
    a, b = world.reaper(), world.reaper()
    await a.poll()
    await b.poll()
    world.clock.t += LEASE
    claims_a, claims_b = await a.poll(), await b.poll()
    assert len(claims_a) == len(claims_b) == 1
    await asyncio.gather(a.reap(claims_a[0]), b.reap(claims_b[0]))
    assert a.stats.lost_total + b.stats.lost_total == 1  # the conditional claim: one wins
    assert len(await world.offlines("d1")) == 1
    assert not (await world.twin("d1")).online


async def test_a_second_reap_appends_nothing(world: World) -> None:
    """A takeover of a claim that was in fact finished, or a repeated reap: the derived ids
    and the conditions make it harmless."""
    await world.gateway("gw", "dead")
    await world.connect("d1", "gw", connection_id("dead", "c1"))
    await world.settled()
    r = world.reaper()
    await r.poll()
    world.clock.t += LEASE
    (claim,) = await r.poll()
    await r.reap(claim)
    # the store lags (the offline not folded yet) and the claim is run again
    again = Claim("gw", "dead", await world.leases.last_position(ALL_LEASES), Cause.TAKEOVER)
    await r.reap(again)
    assert len(await world.offlines("d1")) == 1


async def test_a_superseded_instance_is_reaped_at_once(world: World) -> None:
    old = await world.gateway("gw", "old")
    await world.connect("d1", "gw", connection_id("old", "c1"))
    await world.settled()
    r = world.reaper()
    assert await r.poll() == []
    new = LeaseHolder("gw", "new", LeaseConfig(lease=LEASE))
    entries: list[LeaseEntry] = [decode_entry(m) async for m in world.leases.read(ALL_LEASES)]
    (supersede,) = new.supersede(entries, 0)
    assert supersede.expected_last == old.position
    await world.write(supersede)
    claims = await reap_all(r)  # no time passed
    assert [c.cause for c in claims] == [Cause.SUPERSEDED]
    assert not (await world.twin("d1")).online


async def test_an_unfinished_claim_is_taken_over(world: World) -> None:
    await world.gateway("gw", "dead")
    await world.connect("d1", "gw", connection_id("dead", "c1"))
    await world.settled()
    # another twin instance claimed it and died before marking anything offline
    claim = Claim("gw", "dead", await world.leases.last_position(ALL_LEASES), Cause.LAPSED)
    subject, scope, record = claim_record(claim, LeaseState.REAPING, "twin-gone", datetime.now(UTC))
    await world.leases.append(
        [NatsMessage(subject, "gone-1", record.encode())],
        expected_last=claim.expected_last,
        scope=scope,
    )
    r = world.reaper(takeover_after=30.0)
    assert await r.poll() == []
    world.clock.t += 29
    assert await r.poll() == []
    world.clock.t += 1
    claims = await reap_all(r)
    assert [c.cause for c in claims] == [Cause.TAKEOVER]
    assert not (await world.twin("d1")).online
    assert await world.lease_state("gw", "dead") is LeaseState.REAPED


async def test_the_reaper_waits_for_the_projector(world: World) -> None:
    """A connection the instance opened just before it died must be in the twin store
    before the reaper looks there."""
    await world.gateway("gw", "dead")
    r = world.reaper()
    await r.poll()
    await world.projector.__aexit__(None, None, None)  # the projector stops for a while
    await world.connect("d1", "gw", connection_id("dead", "c1"))
    world.clock.t += LEASE
    (claim,) = await r.poll()
    reap = asyncio.create_task(r.reap(claim))
    await asyncio.sleep(0.2)
    assert not reap.done()  # waiting for the projector's checkpoint
    async with TwinProjector(world.twins, world.events, PROJECTOR) as projector:
        world.projector = projector
        await asyncio.wait_for(reap, WAIT)
        assert len(await world.offlines("d1")) == 1
        assert not (await world.twin("d1")).online


async def test_an_outage_of_the_lease_stream_lapses_nobody(world: World) -> None:
    await world.gateway("gw", "alive")
    r = world.reaper()
    await r.poll()

    async def broken(*_: object, **__: object) -> AsyncIterator[object]:
        raise UnavailableError("down")
        yield  # pragma: no cover

    real = world.leases.read
    world.leases.read = broken  # type: ignore[method-assign,assignment]
    world.clock.t += 60
    with pytest.raises(UnavailableError):
        await r.poll()
    world.leases.read = real  # type: ignore[method-assign]
    assert await r.poll() == []  # a full lease again from now
    world.clock.t += LEASE
    assert [c.instance for c in await r.poll()] == ["alive"]


async def test_run_in_the_background(world: World) -> None:
    await world.gateway("gw", "dead")
    await world.connect("d1", "gw", connection_id("dead", "c1"))
    await world.settled()
    async with world.reaper(poll_interval=0.01) as r:
        await asyncio.sleep(0.05)
        world.clock.t += LEASE
        async with asyncio.timeout(WAIT):
            while (await world.lease_state("gw", "dead")) is not LeaseState.REAPED:
                await asyncio.sleep(0.01)
        assert r.stats.devices_offline_total == 1
    assert not (await world.twin("d1")).online
