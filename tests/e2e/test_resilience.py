"""The spine under failure, on real servers: projector restarts, a NATS outage, writer
overflow, abrupt disconnects and replaced connections.

Every wait is on a condition with a deadline. Device changes are paced (one change, then wait
until its notification went out) so that each change is exactly one notification and the log
must hold every ``seq`` of every light.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from devicesim.backoff import BackoffPolicy
from devicesim.device import SimDevice
from eventstore.adapters.jetstream import JetStreamEventStore
from eventstore.errors import UnavailableError
from gateway.writer import WriterConfig
from proto import events as ev
from proto import subjects
from twin.model import Twin
from twin.service import ProjectorConfig, ProjectorHooks, TwinProjector
from twinhub_cli.devservices import NatsServer

from .stack import WAIT, Stack, open_stack

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

# Devices that must not reconnect on their own during a test (15..30 s with jitter).
NO_RECONNECT = BackoffPolicy(initial=30.0, maximum=30.0)
# Devices that must come back quickly.
FAST_RECONNECT = BackoffPolicy(initial=0.2, maximum=1.0)


@pytest.fixture
async def stack(bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path) -> Any:
    async with open_stack(bus, mongo_db, tmp_path) as st:
        yield st


# --------------------------------------------------------------------------- helpers


async def until(cond: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``cond`` until it holds; fail the test after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what or cond}")


def lights(d: SimDevice) -> dict[str, Any]:
    return {h: d.model.representation(h) for h in d.model.user_hrefs}


def shows(twin: Twin, values: dict[str, Any]) -> bool:
    return all((r := twin.resource(h)) is not None and r.content == v for h, v in values.items())


async def synced(stack: Stack, d: SimDevice) -> Twin:
    return await stack.wait_twin(
        d.device_id,
        lambda t: (
            t.online
            and t.sync_state == "in_sync"
            and all(t.resource(h) is not None for h in d.model.user_hrefs)
        ),
    )


async def notify_once(d: SimDevice) -> None:
    """One change of the next light, and wait until its notification went out."""
    sent = d.stats.notifications_sent
    d.change()
    await d.wait_until(lambda dev: dev.stats.notifications_sent > sent, WAIT)


class Changer:
    """Keeps changing a device's lights, paced one notification at a time, until stopped."""

    def __init__(self, d: SimDevice) -> None:
        self.device = d
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await notify_once(self.device)
            self.count += 1
            await asyncio.sleep(0.005)  # pacing only: leave the loop to the others

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"changer {self.device.device_id}")

    async def stop(self) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a failed changer fails the test
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def seqs_by_href(stack: Stack, device_id: str) -> dict[str, list[int]]:
    """Every light's ``seq`` values as the log holds them, in log order."""
    out: dict[str, list[int]] = {}
    for e in await stack.events(device_id, ev.ResourceChanged.KIND):
        assert isinstance(e.data, ev.ResourceChanged)
        if isinstance(e.data.content, dict) and "seq" in e.data.content:
            out.setdefault(e.data.href, []).append(e.data.content["seq"])
    return out


async def assert_log_complete(stack: Stack, d: SimDevice) -> None:
    """Each light's notifications are all in the log, once each, in order, up to its last."""
    final = lights(d)
    per_href = await seqs_by_href(stack, d.device_id)
    assert set(per_href) == set(final)
    for href, seqs in per_href.items():
        assert seqs == list(range(seqs[0], final[href]["seq"] + 1)), (
            f"{d.device_id}{href}: the log's seqs are not one run without gap or duplicate: {seqs}"
        )


async def assert_log_ordered(stack: Stack, d: SimDevice) -> None:
    """Each light's values are in the log in the order the device made them (gaps allowed)."""
    final = lights(d)
    per_href = await seqs_by_href(stack, d.device_id)
    for href, seqs in per_href.items():
        assert seqs == sorted(seqs), f"{d.device_id}{href}: out of order in the log: {seqs}"
        assert seqs[-1] == final[href]["seq"], f"{d.device_id}{href}: last value missing: {seqs}"


async def projected(stack: Stack, device_id: str) -> Twin:
    """Wait until the twin reflects the device's whole log; return it."""
    end = await stack.store.last_position(
        subjects.event_filter(owner=stack.owner, device=device_id)
    )
    return await stack.wait_twin(device_id, lambda t: t.position >= end)


async def connection_ids(stack: Stack, device_id: str) -> tuple[set[str], set[str]]:
    """The connections the log says went online, and those it says went offline."""
    online: set[str] = set()
    offline: set[str] = set()
    for e in await stack.events(device_id):
        if isinstance(e.data, ev.DeviceOnline):
            online.add(e.data.connection_id)
        elif isinstance(e.data, ev.DeviceOffline):
            offline.add(e.data.connection_id)
    return online, offline


