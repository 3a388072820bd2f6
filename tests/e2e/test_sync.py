"""The twin synchronisation on real servers (devicesim over the real gateway and JetStream).

Order (issue 11, item 1): a device's events for one resource enter the log in the order the
device produced them, through connect and reconnect waves of a fleet. 200 devices change their
lights while they connect, sign in and synchronise, and again while they all reconnect at once:
the moments when a notification can arrive right behind the first response of its observation.
The log must then hold, per (device, resource, connection), the device's own ``seq`` and the
observe sequence number strictly increasing by log position, and every twin the newest content.

What is read (item 5): a device like the reference stack lists ``/oc/wk/introspection``, never
publishes it and answers it 4.00; the twin does not hold it, and a reconnect that finds nothing
changed appends no content.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from devicesim.backoff import BackoffPolicy
from devicesim.config import BatchSupport, DeviceConfig, GatewayAddress
from devicesim.device import SimDevice
from proto import binding, subjects
from proto import events as ev
from twin.fold import fold_batch

from .stack import Stack, open_stack

if TYPE_CHECKING:
    from tests.conftest import Bus

pytestmark = pytest.mark.servers

DEVICES = 200
RESOURCES = 2
RATE = 4.0  # changes per second per device
RECONNECT_WAVES = 2
WAVE_TIMEOUT = 30.0
FAST_RECONNECT = BackoffPolicy(initial=0.05, maximum=0.5)


@pytest.fixture
async def stack(bus: Bus, mongo_db: AsyncDatabase[Any], tmp_path: Path) -> Any:
    async with open_stack(bus, mongo_db, tmp_path, request_rate=None) as st:
        yield st


@contextlib.asynccontextmanager
async def fleet(stack: Stack, n: int) -> AsyncIterator[list[SimDevice]]:
    addr = stack.gateway.tcp_address
    assert addr is not None
    limiter = asyncio.Semaphore(64)
    devices = [
        SimDevice(
            DeviceConfig(
                gateway=GatewayAddress("coap+tcp", addr[0], addr[1]),
                device_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{stack.owner}/{i}")),
                token=lambda di, owner: stack.token(),
                owner=stack.owner,
                resources=RESOURCES,
                rate=RATE,
                ping_interval=None,
                backoff=FAST_RECONNECT,
            ),
            connect_limiter=limiter,
        )
        for i in range(n)
    ]
    try:
        for d in devices:
            await d.start()
        yield devices
    finally:
        await asyncio.gather(*(d.stop(sign_out=False) for d in devices), return_exceptions=True)


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


def all_in_sync(stack: Stack, devices: list[SimDevice], replaced: set[str]) -> bool:
    """Every device signed in on a connection not in ``replaced``, and in sync there."""
    for d in devices:
        c = stack.gateway.devices.get(d.device_id)
        if c is None or c.conn.id in replaced or c.session.sync_state != "in_sync":
            return False
    return True


async def test_fleet_connect_and_reconnect_waves_keep_each_resources_order(
    stack: Stack,
) -> None:
    started = time.monotonic()
    async with fleet(stack, DEVICES) as devices:
        await until(lambda: all_in_sync(stack, devices, set()), WAVE_TIMEOUT, "the first wave")
        replaced: set[str] = set()
        for wave in range(RECONNECT_WAVES):
            # every connection dropped at once, every device comes back and synchronises
            replaced |= {c.conn.id for c in stack.gateway.devices.values()}
            conns = list(stack.gateway.conns.values())
            await asyncio.gather(*(c.conn.close("test: reconnect wave") for c in conns))
            await until(
                functools.partial(all_in_sync, stack, devices, replaced),
                WAVE_TIMEOUT,
                f"wave {wave + 2}",
            )
        changes = sum(d.stats.changes for d in devices)
    # stopped: the writers of every connection have drained
    f = subjects.event_filter(owner=stack.owner, kind=ev.ResourceChanged.KIND)
    per_key: dict[tuple[str, str, str], list[tuple[int, int, int | None]]] = defaultdict(list)
    newest: dict[tuple[str, str], Any] = {}
    async for m in stack.store.read(f):
        e = binding.from_stored(m)
        data = e.data
        assert isinstance(data, ev.ResourceChanged)
        if not isinstance(data.content, dict) or "seq" not in data.content:
            continue
        per_key[(e.device_id, data.href, data.connection_id)].append(
            (m.position, data.content["seq"], data.observe_seq)
        )
        seen = newest.get((e.device_id, data.href))
        if seen is None or data.content["seq"] > seen["seq"]:
            newest[(e.device_id, data.href)] = data.content
    violations = []
    for key, rows in per_key.items():
        seqs = [seq for _, seq, _ in rows]
        observes = [o for _, _, o in rows if o is not None]
        if seqs != sorted(set(seqs)) or observes != sorted(set(observes)):
            violations.append((key, rows))
    logged = sum(len(rows) for rows in per_key.values())
    assert not violations, f"{len(violations)} of {len(per_key)} out of order: {violations[:5]}"
    assert len(per_key) >= DEVICES * RESOURCES * (1 + RECONNECT_WAVES) * 0.9, "waves of syncs"
    # folded, the log gives every twin the newest content of every light
    log = [
        binding.from_stored(m)
        async for m in stack.store.read(subjects.event_filter(owner=stack.owner))
    ]
    twins = fold_batch({}, log).twins
    for d in devices:
        twin = twins[d.device_id]
        for href in d.model.user_hrefs:
            r = twin.resource(href)
            assert r is not None
            assert r.content == newest[(d.device_id, href)], f"{d.device_id}{href}"
    print(
        f"{DEVICES} devices, {1 + RECONNECT_WAVES} sync waves, {changes} changes, "
        f"{logged} light events in {len(per_key)} (device, resource, connection): "
        f"{time.monotonic() - started:.1f} s"
    )


@pytest.mark.parametrize("batch", [BatchSupport.OBSERVE, BatchSupport.REJECT])
async def test_the_twin_holds_what_was_published_and_an_unchanged_resync_appends_nothing(
    stack: Stack, batch: BatchSupport
) -> None:
    d = stack.device(
        0,
        resources=1,
        reference_stack=True,  # publishes once per registration
        introspection=True,
        batch=batch,
        ping_interval=None,
        backoff=FAST_RECONNECT,
    )
    async with stack.running_projector(), d:
        first = await stack.wait_twin(d.device_id, lambda t: t.online and t.sync_state == "in_sync")
        assert [r.href for r in first.resources] == ["/light/1", "/oic/d", "/oic/p"]
        assert ev.ResourceLinksPublished.KIND in {e.kind for e in await stack.events(d.device_id)}
        # the connection drops; the device reconnects, signs in, is synchronised again
        await stack.gateway.devices[d.device_id].conn.close("test: reconnect")
        again = await stack.wait_twin(
            d.device_id,
            lambda t: (
                t.online
                and t.sync_state == "in_sync"
                and t.connection.connection_id != first.connection.connection_id
            ),
        )
        assert [r.href for r in again.resources] == ["/light/1", "/oic/d", "/oic/p"]
        assert again.resources == first.resources, "nothing changed, nothing appended"
    log = await stack.events(d.device_id)
    assert not [
        e
        for e in log
        if e.kind == ev.ResourceChanged.KIND and e.data.href not in {"/light/1", "/oic/d", "/oic/p"}
    ]
    onlines = [i for i, e in enumerate(log) if e.kind == ev.DeviceOnline.KIND]
    assert len(onlines) == 2
    after = [e for e in log[onlines[1] :] if e.kind == ev.ResourceChanged.KIND]
    assert after == [], f"the re-sync appended {[(e.data.href, e.data.status) for e in after]}"
