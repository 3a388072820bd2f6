"""The operations endpoints of the gateway and the twin service, composed as ``twinhub gateway``
and ``twinhub twin run`` compose them (``twinhub_cli.services``), on real servers.

Each test has a NATS server of its own (stopped and started again by the test, so the session's
server and its shared stream stay out of it) and scrapes with a plain HTTP client in a thread.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from pymongo.asynchronous.database import AsyncDatabase

from devicesim.config import DeviceConfig, GatewayAddress
from devicesim.device import SimDevice
from proto import api, binding
from proto import events as ev
from twinhub_cli import config as cfgmod
from twinhub_cli import services
from twinhub_cli.datadir import DataDir
from twinhub_cli.devservices import NatsServer
from twinhub_cli.observability import ApiMetrics, ObservabilityConfig

pytestmark = pytest.mark.servers

WAIT = 30.0
FAST = ObservabilityConfig(
    heartbeat_interval=0.1, stall_after=5.0, probe_interval=0.1, probe_timeout=1.0
)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class HasUrl:  # the mongo_server fixture
    url: str


@pytest_asyncio.fixture(loop_scope="session")
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(tmp_path / "nats") as server:
        yield server


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def fetch(url: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(get, url)


async def scrape(base: str) -> Samples:
    status, body = await fetch(base + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


async def until_status(url: str, status: int) -> dict[str, Any]:
    """Poll ``url`` until it answers ``status``; its JSON body."""
    last: tuple[int, bytes] = (0, b"")
    try:
        async with asyncio.timeout(WAIT):
            while (last := await fetch(url))[0] != status:
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"{url} answered {last} for {WAIT}s, never {status}")
    doc: dict[str, Any] = json.loads(last[1])
    return doc


async def until_metric(
    base: str, cond: Callable[[Samples], bool], what: str, poke: Callable[[], object] | None = None
) -> Samples:
    got: Samples = {}
    try:
        async with asyncio.timeout(WAIT):
            while not cond(got := await scrape(base)):
                if poke is not None:
                    poke()
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}; last scrape: {got}")
    return got


async def readyz_follows_nats(base: str, nats_server: NatsServer) -> None:
    await until_status(base + "/readyz", 200)
    await nats_server.stop()
    doc = await until_status(base + "/readyz", 503)
    assert doc["checks"]["nats"].startswith("failed: ")
    status, body = await fetch(base + "/healthz")  # the process itself is alive
    assert status == 200, body
    await nats_server.start()
    doc = await until_status(base + "/readyz", 200)
    assert set(doc["checks"].values()) == {"ok"}


async def test_gateway_endpoints(own_nats: NatsServer, tmp_path: Path) -> None:
    config = cfgmod.load(
        env={},
        overrides={
            "nats": {"url": own_nats.url, "credentials": str(own_nats.credentials.directory)},
            "gateway": {
                "tcp": "127.0.0.1:0",
                "tls": "",
                "udp": "127.0.0.1:0",
                "dtls": "127.0.0.1:0",
                "metrics_listen": "127.0.0.1:0",
            },
        },
    )
    data = DataDir(tmp_path / "data")
    async with services.event_store(config, data, "twin"):
        pass  # the twin service provisions the stream, the gateway waits for it
    async with (
        services.event_store(config, data, "gateway") as store,
        services.run_gateway(config, data, store) as gw,
        services.gateway_observability(config, store, gw, FAST) as server,
    ):
        assert server is not None
        base = server.url
        status, body = await fetch(base + "/healthz")
        assert status == 200, body
        before = await scrape(base)
        assert before[("twinhub_gateway_notifications_total", ())] == 0
        assert before[("twinhub_gateway_devices_online", ())] == 0
        assert before[("process_open_fds", ())] > 0

        assert gw.tcp_address is not None
        issuer = services.issuer_for(config, data)
        device = SimDevice(
            DeviceConfig(
                gateway=GatewayAddress("coap+tcp", *gw.tcp_address),
                device_id=str(uuid.uuid4()),
                token=lambda di, owner: issuer.issue("ops", now=time.time(), ttl=600),
                owner="ops",
                ping_interval=None,
            )
        )
        async with device:
            # a change is a notification once the gateway observes the resource
            got = await until_metric(
                base,
                lambda s: s.get(("twinhub_gateway_notifications_total", ()), 0) >= 1,
                "a device notification counted",
                poke=device.change,
            )
            assert got[("twinhub_gateway_devices_online", ())] == 1
            assert got[("twinhub_gateway_connections", ())] == 1
            assert got[("twinhub_gateway_connections_total", ())] == 1
            assert got[("twinhub_gateway_sign_ins_total", ())] == 1
            assert got[("twinhub_gateway_requests_total", ())] >= 2  # sign-up, sign-in

        await readyz_follows_nats(base, own_nats)
        got = await scrape(base)
        assert got[("twinhub_gateway_check_ok", (("check", "jetstream"),))] == 1


async def test_twin_endpoints(
    own_nats: NatsServer, mongo_server: HasUrl, mongo_db: AsyncDatabase[Any], tmp_path: Path
) -> None:
    config = cfgmod.load(
        env={},
        overrides={
            "nats": {"url": own_nats.url, "credentials": str(own_nats.credentials.directory)},
            "mongo": {"url": mongo_server.url, "database": mongo_db.name},
            "twin": {"metrics_listen": "127.0.0.1:0"},
        },
    )
    data = DataDir(tmp_path / "data")
    api_metrics = ApiMetrics()
    async with (
        services.event_store(config, data, "twin") as store,
        services.twin_store(config) as twins,
        services.run_projector(config, store, twins) as projector,
        services.run_api(config, data, store, twins, metrics=api_metrics),
        services.twin_observability(config, store, twins, projector, api_metrics, FAST) as server,
    ):
        assert server is not None
        base = server.url
        doc = await until_status(base + "/readyz", 200)
        assert set(doc["checks"]) == {"nats", "jetstream", "mongo", "projector"}

        event = ev.Event(
            owner="ops", device_id=str(uuid.uuid4()), data=ev.DeviceRegistered(), source="test"
        )
        result = await store.append([binding.to_nats(event)])
        got = await until_metric(
            base,
            lambda s: (
                s.get(("twinhub_twin_events_applied_total", ()), 0) >= 1
                and s.get(("twinhub_twin_log_head_position", ()), 0) >= result.last_position
                and s.get(("twinhub_twin_projector_lag", ())) == 0
            ),
            "the event projected and the lag back to 0",
        )
        assert got[("twinhub_twin_projector_position", ())] >= result.last_position
        assert got[("twinhub_twin_batches_total", ())] >= 1
        assert got[("twinhub_twin_projector_running", ())] == 1

        # a command API request without a token: counted by op and outcome
        nc = await nats.connect(**own_nats.endpoint("admin").connect_options())
        try:
            await nc.request(f"{api.API_PREFIX}.devices-list", b"{}", timeout=10)
        finally:
            await nc.close()
        labels = (("op", "devices-list"), ("outcome", "unauthorized"))
        await until_metric(
            base,
            lambda s: s.get(("twinhub_twin_api_requests_total", labels)) == 1,
            "the API request counted",
        )

        await readyz_follows_nats(base, own_nats)