async def wait_log(
    stack: Stack, device_id: str, cond: Callable[[list[Any]], bool], timeout: float = WAIT
) -> list[Any]:
    """The device's events once ``cond`` holds for them."""
    async with asyncio.timeout(timeout):
        while True:
            log = await stack.events(device_id)
            if cond(log):
                return log
            await asyncio.sleep(0.05)


def projector_config(stack: Stack, **kw: Any) -> ProjectorConfig:
    # the same durable consumer and checkpoint as Stack.running_projector
    return ProjectorConfig(
        name=f"p-{stack.owner}", filter_subject=subjects.event_filter(owner=stack.owner), **kw
    )


@contextlib.asynccontextmanager
async def restarted_at_exit(nats_server: NatsServer) -> AsyncIterator[NatsServer]:
    """The test stops the server in the block; make sure it runs again when the block fails,
    before the stack closes (writers would otherwise wait for it up to their drain timeout)."""
    try:
        yield nats_server
    finally:
        if not nats_server.running:
            await nats_server.start()


@contextlib.asynccontextmanager
async def devices(ds: Sequence[SimDevice]) -> AsyncIterator[Sequence[SimDevice]]:
    async with contextlib.AsyncExitStack() as es:
        for d in ds:
            await es.enter_async_context(d)
        yield ds


