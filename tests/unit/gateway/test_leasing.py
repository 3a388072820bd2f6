"""The lease driver (gateway.leasing) on the in-memory lease stream."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from eventstore.layout import StreamLayout
from eventstore.memory import InMemoryEventStore
from gateway.lease import LeaseConfig, LeaseHolder
from gateway.leasing import GatewayLease
from proto.leases import (
    ALL_LEASES,
    LeaseEntry,
    LeaseRecord,
    LeaseState,
    Writer,
    decode_entry,
    instance_scope,
    lease_subject,
)
from proto.message import NatsMessage

WAIT = 10.0
LEASES = StreamLayout(name="LEASES", subjects=(ALL_LEASES,), max_msgs_per_subject=1)
FAST = LeaseConfig(lease=0.3, retry_interval=0.05)


async def store() -> InMemoryEventStore:
    s = InMemoryEventStore(LEASES)
    await s.provision()
    return s


async def table(s: InMemoryEventStore) -> dict[str, LeaseEntry]:
    """instance -> its newest entry"""
    out: dict[str, LeaseEntry] = {}
    async for m in s.read(ALL_LEASES):
        e = decode_entry(m)
        if e.instance not in out or e.position > out[e.instance].position:
            out[e.instance] = e
    return out


async def until(cond: object, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not await cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_held_renewed_and_released() -> None:
    s = await store()
    async with GatewayLease(s, "gw-1", FAST) as lease:
        first = (await table(s))[lease.instance]
        assert first.writer is Writer.GATEWAY
        assert first.record.state is LeaseState.HELD and first.record.lease == 0.3

        async def renewed() -> bool:
            return (await table(s))[lease.instance].position > first.position + 1

        await until(renewed, "two renewals")
        assert lease.stats.renewals >= 2
    last = (await table(s))[lease.instance]
    assert last.record.state is LeaseState.RELEASED


async def test_a_new_run_supersedes_the_old_one() -> None:
    s = await store()
    # a run killed with kill -9: its lease is held, nothing more comes from it
    crashed = LeaseHolder("gw-1", "crashed", FAST)
    w = crashed.acquire(0)
    await s.append(
        [NatsMessage(w.subject, w.msg_id, w.record.encode())],
        expected_last=w.expected_last,
        scope=w.scope,
    )
    async with GatewayLease(s, "gw-2", FAST) as other, GatewayLease(s, "gw-1", FAST) as restarted:
        got = await table(s)
        assert got["crashed"].record.state is LeaseState.SUPERSEDED
        assert got["crashed"].record.by == restarted.instance
        assert got[restarted.instance].record.state is LeaseState.HELD
        assert got[other.instance].record.state is LeaseState.HELD  # another gateway id's
        assert restarted.stats.superseded == 1
        assert other.stats.superseded == 0


async def test_a_claimed_lease_is_lost_and_a_new_instance_takes_over() -> None:
    s = await store()
    adopted: list[str] = []
    async with GatewayLease(s, "gw-1", FAST, on_new_instance=adopted.append) as lease:
        old = lease.instance
        # a twin service declared the instance lost (it could not see renewals)
        claim = LeaseRecord(
            state=LeaseState.REAPING, gateway="gw-1", instance=old, at=datetime.now(UTC)
        )
        scope = instance_scope("gw-1", old)
        await s.append(
            [NatsMessage(lease_subject(Writer.TWIN, "gw-1", old), "claim-1", claim.encode())],
            expected_last=await s.last_position(scope),
            scope=scope,
        )

        async def taken_over() -> bool:
            return bool(adopted)

        await until(taken_over, "a new instance")
        assert adopted == [lease.instance] and lease.instance != old
        assert lease.stats.lost == 1
        got = await table(s)
        assert got[lease.instance].record.state is LeaseState.HELD
        assert got[old].record.state is LeaseState.REAPING  # the gateway leaves it alone
    assert (await table(s))[lease.instance].record.state is LeaseState.RELEASED
