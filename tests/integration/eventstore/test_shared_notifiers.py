"""A gateway's per-device command notifiers on shared subscriptions (``shared_notifiers``):
a few NATS subscriptions per process, not a few per device, and each notifier still woken by
its own device's events only. Real JetStream with the bus security, the gateway's role."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import pytest

from eventstore.adapters.jetstream import JetStreamEventStore
from proto import subjects
from proto.message import NatsMessage

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

KINDS = ("command-pending", "command-canceled", "command-expired")
ABSENCE = 0.3  # how long we watch for a wake-up that must not come


def _message(owner: str, device: str, kind: str) -> NatsMessage:
    event_id = str(uuid.uuid4())
    subject = subjects.event_subject(owner, device, kind, "/light/1")
    return NatsMessage(subject, event_id, b"{}", {"ce-id": event_id})


async def test_per_device_notifiers_share_a_subscription_per_kind(bus: Bus) -> None:
    owner = "o" + uuid.uuid4().hex[:8]
    devices = [f"d{i}" for i in range(40)]
    async with (
        JetStreamEventStore.from_url(bus.endpoint("twin")) as twin,
        JetStreamEventStore.from_url(bus.endpoint("gateway"), shared_notifiers=True) as gw,
    ):
        await twin.provision()
        shared = gw.shared_wakeups
        assert shared is not None
        notifiers = {
            d: await gw.notifier(
                [subjects.event_filter(owner=owner, device=d, kind=k) for k in KINDS]
            )
            for d in devices
        }
        await gw.connection.flush()  # the server holds the subscriptions (appends come from twin)
        try:
            assert shared.subscriptions == len(KINDS)  # not 40 x 3
            await twin.append([_message(owner, "d7", "command-pending")])
            assert await notifiers["d7"].wait(5.0)
            woken = await asyncio.gather(*(n.wait(ABSENCE) for d, n in notifiers.items()))
            assert not any(woken), "another device's command must not wake it"
            # another owner's device of the same name wakes nobody here
            await twin.append([_message("x" + owner, "d3", "command-canceled")])
            assert not await notifiers["d3"].wait(ABSENCE)
            await twin.append([_message(owner, "d3", "command-expired")])
            assert await notifiers["d3"].wait(5.0)
            # a kind nobody listens for wakes nobody
            await twin.append([_message(owner, "d3", "resource-changed")])
            assert not await notifiers["d3"].wait(ABSENCE)
        finally:
            for n in notifiers.values():
                await n.close()
        assert shared.subscriptions == 0


async def test_a_filter_without_the_per_device_shape_gets_its_own_subscription(
    bus: Bus,
) -> None:
    owner = "o" + uuid.uuid4().hex[:8]
    async with (
        JetStreamEventStore.from_url(bus.endpoint("twin")) as twin,
        JetStreamEventStore.from_url(bus.endpoint("gateway"), shared_notifiers=True) as gw,
    ):
        await twin.provision()
        n = await gw.notifier([subjects.event_filter(owner=owner)])
        await gw.connection.flush()  # the server holds the subscription (appends come from twin)
        try:
            assert gw.shared_wakeups is not None
            assert gw.shared_wakeups.subscriptions == 0
            assert len(n.subs) == 1
            await twin.append([_message(owner, "dz", "command-pending")])
            assert await n.wait(5.0)
        finally:
            await n.close()