def stall_at(call: int, reached: asyncio.Event) -> Callable[[Sequence[int]], Awaitable[None]]:
    """A projector hook that blocks forever on its ``call``-th call (the projector is then
    cancelled there by the test)."""
    calls = 0

    async def hook(positions: Sequence[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == call:
            reached.set()
            await asyncio.Event().wait()

    return hook


# --------------------------------------------------------------------------- 1. projector


async def test_projector_restarted_mid_stream_misses_and_repeats_nothing(stack: Stack) -> None:
    ds = [stack.device(i, resources=3, ping_interval=None) for i in range(2)]
    async with devices(ds):
        # run 1: from the start, stopped while the devices keep notifying
        async with TwinProjector(stack.twins, stack.store, projector_config(stack)):
            for d in ds:
                await synced(stack, d)
            changers = [Changer(d) for d in ds]
            for c in changers:
                c.start()
            await until(lambda: min(c.count for c in changers) >= 8, what="8 changes each")
        # down: the log grows without the projector
        await until(lambda: min(c.count for c in changers) >= 16, what="16 changes each")

        # run 2: catches up in small batches and is cancelled after writing its 2nd batch,
        # before acknowledging it (the worst moment)
        reached = asyncio.Event()
        hooks = ProjectorHooks(after_write=stall_at(2, reached))
        cfg = projector_config(stack, batch_size=4)
        async with TwinProjector(stack.twins, stack.store, cfg, hooks=hooks):
            async with asyncio.timeout(WAIT):
                await reached.wait()
        await until(lambda: min(c.count for c in changers) >= 24, what="24 changes each")

        # run 3: catches up, then is cancelled between folding a live batch and writing it
        head = await stack.store.last_position(subjects.event_filter(owner=stack.owner))
        reached = asyncio.Event()

        async def stall_live(positions: Sequence[int]) -> None:
            if min(positions) > head:
                reached.set()
                await asyncio.Event().wait()

        hooks = ProjectorHooks(before_write=stall_live)
        async with TwinProjector(stack.twins, stack.store, projector_config(stack), hooks=hooks):
            async with asyncio.timeout(WAIT):
                await reached.wait()
        await until(lambda: min(c.count for c in changers) >= 32, what="32 changes each")
        for c in changers:
            await c.stop()

        # run 4: to the end
        async with TwinProjector(stack.twins, stack.store, projector_config(stack)):
            for d in ds:
                final = lights(d)
                await stack.wait_twin(d.device_id, lambda t, f=final: shows(t, f))
                twin = await projected(stack, d.device_id)
                assert shows(twin, final)
                assert twin.online and twin.sync_state == "in_sync"
                # every event of the device applied exactly once
                assert twin.version == len(await stack.events(d.device_id))
                await assert_log_complete(stack, d)


# --------------------------------------------------------------------------- 2. NATS outage


async def test_nats_outage_loses_and_duplicates_no_accepted_notification(
    stack: Stack, nats_server: NatsServer
) -> None:
    ds = [stack.device(i, resources=2, ping_interval=None) for i in range(3)]
    async with restarted_at_exit(nats_server), stack.running_projector(), devices(ds):
        for d in ds:
            await synced(stack, d)
        for _ in range(4):
            for d in ds:
                await notify_once(d)
        writers = [stack.gateway.devices[d.device_id].writer for d in ds]
        accepted = stack.gateway.stats.notifications

        await nats_server.stop()
        for _ in range(6):
            for d in ds:
                await notify_once(d)
        # the gateway accepted them all and holds them: nothing was written
        await until(
            lambda: (
                stack.gateway.stats.notifications >= accepted + 6 * len(ds)
                and all(w.buffered >= 6 for w in writers)
            ),
            what="the notifications in the gateway's buffers",
        )
        # keep the log down until every writer failed at least one append and retried
        await until(lambda: all(w.retries >= 1 for w in writers), what="append retries")
        for _ in range(2):
            for d in ds:
                await notify_once(d)
        await nats_server.start()

        for _ in range(3):
            for d in ds:
                await notify_once(d)
        for d in ds:
            final = lights(d)
            await stack.wait_twin(d.device_id, lambda t, f=final: shows(t, f))
        # the devices never noticed: same connection, still in sync
        assert all(d.stats.connects == 1 for d in ds)
        for d, w in zip(ds, writers, strict=True):
            assert stack.gateway.devices[d.device_id].writer is w
            assert w.buffered == 0
    for d in ds:
        await assert_log_complete(stack, d)
        changes = await stack.events(d.device_id, ev.ResourceChanged.KIND)
        assert len({e.id for e in changes}) == len(changes)


# --------------------------------------------------------------------------- 3. overflow


async def test_writer_overflow_closes_only_that_device_which_resynchronises(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path, nats_server: NatsServer
) -> None:
    # Short timeouts, so that the outage below sees several failed appends and sign-ins
    # quickly; a slow retry, so that the closed connection's writer is likely asleep when the
    # log comes back, while the device signs in again and reports its current values.
    small = WriterConfig(max_buffered=8, critical_timeout=0.5, retry_initial=1.0, retry_max=1.0)
    async with open_stack(bus, mongo_db, tmp_path, store_timeout=0.5, writer=small) as stack:
        noisy = stack.device(0, resources=2, ping_interval=None, backoff=FAST_RECONNECT)
        calm = stack.device(1, resources=2, ping_interval=None, backoff=NO_RECONNECT)
        async with (
            restarted_at_exit(nats_server),
            stack.running_projector(),
            devices([noisy, calm]),
        ):
            for d in (noisy, calm):
                await synced(stack, d)
            first = stack.gateway.devices[noisy.device_id]
            await nats_server.stop()
            for _ in range(3):
                await notify_once(calm)
            # notify until the gateway gives up on the noisy device's connection
            while stack.gateway.stats.overflow_closes == 0:
                await notify_once(noisy)
                assert noisy.stats.notifications_sent < 100
            await noisy.wait_until(lambda dev: dev.stats.disconnects >= 1, WAIT)
            # it changes on while disconnected: only a resynchronisation can report that
            for _ in range(3):
                noisy.change()
            # the log stays down while the device comes back and fails to sign in, twice, and
            # the closed connection's writer keeps retrying what it holds
            await noisy.wait_until(lambda dev: dev.stats.disconnects >= 3, WAIT)
            await until(lambda: first.writer.retries >= 2, what="retries of the old writer")
            assert noisy.stats.sign_ins == 1
            await nats_server.start()

            final = lights(noisy)
            twin = await stack.wait_twin(
                noisy.device_id,
                lambda t: t.online and t.sync_state == "in_sync" and shows(t, final),
            )
            assert twin.connection.connection_id not in ("", first.conn.id)
            assert noisy.stats.sign_ins >= 2
            for _ in range(2):
                await notify_once(calm)
            calm_final = lights(calm)
            await stack.wait_twin(calm.device_id, lambda t: shows(t, calm_final))
            # the calm device kept its connection and lost nothing
            assert calm.stats.connects == 1 and calm.stats.disconnects == 0
            assert stack.gateway.stats.overflow_closes == 1
            twin = await projected(stack, noisy.device_id)
            assert twin.online and shows(twin, final)
        await assert_log_complete(stack, calm)
        await assert_log_ordered(stack, noisy)
        # the overflowed connection's end is in the log too, and so is the end of every
        # connection that went online
        online, offline = await connection_ids(stack, noisy.device_id)
        assert first.conn.id in offline
        assert online <= offline


class AcksLost:
    """The gateway's event store, losing append acks on demand: the events are stored but the
    gateway hears :class:`UnavailableError`, an unknown outcome (as when the connection to NATS
    drops between the publish and its ack)."""

    def __init__(self, store: JetStreamEventStore) -> None:
        self._store = store
        self.losing = False
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append(self, messages: Sequence[Any], **kw: Any) -> Any:
        result = await self._store.append(messages, **kw)
        if self.losing:
            self.lost += 1
            raise UnavailableError("append ack lost (injected)")
        return result


async def test_sign_in_with_an_unknown_outcome_leaves_no_ghost_online(
    bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    """A sign-in whose append the gateway gave up on (the device got 5.03) may be in the log
    all the same: the end of its connection must then be recorded too, or the twin shows the
    device online on a connection that is long gone."""
    proxies: list[AcksLost] = []

    def lossy(store: JetStreamEventStore) -> AcksLost:
        proxies.append(AcksLost(store))
        return proxies[-1]

    quick = WriterConfig(critical_timeout=0.3, retry_initial=0.05, retry_max=0.1)
    async with (
        open_stack(bus, mongo_db, tmp_path, gateway_store=lossy, writer=quick) as stack,
        stack.running_projector(),
    ):
        acks = proxies[0]
        first = stack.device(0, resources=1, ping_interval=None)
        did = first.device_id
        async with first:
            await synced(stack, first)
        await stack.wait_twin(did, lambda t: not t.online)  # signed out

        acks.losing = True
        again = stack.device(0, resources=1, ping_interval=None, backoff=NO_RECONNECT)
        again.registration = first.registration  # registered: it signs in straight away
        async with again:
            await again.wait_until(lambda dev: dev.stats.errors >= 1, WAIT)
            assert again.stats.sign_ins == 0
            assert "5.03" in (again.stats.last_error or "")
            assert acks.lost >= 1
            acks.losing = False

        # the sign-in the gateway gave up on is in the log...
        log = await stack.events(did)
        assert sum(isinstance(e.data, ev.DeviceOnline) for e in log) == 2
        ghost = [e.data for e in log if isinstance(e.data, ev.DeviceOnline)][-1].connection_id
        # ...and so is the end of its connection
        await wait_log(
            stack,
            did,
            lambda log: any(
                isinstance(e.data, ev.DeviceOffline) and e.data.connection_id == ghost for e in log
            ),
        )
        twin = await projected(stack, did)
        assert not twin.online


# --------------------------------------------------------------------------- 4. connections


async def test_abrupt_disconnect_marks_the_device_offline(stack: Stack) -> None:
    async with stack.running_projector():
        d = stack.device(resources=1, ping_interval=None, backoff=NO_RECONNECT)
        async with d:
            twin = await synced(stack, d)
            conn_id = twin.connection.connection_id
            assert d.connection is not None
            d.connection._transport.abort()  # TCP reset: no sign-out, no Release
            twin = await stack.wait_twin(d.device_id, lambda t: not t.online)
            assert twin.connection.connection_id == conn_id
            assert twin.sync_state == "out_of_sync"
            assert d.stats.sign_outs == 0
    offline = await stack.events(d.device_id, ev.DeviceOffline.KIND)
    assert isinstance(offline[0].data, ev.DeviceOffline)
    assert offline[0].data.connection_id == conn_id


async def test_second_sign_in_replaces_the_older_connection_without_flapping(
    stack: Stack,
) -> None:
    async with stack.running_projector():
        old = stack.device(0, resources=2, ping_interval=None, backoff=NO_RECONNECT)
        new = stack.device(0, resources=2, ping_interval=None, backoff=NO_RECONNECT)
        assert old.device_id == new.device_id
        did = old.device_id
        async with old:
            twin = await synced(stack, old)
            old_conn = twin.connection.connection_id
            for _ in range(3):
                await notify_once(old)
            async with new:  # signs in while the older connection is open
                await old.wait_until(lambda dev: dev.stats.disconnects >= 1, WAIT)
                await old.stop(sign_out=False)  # in its back-off: it stays away
                twin = await stack.wait_twin(
                    did,
                    lambda t: (
                        t.online
                        and t.connection.connection_id != old_conn
                        and t.sync_state == "in_sync"
                    ),
                )
                new_conn = twin.connection.connection_id
                assert stack.gateway.devices[did].conn.id == new_conn
                for _ in range(3):
                    await notify_once(new)
                final = lights(new)
                # the older connection's offline comes after the newer one's online
                log = await wait_log(
                    stack,
                    did,
                    lambda log: any(
                        isinstance(e.data, ev.DeviceOffline) and e.data.connection_id == old_conn
                        for e in log
                    ),
                )
                online_at = next(
                    i
                    for i, e in enumerate(log)
                    if isinstance(e.data, ev.DeviceOnline) and e.data.connection_id == new_conn
                )
                offline_at = next(
                    i
                    for i, e in enumerate(log)
                    if isinstance(e.data, ev.DeviceOffline) and e.data.connection_id == old_conn
                )
                assert offline_at > online_at
                twin = await projected(stack, did)
                assert twin.online and twin.connection.connection_id == new_conn
                twin = await stack.wait_twin(did, lambda t: shows(t, final))
                assert twin.online and twin.connection.connection_id == new_conn
                assert twin.sync_state == "in_sync"
                assert new.stats.disconnects == 0
        await stack.wait_twin(did, lambda t: not t.online)
