"""A command reaches an online device at once even when the log tells subscribers about it
before a read can see it.

JetStream hands a published message to core-NATS subscribers (the gateway's per-device
notifier) as it passes through the server and stores it in the stream just after: a read
started on the wake-up may not find it yet. Measured in bench/command_bench.py before the fix:
one command in thousands waited for the gateway's periodic command resync (60 s). The store
below makes that window certain: a message is invisible to the first read after it is
appended.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from devicesim.device import DeviceState
from eventstore.memory import InMemoryEventStore
from eventstore.ports import ALL_EVENTS
from proto import binding
from proto import events as ev
from proto.message import StoredMessage

from .gateway_stack import DEADLINE, running_gateway


class StoredLate(InMemoryEventStore):
    """Notifies subscribers of a command before the first read after it can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: set[int] = set()
        self.hid = 0

    def hide_next(self) -> None:
        self.hidden.add(self._last_seq + 1)

    async def read(
        self, filter_subject: str = ALL_EVENTS, *, after: int = 0, limit: int | None = None
    ) -> AsyncGenerator[StoredMessage, None]:
        async for stored in super().read(filter_subject, after=after, limit=limit):
            if stored.position in self.hidden:
                self.hidden.discard(stored.position)  # visible from the next read on
                self.hid += 1
                return  # not stored yet: neither it nor anything after it
            yield stored


async def test_a_command_notified_before_it_is_readable_is_sent_at_once() -> None:
    store = StoredLate()
    async with running_gateway(store=store, command_resync=60.0) as stack:
        device = stack.device()
        await device.start()
        try:
            await device.wait_until(lambda d: d.state is DeviceState.ONLINE, DEADLINE)
            di = device.config.device_id
            href = device.model.user_hrefs[0]
            store.hide_next()
            pending = ev.CommandPending(href=href, op="update", content={"value": True})
            event = ev.Event(stack.owner, di, pending, "/test", correlation_id="late")
            started = time.monotonic()
            await store.append([binding.to_nats(event)])
            await device.wait_until(lambda d: d.stats.updates_applied >= 1, 5.0)
            assert store.hid >= 1  # the gateway's first read after the wake-up missed it
            assert time.monotonic() - started < 5.0
        finally:
            await device.stop()


async def test_a_late_command_after_an_answered_one_is_sent_at_once() -> None:
    """The first read after the wake-up finds only the gateway's own sent / succeeded events of
    the previous command (appended after its last read): that is no reason not to look again
    for the command that woke it. (Measured before the fix: ~1 % of commands at 100/s waited
    for the device's next command, ~1 s, or for the 60 s resync.)"""
    store = StoredLate()
    async with running_gateway(store=store, command_resync=60.0) as stack:
        device = stack.device()
        await device.start()
        try:
            await device.wait_until(lambda d: d.state is DeviceState.ONLINE, DEADLINE)
            di = device.config.device_id
            href = device.model.user_hrefs[0]
            for i, cid in enumerate(("first", "late")):
                if cid == "late":
                    store.hide_next()
                pending = ev.CommandPending(href=href, op="update", content={"value": i == 0})
                event = ev.Event(stack.owner, di, pending, "/test", correlation_id=cid)
                await store.append([binding.to_nats(event)])
                await device.wait_until(lambda d, n=i + 1: d.stats.updates_applied >= n, 5.0)
            assert store.hid >= 1
        finally:
            await device.stop()
