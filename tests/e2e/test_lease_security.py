"""The gateway leases on the bus as users run it: each role reaches what it needs of the lease
stream and nothing more (bus.permissions), refusals observed as the server's permission
violations, each paired with the legitimate use it resembles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest
from nats.aio.client import Client as NatsClient

from eventstore.adapters.endpoint import NatsEndpoint
from eventstore.adapters.jetstream import JetStreamEventStore
from proto import subjects
from proto.leases import (
    LEASE_STREAM,
    LeaseRecord,
    LeaseState,
    Writer,
    instance_scope,
    lease_subject,
    new_instance_id,
)
from proto.message import NatsMessage
from tests.conftest import Bus
from twinhub_cli.services import LEASE_LAYOUT

pytestmark = pytest.mark.servers

WAIT = 10.0


class Client:
    def __init__(self, nc: NatsClient, errors: asyncio.Queue[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def denied_publish(self, subject: str, reply: str) -> None:
        await self.nc.publish(subject, b"{}", reply=reply)
        want = f'permissions violation for publish to "{subject}"'.lower()
        async with asyncio.timeout(WAIT):
            while want not in (await self.errors.get()).lower():
                pass


@contextlib.asynccontextmanager
async def connected(endpoint: NatsEndpoint) -> AsyncIterator[Client]:
    errors: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        errors.put_nowait(str(exc).lower())

    nc = await nats.connect(**endpoint.connect_options(), error_cb=on_error, allow_reconnect=False)
    try:
        yield Client(nc, errors)
    finally:
        await nc.close()


def record(state: LeaseState, gateway: str, instance: str) -> bytes:
    return LeaseRecord(
        state=state, gateway=gateway, instance=instance, at=datetime.now(UTC), lease=3.0
    ).encode()


async def test_each_role_writes_its_own_lease_records(bus: Bus) -> None:
    async with JetStreamEventStore.from_url(bus.endpoint("twin"), LEASE_LAYOUT) as twin:
        await twin.provision()  # the twin service provisions the lease stream
        gateway, instance = f"gw-{new_instance_id()}", new_instance_id()
        scope = instance_scope(gateway, instance)
        held = lease_subject(Writer.GATEWAY, gateway, instance)
        claim = lease_subject(Writer.TWIN, gateway, instance)
        async with JetStreamEventStore.from_url(bus.endpoint("gateway"), LEASE_LAYOUT) as gw:
            await gw.wait_provisioned(WAIT)
            # the gateway holds its lease, and reads the stream
            first = await gw.append(
                [NatsMessage(held, "h1", record(LeaseState.HELD, gateway, instance))],
                expected_last=0,
                scope=scope,
            )
            assert [m.position async for m in gw.read(scope)] == [first.last_position]
            # the twin claims it and reads the stream
            await twin.append(
                [NatsMessage(claim, "c1", record(LeaseState.REAPING, gateway, instance))],
                expected_last=first.last_position,
                scope=scope,
            )
            assert len([m async for m in twin.read(scope)]) == 2
        async with connected(bus.endpoint("gateway")) as g:
            await g.denied_publish(claim, "_INBOX.gateway.x")  # only the twin claims
            await g.denied_publish(f"$JS.API.STREAM.CREATE.{LEASE_STREAM}", "_INBOX.gateway.x")
            await g.denied_publish(f"$JS.API.STREAM.PURGE.{LEASE_STREAM}", "_INBOX.gateway.x")
        async with connected(bus.endpoint("twin")) as t:
            await t.denied_publish(held, "_INBOX.twin.x")  # only gateways hold leases
            await t.denied_publish(f"$JS.API.STREAM.DELETE.{LEASE_STREAM}", "_INBOX.twin.x")


async def test_applications_get_nothing_of_the_leases(bus: Bus) -> None:
    owner = "o" + new_instance_id()
    endpoint = NatsEndpoint(
        bus.url, token=bus.token(owner), inbox_prefix=subjects.owner_inbox_prefix(owner)
    )
    inbox = f"{subjects.owner_inbox_prefix(owner)}.x"
    async with connected(endpoint) as a:
        for subject in (
            lease_subject(Writer.GATEWAY, "gw-1", "a1"),
            lease_subject(Writer.TWIN, "gw-1", "a1"),
            f"$JS.API.DIRECT.GET.{LEASE_STREAM}",
            f"twinhub.js.API.DIRECT.GET.{LEASE_STREAM}",
            f"twinhub.js.API.CONSUMER.CREATE.{LEASE_STREAM}.x.twinhub.lease.>",
        ):
            await a.denied_publish(subject, inbox)
        # what an application may do still works (a request on the command API)
        await a.nc.flush()
        assert a.nc.is_connected
