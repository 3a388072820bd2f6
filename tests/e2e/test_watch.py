"""``twinhub watch`` live, as a user runs it: every event once, in log order, no gap.

The CLI reads with ``next(0.5)`` in a loop (to notice a signal), so a timeout strikes whenever
the owner is quiet for half a second: the producer here pauses about that long now and then,
between bursts, so that timeouts fall while events are on their way (issue 11, item 2: a live
watch lost 4-10 of 45-60 events that way). Every printed line's ``sequence`` is compared with
the positions the producer got back from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import uuid
from collections.abc import AsyncIterator

import pytest

from eventstore.adapters.jetstream import JetStreamEventStore
from proto import binding
from proto import events as ev
from tests.conftest import Bus
from twin.adapters.nats_api import NatsApiServer
from twin.api import ApiConfig, TwinApi
from twin.memory import InMemoryTwinStore

pytestmark = pytest.mark.servers

EVENTS = 40


@pytest.fixture
async def api(bus: Bus) -> AsyncIterator[JetStreamEventStore]:
    """The command API on its production subjects (``watch`` asks it who the token is); the
    log as the gateway writes it."""
    async with (
        JetStreamEventStore.from_url(bus.endpoint("gateway")) as gateway,
        JetStreamEventStore.from_url(bus.endpoint("twin")) as twin,
    ):
        await twin.provision()
        twin_api = TwinApi(
            twin, InMemoryTwinStore(), bus.validator(), ApiConfig(consumer_secret=os.urandom(32))
        )
        async with NatsApiServer(twin.connection, twin_api):
            yield gateway


async def test_a_live_watch_prints_every_event_once_in_order(
    api: JetStreamEventStore, bus: Bus
) -> None:
    owner = "o" + uuid.uuid4().hex[:10]
    start = await api.last_position()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "twinhub_cli.main",
        "watch",
        "--token",
        bus.token(owner),
        "--from",
        str(start),
        "--count",
        str(EVENTS),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TWINHUB_NATS_URL": bus.url},
    )
    rng = random.Random(11)
    positions: list[int] = []
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):  # live from the first event: once it subscribed
            while b"started after position" not in await proc.stderr.readline():
                assert not proc.stderr.at_eof(), "watch ended before subscribing"
        for i in range(EVENTS):
            e = ev.Event(
                owner=owner,
                device_id="d1",
                data=ev.ResourceChanged(href="/n", content={"i": i}),
                source="/test/watch",
            )
            positions.append((await api.append([binding.to_nats(e)])).last_position)
            # Mostly a few milliseconds apart; every so often about the watch's own timeout.
            await asyncio.sleep(rng.uniform(0.45, 0.55) if i % 8 == 7 else rng.uniform(0, 0.01))
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    printed = [int(json.loads(line)["sequence"]) for line in out.decode().splitlines()]
    assert printed == positions
